"""Additive weight-space deltas, the shared machinery of BitFit, layer freezing and diff pruning.

A method of this family picks a set of base leaves ``S`` (a *selector*) and trains a delta
``δ`` shaped like them; the adapted weights are

    θ[p] = θ₀[p] + δ[p]   for p in S,      θ[p] = θ₀[p]   otherwise,

computed in ``float32`` (or the wider of the two dtypes) and cast back to the leaf's dtype. The
delta mirrors the parameter tree restricted to ``S`` (``{"encoder": {"layer_0": {..., "bias":
δ}}}``) and is stored in ``float32`` whatever the base dtype, so a checkpoint holds only ``δ``.

* A fresh delta is zeros, so it is **exactly the identity** (``x + 0 == x``).
* ``∂L/∂δ[p] = ∂L/∂θ[p]``: training ``δ`` is training the selected weights (with the optimizer
  seeing ``δ``, so decoupled weight decay pulls the weights towards ``θ₀``, not towards 0).
* **Mergeable**: ``merge = θ₀ + δ``, ``unmerge = θ − δ`` (exact up to float rounding).

Stacking: parameter rewrites (``adapt_params``) run before any interceptor whatever the
composition order, while ``merge`` runs in composition order. With additive methods (LoRA,
another additive delta) the order does not matter; with a method that *scales* a Dense
(``ia3``) put the additive method first, ``compose(bitfit(), ia3())``, so that merging folds
``(θ₀ + δ) ⊙ l`` exactly as ``apply`` computes it.

The task head (``ModelInfo.head_patterns``) is never part of a delta: the trainer trains it.

**Some layers of a stack.** Layers stacked by ``nn.scan`` / ``nnx.scan`` hold one leaf with a
leading layer axis (:func:`jpeft.core.layers.stacked_leaves`). A config with a method
``stack_rows(n) -> rows`` (layer freezing) trains only those rows: ``δ`` holds
``(len(rows), *shape[1:])`` and ``θ[rows] = θ₀[rows] + δ``; the other rows are never touched
(bit-identical), and the base is not unstacked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.core import layers as L
from jpeft.core import paths as P
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, resolve_info
from jpeft.core.paths import layer_index

Params = Mapping[str, Any]
Delta = Any
Selector = Callable[[Params, ModelInfo], list[str]]
Label = str | Callable[[str], str]


def head_matcher(info: ModelInfo) -> Callable[[str], bool]:
    """``path -> bool``: whether a base path belongs to the task head of ``info``."""
    regexes = [re.compile(p) for p in info.head_patterns]
    return lambda path: any(r.search(path) for r in regexes)


def exclude_head(paths: Iterable[str], info: ModelInfo) -> list[str]:
    """``paths`` without those of the task head (the trainer trains the head itself)."""
    is_head = head_matcher(info)
    return [p for p in paths if not is_head(p)]


Rows = Callable[[int], Sequence[int]]  # stack size -> the layers of the stack trained


def zeros_like_paths(base: Params, selected: Iterable[str],
                     stacked: Mapping[str, int] | None = None, rows: Rows | None = None) -> Delta:
    """A ``float32`` zero delta mirroring ``base`` restricted to ``selected`` (nested dict); a
    leaf of ``stacked`` (``{path: layers}``) gets only the ``rows(layers)`` slices."""
    flat = P.flatten(base)
    out: dict[str, jax.Array] = {}
    for path in selected:
        if path not in flat:
            raise KeyError(f"additive delta: {path!r} is not a parameter path of the base")
        shape = jnp.shape(flat[path])
        if stacked and rows is not None and path in stacked:
            shape = (len(rows(stacked[path])), *shape[1:])
        out[path] = jnp.zeros(shape, jnp.float32)
    return P.unflatten(out)


def add(params: Params, delta: Delta, sign: float = 1.0, rows: Rows | None = None) -> dict[str, Any]:
    """``params`` with ``leaf + sign·δ`` at every path of ``delta`` (cast back to the leaf dtype);
    with ``rows``, a ``δ`` of fewer leading rows than its stacked leaf is added to the rows
    ``rows(leaf.shape[0])`` only.

    Raises ``KeyError`` for a delta path the params lack and ``ValueError`` for a shape mismatch
    (a delta made for another model).
    """
    flat_delta = P.flatten(delta)
    if not flat_delta:
        return dict(params)
    flat = P.flatten(params)
    for path, d in flat_delta.items():
        leaf = flat.get(path)
        if leaf is None:
            raise KeyError(
                f"additive delta: {path!r} is not a parameter path of the model; "
                "was the delta made for another model?"
            )
        if rows is not None and _is_slice_of(d, leaf):
            index = jnp.asarray(tuple(rows(jnp.shape(leaf)[0])), jnp.int32)
            if index.shape[0] != jnp.shape(d)[0]:
                raise ValueError(f"additive delta: {path!r} holds {jnp.shape(d)[0]} layers of the "
                                 f"stack, the config trains {index.shape[0]}")
            update = leaf[index] + (d if sign == 1.0 else sign * d)
            flat[path] = leaf.at[index].set(update.astype(leaf.dtype))
            continue
        if jnp.shape(leaf) != jnp.shape(d):
            raise ValueError(
                f"additive delta: {path!r} has shape {jnp.shape(d)} but the weight has shape "
                f"{jnp.shape(leaf)}; was the delta made for another model?"
            )
        flat[path] = (leaf + (d if sign == 1.0 else sign * d)).astype(leaf.dtype)
    return P.unflatten(flat)


def _is_slice_of(d: Any, leaf: Any) -> bool:
    ds, ls = jnp.shape(d), jnp.shape(leaf)
    return len(ds) == len(ls) > 0 and ds[1:] == ls[1:] and ds[0] < ls[0]


def label_tree(delta: Delta, label: Label) -> Any:
    """The optimizer group label of every delta leaf: a constant, or ``label(path)``."""
    flat = P.flatten(delta)
    if isinstance(label, str):
        return P.unflatten({p: label for p in flat})
    return P.unflatten({p: label(p) for p in flat})


def select_leaves(select: Selector, base: Params, info: ModelInfo, what: str) -> list[str]:
    """Run ``select`` and drop the task head; a selection of *only* head leaves is an error."""
    chosen = list(dict.fromkeys(select(base, info)))
    kept = exclude_head(chosen, info)
    if chosen and not kept:
        raise ValueError(
            f"{what}: the selection {chosen[:5]} lies entirely in the task head "
            f"({', '.join(info.head_patterns)}), which the trainer always trains; "
            "select base-model leaves instead."
        )
    return kept


def additive(
    name: str,
    config: Any,
    select: Selector,
    *,
    label: Label = "default",
) -> Transform:
    """A Transform training ``δ`` on the leaves ``select(base, info)`` chose (see the module doc).

    Args:
      name: the transform's name (its key in a composition; also used in error messages).
      config: the method's config (stored on the transform).
      select: ``(base, info) -> [path, ...]``; it raises through :func:`jpeft.core.paths.select`
        when a pattern matches nothing. Head paths are removed.
      label: the optimizer group of every delta leaf, or ``path -> group``.
    """

    rows: Rows | None = getattr(config, "stack_rows", None)  # some layers of a stack

    def init(rng: jax.Array, base: Params, info: ModelInfo | None = None) -> Delta:
        info = resolve_info(info)
        del rng  # zeros: the identity
        stacked = L.stacked_leaves(base, info.layers) if rows is not None else None
        return zeros_like_paths(base, select_leaves(select, base, info, name), stacked, rows)

    def adapt_params(base: Params, delta: Delta, ctx: ApplyContext) -> Params:
        return add(base, delta, rows=rows)

    return Transform(
        name=name,
        config=config,
        init=init,
        adapt_params=adapt_params,
        merge=lambda params, delta, info=None: add(params, delta, 1.0, rows),
        unmerge=lambda params, delta, info=None: add(params, delta, -1.0, rows),
        labels=lambda delta: label_tree(delta, label),
        new_params=lambda delta: 0,  # θ₀ + δ: no parameter beyond the base's
    )


def embedding_module(info: ModelInfo, paths: list[str]) -> str:
    """The shortest prefix of the embedding table's path that holds no layer: ``embeddings`` on
    BERT (word, position and type tables and their LayerNorm), ``model/embed_tokens`` on Llama."""
    parts = info.embedding_path.split("/")
    for n in range(1, len(parts) + 1):
        prefix = "/".join(parts[:n])
        if not any(layer_index(p) is not None for p in paths if p.startswith(prefix + "/")):
            return prefix
    return info.embedding_path
