"""Adapter arithmetic: combined LoRA updates ΔW against the weighted sum of the inputs' ΔW
(never A and B separately), TIES/DARE on hand-checkable cases, negation, (IA)³."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpeft.arithmetic import (
    combine_ia3,
    combine_lora,
    dare,
    lora_delta_weights,
    negate_lora,
    ties,
)
from jpeft.core.transform import apply, merge, unmerge
from jpeft.methods import IA3Config, LoraConfig, ia3, lora
from tests.helpers import perturb, tiny_batch, tiny_bert

_tiny = functools.lru_cache(maxsize=None)(tiny_bert)
TARGETS = r"(query|value|output/dense)$"


def trained(config, seed):
    model, base = _tiny()
    delta = lora(config).init(jax.random.key(seed), base, model.info())
    return perturb(delta, seed=seed + 100, scale=0.3)  # B != 0


def weighted_sum(configs, deltas, weights):
    per = [lora_delta_weights(c, d) for c, d in zip(configs, deltas)]
    return {m: sum(w * p[m] for w, p in zip(weights, per)) for m in per[0]}


CONFIGS = [LoraConfig(r=2, alpha=4, targets=TARGETS),
           LoraConfig(r=3, alpha=3, targets=TARGETS, use_rslora=True, rank_pattern={"value": 1})]


@settings(max_examples=8, deadline=None)
@given(w1=st.floats(-2, 2), w2=st.floats(-2, 2), seed=st.integers(0, 50))
def test_linear_with_enough_rank_and_cat_are_exact(w1, w2, seed):
    deltas = [trained(CONFIGS[0], seed), trained(CONFIGS[1], seed + 1)]
    want = weighted_sum(CONFIGS, deltas, [w1, w2])
    for how, rank in [("linear", 5), ("cat", None)]:
        cfg, out = combine_lora(deltas, CONFIGS, [w1, w2], how=how, rank=rank)
        got = lora_delta_weights(cfg, out)
        assert sorted(got) == sorted(want)
        for m in want:
            np.testing.assert_allclose(got[m], want[m], rtol=0, atol=1e-5)
    cfg, out = combine_lora(deltas, CONFIGS, [w1, w2], how="cat")
    a = jax.tree_util.tree_leaves(out)[0]
    assert cfg.r in (5, 3)  # 2 + 3 (query/output) or 2 + 1 (value)
    assert a.shape[-1] in (3, 5)


def test_linear_truncation_is_the_best_rank_k_approximation():
    deltas = [trained(CONFIGS[0], 0), trained(CONFIGS[0], 1)]
    want = weighted_sum([CONFIGS[0]] * 2, deltas, [1.0, -0.5])
    cfg, out = combine_lora(deltas, [CONFIGS[0]] * 2, [1.0, -0.5], how="linear", rank=2)
    got = lora_delta_weights(cfg, out)
    for m, dw in want.items():
        u, s, vt = np.linalg.svd(np.asarray(dw), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vt[:2]
        np.testing.assert_allclose(got[m], best, rtol=0, atol=1e-5)
        assert float(np.abs(np.asarray(got[m]) - np.asarray(dw)).max()) > 1e-4  # rank 4 -> 2 loses


def test_combined_delta_runs_like_merged_weights():
    """End to end: the combined delta through apply equals the base plus Σ wᵢΔWᵢ merged."""
    model, base = _tiny()
    deltas = [trained(CONFIGS[0], 3), trained(CONFIGS[1], 4)]
    weights = [0.7, 0.6]
    cfg, out = combine_lora(deltas, CONFIGS, weights, how="cat")
    batch = tiny_batch()
    x = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    from jpeft.core import paths as P

    flat = P.flatten(base)
    for m, dw in weighted_sum(CONFIGS, deltas, weights).items():
        flat[f"{m}/kernel"] = flat[f"{m}/kernel"] + dw
    np.testing.assert_allclose(apply(model, lora(cfg), base, out, *x), model.apply({"params": P.unflatten(flat)}, *x),
                               rtol=0, atol=1e-5)


def test_negation_subtracts_the_task():
    _, base = _tiny()
    delta = trained(CONFIGS[0], 5)
    neg = negate_lora(delta)
    for m, dw in lora_delta_weights(CONFIGS[0], delta).items():
        np.testing.assert_allclose(lora_delta_weights(CONFIGS[0], neg)[m], -dw, rtol=0, atol=1e-7)
    t = lora(CONFIGS[0])
    for a, b in zip(jax.tree_util.tree_leaves(merge(t, base, neg)), jax.tree_util.tree_leaves(unmerge(t, base, delta))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_ties_by_hand():
    a = jnp.array([[3.0, -1.0], [0.5, 2.0]])
    b = jnp.array([[-1.5, -4.0], [0.2, 1.0]])
    # density 0.5 keeps the 2 largest |.| of each: a -> 3, 2; b -> -1.5, -4.
    # elected signs: (0,0) 3-1.5 > 0, (0,1) -4 < 0, (1,0) nothing kept, (1,1) 2 > 0; disjoint means of
    # the agreeing values: 3 (b's -1.5 disagrees), -4, 0, 2
    got = ties([a, b], [1.0, 1.0], density=0.5)
    np.testing.assert_allclose(got, jnp.array([[3.0, -4.0], [0.0, 2.0]]))
    same = ties([a, a], [1.0, 1.0], density=1.0)  # agreeing tasks: the mean of equal values
    np.testing.assert_allclose(same, a)


def test_dare_keeps_density_and_is_unbiased():
    dw = jnp.ones((64, 64))
    np.testing.assert_allclose(dare([dw, 2 * dw], [1.0, 0.5], 1.0, jax.random.key(0)), 2 * dw)
    one = dare([dw], [1.0], 0.3, jax.random.key(1))
    assert abs(float((one != 0).mean()) - 0.3) < 0.03
    mean = jnp.mean(jnp.stack([dare([dw], [1.0], 0.3, jax.random.key(i)) for i in range(50)]), 0)
    assert abs(float(mean.mean()) - 1.0) < 0.02
    deltas = [trained(CONFIGS[0], 6), trained(CONFIGS[0], 7)]
    cfg, out = combine_lora(deltas, [CONFIGS[0]] * 2, [1.0, 1.0], how="dare", density=1.0, rank=4,
                            rng=jax.random.key(0))
    want = weighted_sum([CONFIGS[0]] * 2, deltas, [1.0, 1.0])
    for m, dw_ in lora_delta_weights(cfg, out).items():
        np.testing.assert_allclose(dw_, want[m], rtol=0, atol=1e-5)


def test_ia3_linear_combination():
    model, base = _tiny()
    t = ia3(IA3Config())
    deltas = [perturb(t.init(jax.random.key(i), base, model.info()), seed=i, scale=0.2) for i in range(2)]
    out = combine_ia3(deltas, [0.25, 0.75])
    for o, a, b in zip(*(jax.tree_util.tree_leaves(x) for x in (out, *deltas))):
        np.testing.assert_allclose(o, 0.25 * a + 0.75 * b, rtol=1e-6)


def test_bad_inputs_are_refused():
    deltas = [trained(CONFIGS[0], 0), trained(LoraConfig(r=2, targets=r"query$"), 1)]
    with pytest.raises(ValueError, match="other modules"):
        combine_lora(deltas, [CONFIGS[0], LoraConfig(r=2, targets=r"query$")], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        combine_lora(deltas[:1], CONFIGS[:1], [1, 1])
    with pytest.raises(ValueError, match="choose one of"):
        combine_lora(deltas[:1], CONFIGS[:1], [1], how="mean")
    with pytest.raises(ValueError, match="rng"):
        combine_lora(deltas[:1], CONFIGS[:1], [1], how="dare", density=0.5)
    with pytest.raises(ValueError, match="density"):
        combine_lora(deltas[:1], CONFIGS[:1], [1], how="ties", density=0.0)
    with pytest.raises(ValueError, match="rank"):
        combine_lora(deltas[:1], CONFIGS[:1], [1], how="linear", rank=0)
