"""The Transform protocol: one PEFT method = a small set of pure functions.

A transform never mutates the model or the base parameters. It contributes, at apply time:

* ``adapt_params(base, delta, ctx) -> params``: a rewrite of the weights before the forward pass
  (diff pruning's ``θ₀ + z ⊙ w``); identity for most methods;
* ``interceptors(delta, ctx) -> [interceptor, ...]``: Linen method interceptors
  (``nn.intercept_methods``) that wrap ``Dense.__call__`` (LoRA's factored path, (IA)³) or a model
  *tap* (adapters, prefixes, prompts). Interception happens only while tracing, so the jitted step
  pays nothing for it;
* ``trainable_base(base) -> [path, ...]``: base leaves trained directly (BitFit's biases, the top
  layers for layer freezing, everything for ``full``);
* ``penalty(delta, ctx) -> scalar``: a regulariser added to the loss (diff pruning's expected L0);

and, for weight-space methods, ``merge(base, delta) -> params`` / ``unmerge(params, delta) -> base``.

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
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Mapping[str, Any]
Delta = Any
Interceptor = Callable[..., Any]


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
    """

    train: bool = False
    rng: jax.Array | None = None
    adapter_index: jax.Array | None = None
    decoding: bool = False

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


def _no_penalty(delta: Delta, ctx: ApplyContext) -> jax.Array:
    return jnp.zeros((), jnp.float32)


def _default_labels(delta: Delta) -> Any:
    return jax.tree_util.tree_map(lambda _: "default", delta)


def _keep(delta: Delta) -> Delta:
    return delta


def _no_stats(delta: Delta) -> dict[str, float]:
    return {}


def _no_stages(total_steps: int) -> tuple[int, ...]:
    return ()


def _count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "size"))


class InitFn(Protocol):
    def __call__(self, rng: jax.Array, base: Params, info: ModelInfo | None = None) -> Delta: ...


