"""Optional behaviours of a method, declared beside it as capability objects.

A :class:`~jpeft.core.transform.Transform` holds what every method needs (its delta, how it acts
on the model, what it trains, merging). Anything only some methods have is a *capability*: a small
frozen dataclass passed in ``Transform(capabilities=(...))`` by the method's own file. The trainer,
banks and checkpoint code ask for a capability by type (``transform.capability(TrainingHooks)``)
and never branch on which method they hold. Each capability says how it lifts through the two
wrappers that change a delta's layout:

* :func:`~jpeft.core.transform.compose` (delta ``{part name: part delta}``): ``compose(parts, names)``;
* :func:`~jpeft.bank.bank` (every leaf gains a leading slot axis): ``banked(view)``.

The capabilities:

=====================  =========================================================  ===============
capability             what it declares                                           used by
=====================  =========================================================  ===============
:class:`TrainingHooks`  a loss penalty, a host-side rewrite between steps, stage   diff pruning
                       starts of the learning-rate schedule
:class:`AfterTraining`  what is kept after training (``finalize``) and its stats   prefix, P-tuning,
                                                                                  diff pruning
:class:`OptimizerGroups` learning-rate multipliers of the method's own groups      LoRA+, prefix
:class:`AddsTokens`     the method lengthens the sequence (a fresh delta is not    prompt family
                       the identity)
:class:`Exclusive`      cannot be combined with another method                     full
:class:`ReplacesForward` replaces the whole adapted forward pass, carries heads    banks
=====================  =========================================================  ===============
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp

Delta = Any
C = TypeVar("C", bound="Capability")


class BankView(Protocol):
    """How a bank lays out its delta (see :mod:`jpeft.bank`)."""

    def slots(self, delta: Delta) -> list[Delta]:
        """The per-task deltas of a bank delta."""

    def rebuild(self, delta: Delta, slots: Sequence[Delta]) -> Delta:
        """``delta`` with its per-task deltas replaced by ``slots``."""

    def stacked(self, delta: Delta) -> Delta:
        """The per-task deltas as one tree with a leading slot axis (for ``jax.vmap``)."""


class Capability:
    """Base class of capabilities (see the module docstring)."""

    @classmethod
    def compose(cls: type[C], parts: Sequence[tuple[str, C]], names: Sequence[str]) -> C | None:
        """This capability of a composition of ``names`` whose parts ``parts`` (``(name,
        capability)``) have it; ``None`` drops it. Raises when the method cannot be composed."""
        raise NotImplementedError

    def banked(self: C, view: BankView) -> C | None:
        """This capability of a bank of this method's deltas; ``None`` drops it."""
        raise NotImplementedError


def _zero() -> jax.Array:
    return jnp.zeros((), jnp.float32)


@dataclasses.dataclass(frozen=True)
class TrainingHooks(Capability):
    """Training-time behaviour beyond the gradient step.

    Attributes:
      penalty: ``(delta, ctx) -> scalar`` added to the loss (diff pruning's expected L0 norm).
      between_steps: ``(delta, step, total_steps) -> delta``, called by the training loop after
        every step (host side, outside jit) to rewrite the delta on a schedule; returns the very
        same object when it changes nothing (diff pruning's projection onto its sparsity).
      stage_starts: ``total_steps -> steps`` at which a new training stage begins; the
        learning-rate schedule restarts there with its warm-up and decay over the stage.
    """

    penalty: Callable[[Delta, Any], jax.Array] | None = None
    between_steps: Callable[[Delta, int, int], Delta] | None = None
    stage_starts: Callable[[int], tuple[int, ...]] | None = None

    @classmethod
    def compose(cls, parts: Sequence[tuple[str, "TrainingHooks"]], names: Sequence[str]) -> "TrainingHooks":
        with_penalty = [(n, h.penalty) for n, h in parts if h.penalty is not None]
        with_rewrite = [(n, h.between_steps) for n, h in parts if h.between_steps is not None]
        with_stages = [h.stage_starts for _, h in parts if h.stage_starts is not None]

        def penalty(delta: Delta, ctx: Any) -> jax.Array:
            return sum((fn(delta[n], ctx) for n, fn in with_penalty), _zero())

        def between_steps(delta: Delta, step: int, total: int) -> Delta:
            new = dict(delta)
            for n, fn in with_rewrite:
                new[n] = fn(delta[n], step, total)
            return delta if all(new[n] is delta[n] for n, _ in with_rewrite) else new

        def stage_starts(total: int) -> tuple[int, ...]:
            return tuple(sorted({s for fn in with_stages for s in fn(total)}))

        return cls(penalty if with_penalty else None, between_steps if with_rewrite else None,
                   stage_starts if with_stages else None)

    def banked(self, view: BankView) -> "TrainingHooks":
        inner_penalty, inner_rewrite = self.penalty, self.between_steps

        def penalty(delta: Delta, ctx: Any) -> jax.Array:
            return jnp.sum(jax.vmap(lambda d: inner_penalty(d, ctx))(view.stacked(delta)))

        def between_steps(delta: Delta, step: int, total: int) -> Delta:
            slots = view.slots(delta)
            new = [inner_rewrite(d, step, total) for d in slots]
            return delta if all(n is d for n, d in zip(new, slots)) else view.rebuild(delta, new)

        return TrainingHooks(penalty if inner_penalty is not None else None,
                             between_steps if inner_rewrite is not None else None, self.stage_starts)


