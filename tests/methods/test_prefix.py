"""Prefix tuning: per-layer attention over [prefix; keys] against a hand formula, the prepend
helper (a masked-out prefix recovers the original output), PEFT's table layout, counts,
finalize (MLP dropped, same logits), errors, composition and training."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, NotMergeableError, apply, compose, merge
from jpeft.methods.lora import LoraConfig, lora
from jpeft.methods.prefix import PrefixConfig, finalize_delta, prefix, prepend, split_table
from jpeft.models.bert import BertConfig, BertModel, SelfAttention, init_params
from jpeft.models.taps import ATTN_KV, is_tap
from tests.helpers import perturb, tiny_batch, tiny_bert

prefix_configs = st.builds(
    PrefixConfig,
    num_virtual_tokens=st.integers(1, 5),
    projection=st.booleans(),
    projection_hidden=st.integers(1, 8),
    token_dim=st.one_of(st.none(), st.integers(1, 8)),
    init=st.sampled_from(["normal", "zero"]),
    init_scale=st.floats(0.1, 2.0),
    layers=st.sampled_from([(), (0,), (1,), (1, 0)]),
)
SHAPES = [(16, 2), (16, 4), (12, 3)]  # (hidden, heads)
# Eager ops compile once per new shape: cache the models, vary heads at a fixed hidden size in
# the forward-pass property, and jit each example once.
_tiny_bert = functools.lru_cache(maxsize=None)(tiny_bert)


def _logits(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _adapted(model, t, params, delta, batch, ctx=ApplyContext()):
    return apply(model, t, params, delta, batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"], ctx=ctx)


def _np(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


def _hand_table(delta):
    """The prefix table (P, F) in float64, re-implemented from the delta's leaves."""
    d = _np(delta)
    if "prefix" in d:
        return d["prefix"]
    mlp = d["mlp"]
    hidden = np.tanh(d["embedding"] @ mlp["hidden"]["kernel"] + mlp["hidden"]["bias"])
    return hidden @ mlp["out"]["kernel"] + mlp["out"]["bias"]


def _hand_prefix(table, row, heads, head_dim):
    """Layer ``row``'s key and value prefixes (P, H, Dh), split as PEFT's get_prompt does:
    view (P, 2L, H, Dh), then consecutive pairs of the 2L axis are (key, value) of one layer."""
    view = table.reshape(table.shape[0], -1, heads, head_dim)
    return view[:, 2 * row], view[:, 2 * row + 1]


def _hand_attention(h, mask, layer_params, heads, pk=None, pv=None):
    """BERT self-attention over [prefix; keys] in float64 numpy."""
    b, t, d = h.shape
    dh = d // heads
    proj = lambda n: (h @ layer_params[n]["kernel"] + layer_params[n]["bias"]).reshape(b, t, heads, dh)
    q, k, v = proj("query"), proj("key"), proj("value")
    mask = np.asarray(mask, np.float64)
    if pk is not None:
        k = np.concatenate([np.broadcast_to(pk, (b, *pk.shape)), k], axis=1)
        v = np.concatenate([np.broadcast_to(pv, (b, *pv.shape)), v], axis=1)
        mask = np.concatenate([np.ones((b, pk.shape[0])), mask], axis=1)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)


def _capture_self_attention(store):
    """An interceptor recording every SelfAttention call's inputs and output by layer."""

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, SelfAttention) and context.method_name == "__call__":
            store[context.module.layer] = (args[0], args[1], out)
        return out

    return capture


def _check_layers(model, params, t, batch, seed, heads):
    """Run ``t`` once (jitted) and compare every layer's attention with the hand formula; returns
    the adapted and the base logits."""
    cfg = t.config

    @jax.jit  # one compilation instead of one per eager op and new shape
    def run(key):
        delta = t.init(key, params, model.info())
        store: dict[int, tuple] = {}
        with nn.intercept_methods(_capture_self_attention(store)):
            out = _adapted(model, t, params, delta, batch)
        return delta, out, store, _logits(model, params, batch)

    delta, out, store, base_out = run(jax.random.key(seed))
    store = {layer: _np(values) for layer, values in store.items()}
    n_layers = model.config.num_hidden_layers
    assert sorted(store) == list(range(n_layers))
    table = _hand_table(delta)
    adapted = sorted(cfg.layers) or list(range(n_layers))
    flat = _np(params)["encoder"]
    for layer, (h, mask, got) in store.items():
        lp = flat[f"layer_{layer}"]["attention"]["self"]
        if layer in adapted:
            pk, pv = _hand_prefix(table, adapted.index(layer), heads, h.shape[-1] // heads)
            want = _hand_attention(h, mask, lp, heads, pk, pv)
        else:
            want = _hand_attention(h, mask, lp, heads)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"layer {layer}")
    return out, base_out


