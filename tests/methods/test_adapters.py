"""Bottleneck adapters (Houlsby, Pfeiffer): identity at init, hand-formula numerics at the taps,
counts, placement, errors, composition and training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, NotMergeableError, apply, compose, merge
from jpeft.methods.adapters import AdapterConfig, houlsby, pfeiffer
from jpeft.methods.lora import LoraConfig, lora
from jpeft.models.taps import ATTN_OUT, FFN_OUT, Tap
from tests.helpers import perturb, tiny_batch, tiny_bert

adapter_configs = st.builds(
    AdapterConfig,
    size=st.integers(1, 8),
    activation=st.sampled_from(["relu", "gelu", "tanh", "swish"]),
    init_scale=st.floats(1e-3, 1.0),
    layers=st.sampled_from([(), (0,), (1,), (0, 1)]),
)
FACTORIES = {"houlsby": houlsby, "pfeiffer": pfeiffer}


def _logits(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _adapted(model, t, params, delta, batch, ctx=ApplyContext()):
    return apply(model, t, params, delta, batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"], ctx=ctx)


def _per_adapter(d, m):
    return 2 * d * m + d + m


@settings(max_examples=10, deadline=None)
@given(cfg=adapter_configs, seed=st.integers(0, 2**16), model_type=st.sampled_from(["bert", "roberta"]),
       kind=st.sampled_from(sorted(FACTORIES)))
def test_fresh_delta_changes_nothing(cfg, seed, model_type, kind):
    model, params = tiny_bert(model_type=model_type, seed=seed % 7)
    batch = tiny_batch(seed=seed)
    t = FACTORIES[kind](cfg)
    delta = t.init(jax.random.key(seed), params, model.info())
    # the down projection is random, so the identity comes from up = 0, not from a zero delta
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree_util.tree_leaves(delta))
    np.testing.assert_array_equal(_adapted(model, t, params, delta, batch), _logits(model, params, batch))


def _record_taps(model, t, params, delta, batch):
    """{(kind, layer): (tap input, adapted output)} from an outer interceptor around ``apply``."""
    seen = {}

    def recorder(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, Tap) and context.module.kind in (ATTN_OUT, FFN_OUT):
            seen[(context.module.kind, context.module.layer)] = (args[0], out)
        return out

    with nn.intercept_methods(recorder):  # installed first: outermost, sees the adapter's result
        logits = _adapted(model, t, params, delta, batch)
    return seen, logits


@pytest.mark.parametrize("activation,fn", [
    ("relu", lambda z: np.maximum(z, 0.0)),
    ("tanh", np.tanh),
    ("swish", lambda z: z / (1.0 + np.exp(-z))),
])
def test_numerics_against_hand_formula(activation, fn):
    model, params = tiny_bert(layers=2, hidden=16)
    batch = tiny_batch()
    t = houlsby(AdapterConfig(size=3, activation=activation))
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.5)
    seen, _ = _record_taps(model, t, params, delta, batch)
    assert set(seen) == {(k, i) for k in (ATTN_OUT, FFN_OUT) for i in (0, 1)}
    for (kind, layer), (h, out) in seen.items():
        a = delta[f"layer_{layer}"][kind.replace(".", "_")]
        h = np.asarray(h, np.float64)
        z = fn(h @ np.asarray(a["down"]["kernel"]) + np.asarray(a["down"]["bias"]))
        expected = h + z @ np.asarray(a["up"]["kernel"]) + np.asarray(a["up"]["bias"])
        assert float(np.abs(expected - h).max()) > 1e-2  # the adapter does something
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=f"{kind} {layer}")


def test_pfeiffer_adapts_only_the_ffn_output_and_layers_restrict():
    model, params = tiny_bert(layers=2)
    batch = tiny_batch()
    t = pfeiffer(AdapterConfig(size=4, layers=(1,)))
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.5)
    assert list(delta) == ["layer_1"] and list(delta["layer_1"]) == ["ffn_out"]
    seen, logits = _record_taps(model, t, params, delta, batch)
    for key, (h, out) in seen.items():
        if key == (FFN_OUT, 1):
            assert float(jnp.abs(out - h).max()) > 1e-2
        else:
            np.testing.assert_array_equal(out, h, err_msg=str(key))
    assert float(jnp.abs(logits - _logits(model, params, batch)).max()) > 1e-4


def test_shapes_and_counts_match_the_formula():
    for layers, hidden, m in [(2, 16, 4), (3, 8, 1), (1, 16, 7)]:
        model, params = tiny_bert(layers=layers, hidden=hidden)
        info = model.info()
        h = houlsby(AdapterConfig(size=m)).init(jax.random.key(0), params, info)
        p = pfeiffer(AdapterConfig(size=m)).init(jax.random.key(0), params, info)
        assert P.count_params(h) == 2 * layers * _per_adapter(hidden, m)
        assert P.count_params(p) == layers * _per_adapter(hidden, m)
    a = h["layer_0"]["attn_out"]
    assert a["down"]["kernel"].shape == (16, 7) and a["down"]["bias"].shape == (7,)
    assert a["up"]["kernel"].shape == (7, 16) and a["up"]["bias"].shape == (16,)
    assert not np.any(np.asarray(a["up"]["kernel"])) and not np.any(np.asarray(a["up"]["bias"]))
    assert not np.any(np.asarray(a["down"]["bias"]))
    only = houlsby(AdapterConfig(size=2, layers=(0,))).init(jax.random.key(0), params, info)
    assert list(only) == ["layer_0"]


def test_init_scale_sets_the_down_std():
    model, params = tiny_bert(hidden=32)
    delta = houlsby(AdapterConfig(size=32, init_scale=0.05)).init(jax.random.key(0), params, model.info())
    down = np.concatenate([np.ravel(v["down"]["kernel"]) for layer in delta.values() for v in layer.values()])
    assert 0.04 < down.std() < 0.06
    # every adapter gets its own random down projection
    assert not np.array_equal(delta["layer_0"]["attn_out"]["down"]["kernel"],
                              delta["layer_0"]["ffn_out"]["down"]["kernel"])


def test_names_labels_and_not_mergeable():
    model, params = tiny_bert()
    assert houlsby().name == "houlsby" and pfeiffer().name == "pfeiffer"
    assert houlsby().config.placement == (ATTN_OUT, FFN_OUT)
    assert pfeiffer().config.placement == (FFN_OUT,)
    t = houlsby(AdapterConfig(size=2))
    delta = t.init(jax.random.key(0), params, model.info())
    labels = t.labels(delta)
    assert labels["layer_0"]["ffn_out"]["up"] == {"kernel": "default", "bias": "no_decay"}
    assert not t.mergeable
    with pytest.raises(NotMergeableError, match="houlsby"):
        merge(t, params, delta)


def test_placement_override_and_layer_norm_option():
    model, params = tiny_bert(layers=2)
    t = houlsby(AdapterConfig(size=2, placement=(FFN_OUT,)))
    assert list(t.init(jax.random.key(0), params, model.info())["layer_0"]) == ["ffn_out"]
    assert houlsby().trainable_base(params) == []
    norms = houlsby(AdapterConfig(train_layer_norm=True, layers=(1,))).trainable_base(params)
    assert sorted(norms) == sorted(
        f"encoder/layer_1/{m}/LayerNorm/{leaf}" for m in ("attention/output", "output")
        for leaf in ("scale", "bias"))


def test_bad_config_values():
    with pytest.raises(ValueError, match="adapter.size"):
        AdapterConfig(size=0)
    with pytest.raises(ValueError, match="adapter.activation"):
        AdapterConfig(activation="sigmoid")
    with pytest.raises(ValueError, match="adapter.init_scale"):
        AdapterConfig(init_scale=0.0)
    with pytest.raises(ValueError, match="adapter.layers"):
        AdapterConfig(layers=(1, 1))
    with pytest.raises(ValueError, match="adapter.placement"):
        AdapterConfig(placement=("attn.kv",))
    model, params = tiny_bert(layers=2)
    with pytest.raises(ValueError, match=r"adapter.layers=\[5\].*0\.\.1"):
        houlsby(AdapterConfig(layers=(5,))).init(jax.random.key(0), params, model.info())


def test_jit_and_no_jit_agree():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = houlsby(AdapterConfig(size=4, activation="gelu"))
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.3)
    f = lambda p, d: _adapted(model, t, p, d, batch)
    eager = f(params, delta)
    assert float(jnp.abs(eager - _logits(model, params, batch)).max()) > 1e-4
    np.testing.assert_allclose(jax.jit(f)(params, delta), eager, atol=1e-6)


def test_houlsby_and_pfeiffer_on_the_same_tap_run_in_sequence():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = compose(houlsby(AdapterConfig(size=2)), pfeiffer(AdapterConfig(size=3, activation="tanh")))
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.5)
    seen, _ = _record_taps(model, t, params, delta, batch)
    h, out = seen[(FFN_OUT, 0)]
    from jpeft.methods.adapters import adapter_forward
    expected = adapter_forward(adapter_forward(h, delta["houlsby"]["layer_0"]["ffn_out"], "relu"),
                               delta["pfeiffer"]["layer_0"]["ffn_out"], "tanh")
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_compose_with_lora_and_train(kind):
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    batch = tiny_batch()
    t = compose(FACTORIES[kind](AdapterConfig(size=4)), lora(LoraConfig(r=2)))
    trainer = Trainer(model, t, params, total_steps=3)
    state = trainer.init_state(jax.random.key(0))
    delta0 = jax.tree_util.tree_map(np.asarray, state.trainable["delta"])
    # jitted vs eager reference: equal up to XLA fusion rounding
    np.testing.assert_allclose(trainer.eval_step(state, trainer.frozen, batch),
                               _logits(model, params, batch), rtol=1e-5, atol=1e-7)
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] <= losses[0]
    up0 = delta0[kind]["layer_0"]["ffn_out"]["up"]["kernel"]
    up3 = np.asarray(state.trainable["delta"][kind]["layer_0"]["ffn_out"]["up"]["kernel"])
    assert not np.array_equal(up0, up3)


@pytest.mark.real
@pytest.mark.parametrize("kind,adapters", [("houlsby", 12), ("pfeiffer", 6)])
def test_minilm_counts(minilm_dir, kind, adapters):
    """MiniLM (d=384, 6 layers), m=64, 2-class head (770): houlsby 595,970, pfeiffer 298,370."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    trainer = Trainer(model, FACTORIES[kind](AdapterConfig(size=64)), params)
    counts = trainer.counts(trainer.init_state(jax.random.key(0)))
    assert counts.trainable == adapters * (2 * 384 * 64 + 384 + 64) + 770
    assert counts.trainable == {"houlsby": 595_970, "pfeiffer": 298_370}[kind]


def test_a_delta_that_does_not_fit_is_refused():
    """Another method's delta used to run as no adapter at all; a bias of the wrong size
    broadcast silently; a fractional size reached jnp as a shape."""
    model, params = tiny_bert()
    batch = tiny_batch()
    run = lambda t, d: apply(model, t, params, d, batch["input_ids"], batch["attention_mask"],
                             batch["token_type_ids"])
    t = houlsby(AdapterConfig(size=4))
    with pytest.raises(KeyError, match="an adapter delta is"):
        run(t, lora(LoraConfig(r=2)).init(jax.random.key(0), params, model.info()))
    with pytest.raises(KeyError, match="an adapter delta is"):  # Houlsby's attn_out under Pfeiffer
        run(pfeiffer(AdapterConfig(size=4)), t.init(jax.random.key(0), params, model.info()))
    delta = P.flatten(t.init(jax.random.key(0), params, model.info()))
    key = next(k for k in sorted(delta) if k.endswith("down/bias"))
    delta[key] = delta[key][:1]
    with pytest.raises(ValueError, match="bottleneck shapes"):
        run(t, P.unflatten(delta))
    with pytest.raises(ValueError, match="adapter.size must be an integer"):
        AdapterConfig(size=2.5)