@dataclasses.dataclass(frozen=True)
class AfterTraining(Capability):
    """What a method keeps and reports once training ends.

    Attributes:
      finalize: ``delta -> delta`` kept after training (prefix tuning drops its reparametrising
        MLP, diff pruning keeps its largest entries); idempotent.
      stats: ``delta -> {name: float}`` reported after training (diff pruning's density).
    """

    finalize: Callable[[Delta], Delta] | None = None
    stats: Callable[[Delta], dict[str, float]] | None = None

    @classmethod
    def compose(cls, parts: Sequence[tuple[str, "AfterTraining"]], names: Sequence[str]) -> "AfterTraining":
        own = dict(parts)

        def finalize(delta: Delta) -> Delta:
            return {n: own[n].finalize(d) if n in own and own[n].finalize else d for n, d in delta.items()}

        def stats(delta: Delta) -> dict[str, float]:
            return {f"{n}.{k}": v for n, a in parts if a.stats for k, v in a.stats(delta[n]).items()}

        return cls(finalize, stats)

    def banked(self, view: BankView) -> "AfterTraining":
        inner_finalize, inner_stats = self.finalize, self.stats

        def finalize(delta: Delta) -> Delta:
            return view.rebuild(delta, [inner_finalize(d) for d in view.slots(delta)])

        def stats(delta: Delta) -> dict[str, float]:
            return {f"{i}.{k}": v for i, d in enumerate(view.slots(delta)) for k, v in inner_stats(d).items()}

        return AfterTraining(finalize if inner_finalize else None, stats if inner_stats else None)


@dataclasses.dataclass(frozen=True)
class OptimizerGroups(Capability):
    """Learning-rate multipliers for the method's own optimizer groups (its ``labels``), e.g.
    LoRA+'s ``{"lora_B": 16}``; :attr:`jpeft.train.optim.OptimConfig.group_lr` overrides them."""

    group_lr: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def compose(cls, parts: Sequence[tuple[str, "OptimizerGroups"]], names: Sequence[str]) -> "OptimizerGroups":
        return cls({k: v for _, g in parts for k, v in g.group_lr.items()})

    def banked(self, view: BankView) -> "OptimizerGroups":
        return self


@dataclasses.dataclass(frozen=True)
class AddsTokens(Capability):
    """The method lengthens the sequence (prompt tuning, P-tuning, prefixes): a fresh delta
    changes the output, and the method cannot be merged."""

    @classmethod
    def compose(cls, parts: Sequence[tuple[str, "AddsTokens"]], names: Sequence[str]) -> "AddsTokens":
        return cls()

    def banked(self, view: BankView) -> "AddsTokens":
        return self


@dataclasses.dataclass(frozen=True)
class Exclusive(Capability):
    """The method cannot be combined with any other (full fine-tuning trains every weight)."""

    @classmethod
    def compose(cls, parts: Sequence[tuple[str, "Exclusive"]], names: Sequence[str]) -> "Exclusive":
        name = parts[0][0]
        others = ", ".join(n for n in names if n != name)
        raise ValueError(
            f"'{name}' trains every weight and cannot be combined with other methods "
            f"(got {others}); use '{name}' alone or drop it from the combination.")

    def banked(self, view: BankView) -> "Exclusive":
        return self


@dataclasses.dataclass(frozen=True)
class ReplacesForward(Capability):
    """The transform runs the adapted forward pass itself (adapter banks vmap the ordinary pass
    over examples, :mod:`jpeft.bank`).

    Attributes:
      forward: ``(model, base, delta, args, kwargs, ctx, method) -> outputs``.
      trains_head: the delta carries its own task head(s), so the trainer leaves the base's head
        frozen.
    """

    forward: Callable[..., Any]
    trains_head: bool = False

    @classmethod
    def compose(cls, parts: Sequence[tuple[str, "ReplacesForward"]], names: Sequence[str]) -> "ReplacesForward":
        raise ValueError(
            f"'{parts[0][0]}' replaces the whole forward pass (an adapter bank) and cannot be composed; "
            "compose the methods first and bank the composition: bank(compose(a, b), size)")

    def banked(self, view: BankView) -> "ReplacesForward":
        raise ValueError("bank: this transform is already a bank; a bank of banks is not supported")


__all__ = ["AddsTokens", "AfterTraining", "BankView", "Capability", "Exclusive", "OptimizerGroups",
           "ReplacesForward", "TrainingHooks"]
