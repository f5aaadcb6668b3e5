"""Adapter banks: K deltas of one method on a leading axis, each example run with its own.

A bank stacks ``K`` deltas of the same transform (same shapes) on a new leading axis, and
optionally ``K`` copies of the task head and of any base leaves the method trains itself
(BitFit's biases): every task gets its own. A batch carries ``adapter_index (B,)``; the banked
forward pass computes

    y_b = f(x_b; θ₀ ⊕ head[i_b], δ[i_b])        for every example b, i_b = adapter_index[b]

in one call, by gathering each example's slice of the bank (``δ[i_b]``: LoRA factors, (IA)³
vectors, prompts, prefixes, bottleneck adapters, diff-pruning gates ...) and ``jax.vmap``-ing
the ordinary adapted forward pass over the examples. The frozen base is shared (not batched),
so its matmuls stay ordinary matmuls; only the small per-example pieces are contracted batched
(``x_b A_{i_b}`` is a batched matmul). There is no Python loop over adapters, and the method
code is the unbanked code: every method (and composition) works in a bank.

Gradients flow through the gather, so in training each delta (and head) receives gradients only
from the examples that use it: one jitted step trains K task deltas on a batch mixing K tasks.

Bank delta layout::

    {"adapters": δ with every leaf (K, ...), "base": {path tree of per-task base leaves (K, ...)}}

``base`` holds the task head (``heads=True``) and the method's ``trainable_base`` leaves; the
bank's :class:`~jpeft.core.capabilities.ReplacesForward` says ``trains_head``, so the
:class:`~jpeft.train.trainer.Trainer` does not also train the shared head. Swapping the bank's arrays for others of the same shapes (another set of
tasks, :func:`load_bank`) reuses the compiled step: the bank is an argument, not a constant.

Example::

    method = bank(lora(LoraConfig(r=8)), size=4)
    deltas = method.init(jax.random.key(0), base, model.info())   # leaves (4, ...)
    logits = apply(model, method, base, deltas, ids, mask, types,
                   ctx=ApplyContext(adapter_index=jnp.array([0, 3, 1, 0])))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import paths as P
from jpeft.core.arrays import is_concrete
from jpeft.core.capabilities import ReplacesForward
from jpeft.core.compile import jit
from jpeft.core.transform import (
    ApplyContext,
    Delta,
    ModelInfo,
    Params,
    Transform,
    apply,
    resolve_info,
)

ADAPTERS = "adapters"
BASE = "base"


@dataclasses.dataclass(frozen=True)
class BankConfig:
    size: int = dataclasses.field(default=2, metadata={"help": "number of deltas K in the bank"})
    heads: bool = dataclasses.field(
        default=True, metadata={"help": "give every delta its own copy of the task head"})
    inner: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"bank.size must be an integer >= 1, got {self.size!r}")


def stack(trees: Sequence[Any]) -> Any:
    """Stack pytrees of identical structure and shapes on a new leading axis (the bank axis)."""
    if not trees:
        raise ValueError("stack: need at least one delta")
    first = jax.tree_util.tree_structure(trees[0])
    for i, tree in enumerate(trees[1:], 1):
        if jax.tree_util.tree_structure(tree) != first:
            raise ValueError(f"stack: delta {i} has another structure than delta 0; a bank needs deltas "
                             "of the same method and config")
        bad = [P.paths(trees[0])[j] if isinstance(trees[0], Mapping) else j
               for j, (a, b) in enumerate(zip(jax.tree_util.tree_leaves(trees[0]),
                                               jax.tree_util.tree_leaves(tree)))
               if np.shape(a) != np.shape(b)]
        if bad:
            raise ValueError(f"stack: delta {i} differs in shape from delta 0 at {bad[:5]}; a bank "
                             "needs deltas of the same shapes (same ranks, prompt lengths, ...)")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any) -> list[Any]:
    """Inverse of :func:`stack`."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return []
    size = leaves[0].shape[0]
    return [jax.tree_util.tree_unflatten(treedef, [x[i] for x in leaves]) for i in range(size)]


def select(bank_delta: Delta, index: int) -> Delta:
    """Slice ``index`` of every leaf (one task's delta, or head tree)."""
    return jax.tree_util.tree_map(lambda x: x[index], bank_delta)