@settings(max_examples=6, deadline=None)
@given(cfg=prefix_configs, seed=st.integers(0, 2**16), model_type=st.sampled_from(["bert", "roberta"]),
       shape=st.sampled_from([(16, 2), (16, 4)]))
def test_every_layer_attends_over_prefix_and_keys(cfg, seed, model_type, shape):
    """Not the identity (documented): each layer computes softmax(Q[Pk;K]ᵀ/√Dh)[Pv;V] with mask
    [1;m]; layers outside ``layers`` compute the plain attention."""
    hidden, heads = shape
    model, params = _tiny_bert(model_type=model_type, hidden=hidden, heads=heads)
    t = prefix(cfg)
    assert t.adds_tokens and not t.mergeable
    out, base_out = _check_layers(model, params, t, tiny_batch(seed=seed), seed, heads)
    assert out.shape == (3, 2)
    assert float(jnp.abs(out - base_out).max()) > 0.0  # the prefix adds keys: not the identity


def test_layer_subset_maps_table_rows_in_sorted_order():
    """layers=(2, 0) on 3 layers: table row 0 is layer 0, row 1 is layer 2; layer 1 is untouched."""
    model, params = _tiny_bert(layers=3)
    t = prefix(PrefixConfig(num_virtual_tokens=2, projection=False, layers=(2, 0)))
    assert t.init(jax.random.key(0), params, model.info())["prefix"].shape == (2, 2 * 2 * 16)
    _check_layers(model, params, t, tiny_batch(), 0, heads=2)


@pytest.mark.parametrize("mask_dtype", [jnp.int32, jnp.float32, jnp.bool_])
def test_prepend_shapes_values_and_mask_dtype(mask_dtype):
    b, s, h, dh, p = 2, 5, 3, 4, 6
    keys = jax.random.split(jax.random.key(0), 4)
    key, value = (jax.random.normal(k, (b, s, h, dh)) for k in keys[:2])
    pk, pv = (jax.random.normal(k, (p, h, dh)) for k in keys[2:])
    mask = (jnp.arange(s)[None] < jnp.array([[5], [3]])).astype(mask_dtype)
    k2, v2, m2 = prepend(key, value, mask, pk, pv)
    assert k2.shape == v2.shape == (b, p + s, h, dh) and m2.shape == (b, p + s)
    assert m2.dtype == mask.dtype
    np.testing.assert_array_equal(k2[:, :p], np.broadcast_to(pk, (b, p, h, dh)))
    np.testing.assert_array_equal(v2[:, p:], value)
    np.testing.assert_array_equal(m2[:, :p], np.ones((b, p), mask.dtype))
    np.testing.assert_array_equal(m2[:, p:], mask)
    # per-example prefixes (B, P, H, Dh), the shape an adapter bank will give
    per_example = jnp.stack([pk, -pk])
    k3, _, _ = prepend(key, value, mask, per_example, jnp.stack([pv, pv]))
    np.testing.assert_array_equal(k3[1, :p], -pk)
    with pytest.raises(AssertionError):
        prepend(key, value, mask, pk[..., :2], pv[..., :2])  # head_dim mismatch


def test_masked_out_prefix_recovers_the_original_output():
    """prepend's prefix with its mask part set to zero: every layer's attention, and the logits,
    equal those of the un-adapted model."""
    model, params = tiny_bert()
    batch = tiny_batch()
    pk, pv = (5.0 * jax.random.normal(k, (4, 2, 8)) for k in jax.random.split(jax.random.key(3)))

    def masked_prefix(next_fun, args, kwargs, context):
        if not is_tap(context, ATTN_KV):
            return next_fun(*args, **kwargs)
        key, value, mask = prepend(*next_fun(*args, **kwargs), pk, pv)
        return key, value, mask.at[:, :4].set(0)

    with nn.intercept_methods(masked_prefix):
        masked = _logits(model, params, batch)
    np.testing.assert_allclose(masked, _logits(model, params, batch), rtol=0, atol=1e-6)
    # the same prefix unmasked does change the output (so the check above can fail)

    def unmasked(next_fun, args, kwargs, context):
        if not is_tap(context, ATTN_KV):
            return next_fun(*args, **kwargs)
        return prepend(*next_fun(*args, **kwargs), pk, pv)

    with nn.intercept_methods(unmasked):
        changed = _logits(model, params, batch)
    assert float(jnp.abs(changed - masked).max()) > 1e-4