MergeFn = Callable[[Params, Delta, "ModelInfo | None"], Params]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A PEFT method as pure functions (see the module docstring).

    Attributes:
      name: key of this transform's delta inside a composition.
      config: the method's config dataclass (saved with checkpoints).
      init: ``(rng, base, info=None) -> delta``.
      layer_hook: weight-space methods that act on a layer's call: ``ctx -> hook`` with
        ``hook(call, x, layer, leaves) -> y`` (see :mod:`jpeft.core.model`); the delta holds
        the leaves at ``<module path>/<leaf>``.
      delta_layout: for a method with a layer hook, ``(module path, leaf name) -> groups``: the
        axes of each delta leaf as groups of its kernel (:data:`jpeft.core.layers.GROUPS`), so
        that under a mesh the leaf is partitioned as its kernel is (LoRA's ``A`` as the
        kernel's input axes, ``B`` as its output axes).
      merge / unmerge: ``(params, delta, info) -> params``; ``None`` for methods that cannot
        fold into the weights.
      labels: ``delta -> tree of optimizer group names`` (e.g. ``"no_decay"``).
      group_lr: the learning-rate multipliers the method asks for its own groups (LoRA+'s
        ``{"lora_B": 16}``); ``OptimConfig.group_lr`` overrides them.
      finalize: ``delta -> delta`` kept after training (prefix tuning drops its MLP, diff pruning
        keeps its largest entries).
      stats: ``delta -> {name: float}`` reported after training (diff pruning's density).
      between_steps: ``None``, or ``(delta, step, total_steps) -> delta`` called by the training
        loop after every step (host side, outside jit) to rewrite the delta on a schedule (diff
        pruning projects onto its target sparsity, then fine-tunes with the mask fixed); it
        returns the very same object when it changes nothing.
      stage_starts: ``total_steps -> steps`` at which a new training stage begins (diff
        pruning's fine-tuning after the projection); the learning-rate schedule restarts there,
        with its warm-up and decay over the stage.
      exclusive: refuses composition with any other method (``full``).
      adds_tokens: the method lengthens the sequence (prompt family), so a fresh delta changes
        the output.
      forward: ``None``, or a replacement of the whole adapted forward pass
        ``(model, base, delta, args, kwargs, ctx, method) -> outputs`` (adapter banks vmap the
        ordinary pass over examples, :mod:`jpeft.bank`); such a transform is not composable.
      trains_head: the delta carries its own task head(s), so the trainer leaves the base's
        head frozen (banks).
      new_params: ``delta -> int``, how many parameters the adapted model has beyond the base's
        (for the "all params" count): the delta's size by default; ``0`` for additive deltas on
        existing weights (BitFit, freezing), whose ``θ₀ + δ`` has the base's shape.
    """

    name: str
    config: Any
    init: InitFn
    adapt_params: Callable[[Params, Delta, ApplyContext], Params] = _identity_params
    interceptors: Callable[[Delta, ApplyContext], Sequence[Interceptor]] = _no_interceptors
    layer_hook: Callable[[ApplyContext], Callable[..., jax.Array]] | None = None
    delta_layout: Callable[[str, str], tuple[str, ...]] | None = None
    trainable_base: Callable[[Params], list[str]] = _no_base
    penalty: Callable[[Delta, ApplyContext], jax.Array] = _no_penalty
    merge: MergeFn | None = None
    unmerge: MergeFn | None = None
    labels: Callable[[Delta], Any] = _default_labels
    group_lr: Mapping[str, float] = dataclasses.field(default_factory=dict)
    finalize: Callable[[Delta], Delta] = _keep
    stats: Callable[[Delta], dict[str, float]] = _no_stats
    exclusive: bool = False
    adds_tokens: bool = False
    parts: tuple["Transform", ...] = ()
    forward: Callable[..., Any] | None = None
    trains_head: bool = False
    new_params: Callable[[Delta], int] = lambda delta: _count(delta)
    between_steps: Callable[[Delta, int, int], Delta] | None = None
    stage_starts: Callable[[int], tuple[int, ...]] = _no_stages

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


def compose(*transforms: Transform, name: str | None = None) -> Transform:
    """Compose transforms into one; the delta is ``{part.name: part_delta}``.

    Refuses an exclusive transform (``full``) together with anything else, and two parts with
    the same name. See the module docstring for the stacking order.
    """
    flat: list[Transform] = []
    for t in transforms:
        flat.extend(t.parts if t.parts else (t,))
    if not flat:
        raise ValueError("compose() needs at least one transform")
    if len(flat) == 1:
        return flat[0]
    for t in flat:
        if t.exclusive:
            others = ", ".join(o.name for o in flat if o is not t)
            raise ValueError(
                f"'{t.name}' trains every weight and cannot be combined with other methods "
                f"(got {others}); use '{t.name}' alone or drop it from the combination."
            )
    for t in flat:
        if t.forward is not None:
            raise ValueError(
                f"'{t.name}' replaces the whole forward pass (an adapter bank) and cannot be composed; "
                "compose the methods first and bank the composition: bank(compose(a, b), size)")
    names = [t.name for t in flat]
    if len(set(names)) != len(names):
        raise ValueError(
            f"compose: duplicate method names {names}; give each part a distinct name "
            "(e.g. lora(..., name='lora_attn'))"
        )

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

    def penalty(delta: Delta, ctx: ApplyContext) -> jax.Array:
        return sum((t.penalty(delta[t.name], ctx) for t in flat), jnp.zeros((), jnp.float32))

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
        penalty=penalty,
        merge=_merge_chain(merge_order, reverse=False) if mergeable else None,
        unmerge=_merge_chain(merge_order, reverse=True) if mergeable else None,
        labels=lambda delta: {t.name: t.labels(delta[t.name]) for t in flat},
        group_lr={k: v for t in flat for k, v in t.group_lr.items()},
        finalize=lambda delta: {t.name: t.finalize(delta[t.name]) for t in flat},
        stats=lambda delta: {f"{t.name}.{k}": v for t in flat for k, v in t.stats(delta[t.name]).items()},
        adds_tokens=any(t.adds_tokens for t in flat),
        parts=tuple(flat),
        new_params=lambda delta: sum(t.new_params(delta[t.name]) for t in flat),
        between_steps=_between_steps_chain(flat),
        stage_starts=lambda total: tuple(sorted({s for t in flat for s in t.stage_starts(total)})),
    )


def _between_steps_chain(flat: Sequence[Transform]) -> Callable[[Delta, int, int], Delta] | None:
    """The parts' ``between_steps`` on their own sub-deltas (same object back when none changed)."""
    active = [t for t in flat if t.between_steps is not None]
    if not active:
        return None

    def between_steps(delta: Delta, step: int, total: int) -> Delta:
        new = dict(delta)
        for t in active:
            new[t.name] = t.between_steps(delta[t.name], step, total)
        return delta if all(new[t.name] is delta[t.name] for t in active) else new

    return between_steps


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

    if transform.forward is not None:
        return transform.forward(model, base, delta, args, kwargs, ctx, method)
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
    if transform.unmerge is None:
        raise NotMergeableError(f"cannot unmerge '{transform.name}': it has no weight-space form")
    return transform.unmerge(params, delta, info)


def module_path(context: Any) -> str:
    """The '/'-joined path of the module an interceptor is looking at."""
    return "/".join(str(p) for p in context.module.path)
