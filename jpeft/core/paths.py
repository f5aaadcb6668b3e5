"""Parameter paths, selection by pattern, and partition/combine of parameter trees.

A parameter tree is a nested dict of arrays (Flax's ``params`` collection). Every leaf has a
*path string*: its keys joined with ``/``, e.g. ``encoder/layer_0/attention/self/query/kernel``.
Methods select their targets with regular expressions searched in those strings.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
from flax import traverse_util

Params = Mapping[str, Any]
Pattern = str | re.Pattern[str] | Iterable[str]
SEP = "/"


_LAYER = re.compile(r"(?:^|/)(?:layer|layers|h|blocks?)[_/](\d+)(?:/|$)")


def layer_index(path: str) -> int | None:
    """The layer number in a module path (``encoder/layer_3/...`` -> 3; NNX lists:
    ``layers/3/...`` -> 3), if any."""
    m = _LAYER.search(path)
    return int(m.group(1)) if m else None


def check_layer_indices(where: str, layers: Any) -> None:
    """Refuse a config's ``layers`` (``where`` names the config) unless it is a sequence of
    distinct integer layer indices >= 0."""
    if isinstance(layers, (str, bytes, numbers.Number)) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in layers) \
            or len(set(layers)) != len(tuple(layers)):
        raise ValueError(f"{where}.layers must be distinct non-negative layer indices, got {layers!r}")


def flatten(tree: Params) -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}`` (insertion order kept)."""
    if not tree:
        return {}
    return traverse_util.flatten_dict(dict(tree), sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` -> nested dict. Inverse of :func:`flatten`."""
    if not flat:
        return {}
    return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def paths(tree: Params) -> list[str]:
    """All leaf path strings of ``tree``."""
    return list(flatten(tree))


def _compile(pattern: Pattern) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    if isinstance(pattern, str):
        return re.compile(pattern)
    return re.compile("|".join(f"(?:{p})" for p in pattern))


def _describe(pattern: Pattern) -> str:
    return pattern.pattern if isinstance(pattern, re.Pattern) else repr(pattern)


class NoMatchError(ValueError):
    """A target pattern matched no parameter path."""


def no_match_error(what: str, pattern: Pattern, available: Iterable[str]) -> NoMatchError:
    available = list(available)
    shown = "\n  ".join(available[:200])
    more = f"\n  ... and {len(available) - 200} more" if len(available) > 200 else ""
    return NoMatchError(
        f"{what}: pattern {_describe(pattern)} matches no parameter path. "
        f"Patterns are regular expressions searched in '/'-joined paths; the available paths "
        f"are:\n  {shown}{more}"
    )


def select(
    tree: Params,
    pattern: Pattern,
    *,
    leaf_filter: Callable[[str, Any], bool] | None = None,
    what: str = "select",
) -> list[str]:
    """Paths of the leaves whose path matches ``pattern`` (``re.search``).

    ``leaf_filter(path, leaf)`` narrows the candidates (e.g. only ``kernel`` leaves). Raises
    :class:`NoMatchError` listing the candidate paths when nothing matches.
    """
    regex = _compile(pattern)
    flat = flatten(tree)
    candidates = [p for p, v in flat.items() if leaf_filter is None or leaf_filter(p, v)]
    hits = [p for p in candidates if regex.search(p)]
    if not hits:
        raise no_match_error(what, pattern, candidates)
    return hits


def select_modules(
    tree: Params, pattern: Pattern, *, param: str = "kernel", what: str = "select"
) -> list[str]:
    """Module paths (path minus the final ``/param``) whose ``param`` leaf matches ``pattern``.

    ``select_modules(params, r"(query|value)")`` -> ``["encoder/layer_0/attention/self/query", ...]``.
    The pattern is searched in the module path, so ``r"query$"`` works.
    """
    regex = _compile(pattern)
    flat = flatten(tree)
    suffix = SEP + param
    modules = [p[: -len(suffix)] for p in flat if p.endswith(suffix)]
    hits = [m for m in modules if regex.search(m)]
    if not hits:
        raise no_match_error(what, pattern, modules)
    return hits


def mask(tree: Params, selected: Iterable[str]) -> dict[str, Any]:
    """Boolean tree of ``tree``'s structure: True at the given paths."""
    chosen = set(selected)
    return unflatten({p: (p in chosen) for p in flatten(tree)})


def partition(tree: Params, selected: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``tree`` into ``(chosen, rest)`` flat dicts keyed by path string.

    Like ``eqx.partition``, but the two halves are disjoint flat dicts, so the frozen half can be
    closed over and never differentiated. :func:`combine` is the inverse.
    """
    chosen = set(selected)
    flat = flatten(tree)
    unknown = chosen.difference(flat)
    if unknown:
        raise KeyError(f"partition: paths not in the tree: {sorted(unknown)[:10]}")
    left = {p: v for p, v in flat.items() if p in chosen}
    right = {p: v for p, v in flat.items() if p not in chosen}
    return left, right


def combine(*flat_parts: Mapping[str, Any]) -> dict[str, Any]:
    """Merge disjoint flat dicts (from :func:`partition`) back into one nested tree."""
    merged: dict[str, Any] = {}
    for part in flat_parts:
        overlap = merged.keys() & part.keys()
        if overlap:
            raise ValueError(f"combine: overlapping paths {sorted(overlap)[:10]}")
        merged.update(part)
    return unflatten(merged)


def _is_quantized(x: Any) -> bool:
    from jpeft.quant import is_quantized

    return is_quantized(x)


def count_params(tree: Any) -> int:
    """Total number of scalars in the array leaves of ``tree``; a quantized weight
    (:class:`jpeft.quant.QuantizedArray`) counts as the weight it stands for, not its codes."""
    return int(sum(getattr(x, "size", 0) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_quantized)))


def nbytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree``."""
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(tree)))