def test_table_layout_is_pefts_and_split_table_inverts_it():
    table = jnp.arange(3 * 2 * 2 * 2 * 4, dtype=jnp.float32).reshape(3, -1)  # P=3, L=2, H=2, Dh=4
    per_layer = split_table(table, heads=2, head_dim=4)
    assert per_layer.shape == (2, 2, 3, 2, 4)
    for layer in range(2):
        pk, pv = _hand_prefix(np.asarray(table), layer, 2, 4)
        np.testing.assert_array_equal(per_layer[layer, 0], pk)
        np.testing.assert_array_equal(per_layer[layer, 1], pv)
    with pytest.raises(ValueError, match="not a multiple"):
        split_table(table, heads=3, head_dim=4)


def _tiny_model(layers, hidden, heads):
    """A tiny model without initialised parameters (counts need shapes only)."""
    return BertModel(BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=24,
                                max_position_embeddings=40))


def _count(cfg, layers, hidden, heads):
    """Li & Liang's parameter count for our tiny model: P·t + t·h + h + h·F + F or P·F."""
    n = len(cfg.layers) or layers
    width = n * 2 * hidden  # heads · head_dim = hidden
    if not cfg.projection:
        return cfg.num_virtual_tokens * width
    t, h = cfg.token_dim or hidden, cfg.projection_hidden
    return cfg.num_virtual_tokens * t + t * h + h + h * width + width


@settings(max_examples=10, deadline=None)
@given(cfg=prefix_configs, shape=st.sampled_from(SHAPES), layers=st.integers(2, 3))
def test_counts_and_shapes(cfg, shape, layers):
    hidden, heads = shape
    model = _tiny_model(layers, hidden, heads)
    params = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    delta = jax.eval_shape(lambda key: prefix(cfg).init(key, params, model.info()), jax.random.key(0))
    assert P.count_params(delta) == _count(cfg, layers, hidden, heads)
    n = len(cfg.layers) or layers
    if cfg.projection:
        assert delta["embedding"].shape == (cfg.num_virtual_tokens, cfg.token_dim or hidden)
        assert delta["mlp"]["out"]["kernel"].shape == (cfg.projection_hidden, n * 2 * hidden)
    else:
        assert set(delta) == {"prefix"}
    assert jax.eval_shape(finalize_delta, delta)["prefix"].shape == (cfg.num_virtual_tokens, n * 2 * hidden)


def test_init_normal_scale_and_zero():
    model, params = tiny_bert(hidden=16)
    table = prefix(PrefixConfig(num_virtual_tokens=50, projection=False, init_scale=0.5)).init(
        jax.random.key(0), params, model.info())["prefix"]
    assert 0.45 < float(table.std()) < 0.55
    zero = prefix(PrefixConfig(projection=False, init="zero")).init(jax.random.key(0), params, model.info())
    assert not np.any(np.asarray(zero["prefix"]))
    proj = prefix(PrefixConfig(init="zero", projection_hidden=8)).init(jax.random.key(0), params, model.info())
    assert not np.any(np.asarray(finalize_delta(proj)["prefix"]))
    assert np.any(np.asarray(proj["embedding"])) and np.any(np.asarray(proj["mlp"]["hidden"]["kernel"]))
    # torch.nn.Linear's default: |W1| <= 1/sqrt(token_dim)
    assert float(jnp.abs(proj["mlp"]["hidden"]["kernel"]).max()) <= 1 / 4 + 1e-7


def test_finalize_drops_the_mlp_and_keeps_the_logits():
    model, params = tiny_bert()
    batch = tiny_batch()
    cfg = PrefixConfig(num_virtual_tokens=4, projection_hidden=8)
    t = prefix(cfg)
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.3)
    kept = t.finalize(delta)
    assert set(kept) == {"prefix"} and kept["prefix"].shape == (4, 2 * 2 * 16)
    assert P.count_params(kept) < P.count_params(delta)
    full = _adapted(model, t, params, delta, batch)
    np.testing.assert_array_equal(_adapted(model, t, params, kept, batch), full)
    # the finalized delta is a plain (no-projection) delta: same code path, same logits
    plain = prefix(PrefixConfig(num_virtual_tokens=4, projection=False))
    np.testing.assert_array_equal(_adapted(model, plain, params, kept, batch), full)
    np.testing.assert_array_equal(t.finalize(kept)["prefix"], kept["prefix"])  # idempotent
    # through compose, finalize reaches the part
    both = compose(lora(LoraConfig(r=2)), t)
    composed = both.init(jax.random.key(1), params, model.info())
    assert set(both.finalize(composed)["prefix"]) == {"prefix"}


