"""The Transform protocol: one PEFT method = a small set of pure functions.

A transform never mutates the model or the base parameters. It contributes, at apply time:

* ``adapt_params(base, delta, ctx) -> params``: a rewrite of the weights before the forward pass
  (diff pruning's ``θ₀ + z ⊙ w``); identity for most methods;
* ``interceptors(delta, ctx) -> [interceptor, ...]``: Linen method interceptors
  (``nn.intercept_methods``) that wrap a model *tap* (adapters, prefixes, prompts). Interception happens only while tracing, so the jitted step
  pays nothing for it;
* ``layer_hook(ctx)``: a hook on every adapted layer's call (LoRA, (IA)³ on any Dense, DenseGeneral,
  Einsum or Conv, :mod:`jpeft.core.model`);
* ``trainable_base(base) -> [path, ...]``: base leaves trained directly (BitFit's biases, the top
  layers for layer freezing, everything for ``full``);

and, for weight-space methods, ``merge(base, delta) -> params`` / ``unmerge(params, delta) -> base``.
What only some methods have (diff pruning's loss penalty and projection between steps, LoRA+'s
learning-rate groups, what prefix tuning keeps after training, a bank's own forward pass) is a
capability declared beside the method (:mod:`jpeft.core.capabilities`).

``compose(a, b, ...)`` is itself a transform whose delta is ``{a.name: δa, b.name: δb, ...}``.
Order is the stacking order: every parameter rewrite runs first (left to right), then the
interceptors, a later transform's wrapping an earlier one's, so on the same ``Dense``
``compose(lora, ia3)`` computes ``ia3(lora(x))`` and ``compose(bitfit, lora)`` computes
``x(W) + b + δb + s·xAB``. Merging follows the same order (the parameter-rewriting parts first,
then the others left to right) so that merged weights compute what the adapted model computes;
unmerging runs in reverse.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft.core.capabilities import (
    AddsTokens,
    AfterTraining,
    Capability,
    OptimizerGroups,
    ReplacesForward,
    TrainingHooks,
)

Params = Mapping[str, Any]
Delta = Any
Interceptor = Callable[..., Any]
C = TypeVar("C", bound=Capability)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Static facts about a model that transforms may need (every field optional).

    Weight-space methods need none of them on a model whose adapted kernels are 2-D; ``layers``
    (filled by :func:`jpeft.from_linen` / :func:`jpeft.from_nnx`) describes DenseGeneral, Einsum,
    Conv and stacked layers, and ``taps`` counts the calls of each tap kind
    (:mod:`jpeft.models.taps`) of such a described model (``None``: not counted). Activation-space methods need sizes (``hidden_size``, ...) and ask
    for the ones they use by name (:meth:`require`). ``head_patterns`` are regexes of the task
    head's parameter paths (trained by every method, as HF PEFT's ``modules_to_save`` does for
    sequence classification).
    """

    family: str = "custom"
    num_layers: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    num_kv_heads: int | None = None
    embedding_path: str = "embeddings/word_embeddings/embedding"
    head_patterns: tuple[str, ...] = ()
    has_bias: bool = True
    matmul_dtype: str | None = None  # the config's: matmul operand dtype, float32 accumulation
    layers: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    taps: Mapping[str, int] | None = dataclasses.field(default=None, compare=False, hash=False)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def require(self, method: str, *fields: str) -> None:
        """Raise naming every field of ``fields`` that is unset (0 or ``None``) for ``method``."""
        missing = [f for f in fields if not getattr(self, f)]
        if missing:
            raise ValueError(
                f"{method} needs ModelInfo.{', ModelInfo.'.join(missing)} of this model, which the "
                f"given info (family {self.family!r}) does not set; pass "
                f"info=jpeft.ModelInfo({', '.join(f'{m}=...' for m in missing)}, ...)")


