"""LoRA: laws (fresh delta = identity, merge/unmerge, factored = merged), counts, numerics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, apply, merge, unmerge
from jpeft.methods.lora import LoraConfig, lora, rank_and_scale
from tests.helpers import perturb, tiny_batch, tiny_bert

TARGETS = ["(query|value)$", "(query|key|value)$", "dense$", "intermediate/dense$", "attention/output/dense$"]

lora_configs = st.builds(
    LoraConfig,
    r=st.integers(1, 6),
    alpha=st.floats(0.5, 32.0),
    targets=st.sampled_from(TARGETS),
    use_rslora=st.booleans(),
    init=st.sampled_from(["kaiming", "gaussian"]),
)


def _logits(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _adapted(model, t, params, delta, batch, ctx=ApplyContext()):
    return apply(model, t, params, delta, batch["input_ids"], batch["attention_mask"],
                 batch["token_type_ids"], ctx=ctx)


@settings(max_examples=8, deadline=None)
@given(cfg=lora_configs, seed=st.integers(0, 2**16), model_type=st.sampled_from(["bert", "roberta"]))
def test_fresh_delta_changes_nothing(cfg, seed, model_type):
    model, params = tiny_bert(model_type=model_type, seed=seed % 7)
    batch = tiny_batch(seed=seed)
    t = lora(cfg)
    delta = t.init(jax.random.key(seed), params, model.info())
    np.testing.assert_array_equal(_adapted(model, t, params, delta, batch), _logits(model, params, batch))


@settings(max_examples=8, deadline=None)
@given(cfg=lora_configs, seed=st.integers(0, 2**16))
def test_merge_unmerge_and_factored_equals_merged(cfg, seed):
    model, params = tiny_bert(seed=seed % 5)
    batch = tiny_batch(seed=seed)
    t = lora(cfg)
    delta = perturb(t.init(jax.random.key(seed), params, model.info()), seed=seed, scale=0.3)
    merged = merge(t, params, delta)
    flat_base, flat_merged = P.flatten(params), P.flatten(merged)
    changed = [p for p in flat_base if not np.array_equal(flat_base[p], flat_merged[p])]
    assert changed and all(p.endswith("/kernel") for p in changed)
    # unmerge(merge(base, δ), δ) == base within float32 rounding of |W| + |s·AB|
    for path, leaf in P.flatten(unmerge(t, merged, delta)).items():
        scale = float(jnp.abs(flat_base[path]).max() + jnp.abs(flat_merged[path]).max())
        np.testing.assert_allclose(leaf, flat_base[path], rtol=0,
                                   atol=4 * np.finfo(np.float32).eps * max(scale, 1.0), err_msg=path)
    factored = _adapted(model, t, params, delta, batch)
    np.testing.assert_allclose(factored, _logits(model, merged, batch), atol=2e-5, rtol=1e-5)


def test_numerics_against_hand_formula():
    model, params = tiny_bert()
    cfg = LoraConfig(r=3, alpha=6.0, targets="layer_0/attention/self/query$")
    t = lora(cfg)
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.5)
    path = "encoder/layer_0/attention/self/query"
    a = P.flatten(delta)[f"{path}/lora_A"]
    b = P.flatten(delta)[f"{path}/lora_B"]
    w = P.flatten(params)[f"{path}/kernel"]
    merged = P.flatten(merge(t, params, delta))[f"{path}/kernel"]
    np.testing.assert_allclose(merged, w + (6.0 / 3) * a @ b, rtol=1e-6, atol=1e-6)
    assert rank_and_scale(LoraConfig(r=4, alpha=8.0, use_rslora=True), path) == (4, 8.0 / math.sqrt(4))


def test_shapes_counts_and_patterns():
    model, params = tiny_bert(layers=2, hidden=16)
    cfg = LoraConfig(r=4, targets="(query|value)$", rank_pattern={"layer_1/.*value": 2},
                     alpha_pattern={"layer_1": 1.0})
    delta = lora(cfg).init(jax.random.key(0), params, model.info())
    flat = P.flatten(delta)
    assert flat["encoder/layer_0/attention/self/query/lora_A"].shape == (16, 4)
    assert flat["encoder/layer_0/attention/self/query/lora_B"].shape == (4, 16)
    assert flat["encoder/layer_1/attention/self/value/lora_A"].shape == (16, 2)
    assert not np.any(np.asarray(flat["encoder/layer_0/attention/self/query/lora_B"]))
    assert P.count_params(delta) == 3 * 2 * 16 * 4 + 2 * 16 * 2
    only_l1 = lora(LoraConfig(targets="query$", layers=(1,))).init(jax.random.key(0), params, model.info())
    assert list(P.flatten(only_l1)) == ["encoder/layer_1/attention/self/query/lora_A",
                                        "encoder/layer_1/attention/self/query/lora_B"]


def test_kaiming_init_bound_and_gaussian_std():
    model, params = tiny_bert(hidden=16)
    a = P.flatten(lora(LoraConfig(r=8)).init(jax.random.key(0), params, model.info()))
    first = np.asarray(next(v for k, v in a.items() if k.endswith("lora_A")))
    assert np.abs(first).max() <= 1 / math.sqrt(16) + 1e-7
    g = P.flatten(lora(LoraConfig(r=8, init="gaussian")).init(jax.random.key(0), params, model.info()))
    first = np.asarray(next(v for k, v in g.items() if k.endswith("lora_A")))
    assert 0.05 < first.std() < 0.25  # std 1/r = 0.125


def test_bad_target_pattern_lists_paths():
    model, params = tiny_bert()
    with pytest.raises(ValueError) as err:
        lora(LoraConfig(targets="qkv_proj$")).init(jax.random.key(0), params, model.info())
    assert "lora.targets" in str(err.value) and "attention/self/query" in str(err.value)


def test_bad_config_values():
    with pytest.raises(ValueError, match="lora.r"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="lora.bias"):
        LoraConfig(bias="some")


@pytest.mark.parametrize("field, value, needle", [
    ("r", 2.5, "lora.r must be an integer"),  # was silently int(2.5) = 2 with scale alpha / 2.5
    ("alpha", 0.0, "lora.alpha"),
    ("alpha", float("nan"), "lora.alpha"),
    ("targets", "(query", "lora.targets: '\\(query' is not a valid regex"),
    ("rank_pattern", {"query": 0}, "lora.rank_pattern ranks"),  # was a ZeroDivisionError in init
    ("rank_pattern", {"(q": 2}, "lora.rank_pattern"),
    ("alpha_pattern", {"query": -1.0}, "lora.alpha_pattern"),
    ("layers", (-1,), "lora.layers"),
    ("layers", 1, "lora.layers"),
])
def test_bad_config_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        LoraConfig(**{field: value})


def test_a_delta_that_does_not_fit_is_refused_by_apply_and_merge():
    """A delta of another rank, model or method (or with integer factors) is refused, naming the
    layer and the expected shapes, instead of running with the config's scale (another rank),
    failing in dot_general (another model) or with a bare KeyError (another method)."""
    from jpeft.methods.ia3 import IA3Config, ia3

    model, params = tiny_bert()
    batch = tiny_batch()
    t = lora(LoraConfig(r=4))
    rank8 = lora(LoraConfig(r=8)).init(jax.random.key(0), params, model.info())
    with pytest.raises(ValueError, match=r"lora_A \(16, 8\).*r=4; expected \(16, 4\) / \(4, 16\)"):
        _adapted(model, t, params, rank8, batch)
    big, big_params = tiny_bert(hidden=32)
    other = t.init(jax.random.key(0), big_params, big.info())
    with pytest.raises(ValueError, match="another model"):
        merge(t, params, other)
    with pytest.raises(ValueError, match="another model"):
        _adapted(model, t, params, other, batch)
    ints = jax.tree_util.tree_map(lambda x: x.astype(jnp.int32), t.init(jax.random.key(0), params, model.info()))
    with pytest.raises(TypeError, match="floating-point"):
        _adapted(model, t, params, ints, batch)
    with pytest.raises(KeyError, match="not LoRA's lora_A and lora_B"):
        _adapted(model, t, params, ia3(IA3Config()).init(jax.random.key(0), params, model.info()), batch)


def test_bias_options_select_base_leaves():
    model, params = tiny_bert(layers=1)
    assert lora(LoraConfig()).trainable_base(params) == []
    only = lora(LoraConfig(bias="lora_only")).trainable_base(params)
    assert sorted(only) == ["encoder/layer_0/attention/self/query/bias",
                            "encoder/layer_0/attention/self/value/bias"]
    everything = lora(LoraConfig(bias="all")).trainable_base(params)
    assert len(everything) > len(only) and all(p.endswith("/bias") for p in everything)
    assert not any(p.startswith("head/") for p in everything)


def test_dropout_only_in_training_and_reproducible():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = lora(LoraConfig(dropout=0.5))
    delta = perturb(t.init(jax.random.key(0), params, model.info()), scale=0.5)
    eval_out = _adapted(model, t, params, delta, batch)
    np.testing.assert_allclose(eval_out, _logits(model, merge(t, params, delta), batch), atol=2e-5)
    ctx = ApplyContext(train=True, rng=jax.random.key(1))
    train_a = _adapted(model, t, params, delta, batch, ctx)
    train_b = _adapted(model, t, params, delta, batch, ctx)
    np.testing.assert_array_equal(train_a, train_b)
    assert float(jnp.abs(train_a - eval_out).max()) > 1e-5


def test_jit_and_no_jit_agree():
    model, params = tiny_bert()
    batch = tiny_batch()
    t = lora(LoraConfig(r=2))
    delta = perturb(t.init(jax.random.key(0), params, model.info()))
    f = lambda p, d: _adapted(model, t, p, d, batch)
    np.testing.assert_allclose(jax.jit(f)(params, delta), f(params, delta), atol=1e-6)


@pytest.mark.real
def test_minilm_count_equals_hf_peft(minilm_dir):
    """LoRA r=8 on query and value of MiniLM with a 2-class head: PEFT prints 74,498."""
    from jpeft.models.bert import from_pretrained
    from jpeft.train.trainer import Trainer

    model, params = from_pretrained(minilm_dir, num_labels=2)
    trainer = Trainer(model, lora(LoraConfig(r=8, targets="(query|value)$")), params)
    counts = trainer.counts(trainer.init_state(jax.random.key(0)))
    assert counts.trainable == 74_498
    assert counts.total == 22_713_986 + 73_728


def test_lora_plus_trains_b_at_lr_ratio_times_a():
    """LoRA+: with Adam's first step (update = lr · sign(g)), |ΔB| = lr_ratio · |ΔA|; the plain
    config keeps one group."""
    from jpeft.train.optim import OptimConfig, make_optimizer

    delta = {"q": {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.ones((2, 3))}}
    grads = jax.tree_util.tree_map(lambda x: 0.3 * jnp.ones_like(x), delta)
    plain = lora(LoraConfig())
    assert set(jax.tree_util.tree_leaves(plain.labels(delta))) == {"default"} and plain.group_lr == {}
    method = lora(LoraConfig(lr_ratio=16.0))
    assert method.group_lr == {"lora_B": 16.0}
    config = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_ratio=0.0, schedule="constant",
                         group_lr=dict(method.group_lr))
    tx = make_optimizer(config, method.labels(delta), 10)
    updates, _ = tx.update(grads, tx.init(delta), delta)
    step_a = float(jnp.abs(updates["q"]["lora_A"]).max())
    step_b = float(jnp.abs(updates["q"]["lora_B"]).max())
    np.testing.assert_allclose(step_b / step_a, 16.0, rtol=1e-4)
    with pytest.raises(ValueError, match="lr_ratio"):
        LoraConfig(lr_ratio=0.0)