def test_not_mergeable():
    model, params = tiny_bert()
    t = prefix(PrefixConfig(num_virtual_tokens=2))
    delta = t.init(jax.random.key(0), params, model.info())
    with pytest.raises(NotMergeableError, match="prefix"):
        merge(t, params, delta)


def test_jit_and_no_jit_agree():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = prefix(PrefixConfig(num_virtual_tokens=3, projection_hidden=8))
    delta = perturb(t.init(jax.random.key(0), params, model.info()))
    f = lambda p, d: _adapted(model, t, p, d, batch)
    np.testing.assert_allclose(jax.jit(f)(params, delta), f(params, delta), atol=1e-6)


def test_bad_config_values():
    for kwargs, field in [({"num_virtual_tokens": 0}, "prefix.num_virtual_tokens"),
                          ({"projection_hidden": 0}, "prefix.projection_hidden"),
                          ({"token_dim": 0}, "prefix.token_dim"),
                          ({"init": "xavier"}, "prefix.init"),
                          ({"init_scale": 0.0}, "prefix.init_scale"),
                          ({"layers": (0, 0)}, "prefix.layers"),
                          ({"layers": (-1,)}, "prefix.layers")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            PrefixConfig(**kwargs)


def test_layers_out_of_range_and_foreign_delta_raise():
    model, params = tiny_bert(layers=2)
    with pytest.raises(ValueError, match=r"prefix\.layers=\[5\].*layers 0\.\.1"):
        prefix(PrefixConfig(layers=(5,))).init(jax.random.key(0), params, model.info())
    # a delta made for a model with another head layout is refused with a clear message
    t = prefix(PrefixConfig(num_virtual_tokens=2, projection=False))
    foreign = t.init(jax.random.key(0), params, _tiny_model(2, 12, 3).info())  # 3 heads of 4
    with pytest.raises(ValueError, match="another model"):
        _adapted(model, t, params, foreign, tiny_batch())
    with pytest.raises(KeyError, match="'prefix' or 'embedding'"):
        _adapted(model, t, params, {"table": foreign["prefix"]}, tiny_batch())


def test_labels_are_prefix_and_group_lr_reaches_them():
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    batch = tiny_batch()
    t = prefix(PrefixConfig(num_virtual_tokens=2, projection_hidden=4))
    delta = t.init(jax.random.key(0), params, model.info())
    assert set(jax.tree_util.tree_leaves(t.labels(delta))) == {"prefix"}
    assert set(jax.tree_util.tree_leaves(t.labels(t.finalize(delta)))) == {"prefix"}
    frozen = Trainer(model, t, params, total_steps=3,
                     optim=OptimConfig(lr=1e-2, warmup_ratio=0.0, group_lr={"prefix": 0.0}))
    state = frozen.init_state(jax.random.key(0))
    before = jax.tree_util.tree_map(np.array, state.trainable)
    state, _ = frozen.train_step(state, frozen.frozen, batch)
    for a, b in zip(jax.tree_util.tree_leaves(before["delta"]), jax.tree_util.tree_leaves(state.trainable["delta"])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before["base"]),
                                                        jax.tree_util.tree_leaves(state.trainable["base"])))