def resolve_info(info: "ModelInfo | None") -> "ModelInfo":
    """``info``, or an empty :class:`ModelInfo` (facts read off the parameter tree)."""
    return ModelInfo() if info is None else info


@dataclasses.dataclass(frozen=True)
class ApplyContext:
    """What a transform may read at apply time besides its delta (all optional).

    Attributes:
      train: training mode (dropout, stochastic gates).
      rng: a PRNG key for this forward pass; use :meth:`key` to derive independent streams.
      adapter_index: ``(batch,)`` int array selecting a delta from a bank per example.
      decoding: the call continues a cached sequence (a decode step after the prefill, see
        :mod:`jpeft.generate`): methods that prepend input tokens (prompt tuning, P-tuning) do so
        on the first call only, their tokens being in the KV cache already.
      info: the model's :class:`ModelInfo` (set by :func:`apply` from ``model.info()`` when not
        given; ``None`` for an undescribed Linen module), for parameter rewrites that need the
        layers' axis groups (OFT's rotation of ``DenseGeneral``/``Einsum`` kernels).
    """

    train: bool = False
    rng: jax.Array | None = None
    adapter_index: jax.Array | None = None
    decoding: bool = False
    info: "ModelInfo | None" = dataclasses.field(default=None, compare=False, hash=False)

    def key(self, *names: str | int) -> jax.Array | None:
        """A key derived from ``rng`` and stable names (``None`` when there is no rng)."""
        if self.rng is None:
            return None
        key = self.rng
        for name in names:
            salt = name if isinstance(name, int) else zlib.crc32(name.encode())
            key = jax.random.fold_in(key, salt & 0x7FFFFFFF)
        return key


def _identity_params(base: Params, delta: Delta, ctx: ApplyContext) -> Params:
    return base


def _no_interceptors(delta: Delta, ctx: ApplyContext) -> Sequence[Interceptor]:
    return ()


def _no_base(base: Params) -> list[str]:
    return []


def _default_labels(delta: Delta) -> Any:
    return jax.tree_util.tree_map(lambda _: "default", delta)


def _count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "size"))


class InitFn(Protocol):
    def __call__(self, rng: jax.Array, base: Params, info: ModelInfo | None = None) -> Delta: ...


