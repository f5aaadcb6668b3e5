"""Diff pruning: a sparse, task-specific difference vector (Guo, Rush and Kim, 2021,
arXiv:2012.07463), with hard-concrete gates (Louizos, Welling and Kingma, 2018, arXiv:1712.01312).

Every selected leaf ``θ₀`` (shape ``S``) gets a difference ``w (S)`` and gate logits ``α (S)``:

    θ = θ₀ + z ⊙ w,

* training (``ctx.train`` with an rng; ``u ~ U(ε, 1−ε)`` drawn from ``ctx.key(name, path)``):
  ``s = σ((log u − log(1−u) + α) / β)``, ``s̄ = s·(ζ−γ) + γ``, ``z = clip(s̄, 0, 1)``;
* evaluation (and training without an rng): ``z = clip(σ(α)·(ζ−γ) + γ, 0, 1)``;

with ``β = 2/3, γ = −0.1, ζ = 1.1`` (Louizos et al.'s values; configurable). The loss adds the
expected L0 norm of the gates, normalised by the number ``N`` of gated entries:

    penalty = λ · Σ σ(α − β·log(−γ/ζ)) / N          (λ = ``l0_weight``).

Normalising makes λ independent of the model size (the paper's unnormalised weight λ' over ``N``
entries corresponds to ``l0_weight = λ'·N``); with Adam only the balance between the penalty's
and the task's per-entry gradients matters, which is what λ/N sets.

Init: ``w = 0`` and ``α = init_logit`` (default **5**: gates start open, ``z_eval = 1`` and
``z ≈ 1`` in training). Open gates matter: ``∂L/∂w = z ⊙ ∂L/∂θ``, so closed gates would stop
``w`` from ever learning; the L0 penalty then closes the gates that the task does not need.
Because ``w = 0``, a fresh delta is **exactly the identity** in evaluation *and* in training
(``z ⊙ 0 = 0`` whatever the sampled ``z``).

Selection: ``pattern`` (a regex searched in the paths; ``''`` = every leaf) over the base leaves
outside the task head (trained by the trainer) and, by default, outside the embeddings
(``embeddings=False``): the word-embedding table is half of MiniLM (11.7M of 22.7M weights) and a
dense ``w`` and ``α`` plus their Adam moments would cost six copies of it. The paper diffs every
weight including the embeddings: set ``embeddings=True`` to follow it.

Delta (mirrors the parameter tree twice): ``{"w": {...: w}, "logits": {...: α}}``. Labels:
``"gates_no_decay"`` for ``α`` (the ``gates`` group, never decayed: decay would drag every gate
towards ``σ(0)``, i.e. z = 0.5, which means nothing; ``group_lr={"gates": k}`` sets its learning
rate) and ``"default"`` for ``w``: decoupled decay pulls ``w`` towards 0, i.e. the weights
towards ``θ₀``, which helps sparsity.

After training (the paper's magnitude projection onto the L0 ball):

* :func:`sparsify` computes the effective difference ``d = z_eval ⊙ w`` and keeps the
  ``round(target_sparsity · N)`` entries of largest ``|d|`` **globally** across the selected leaves
  (exact zeros are not stored), as ``{path: {"indices": int32 flat indices (sorted), "values":
  float32, "shape": tuple}}``: the storage/export format (about ``8·k`` bytes);
* :func:`densify` turns it back into a dense ``{path: d}`` tree;
* **during training** (the paper's second stage), at step ``round(project_at · total_steps)``
  the training loop's ``between_steps`` hook applies :func:`project`: ``w ← d`` on the kept entries
  (0 elsewhere) and the gate logits become ``±HARD_LOGIT``, so every gate is exactly 1 (kept) or
  0 (dropped) in training and evaluation, with zero gradient: the remaining steps fine-tune the
  kept entries with the mask fixed, and the L0 penalty is a constant. The projection starts a
  new training stage (``Transform.stage_starts``): the learning-rate schedule restarts there
  with its own warm-up and decay, since the projected model has to re-learn what the dropped
  entries carried. ``project_at = 1`` skips
  this stage (projection only at the end, which then changes the function);
* the transform's ``finalize`` is ``{"w": densify(sparsify(delta, config.target_sparsity))}``: a
  finalized delta has **no** ``"logits"`` and behaves as a plain additive delta
  (:mod:`jpeft.methods.additive`: ``θ = θ₀ + w``, no gates, no penalty). After the in-training
  projection it computes exactly what the projected delta computes;
* :func:`nonzero_fraction` reports the fraction of non-zero entries of ``d`` (of ``N``).

**Mergeable**: ``merge = θ₀ + z_eval ⊙ w`` (exactly what evaluation computes), ``unmerge`` the
inverse; for a finalized delta ``θ₀ + w``. Stacking: see :mod:`jpeft.methods.additive` (put diff
pruning before ``ia3`` in a composition). Mixed batches (per-example banks) would need an
activation-space form; this weight-space method serves one delta per forward pass.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import paths as P
from jpeft.core.capabilities import AfterTraining, TrainingHooks
from jpeft.core.registry import register
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, resolve_info
from jpeft.methods import additive as A

EPS = 1e-6  # u ~ U(EPS, 1 - EPS) keeps log u and log(1 - u) finite
HARD_LOGIT = 1e4  # |α| that makes a gate exactly 0 or 1 whatever the noise (|logit(u)| < 14)

Sparse = dict[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class DiffPruningConfig:
    pattern: str = dataclasses.field(
        default="", metadata={"help": "regex searched in parameter paths ('' = every non-head leaf)"}
    )
    embeddings: bool = dataclasses.field(
        default=False,
        metadata={"help": "also diff the embedding tables (the paper does; 2x memory on MiniLM)"},
    )
    init_logit: float = dataclasses.field(
        default=5.0, metadata={"help": "initial gate logit alpha (5: gates open, z = 1)"}
    )
    l0_weight: float = dataclasses.field(
        default=1.0, metadata={"help": "lambda of the expected-L0 penalty (normalised by the gated entries)"}
    )
    target_sparsity: float = dataclasses.field(
        default=0.005, metadata={"help": "fraction of gated entries kept by finalize/sparsify (paper: 0.5%)"}
    )
    project_at: float = dataclasses.field(
        default=0.75,
        metadata={"help": "fraction of the training steps after which the delta is projected onto "
                          "target_sparsity and the kept entries are fine-tuned with the mask fixed "
                          "(1: no in-training projection)"},
    )
    beta: float = dataclasses.field(default=2.0 / 3.0, metadata={"help": "hard-concrete temperature"})
    gamma: float = dataclasses.field(
        default=-0.1, metadata={"help": "hard-concrete stretch lower bound (< 0)"}
    )
    zeta: float = dataclasses.field(default=1.1, metadata={"help": "hard-concrete stretch upper bound (> 1)"})

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"diff_pruning.pattern is not a valid regex: {self.pattern!r} ({err})") from None
        if not math.isfinite(self.init_logit):
            raise ValueError(f"diff_pruning.init_logit must be finite, got {self.init_logit}")
        if not (math.isfinite(self.l0_weight) and self.l0_weight >= 0):
            raise ValueError(f"diff_pruning.l0_weight must be >= 0, got {self.l0_weight}")
        if not 0.0 < self.target_sparsity <= 1.0:
            raise ValueError(
                f"diff_pruning.target_sparsity is the fraction of entries kept, in (0, 1]; "
                f"got {self.target_sparsity}"
            )
        if not 0.0 < self.project_at <= 1.0:
            raise ValueError(f"diff_pruning.project_at is a fraction of the training steps in (0, 1]; "
                             f"got {self.project_at}")
        if not self.beta > 0:
            raise ValueError(f"diff_pruning.beta (temperature) must be > 0, got {self.beta}")
        if not self.gamma < 0:
            raise ValueError(f"diff_pruning.gamma must be < 0 (stretch below 0), got {self.gamma}")
        if not self.zeta > 1:
            raise ValueError(f"diff_pruning.zeta must be > 1 (stretch above 1), got {self.zeta}")


# -- gates ---------------------------------------------------------------------------------------

GATES = "gates_no_decay"  # the optimizer group of the gate logits: "gates", not decayed

def hard_concrete(logits: jax.Array, key: jax.Array | None,
                  config: DiffPruningConfig = DiffPruningConfig()) -> jax.Array:
    """Gates ``z`` in ``[0, 1]`` shaped like ``logits``: sampled when ``key`` is given, else the
    deterministic evaluation gate (see the module docstring)."""
    span = config.zeta - config.gamma
    if key is None:
        s = jax.nn.sigmoid(logits)
    else:
        u = jax.random.uniform(key, jnp.shape(logits), jnp.float32, EPS, 1.0 - EPS)
        s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + logits) / config.beta)
    return jnp.clip(s * span + config.gamma, 0.0, 1.0)


def open_probability(logits: jax.Array, config: DiffPruningConfig = DiffPruningConfig()) -> jax.Array:
    """``P(z ≠ 0) = σ(α − β·log(−γ/ζ))`` per entry (the expected L0 contribution)."""
    return jax.nn.sigmoid(logits - config.beta * math.log(-config.gamma / config.zeta))


def _parts(delta: Any) -> tuple[dict[str, jax.Array], dict[str, jax.Array] | None]:
    """Flat ``w`` and flat logits (``None`` for a finalized delta)."""
    if not isinstance(delta, dict) or "w" not in delta or set(delta) - {"w", "logits"}:
        keys = sorted(delta) if isinstance(delta, dict) else type(delta).__name__
        raise KeyError(
            f"a diff-pruning delta is {{'w', 'logits'}} (training) or {{'w'}} (finalized); got {keys}"
        )
    w = P.flatten(delta["w"])
    if "logits" not in delta:
        return w, None
    logits = P.flatten(delta["logits"])
    if set(w) != set(logits):
        raise KeyError(f"diff pruning: 'w' and 'logits' cover different paths: "
                       f"{sorted(set(w) ^ set(logits))[:10]}")
    return w, logits


def effective_delta(delta: Any, config: DiffPruningConfig = DiffPruningConfig(),
                    ctx: ApplyContext = ApplyContext(), name: str = "diff_pruning") -> dict[str, Any]:
    """The additive difference ``z ⊙ w`` as a tree mirroring the params (``w`` when finalized).

    ``ctx.train`` with an rng samples the gates (key ``ctx.key(name, path)``); otherwise the
    evaluation gates are used.
    """
    w, logits = _parts(delta)
    if logits is None:
        return delta["w"]
    out = {}
    for path, wl in w.items():
        chex.assert_equal_shape([wl, logits[path]])
        key = ctx.key(name, path) if ctx.train else None
        out[path] = hard_concrete(logits[path], key, config) * wl
    return P.unflatten(out)


def expected_density(delta: Any, config: DiffPruningConfig = DiffPruningConfig()) -> jax.Array:
    """Expected fraction of open gates, ``Σ σ(α − β log(−γ/ζ)) / N`` (1 for a finalized delta)."""
    _, logits = _parts(delta)
    if logits is None:
        return jnp.ones((), jnp.float32)
    total = max(sum(int(np.prod(jnp.shape(a))) for a in logits.values()), 1)
    # Σ σ(x) summed naively in float32 loses changes of ~1e-6 per entry when σ(x) ≈ 1 (each add
    # rounds at the sum's ulp). Exactly: σ(x) = [x ≥ 0] + sign·σ(−|x|), so sum the small terms
    # and count the non-negative entries separately (same gradient, σ'(x)).
    shift = config.beta * math.log(-config.gamma / config.zeta)
    small = jnp.zeros((), jnp.float32)
    count = jnp.zeros((), jnp.float32)
    for a in logits.values():
        x = a.astype(jnp.float32) - shift
        tail = jax.nn.sigmoid(-jnp.abs(x))
        small = small + jnp.where(x >= 0, -tail, tail).sum()
        count = count + (x >= 0).sum().astype(jnp.float32) / total
    return count + small / total


# -- after training: sparse format ----------------------------------------------------------------

def _flat_effective(delta: Any, config: DiffPruningConfig) -> dict[str, np.ndarray]:
    return {p: np.asarray(jax.device_get(v), np.float32)
            for p, v in P.flatten(effective_delta(delta, config)).items()}


def sparsify(delta: Any, target_sparsity: float,
             config: DiffPruningConfig = DiffPruningConfig()) -> Sparse:
    """Keep the ``round(target_sparsity·N)`` (at least 1) entries of largest ``|z_eval ⊙ w|``.

    Global over all gated leaves (the paper's projection onto the L0 ball); exact zeros are not
    stored, so fewer entries come back when ``d`` has fewer non-zeros. Returns ``{path:
    {"indices": int32 (sorted flat indices), "values": float32, "shape": tuple}}`` with every leaf
    present (possibly with no entries). Host-side (numpy); not jittable.
    """
    if not 0.0 < target_sparsity <= 1.0:
        raise ValueError(f"target_sparsity is the fraction of entries kept, in (0, 1]; got {target_sparsity}")
    flat = _flat_effective(delta, config)
    paths = list(flat)
    sizes = [flat[p].size for p in paths]
    if any(s >= 2**31 for s in sizes):
        raise ValueError("sparsify: a leaf has >= 2**31 entries; int32 flat indices cannot address it")
    total = int(sum(sizes))
    if total == 0:
        return {p: {"indices": np.zeros((0,), np.int32), "values": np.zeros((0,), np.float32),
                    "shape": tuple(flat[p].shape)} for p in paths}
    magnitudes = np.concatenate([np.abs(flat[p]).ravel() for p in paths])
    k = min(max(1, int(round(target_sparsity * total))), total)
    keep = np.argpartition(-magnitudes, k - 1)[:k] if k < total else np.arange(total)
    keep = np.sort(keep[magnitudes[keep] > 0])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    out: Sparse = {}
    for i, path in enumerate(paths):
        lo, hi = np.searchsorted(keep, [offsets[i], offsets[i + 1]])
        idx = (keep[lo:hi] - offsets[i]).astype(np.int32)
        out[path] = {"indices": idx, "values": flat[path].ravel()[idx].astype(np.float32),
                     "shape": tuple(int(s) for s in flat[path].shape)}
    return out


def densify(sparse: Sparse) -> dict[str, Any]:
    """The dense ``float32`` tree (mirroring the params) of a :func:`sparsify` result."""
    out = {}
    for path, entry in sparse.items():
        shape = tuple(entry["shape"])
        idx = np.asarray(entry["indices"], np.int64)
        values = np.asarray(entry["values"], np.float32)
        if idx.shape != values.shape or idx.ndim != 1:
            raise ValueError(f"densify: {path!r} has {idx.shape} indices but {values.shape} values")
        size = int(np.prod(shape))
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(f"densify: {path!r} has an index outside its shape {shape}")
        dense = np.zeros(size, np.float32)
        dense[idx] = values
        out[path] = jnp.asarray(dense.reshape(shape))
    return P.unflatten(out)


def project(delta: Any, config: DiffPruningConfig = DiffPruningConfig()) -> dict[str, Any]:
    """The training delta projected onto ``config.target_sparsity``: ``w`` holds ``z_eval ⊙ w``
    on the kept entries (:func:`sparsify`) and 0 elsewhere, and the gate logits are
    ``+HARD_LOGIT`` on the kept entries and ``−HARD_LOGIT`` elsewhere (gates exactly 1 / 0,
    sampled or not, with zero gradient). The evaluation output equals that of
    ``finalize(delta)``."""
    if "logits" not in delta:
        raise ValueError("diff_pruning.project needs a training delta (with gate logits); this one "
                         "is finalized")
    sparse = sparsify(delta, config.target_sparsity, config)
    ones = {p: {**e, "values": np.ones_like(e["values"])} for p, e in sparse.items()}
    kept = P.flatten(densify(ones))
    logits = {p: jnp.where(m > 0, HARD_LOGIT, -HARD_LOGIT).astype(jnp.float32) for p, m in kept.items()}
    return {"w": densify(sparse), "logits": P.unflatten(logits)}


def projection_step(config: DiffPruningConfig, total_steps: int) -> int | None:
    """The step after which :func:`project` runs (``None``: never during training)."""
    if config.project_at >= 1.0:
        return None
    step = max(1, int(round(config.project_at * total_steps)))
    return step if step < total_steps else None


def nonzero_fraction(delta: Any, config: DiffPruningConfig = DiffPruningConfig()) -> float:
    """Fraction of the gated entries where ``z_eval ⊙ w`` (``w`` when finalized) is non-zero."""
    flat = _flat_effective(delta, config)
    total = sum(v.size for v in flat.values())
    return float(sum(int(np.count_nonzero(v)) for v in flat.values()) / max(total, 1))


# -- the transform --------------------------------------------------------------------------------

def gated_paths(config: DiffPruningConfig, base: P.Params, info: ModelInfo) -> list[str]:
    """The leaves that get a difference (head excluded; embeddings unless ``config.embeddings``)."""
    is_head = A.head_matcher(info)
    embeddings = A.embedding_module(info, P.paths(base)) + "/"

    def allowed(path: str, _: Any) -> bool:
        return not is_head(path) and (config.embeddings or not path.startswith(embeddings))

    return P.select(base, config.pattern, leaf_filter=allowed, what="diff_pruning.pattern")


def diff_pruning(config: DiffPruningConfig = DiffPruningConfig(), *,
                 name: str = "diff_pruning") -> Transform:
    """Diff pruning as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        info = resolve_info(info)
        del rng  # deterministic: w = 0, alpha = init_logit
        w = A.zeros_like_paths(base, gated_paths(config, base, info))
        logits = jax.tree_util.tree_map(lambda z: jnp.full_like(z, config.init_logit), w)
        return {"w": w, "logits": logits}

    def adapt_params(base: P.Params, delta: Any, ctx: ApplyContext) -> P.Params:
        return A.add(base, effective_delta(delta, config, ctx, name))

    def penalty(delta: Any, ctx: ApplyContext) -> jax.Array:
        if "logits" not in delta:
            return jnp.zeros((), jnp.float32)
        return config.l0_weight * expected_density(delta, config)

    def fold(params: P.Params, delta: Any, sign: float) -> P.Params:
        return A.add(params, effective_delta(delta, config), sign)

    def labels(delta: Any) -> dict[str, Any]:
        out = {"w": A.label_tree(delta["w"], "default")}
        if "logits" in delta:
            out["logits"] = A.label_tree(delta["logits"], GATES)
        return out

    def finalize(delta: Any) -> dict[str, Any]:
        if "logits" not in delta:
            return delta
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(delta)):
            # traced for its structure only (jax.eval_shape, as the adapter checks do): sparsify
            # runs on the host, and what it keeps is a dense float32 w of the same shapes
            return {"w": jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), delta["w"])}
        return {"w": densify(sparsify(delta, config.target_sparsity, config))}

    def between_steps(delta: Any, step: int, total_steps: int) -> Any:
        if "logits" not in delta or step != projection_step(config, total_steps):
            return delta
        return project(delta, config)

    return Transform(
        name=name,
        config=config,
        init=init,
        adapt_params=adapt_params,
        merge=lambda params, delta, info=None: fold(params, delta, 1.0),
        unmerge=lambda params, delta, info=None: fold(params, delta, -1.0),
        labels=labels,
        new_params=lambda delta: P.count_params(delta.get("logits", {})),  # w shadows θ₀; gates are new
        capabilities=(
            TrainingHooks(
                penalty=penalty,
                between_steps=between_steps,
                stage_starts=lambda total: tuple(s for s in [projection_step(config, total)] if s is not None)),
            AfterTraining(finalize=finalize,
                          stats=lambda delta: {"nonzero_fraction": nonzero_fraction(delta, config)}),
        ),
    )


register("diff_pruning", DiffPruningConfig, diff_pruning)