@pytest.mark.parametrize("projection", [True, False])
def test_compose_with_lora_and_train(projection):
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    batch = tiny_batch()
    t = compose(prefix(PrefixConfig(num_virtual_tokens=3, projection=projection, projection_hidden=8)),
                lora(LoraConfig(r=2)))
    assert t.adds_tokens and not t.mergeable
    trainer = Trainer(model, t, params, total_steps=3, optim=OptimConfig(lr=1e-2, warmup_ratio=0.0))
    state = trainer.init_state(jax.random.key(0))
    before = jax.tree_util.tree_map(np.array, state.trainable["delta"]["prefix"])
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    after = state.trainable["delta"]["prefix"]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                        jax.tree_util.tree_leaves(after)))


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_logits_equal_hf_peft_prefix_tuning(model_type):
    """Same weights in PEFT's PrefixEncoder -> same logits, so PEFT's table layout is ours.

    PEFT also shifts the real tokens' position ids by P (the past_key_values convention of
    Hugging Face models); jpeft's prefix leaves positions alone, so PEFT gets ``position_ids - P``
    here to cancel its shift.
    """
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from jpeft.models.bert import state_dict_from_params

    model, params = tiny_bert(model_type=model_type)
    c = model.config
    hf_config = (transformers.BertConfig if model_type == "bert" else transformers.RobertaConfig)(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        pad_token_id=c.pad_token_id, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    hf_cls = (transformers.BertForSequenceClassification if model_type == "bert"
              else transformers.RobertaForSequenceClassification)
    state_dict = {k: torch.tensor(v) for k, v in state_dict_from_params(jax.device_get(params), c).items()}
    batch = tiny_batch()
    ids, mask, types = (torch.tensor(np.asarray(batch[k])).long()
                        for k in ("input_ids", "attention_mask", "token_type_ids"))
    positions = (torch.arange(ids.shape[1])[None].expand_as(ids) if model_type == "bert"
                 else torch.cumsum(mask, 1) * mask + c.pad_token_id)
    n_tok = 3
    for projection in (False, True):
        t = prefix(PrefixConfig(num_virtual_tokens=n_tok, projection=projection, projection_hidden=8))
        delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.3)
        ours = np.asarray(_adapted(model, t, params, delta, batch))
        hf = hf_cls(hf_config)
        hf.load_state_dict(state_dict)
        pm = peft.get_peft_model(hf, peft.PrefixTuningConfig(
            task_type="SEQ_CLS", num_virtual_tokens=n_tok, prefix_projection=projection,
            encoder_hidden_size=8 if projection else None))
        encoder = pm.prompt_encoder["default"]
        d = jax.tree_util.tree_map(lambda x: torch.tensor(np.asarray(x)), delta)
        with torch.no_grad():
            if projection:
                encoder.embedding.weight.copy_(d["embedding"])
                encoder.transform[0].weight.copy_(d["mlp"]["hidden"]["kernel"].T)
                encoder.transform[0].bias.copy_(d["mlp"]["hidden"]["bias"])
                encoder.transform[2].weight.copy_(d["mlp"]["out"]["kernel"].T)
                encoder.transform[2].bias.copy_(d["mlp"]["out"]["bias"])
            else:
                encoder.embedding.weight.copy_(d["prefix"])
            pm.eval()
            theirs = pm(input_ids=ids, attention_mask=mask, token_type_ids=types,
                        position_ids=positions - n_tok).logits.numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6, err_msg=f"projection={projection}")
        assert np.abs(ours - np.asarray(_logits(model, params, batch))).max() > 1e-5


@pytest.mark.real
def test_minilm_counts_equal_hf_peft(minilm_dir):
    """PEFT prefix tuning on MiniLM with a 2-class head, 20 virtual tokens: no projection
    20·6·2·384 + 770 = 92,930; projection (encoder_hidden_size 512) 2,569,474."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    plain = Trainer(model, prefix(PrefixConfig(num_virtual_tokens=20, projection=False)), params)
    assert plain.counts(plain.init_state(jax.random.key(0))).trainable == 92_930
    projected = Trainer(model, prefix(PrefixConfig(num_virtual_tokens=20, projection=True,
                                                   projection_hidden=512)), params)
    counts = projected.counts(projected.init_state(jax.random.key(0)))
    assert counts.trainable == 20 * 384 + 384 * 512 + 512 + 512 * 4608 + 4608 + 770 == 2_569_474


def test_peft_positions_number_the_inputs_from_p():
    """peft_positions=True on BERT equals positions from 0 on a position table shifted by P,
    and inputs that would run past max_position_embeddings are refused."""
    model, params = tiny_bert()  # max_position_embeddings=40
    batch = tiny_batch()
    p = 3
    plain = prefix(PrefixConfig(num_virtual_tokens=p, projection=False))
    shifted = prefix(PrefixConfig(num_virtual_tokens=p, projection=False, peft_positions=True))
    delta = perturb(plain.init(jax.random.key(0), params, model.info()), scale=0.3)
    flat = P.flatten(params)
    key = "embeddings/position_embeddings/embedding"
    flat[key] = jnp.roll(flat[key], -p, axis=0)
    rolled = P.unflatten(flat)

    def logits(t, ps, b):
        return _adapted(model, t, ps, delta, b)

    np.testing.assert_allclose(logits(shifted, params, batch), logits(plain, rolled, batch), rtol=0, atol=1e-6)
    assert float(jnp.abs(logits(shifted, params, batch) - logits(plain, params, batch)).max()) > 1e-4
    with pytest.raises(ValueError, match="max_position_embeddings"):
        logits(shifted, params, tiny_batch(length=40 - p + 1))