def bank_size(bank_delta: Delta) -> int:
    leaves = jax.tree_util.tree_leaves(bank_delta)
    if not leaves:
        raise ValueError("an empty bank")
    return int(leaves[0].shape[0])


def banked_base_paths(transform: Transform, base: Params, info: ModelInfo, heads: bool) -> list[str]:
    """The base leaves every task gets its own copy of: the method's and (``heads``) the head's."""
    from jpeft.train.trainer import trainable_base_paths

    return trainable_base_paths(transform, base, info, train_head=heads)


def bank(transform: Transform, size: int, *, heads: bool = True, name: str | None = None) -> Transform:
    """A bank of ``size`` deltas of ``transform`` applied per example (see the module docstring).

    ``heads``: each task also gets its own task head (``info.head_patterns``). The returned
    transform needs ``ApplyContext.adapter_index (B,)`` (the trainer takes it from
    ``batch["adapter_index"]``). Not mergeable: merge one task with :func:`select`.
    """
    if transform.capability(ReplacesForward) is not None:
        raise ValueError(f"bank: {transform.name!r} is already a bank; a bank of banks is not supported")
    config = BankConfig(size=size, heads=heads, inner=transform.config)

    def init(rng: jax.Array, base: Params, info: ModelInfo | None = None) -> Delta:
        info = resolve_info(info)
        keys = jax.random.split(rng, config.size)
        adapters = stack([transform.init(k, base, info) for k in keys])
        paths = banked_base_paths(transform, base, info, heads)
        flat = P.flatten(base)
        tasks = {p: jnp.broadcast_to(jnp.asarray(flat[p]), (config.size, *np.shape(flat[p]))) for p in paths}
        return {ADAPTERS: adapters, BASE: P.unflatten(tasks)}

    def forward(model: Any, base: Params, delta: Delta, args: Sequence[Any], kwargs: Mapping[str, Any],
                ctx: ApplyContext, method: Any) -> Any:
        index = ctx.adapter_index
        if index is None:
            raise ValueError(f"{transform.name} bank: every example needs an adapter index; pass "
                             "ApplyContext(adapter_index=(B,) ints) or batch['adapter_index'] to the trainer")
        index = jnp.asarray(index)
        chex.assert_rank(index, 1)
        b = index.shape[0]
        arrays = [jnp.asarray(a) for a in args]
        for i, a in enumerate(arrays):
            if a.ndim == 0 or a.shape[0] != b:
                raise ValueError(f"bank: model argument {i} has shape {a.shape}; every argument needs the "
                                 f"batch axis first, of size {b} = len(adapter_index)")
        k = bank_size(delta[ADAPTERS])
        if is_concrete(index):
            bad = np.asarray(index)[(np.asarray(index) < 0) | (np.asarray(index) >= k)]
            if bad.size:
                raise ValueError(f"bank: adapter_index {bad[:5].tolist()} out of range for a bank of {k} deltas")
        take = lambda x: jnp.take(x, index, axis=0)
        per_delta = jax.tree_util.tree_map(take, delta[ADAPTERS])
        per_base = jax.tree_util.tree_map(take, delta[BASE])
        keys = jax.random.split(ctx.rng, b) if ctx.rng is not None else None
        flat_base = P.flatten(base)

        def one(d: Delta, own: Any, key: Any, *xs: Any) -> Any:
            own_flat = P.flatten(own)
            shared = {p: v for p, v in flat_base.items() if p not in own_flat}
            params = P.combine(shared, own_flat)
            sub = ApplyContext(train=ctx.train, rng=key, decoding=ctx.decoding)
            out = apply(model, transform, params, d, *(x[None] for x in xs), ctx=sub, method=method,
                        **kwargs)
            return jax.tree_util.tree_map(lambda o: o[0], out)

        in_axes = (0, 0, None if keys is None else 0, *([0] * len(arrays)))
        return jax.vmap(one, in_axes=in_axes)(per_delta, per_base, keys, *arrays)

    def labels(delta: Delta) -> Any:
        from jpeft.train.optim import base_labels

        one = jax.tree_util.tree_map(  # labels need shapes only (the trainer passes abstract trees)
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), delta[ADAPTERS])
        inner_labels = transform.labels(one)
        return {ADAPTERS: inner_labels, BASE: P.unflatten(base_labels(P.flatten(delta[BASE])))}

    view = _BankView()
    capabilities = [c.banked(view) for c in transform.capabilities]
    capabilities.append(ReplacesForward(forward, trains_head=heads))
    return Transform(
        name=name or f"bank[{transform.name}]",
        config=config,
        init=init,
        labels=labels,
        capabilities=tuple(c for c in capabilities if c is not None),
    )


