"""Adapter arithmetic: combine trained deltas of one method into one delta (task vectors).

LoRA deltas are combined on their weight updates ``ΔW = s·A B`` (``(in, out)`` per module, ``s``
the module's LoRA scale), never on ``A`` and ``B`` separately:

* ``"linear"``: ``ΔW = Σᵢ wᵢ ΔWᵢ``, re-factorised by a truncated SVD to ``rank`` (``U_r S_r V_rᵀ``,
  ``A = U_r √S_r``, ``B = √S_r V_rᵀ``; the best rank-``r`` approximation, exact when ``rank`` is
  at least the rank of the sum, e.g. ``Σ rᵢ``);
* ``"cat"``: concatenation along the rank axis, ``A = [w₁s₁A₁ | w₂s₂A₂ | …]``,
  ``B = [B₁; B₂; …]``: exactly ``Σ wᵢ ΔWᵢ`` with rank ``Σ rᵢ`` (no SVD);
* ``"ties"`` (TIES-merging, Yadav et al. 2023, arXiv:2306.01708): per module, keep the
  ``density`` fraction of largest-magnitude entries of each ``wᵢΔWᵢ`` (trim), elect each entry's
  sign as the sign of the sum of the trimmed values, average the trimmed values that agree with it
  (disjoint mean), then SVD to ``rank``;
* ``"dare"`` (DARE, Yu et al. 2023, arXiv:2311.03099): drop each entry of ``ΔWᵢ`` with probability
  ``1 − density`` and rescale the kept ones by ``1/density`` (unbiased), weighted sum, SVD to
  ``rank``.

The result is a plain LoRA ``(config, delta)``: ``r = rank`` (per-module ``rank_pattern`` where
ranks differ, e.g. ``cat`` over configs with rank patterns), ``alpha = r`` (scale 1,
``use_rslora=False``), targets and layers of the first config. Negation (task forgetting) flips
``B``: ``ΔW → −ΔW``. (IA)³ vectors combine linearly, ``l = Σᵢ wᵢ lᵢ`` (as Hugging Face PEFT's
``add_weighted_adapter`` does for IA3).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import paths as P
from jpeft.methods.lora import LoraConfig, rank_and_scale

HOWS = ("linear", "cat", "ties", "dare")
Delta = Any


def lora_modules(delta: Delta) -> list[str]:
    """Module paths of a LoRA delta (those with ``lora_A`` and ``lora_B``), sorted."""
    flat = P.flatten(delta)
    return sorted(k[: -len("/lora_A")] for k in flat if k.endswith("/lora_A") and
                  f"{k[: -len('/lora_A')]}/lora_B" in flat)


def lora_delta_weights(config: LoraConfig, delta: Delta) -> dict[str, jax.Array]:
    """``{module path: ΔW = s·A B (in, out)}`` for every module of a LoRA delta."""
    flat = P.flatten(delta)
    out = {}
    for path in lora_modules(delta):
        a, b = flat[f"{path}/lora_A"], flat[f"{path}/lora_B"]
        chex.assert_rank([a, b], 2)
        _, scale = rank_and_scale(config, path)
        out[path] = scale * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))
    return out


def _check_inputs(deltas: Sequence[Delta], weights: Sequence[float]) -> None:
    if not deltas:
        raise ValueError("need at least one delta to combine")
    if len(weights) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights; give one weight per delta")


def _same_modules(per_delta: Sequence[dict[str, jax.Array]]) -> list[str]:
    modules = sorted(per_delta[0])
    for i, dws in enumerate(per_delta[1:], 1):
        if sorted(dws) != modules:
            diff = sorted(set(modules) ^ set(dws))
            raise ValueError(f"delta {i} adapts other modules than delta 0 (differing: {diff[:5]}); "
                             "combine deltas made with the same targets")
        bad = [m for m in modules if dws[m].shape != per_delta[0][m].shape]
        if bad:
            raise ValueError(f"delta {i} has other weight shapes than delta 0 at {bad[:5]}")
    return modules


def factorize(dw: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Best rank-``rank`` factors ``A (…, in, r)``, ``B (…, r, out)`` of ``dw (…, in, out)``
    (truncated SVD, ``A = U_r √S_r``, ``B = √S_r V_rᵀ``; leading axes are batched)."""
    if jnp.ndim(dw) < 2:
        raise ValueError(f"factorize: expected an (..., in, out) update, got shape {jnp.shape(dw)}")
    if not 1 <= rank <= min(dw.shape[-2:]):
        raise ValueError(f"rank must be in [1, {min(dw.shape[-2:])}] for a {dw.shape} update, got {rank}")
    u, s, vt = jnp.linalg.svd(dw, full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def ties(dws: Sequence[jax.Array], weights: Sequence[float], density: float) -> jax.Array:
    """TIES-merging of same-shape updates: trim to ``density``, elect signs, disjoint mean."""
    trimmed = []
    for dw, w in zip(dws, weights):
        x = w * dw
        k = max(1, round(density * x.size))
        threshold = jnp.sort(jnp.abs(x).ravel())[-k]
        trimmed.append(jnp.where(jnp.abs(x) >= threshold, x, 0.0))
    stacked = jnp.stack(trimmed)
    sign = jnp.sign(stacked.sum(0))
    agree = (jnp.sign(stacked) == sign[None]) & (stacked != 0)
    count = agree.sum(0)
    return jnp.where(count > 0, (stacked * agree).sum(0) / jnp.maximum(count, 1), 0.0)


def dare(dws: Sequence[jax.Array], weights: Sequence[float], density: float, rng: jax.Array) -> jax.Array:
    """DARE: random drop with keep probability ``density``, rescale by ``1/density``, weighted sum."""
    keys = jax.random.split(rng, len(dws))
    return sum(w * jnp.where(jax.random.bernoulli(k, density, dw.shape), dw / density, 0.0)
               for dw, w, k in zip(dws, weights, keys))


def _output_config(config: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """A plain LoRA config with per-module ``ranks`` and scale 1 (alpha = r)."""
    default = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = {f"{re.escape(m)}$": r for m, r in ranks.items() if r != default}
    return dataclasses.replace(config, r=default, alpha=float(default), use_rslora=False,
                               rank_pattern=odd, alpha_pattern={p: float(r) for p, r in odd.items()})


def combine_lora(deltas: Sequence[Delta], configs: Sequence[LoraConfig], weights: Sequence[float], *,
                 how: str = "linear", rank: int | None = None, density: float = 1.0,
                 rng: jax.Array | None = None) -> tuple[LoraConfig, Delta]:
    """Combine LoRA deltas into one ``(config, delta)`` (see the module docstring)."""
    _check_inputs(deltas, weights)
    if len(configs) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas but {len(configs)} configs; give each delta its config")
    if how not in HOWS:
        raise ValueError(f"unknown combination {how!r}; choose one of {list(HOWS)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1 (or None for the inputs' largest), got {rank!r}")
    if how == "dare" and rng is None:
        raise ValueError("how='dare' drops entries at random: pass rng=jax.random.key(...)")
    per = [lora_delta_weights(c, d) for c, d in zip(configs, deltas)]
    modules = _same_modules(per)
    flat_in = [P.flatten(d) for d in deltas]
    out: dict[str, jax.Array] = {}
    ranks: dict[str, int] = {}
    if how == "cat":
        for m in modules:
            a_parts, b_parts = [], []
            for cfg, flat, w in zip(configs, flat_in, weights):
                _, scale = rank_and_scale(cfg, m)
                a_parts.append(w * scale * jnp.asarray(flat[f"{m}/lora_A"], jnp.float32))
                b_parts.append(jnp.asarray(flat[f"{m}/lora_B"], jnp.float32))
            out[f"{m}/lora_A"] = jnp.concatenate(a_parts, axis=1)
            out[f"{m}/lora_B"] = jnp.concatenate(b_parts, axis=0)
            ranks[m] = int(out[f"{m}/lora_A"].shape[1])
        return _output_config(configs[0], ranks), P.unflatten(out)
    keys = dict(zip(modules, jax.random.split(rng, len(modules)))) if how == "dare" else {}
    for m in modules:
        dws = [p[m] for p in per]
        if how == "linear":
            target = sum(w * dw for w, dw in zip(weights, dws))
        elif how == "ties":
            target = ties(dws, weights, density)
        else:
            target = dare(dws, weights, density, keys[m])
        r = rank or max(rank_and_scale(c, m)[0] for c in configs)
        out[f"{m}/lora_A"], out[f"{m}/lora_B"] = factorize(target, min(r, min(target.shape)))
        ranks[m] = int(out[f"{m}/lora_A"].shape[1])
    return _output_config(configs[0], ranks), P.unflatten(out)


def negate_lora(delta: Delta) -> Delta:
    """``ΔW → −ΔW`` for every module (``B → −B``): subtracting a task (forgetting)."""
    flat = P.flatten(delta)
    return P.unflatten({k: -v if k.endswith("/lora_B") else v for k, v in flat.items()})


def combine_ia3(deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
    """``l = Σᵢ wᵢ lᵢ`` for (IA)³ deltas of the same structure and shapes."""
    _check_inputs(deltas, weights)
    structure = jax.tree_util.tree_structure(deltas[0])
    for i, d in enumerate(deltas[1:], 1):
        if jax.tree_util.tree_structure(d) != structure or any(
                np.shape(a) != np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(deltas[0]),
                                                           jax.tree_util.tree_leaves(d))):
            raise ValueError(f"(IA)³ delta {i} has another structure or shapes than delta 0; "
                             "combine deltas made with the same targets")
    return jax.tree_util.tree_map(lambda *ls: sum(w * l for w, l in zip(weights, ls)), *deltas)


__all__ = ["HOWS", "combine_ia3", "combine_lora", "dare", "factorize", "lora_delta_weights", "lora_modules",
           "negate_lora", "ties"]
