"""P-tuning v2: the same transform as prefix tuning without projection (same delta and logits
for the same init), its own config and errors, counts, shapes and training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, NotMergeableError, apply, compose, merge
from jpeft.methods.lora import LoraConfig, lora
from jpeft.methods.prefix import PrefixConfig, prefix
from jpeft.methods.ptuning2 import PTuningV2Config, ptuning2
from tests.helpers import perturb, tiny_batch, tiny_bert

ptuning2_configs = st.builds(
    PTuningV2Config,
    num_virtual_tokens=st.integers(1, 5),
    init=st.sampled_from(["normal", "zero"]),
    init_scale=st.floats(0.1, 2.0),
    layers=st.sampled_from([(), (0,), (1,), (1, 0)]),
)


def _logits(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _adapted(model, t, params, delta, batch, ctx=ApplyContext()):
    return apply(model, t, params, delta, batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"], ctx=ctx)


@settings(max_examples=5, deadline=None)
@given(cfg=ptuning2_configs, seed=st.integers(0, 2**16), model_type=st.sampled_from(["bert", "roberta"]))
def test_equals_prefix_without_projection(cfg, seed, model_type):
    """Same delta and logits as prefix(projection=False) with the same fields; not the identity."""
    model, params = tiny_bert(model_type=model_type)
    batch = tiny_batch(seed=seed)
    t = ptuning2(cfg)
    reference = prefix(PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens, projection=False,
                                    init=cfg.init, init_scale=cfg.init_scale, layers=cfg.layers))
    assert t.name == "ptuning2" and t.config == cfg and t.adds_tokens and not t.mergeable

    @jax.jit
    def run(key):
        delta = t.init(key, params, model.info())
        return (delta, _adapted(model, t, params, delta, batch),
                _adapted(model, reference, params, reference.init(key, params, model.info()), batch),
                _logits(model, params, batch))

    delta, out, want, base = run(jax.random.key(seed))
    assert set(delta) == {"prefix"}
    np.testing.assert_array_equal(out, want)
    assert float(jnp.abs(out - base).max()) > 0.0  # the prefix adds keys: not the identity


def test_counts_shapes_and_finalize_is_identity():
    model, params = tiny_bert(layers=2, hidden=16, heads=2)
    t = ptuning2(PTuningV2Config(num_virtual_tokens=5))
    delta = t.init(jax.random.key(0), params, model.info())
    assert delta["prefix"].shape == (5, 2 * 2 * 2 * 8)  # P × (layers · (k, v) · heads · head_dim)
    assert P.count_params(delta) == 5 * 2 * 2 * 16
    only = ptuning2(PTuningV2Config(num_virtual_tokens=5, layers=(1,))).init(jax.random.key(0), params,
                                                                              model.info())
    assert P.count_params(only) == 5 * 1 * 2 * 16
    np.testing.assert_array_equal(t.finalize(delta)["prefix"], delta["prefix"])
    assert set(jax.tree_util.tree_leaves(t.labels(delta))) == {"prefix"}
    with pytest.raises(NotMergeableError):
        merge(t, params, delta)


def test_bad_config_values_name_ptuning2():
    for kwargs, field in [({"num_virtual_tokens": 0}, "ptuning2.num_virtual_tokens"),
                          ({"init": "uniform"}, "ptuning2.init"),
                          ({"init_scale": -1.0}, "ptuning2.init_scale"),
                          ({"layers": (1, 1)}, "ptuning2.layers")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            PTuningV2Config(**kwargs)
    model, params = tiny_bert(layers=2)
    with pytest.raises(ValueError, match=r"ptuning2\.layers=\[2\]"):
        ptuning2(PTuningV2Config(layers=(2,))).init(jax.random.key(0), params, model.info())


def test_jit_and_no_jit_agree():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = ptuning2(PTuningV2Config(num_virtual_tokens=3))
    delta = perturb(t.init(jax.random.key(0), params, model.info()))
    f = lambda p, d: _adapted(model, t, p, d, batch)
    np.testing.assert_allclose(jax.jit(f)(params, delta), f(params, delta), atol=1e-6)


def test_compose_with_lora_and_train():
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    batch = tiny_batch()
    t = compose(ptuning2(PTuningV2Config(num_virtual_tokens=3)), lora(LoraConfig(r=2)))
    trainer = Trainer(model, t, params, total_steps=3, optim=OptimConfig(lr=1e-2, warmup_ratio=0.0))
    state = trainer.init_state(jax.random.key(0))
    before = np.array(state.trainable["delta"]["ptuning2"]["prefix"])
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not np.array_equal(before, state.trainable["delta"]["ptuning2"]["prefix"])


@pytest.mark.real
def test_minilm_count_equals_hf_peft(minilm_dir):
    """PEFT prefix tuning, 20 virtual tokens, no projection, MiniLM + 2-class head:
    20·6·2·384 + 770 = 92,930."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    trainer = Trainer(model, ptuning2(PTuningV2Config(num_virtual_tokens=20)), params)
    assert trainer.counts(trainer.init_state(jax.random.key(0))).trainable == 92_930