class _BankView:
    """The bank delta layout, for the capabilities' ``banked`` lifts."""

    def slots(self, delta: Delta) -> list[Delta]:
        return unstack(delta[ADAPTERS])

    def rebuild(self, delta: Delta, slots: Sequence[Delta]) -> Delta:
        return {ADAPTERS: stack(list(slots)), BASE: delta[BASE]}

    def stacked(self, delta: Delta) -> Delta:
        return delta[ADAPTERS]


def task(bank_delta: Delta, index: int) -> tuple[Delta, dict[str, Any]]:
    """Task ``index`` of a bank: ``(delta, base leaves)`` (head etc. as a flat path dict)."""
    return select(bank_delta[ADAPTERS], index), P.flatten(select(bank_delta[BASE], index))


def from_tasks(deltas: Sequence[Delta], bases: Sequence[Mapping[str, Any]]) -> Delta:
    """Build a bank delta from per-task deltas and per-task base leaves (flat path dicts, e.g. the
    trained heads): the inverse of :func:`task`. All tasks must have the same shapes."""
    if len(deltas) != len(bases):
        raise ValueError(f"from_tasks: {len(deltas)} deltas but {len(bases)} base-leaf dicts")
    keys = [sorted(b) for b in bases]
    if any(k != keys[0] for k in keys):
        raise ValueError("from_tasks: the tasks hold different base leaves "
                         f"({keys[0][:3]} vs {next(k for k in keys if k != keys[0])[:3]})")
    return {ADAPTERS: stack(list(deltas)), BASE: P.unflatten(P.flatten(stack([dict(b) for b in bases])))}


def load_bank(folders: Sequence[str | os.PathLike[str]], model: Any, base: Params, *, heads: bool = True,
              allow_base_mismatch: bool = False) -> tuple[Transform, Delta]:
    """Stack adapters saved by :func:`jpeft.checkpoint.export.save_adapter` (same method and
    shapes, made on this base) into a bank: ``(bank transform, bank delta)``."""
    from jpeft.checkpoint.export import load_adapter

    loaded = [load_adapter(f, model, base, allow_base_mismatch=allow_base_mismatch) for f in folders]
    if not loaded:
        raise ValueError("load_bank: no adapter folders given")
    names = {t.name for t, _, _ in loaded}
    if len(names) != 1:
        raise ValueError(f"load_bank: the adapters are of different methods {sorted(names)}; a bank "
                         "holds one method")
    transform = loaded[0][0]
    method = bank(transform, len(loaded), heads=heads)
    paths = banked_base_paths(transform, base, model.info(), heads)
    bases = [{p: P.flatten(params)[p] for p in paths} for _, _, params in loaded]
    return method, from_tasks([d for _, d, _ in loaded], bases)


def predictor(model: Any, method: Transform, base: Params,
              model_inputs: Sequence[str] = ("input_ids", "attention_mask", "token_type_ids"),
              ) -> Callable[[Delta, Mapping[str, Any]], Any]:
    """A jitted ``(bank_delta, batch) -> outputs`` for serving: the bank is an argument, so a
    bank of other deltas with the same shapes (hot swap) reuses the compiled function."""

    def run(bank_delta: Delta, batch: Mapping[str, Any]) -> Any:
        ctx = ApplyContext(adapter_index=batch["adapter_index"])
        return apply(model, method, base, bank_delta, *(batch[k] for k in model_inputs if k in batch), ctx=ctx)

    return jit(run, matmul_dtype=model.info().matmul_dtype)


__all__ = ["BankConfig", "bank", "bank_size", "from_tasks", "load_bank", "predictor", "select", "stack",
           "task", "unstack"]