MergeFn = Callable[[Params, Delta, "ModelInfo | None"], Params]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A PEFT method as pure functions (see the module docstring).

    Every method sets ``name``, ``config`` and ``init`` and acts on the model through one or
    more of ``adapt_params``, ``interceptors`` and ``layer_hook``; the rest has defaults.
    Behaviours only some methods have (a loss penalty, a learning-rate group, a bank's forward
    pass ...) are :mod:`capabilities <jpeft.core.capabilities>`, looked up with
    :meth:`capability`.

    Attributes:
      name: key of this transform's delta inside a composition.
      config: the method's config dataclass (saved with checkpoints).
      init: ``(rng, base, info=None) -> delta``.
      adapt_params: ``(base, delta, ctx) -> params``, a rewrite of the weights before the forward
        pass (diff pruning's ``θ₀ + z ⊙ w``).
      interceptors: ``(delta, ctx) -> [interceptor, ...]``, Linen method interceptors on the
        model's taps (adapters, prefixes, prompts).
      layer_hook: weight-space methods that act on a layer's call: ``ctx -> hook`` with
        ``hook(call, x, layer, leaves) -> y`` (see :mod:`jpeft.core.model`); the delta holds
        the leaves at ``<module path>/<leaf>``.
      delta_layout: for a method with a layer hook, ``(module path, leaf name) -> groups``: the
        axes of each delta leaf as groups of its kernel (:data:`jpeft.core.layers.GROUPS`), so
        that under a mesh the leaf is partitioned as its kernel is (LoRA's ``A`` as the
        kernel's input axes, ``B`` as its output axes).
      trainable_base: ``base -> [path, ...]``, base leaves trained directly (BitFit's biases).
      merge / unmerge: ``(params, delta, info) -> params``; ``None`` for methods that cannot
        fold into the weights.
      labels: ``delta -> tree of optimizer group names`` (e.g. ``"no_decay"``).
      new_params: ``delta -> int``, how many parameters the adapted model has beyond the base's
        (for the "all params" count): the delta's size by default; ``0`` for additive deltas on
        existing weights (BitFit, freezing), whose ``θ₀ + δ`` has the base's shape.
      capabilities: the method's optional behaviours (:mod:`jpeft.core.capabilities`), at most
        one of each type.
      parts: the transforms of a composition (empty for a single method).
    """

    name: str
    config: Any
    init: InitFn
    adapt_params: Callable[[Params, Delta, ApplyContext], Params] = _identity_params
    interceptors: Callable[[Delta, ApplyContext], Sequence[Interceptor]] = _no_interceptors
    layer_hook: Callable[[ApplyContext], Callable[..., jax.Array]] | None = None
    delta_layout: Callable[[str, str], tuple[str, ...]] | None = None
    trainable_base: Callable[[Params], list[str]] = _no_base
    merge: MergeFn | None = None
    unmerge: MergeFn | None = None
    labels: Callable[[Delta], Any] = _default_labels
    new_params: Callable[[Delta], int] = lambda delta: _count(delta)
    capabilities: tuple[Capability, ...] = ()
    parts: tuple["Transform", ...] = ()

    def __post_init__(self) -> None:
        kinds = [type(c) for c in self.capabilities]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"{self.name}: at most one capability of each type, got "
                             f"{[k.__name__ for k in kinds]}")

    def capability(self, kind: type[C]) -> C | None:
        """This transform's capability of type ``kind``, or ``None``."""
        return next((c for c in self.capabilities if isinstance(c, kind)), None)

    # Read-only views of the capabilities, with the defaults of a method that lacks them.
    def penalty(self, delta: Delta, ctx: ApplyContext) -> jax.Array:
        """The loss penalty (:class:`~jpeft.core.capabilities.TrainingHooks`; 0 without one)."""
        hooks = self.capability(TrainingHooks)
        if hooks is None or hooks.penalty is None:
            return jnp.zeros((), jnp.float32)
        return hooks.penalty(delta, ctx)

    def stage_starts(self, total_steps: int) -> tuple[int, ...]:
        """Steps where a new training stage starts (:class:`~jpeft.core.capabilities.TrainingHooks`)."""
        hooks = self.capability(TrainingHooks)
        return () if hooks is None or hooks.stage_starts is None else hooks.stage_starts(total_steps)

    def finalize(self, delta: Delta) -> Delta:
        """The delta kept after training (:class:`~jpeft.core.capabilities.AfterTraining`)."""
        after = self.capability(AfterTraining)
        return delta if after is None or after.finalize is None else after.finalize(delta)

    def stats(self, delta: Delta) -> dict[str, float]:
        """Numbers reported after training (:class:`~jpeft.core.capabilities.AfterTraining`)."""
        after = self.capability(AfterTraining)
        return {} if after is None or after.stats is None else after.stats(delta)

    @property
    def group_lr(self) -> Mapping[str, float]:
        """The method's own learning-rate multipliers (:class:`~jpeft.core.capabilities.OptimizerGroups`)."""
        groups = self.capability(OptimizerGroups)
        return {} if groups is None else groups.group_lr

    @property
    def adds_tokens(self) -> bool:
        """Whether the method lengthens the sequence (:class:`~jpeft.core.capabilities.AddsTokens`)."""
        return self.capability(AddsTokens) is not None

    @property
    def mergeable(self) -> bool:
        return self.merge is not None and self.unmerge is not None


class NotMergeableError(TypeError):
    """``merge``/``unmerge`` on a transform with an activation-space part."""


def _merge_chain(parts: Sequence[Transform], reverse: bool) -> MergeFn:
    def run(params: Params, delta: Delta, info: ModelInfo | None = None) -> Params:
        order = reversed(parts) if reverse else parts
        for part in order:
            fn = part.unmerge if reverse else part.merge
            assert fn is not None
            params = fn(params, delta[part.name], info)
        return params

    return run


def _require_transform(where: str, value: Any) -> None:
    """Refuse what is not a :class:`Transform` (e.g. a method's config) with the fix."""
    if not isinstance(value, Transform):
        raise TypeError(f"{where}: expected a jpeft Transform, got a {type(value).__name__}; make one "
                        "from a config with the method's factory (e.g. jpeft.lora(LoraConfig(...)), "
                        "jpeft.ia3(IA3Config(...))) or jpeft.build(...)")


def compose(*transforms: Transform, name: str | None = None) -> Transform:
    """Compose transforms into one; the delta is ``{part.name: part_delta}``.

    Refuses two parts with the same name, and parts whose capabilities refuse composition (an
    exclusive ``full``, a bank). See the module docstring for the stacking order.
    """
    flat: list[Transform] = []
    for t in transforms:
        _require_transform("compose", t)
        flat.extend(t.parts if t.parts else (t,))
    if not flat:
        raise ValueError("compose() needs at least one transform")
    if len(flat) == 1:
        return flat[0]
    names = [t.name for t in flat]
    if len(set(names)) != len(names):
        raise ValueError(
            f"compose: duplicate method names {names}; give each part a distinct name "
            "(e.g. lora(..., name='lora_attn'))"
        )
    capabilities = _compose_capabilities(flat, names)

    def init(rng: jax.Array, base: Params, info: ModelInfo | None = None) -> Delta:
        keys = jax.random.split(rng, len(flat))
        return {t.name: t.init(k, base, info) for t, k in zip(flat, keys)}

    def adapt_params(base: Params, delta: Delta, ctx: ApplyContext) -> Params:
        for t in flat:
            base = t.adapt_params(base, delta[t.name], ctx)
        return base

    def interceptors(delta: Delta, ctx: ApplyContext) -> list[Interceptor]:
        out: list[Interceptor] = []
        for t in flat:
            out.extend(t.interceptors(delta[t.name], ctx))
        return out

    def trainable_base(base: Params) -> list[str]:
        seen: dict[str, None] = {}
        for t in flat:
            seen.update(dict.fromkeys(t.trainable_base(base)))
        return list(seen)

    mergeable = all(t.mergeable for t in flat)
    # Parameter rewrites happen before any interceptor runs, so they merge first.
    merge_order = [t for t in flat if t.adapt_params is not _identity_params] + \
                  [t for t in flat if t.adapt_params is _identity_params]
    return Transform(
        name=name or "+".join(names),
        config={t.name: t.config for t in flat},
        init=init,
        adapt_params=adapt_params,
        interceptors=interceptors,
        trainable_base=trainable_base,
        merge=_merge_chain(merge_order, reverse=False) if mergeable else None,
        unmerge=_merge_chain(merge_order, reverse=True) if mergeable else None,
        labels=lambda delta: {t.name: t.labels(delta[t.name]) for t in flat},
        new_params=lambda delta: sum(t.new_params(delta[t.name]) for t in flat),
        capabilities=capabilities,
        parts=tuple(flat),
    )


def _compose_capabilities(flat: Sequence[Transform], names: Sequence[str]) -> tuple[Capability, ...]:
    """Each capability type some part has, lifted to the composed delta by its ``compose``."""
    kinds = list(dict.fromkeys(type(c) for t in flat for c in t.capabilities))
    out = []
    for kind in kinds:
        have = [(t.name, t.capability(kind)) for t in flat if t.capability(kind) is not None]
        lifted = kind.compose(have, names)
        if lifted is not None:
            out.append(lifted)
    return tuple(out)


@contextmanager
def intercepting(interceptors: Sequence[Interceptor]) -> Iterator[None]:
    """Install interceptors; later ones wrap earlier ones (are called first).

    Flax wraps the most recently installed interceptor innermost, hence the reversal.
    """
    with ExitStack() as stack:
        for fn in reversed(list(interceptors)):
            stack.enter_context(nn.intercept_methods(fn))
        yield


def hook_parts(transform: Transform, delta: Delta, ctx: ApplyContext) -> list[Any]:
    """The layer hooks of ``transform``'s parts with their leaves grouped by module path."""
    from jpeft.core import model as M

    if not transform.parts:
        return ([M.HookPart(transform.name, transform.layer_hook(ctx), M.group_by_module(delta))]
                if transform.layer_hook is not None else [])
    return [M.HookPart(t.name, t.layer_hook(ctx), M.group_by_module(delta[t.name]))
            for t in transform.parts if t.layer_hook is not None]


def apply(
    model: Any,
    transform: Transform,
    base: Params,
    delta: Delta,
    *args: Any,
    ctx: ApplyContext = ApplyContext(),
    method: Callable[..., Any] | str | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``model`` adapted by ``transform``: pure and jittable.

    ``model`` is a Linen module (jpeft's own, or any other, optionally described by
    :func:`jpeft.from_linen`) or an NNX model from :func:`jpeft.from_nnx`. ``args``/``kwargs``
    go to the model. When the model's call takes ``deterministic`` (or ``train``) and it is not
    given, it is set from ``ctx.train``; Linen's ``dropout`` rng (NNX: the model's rng streams)
    comes from ``ctx.rng``.
    """
    from jpeft.core import model as M

    _require_transform("jpeft.apply", transform)
    own_forward = transform.capability(ReplacesForward)
    if own_forward is not None:
        return own_forward.forward(model, base, delta, args, kwargs, ctx, method)
    if ctx.info is None and callable(getattr(model, "info", None)):
        ctx = dataclasses.replace(ctx, info=model.info())
    params = transform.adapt_params(base, delta, ctx)
    parts = hook_parts(transform, delta, ctx)
    interceptors = transform.interceptors(delta, ctx)
    if isinstance(model, M.NnxModel):
        return model.run(params, parts, interceptors, args, kwargs, ctx, method)
    module = model.module if isinstance(model, M.LinenModel) else model
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"jpeft.apply: model is a {type(model).__name__}; pass a Linen module, "
            "jpeft.from_linen(module, params, *example_inputs), or the model of "
            "jpeft.from_nnx(nnx_module)")
    return M.run_linen(module, params, parts, interceptors, args, kwargs, ctx, method)


def merge(transform: Transform, base: Params, delta: Delta, info: ModelInfo | None = None) -> Params:
    """Fold a weight-space delta into plain weights (zero inference overhead). ``info`` (a
    model's :meth:`info`) is needed only for layers whose kernel is not 2-D."""
    _require_transform("jpeft.merge", transform)
    if transform.merge is None:
        parts = transform.parts or (transform,)
        bad = [t.name for t in parts if not t.mergeable]
        raise NotMergeableError(
            f"cannot merge: {bad} act on activations, not weights; keep them unmerged "
            "(jpeft.apply) or merge only the weight-space parts."
        )
    return transform.merge(base, delta, info)


def unmerge(transform: Transform, params: Params, delta: Delta,
            info: ModelInfo | None = None) -> Params:
    """Inverse of :func:`merge`: take the delta back out of merged weights."""
    _require_transform("jpeft.unmerge", transform)
    if transform.unmerge is None:
        raise NotMergeableError(f"cannot unmerge '{transform.name}': it has no weight-space form")
    return transform.unmerge(params, delta, info)


def module_path(context: Any) -> str:
    """The '/'-joined path of the module an interceptor is looking at."""
    return "/".join(str(p) for p in context.module.path)
