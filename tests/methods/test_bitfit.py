"""BitFit: identity at init, bias-only numerics, exact gradients, merge/unmerge, counts, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, apply, compose, merge, module_path, unmerge
from jpeft.methods.bitfit import BitFitConfig, bias_paths, bitfit, is_layernorm
from jpeft.methods.ia3 import ia3
from jpeft.methods.lora import LoraConfig, lora
from tests.helpers import perturb, tiny_batch, tiny_bert

PATTERNS = ["", "attention", "layer_0/", "(query|intermediate)", "LayerNorm"]

bitfit_configs = st.builds(
    BitFitConfig, include_layernorm=st.booleans(), pattern=st.sampled_from(PATTERNS)
).filter(lambda c: c.include_layernorm or c.pattern != "LayerNorm")


def _logits(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _adapted(model, t, params, delta, batch, ctx=ApplyContext()):
    return apply(model, t, params, delta, batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"], ctx=ctx)


def _plain_biases(params, delta):
    """Re-implementation with plain jnp: every delta leaf added to the bias at the same path."""
    flat = dict(P.flatten(params))
    for path, d in P.flatten(delta).items():
        flat[path] = flat[path] + d
    return P.unflatten(flat)


@settings(max_examples=10, deadline=None)
@given(cfg=bitfit_configs, seed=st.integers(0, 2**16), model_type=st.sampled_from(["bert", "roberta"]),
       layers=st.integers(1, 3))
def test_fresh_delta_changes_nothing(cfg, seed, model_type, layers):
    model, params = tiny_bert(model_type=model_type, seed=seed % 7, layers=layers)
    batch = tiny_batch(seed=seed)
    t = bitfit(cfg)
    delta = t.init(jax.random.key(seed), params, model.info())
    assert P.count_params(delta) > 0
    expected = _logits(model, params, batch)
    np.testing.assert_array_equal(_adapted(model, t, params, delta, batch), expected)
    train = ApplyContext(train=True, rng=jax.random.key(seed))
    np.testing.assert_array_equal(_adapted(model, t, params, delta, batch, train), expected)


def test_numerics_against_plain_bias_update():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = bitfit()
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.5)
    adapted = _adapted(model, t, params, delta, batch)
    np.testing.assert_allclose(adapted, _logits(model, _plain_biases(params, delta), batch),
                               atol=1e-6, rtol=1e-6)
    assert float(jnp.abs(adapted - _logits(model, params, batch)).max()) > 1e-3

    # One Dense seen from outside: y = x W + (b + δ_b).
    path = "encoder/layer_1/intermediate/dense"
    seen = {}

    def recorder(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dense) and module_path(context) == path:
            seen["io"] = (args[0], out)
        return out

    with nn.intercept_methods(recorder):
        _adapted(model, t, params, delta, batch)
    x, y = seen["io"]
    fp, fd = P.flatten(params), P.flatten(delta)
    expected = x @ fp[f"{path}/kernel"] + fp[f"{path}/bias"] + fd[f"{path}/bias"]
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def test_gradient_wrt_delta_equals_gradient_wrt_biases():
    model, params = tiny_bert(seed=3)
    batch = tiny_batch(seed=3)
    t = bitfit()
    delta = t.init(jax.random.key(0), params, model.info())

    def loss_delta(d):
        return jnp.sum(_adapted(model, t, params, d, batch) ** 2)

    def loss_params(p):
        return jnp.sum(_logits(model, p, batch) ** 2)

    g_delta = P.flatten(jax.grad(loss_delta)(delta))
    g_params = P.flatten(jax.grad(loss_params)(params))
    assert set(g_delta) == set(bias_paths(BitFitConfig(), params, model.info()))
    for path, g in g_delta.items():
        np.testing.assert_allclose(g, g_params[path], rtol=1e-6, atol=1e-9, err_msg=path)
    assert any(float(jnp.abs(g).max()) > 1e-4 for g in g_delta.values())


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("layers", [1, 3])
def test_counts_equal_the_bias_formula(model_type, layers):
    d, inter = 16, 24  # tiny_bert's hidden and intermediate sizes
    model, params = tiny_bert(model_type=model_type, layers=layers, hidden=d)
    info = model.info()
    delta = bitfit().init(jax.random.key(0), params, info)
    from_tree = sum(v.size for p, v in P.flatten(params).items()
                    if p.endswith("/bias") and not p.startswith("head/"))
    pooler = d if model_type == "bert" else 0
    formula = layers * (4 * d + inter + d + 2 * d) + d + pooler
    assert P.count_params(delta) == from_tree == formula
    assert all(p.endswith("/bias") and not p.startswith("head/") for p in P.flatten(delta))
    # without LayerNorm biases: 2 per layer and the embeddings' one go
    no_ln = bitfit(BitFitConfig(include_layernorm=False)).init(jax.random.key(0), params, info)
    assert P.count_params(no_ln) == formula - (2 * layers + 1) * d
    assert not any(is_layernorm(p) for p in P.flatten(no_ln))
    # pattern narrows
    only_q = bitfit(BitFitConfig(pattern="query")).init(jax.random.key(0), params, info)
    assert P.count_params(only_q) == layers * d


def test_delta_is_float32_and_zero():
    model, params = tiny_bert()
    delta = bitfit().init(jax.random.key(0), params, model.info())
    for leaf in jax.tree_util.tree_leaves(delta):
        assert leaf.dtype == jnp.float32 and not np.any(np.asarray(leaf))


@settings(max_examples=8, deadline=None)
@given(cfg=bitfit_configs, seed=st.integers(0, 2**16))
def test_merge_unmerge(cfg, seed):
    model, params = tiny_bert(seed=seed % 5)
    batch = tiny_batch(seed=seed)
    t = bitfit(cfg)
    delta = perturb(t.init(jax.random.key(seed), params, model.info()), seed=seed, scale=0.3)
    merged = merge(t, params, delta)
    flat_base, flat_merged = P.flatten(params), P.flatten(merged)
    changed = {p for p in flat_base if not np.array_equal(flat_base[p], flat_merged[p])}
    assert changed == set(P.flatten(delta))
    for path, leaf in P.flatten(unmerge(t, merged, delta)).items():
        scale = float(jnp.abs(flat_base[path]).max() + jnp.abs(flat_merged[path]).max())
        np.testing.assert_allclose(leaf, flat_base[path], rtol=0,
                                   atol=2 * np.finfo(np.float32).eps * max(scale, 1.0), err_msg=path)
    np.testing.assert_allclose(_adapted(model, t, params, delta, batch), _logits(model, merged, batch),
                               atol=2e-5, rtol=1e-5)


def test_jit_and_no_jit_agree():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = bitfit()
    delta = perturb(t.init(jax.random.key(0), params, model.info()))
    f = lambda p, d: _adapted(model, t, p, d, batch)
    np.testing.assert_allclose(jax.jit(f)(params, delta), f(params, delta), atol=1e-6)


def test_labels_are_no_decay():
    model, params = tiny_bert()
    t = bitfit()
    labels = jax.tree_util.tree_leaves(t.labels(t.init(jax.random.key(0), params, model.info())))
    assert labels and set(labels) == {"no_decay"}


def test_bad_config_and_patterns_raise_clearly():
    with pytest.raises(ValueError, match="bitfit.pattern"):
        BitFitConfig(pattern="(unclosed")
    model, params = tiny_bert()
    with pytest.raises(P.NoMatchError) as err:
        bitfit(BitFitConfig(pattern="qkv_proj")).init(jax.random.key(0), params, model.info())
    assert "bitfit.pattern" in str(err.value) and "attention/self/query/bias" in str(err.value)
    # the head is never a candidate: a pattern for it alone matches nothing
    with pytest.raises(P.NoMatchError, match="bitfit.pattern"):
        bitfit(BitFitConfig(pattern="^head/")).init(jax.random.key(0), params, model.info())
    # only LayerNorm biases requested while LayerNorms are excluded
    with pytest.raises(P.NoMatchError):
        bitfit(BitFitConfig(pattern="LayerNorm", include_layernorm=False)).init(
            jax.random.key(0), params, model.info())


def test_a_delta_for_another_model_is_refused():
    model, params = tiny_bert(hidden=16)
    _, other = tiny_bert(hidden=8, heads=2)
    t = bitfit()
    delta = t.init(jax.random.key(0), other, model.info())
    with pytest.raises(ValueError, match="another model"):
        _adapted(model, t, params, delta, tiny_batch())


def test_stacking_with_ia3_merges_in_either_order():
    """apply rewrites the biases before ia3 scales the Dense: (xW + b + δ)·l, whatever the order
    of the composition; merge folds parameter rewrites first, so both orders merge exactly."""
    model, params = tiny_bert()
    batch = tiny_batch()
    t = compose(bitfit(), ia3())
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.3)
    adapted = _adapted(model, t, params, delta, batch)
    key = "encoder/layer_0/attention/self/key/bias"  # an ia3 output target: (b + δ)·l != b·l + δ
    l = P.flatten(delta["ia3"])["encoder/layer_0/attention/self/key/ia3_l"]
    expected_bias = (P.flatten(params)[key] + P.flatten(delta["bitfit"])[key]) * l
    for order in (t, compose(ia3(), bitfit())):
        merged = merge(order, params, delta)
        np.testing.assert_allclose(_adapted(model, order, params, delta, batch), adapted, atol=1e-6)
        np.testing.assert_allclose(_logits(model, merged, batch), adapted, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(P.flatten(merged)[key], expected_bias, atol=1e-6)
        for path, leaf in P.flatten(unmerge(order, merged, delta)).items():
            np.testing.assert_allclose(leaf, P.flatten(params)[path], atol=1e-5, err_msg=path)


def test_compose_with_lora_and_train():
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    batch = tiny_batch()
    trainer = Trainer(model, compose(bitfit(), lora(LoraConfig(r=2))), params, total_steps=3)
    state = trainer.init_state(jax.random.key(0))
    delta0 = jax.tree_util.tree_map(np.asarray, state.trainable["delta"])
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] <= losses[0]
    b0 = delta0["bitfit"]["encoder"]["layer_0"]["intermediate"]["dense"]["bias"]
    b3 = np.asarray(state.trainable["delta"]["bitfit"]["encoder"]["layer_0"]["intermediate"]["dense"]["bias"])
    assert not np.any(b0) and np.any(b3)
    # the biases are trained through the delta, not as base leaves
    assert all(p.startswith("head/") for p in P.paths(state.trainable["base"]))


@pytest.mark.real
def test_minilm_count(minilm_dir):
    """All 26,112 biases of MiniLM (pooler included) + the 770 of the 2-class head."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    trainer = Trainer(model, bitfit(), params)
    counts = trainer.counts(trainer.init_state(jax.random.key(0)))
    from_tree = sum(int(v.size) for p, v in P.flatten(params).items()
                    if p.endswith("/bias") and not p.startswith("head/"))
    per_layer = 4 * 384 + 1536 + 384 + 2 * 384
    assert from_tree == 6 * per_layer + 384 + 384 == 26_112
    assert counts.trainable == from_tree + 770 == 26_882
