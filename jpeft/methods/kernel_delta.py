"""What LoHa and LoKr share: an update ``ΔW`` built whole from small factors, per layer.

LoRA's update is applied factored (``x·A·B``). The LyCORIS methods (:mod:`~jpeft.methods.loha`,
:mod:`~jpeft.methods.lokr`) combine their factors with a Hadamard or Kronecker product, which
has no cheaper factored form, so each adapted layer builds

    ΔW = s · f(factors),     (fan_in, fan_out),   s = α / r

(the kernel's input axis group flattened, then its output group, as
:func:`jpeft.core.layers.matrix_kernel` reads it) and computes ``y = layer(x) + x·ΔW`` with the
layer's own operation (:func:`jpeft.core.layers.apply_kernel`), as Hugging Face PEFT does
(``peft/tuners/lycoris_utils.py``). Merging adds ``ΔW`` to the kernel, unmerging subtracts it.

A method is a :class:`Factorisation`: the factor shapes of one layer, their init, and ``f``.
Layers stacked by ``nn.scan`` / ``nnx.scan`` get factors with the stack axes in front; with
``layers=`` the unlisted layers of a stack hold all-zero factors, a fixed point of training
(every factor's gradient is a product with another, zero, factor).

Training-time options, as PEFT's: ``rank_dropout`` zeroes output columns of ``ΔW`` (rescaled
by the kept fraction when ``rank_dropout_scale``), ``module_dropout`` skips a layer's update for
a forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.checkpoint import peft_convert as PC
from jpeft.checkpoint import peft_fields as F
from jpeft.checkpoint import peft_targets as T
from jpeft.core import layers as L
from jpeft.core import paths as P
from jpeft.core.model import group_by_module
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, resolve_info
from jpeft.methods.lora import (
    _stack_mask,
    check_rank_fields,
    config_for_peft_targets,
    peft_rank_patterns,
    rank_and_scale,
    target_specs,
)

Shapes = dict[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Factorisation:
    """One method's factors of ``ΔW``.

    Attributes:
      name: the method (for messages).
      shapes: ``(spec, r, config) -> {leaf: shape}``, one layer's factors (no stack axes).
      init: ``(key, leaf, shape, spec, r, config) -> array`` for one leaf of ``shapes`` (the
        stack axes lead ``shape``).
      matrix: ``(leaves, spec, r, config) -> (*stack, fan_in, fan_out)``, ``f`` unscaled (leaves
        may carry leading stack axes).
      layout: ``leaf -> axis groups`` for sharding (:data:`jpeft.core.layers.GROUPS`).
    """

    name: str
    shapes: Callable[[L.LayerSpec, int, Any], Shapes]
    init: Callable[[jax.Array, str, tuple[int, ...], L.LayerSpec, int, Any], jax.Array]
    matrix: Callable[[Mapping[str, jax.Array], L.LayerSpec, int, Any], jax.Array]
    layout: Callable[[str], tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class KernelDeltaConfig:
    """The fields LoHa's and LoKr's configs share (LoRA's targeting and scaling, PEFT's
    training-time dropouts); ``method`` names the config in errors."""

    r: int = dataclasses.field(default=8, metadata={"help": "rank r of the factors"})
    alpha: float = dataclasses.field(default=8.0, metadata={"help": "scaling numerator: s = alpha / r"})
    targets: str = dataclasses.field(
        default=r"(query|value)$", metadata={"help": "regex searched in layer module paths"})
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "only these layer indices (empty: all layers)"})
    rank_pattern: dict[str, int] = dataclasses.field(
        default_factory=dict, metadata={"help": "per-target rank: {regex: r}"})
    alpha_pattern: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata={"help": "per-target alpha: {regex: alpha}"})
    rank_dropout: float = dataclasses.field(
        default=0.0, metadata={"help": "training: drop output columns of ΔW"})
    module_dropout: float = dataclasses.field(
        default=0.0, metadata={"help": "training: skip a layer's update with this probability"})

    method: ClassVar[str] = "kernel_delta"

    def __post_init__(self) -> None:
        check_rank_fields(self.method, self)
        for field in ("rank_dropout", "module_dropout"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{self.method}.{field} must be in [0, 1), got {value!r}")


def kaiming(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's ``kaiming_uniform_(a=√5)`` of a weight with ``fan_in`` inputs: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _check_leaves(f: Factorisation, path: str, spec: L.LayerSpec, leaves: Mapping[str, Any],
                  r: int, config: Any) -> None:
    """Refuse (at trace time) leaves that are not this method's factors for this layer."""
    want = {k: (*spec.stack, *v) for k, v in f.shapes(spec, r, config).items()}
    got = {k: tuple(jnp.shape(v)) for k, v in leaves.items()}
    if set(got) != set(want):
        raise KeyError(f"{f.name}: the delta holds {sorted(got)} for '{path}', not {f.name}'s "
                       f"{sorted(want)}; was it made by another method or config? Apply a delta "
                       "with the transform that made it")
    if got != want:
        raise ValueError(f"{f.name}: the delta's factors {got} for '{path}' do not fit its kernel "
                         f"{(*spec.stack, *spec.kernel_shape)} and r={r}; expected {want}. Was the "
                         "delta made for another model or config? Init it with this transform on "
                         "this model's parameters")
    for leaf, value in leaves.items():
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise TypeError(f"{f.name}: the delta's {leaf} for '{path}' is {jnp.result_type(value)}; "
                            "factors must be floating-point arrays")


def delta_matrix(f: Factorisation, config: Any, path: str, spec: L.LayerSpec,
                 leaves: Mapping[str, Any]) -> jax.Array:
    """``s · f(factors)`` of one module, ``(*stack, fan_in, fan_out)`` float32, checked."""
    r, scale = rank_and_scale(config, path)
    _check_leaves(f, path, spec, leaves, r, config)
    cast = {k: jnp.asarray(v, jnp.float32) for k, v in leaves.items()}
    return scale * f.matrix(cast, spec, r, config)


def map_kernels(params: P.Params, delta: Any, info: ModelInfo | None, where: str,
                fn: Callable[[str, L.LayerSpec, Mapping[str, Any], jax.Array], jax.Array]) -> P.Params:
    """``params`` with the kernel of every module of ``delta`` replaced by ``fn(path, spec,
    leaves, M)``, ``M`` the kernel as a float32 ``(*stack, fan_in, fan_out)`` matrix (the
    rewrites of OFT and HRA, which multiply it by an orthogonal ``(fan_in, fan_in)`` matrix)."""
    flat = dict(P.flatten(params))
    layers = resolve_info(info).layers
    for path, leaves in group_by_module(delta).items():
        key = L.kernel_path(path, layers, flat)
        kernel = flat[key]
        spec = L.kernel_spec(path, kernel.shape, layers, where)
        out = fn(path, spec, leaves, L.kernel_matrix(spec, kernel.astype(jnp.float32)))
        flat[key] = L.matrix_kernel(spec, out).astype(kernel.dtype)
    return P.unflatten(flat)


def add_to_kernels(params: P.Params, delta: Any, sign: float, info: ModelInfo | None, where: str,
                   matrix: Callable[[str, L.LayerSpec, Mapping[str, Any]], jax.Array]) -> P.Params:
    """``params`` with ``sign · ΔW`` added to the kernel of every module of ``delta``;
    ``matrix(path, spec, leaves) -> (*stack, fan_in, fan_out)`` is the module's ``ΔW`` (merge and
    unmerge of the methods whose update is a whole kernel: LoHa, LoKr, VeRA)."""
    return map_kernels(params, delta, info, where,
                       lambda path, spec, leaves, m: m + sign * matrix(path, spec, leaves))


def transform(f: Factorisation, config: Any, name: str) -> Transform:
    """The :class:`~jpeft.core.transform.Transform` of a factorisation (module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        specs = target_specs(config, base, resolve_info(info), f.name)
        flat: dict[str, jax.Array] = {}
        for key, (path, spec) in zip(jax.random.split(rng, len(specs)), specs.items()):
            r, _ = rank_and_scale(config, path)
            shapes = f.shapes(spec, r, config)
            mask = _stack_mask(config, spec)
            for leaf_key, (leaf, shape) in zip(jax.random.split(key, len(shapes)), shapes.items()):
                value = f.init(leaf_key, leaf, (*spec.stack, *shape), spec, r, config)
                if mask is not None:
                    value = value * mask.reshape(mask.shape[:1] + (1,) * (value.ndim - 1))
                flat[f"{path}/{leaf}"] = value
        return P.unflatten(flat)

    def layer_hook(ctx: ApplyContext):
        def adapt(call, x, layer, leaves):
            spec = layer.spec
            matrix = delta_matrix(f, config, layer.path, spec, leaves)
            y = call(x)
            if ctx.train and ctx.rng is not None:
                if config.rank_dropout > 0.0:
                    keep = jax.random.bernoulli(layer.key(ctx, name, "rank"), 1.0 - config.rank_dropout,
                                                (matrix.shape[-1],)).astype(jnp.float32)
                    if getattr(config, "rank_dropout_scale", True):
                        keep = keep / jnp.maximum(jnp.mean(keep), 1e-12)
                    matrix = matrix * keep
                if config.module_dropout > 0.0:
                    skip = jax.random.bernoulli(layer.key(ctx, name, "module"), config.module_dropout)
                    matrix = jnp.where(skip, 0.0, matrix)
            update = L.apply_kernel(spec, x, L.matrix_kernel(spec, matrix).astype(x.dtype))
            return y + update.astype(y.dtype)

        return adapt

    def fold(params: P.Params, delta: Any, sign: float, info: ModelInfo | None) -> P.Params:
        return add_to_kernels(params, delta, sign, info, f"{f.name} merge",
                              lambda path, spec, leaves: delta_matrix(f, config, path, spec, leaves))

    return Transform(
        name=name, config=config, init=init, layer_hook=layer_hook,
        delta_layout=lambda path, leaf: f.layout(leaf),
        merge=lambda params, delta, info=None: fold(params, delta, 1.0, info),
        unmerge=lambda params, delta, info=None: fold(params, delta, -1.0, info),
    )


# -- Hugging Face PEFT format (LOHA, LOKR) -----------------------------------------------------
# Per target ``<module>.<peft leaf>`` tensors in PyTorch's ``(d_out, d_in)`` orientation; jpeft's
# factors are their transposes in the kernel's ``(d_in, d_out)`` orientation.

_LYCORIS_HANDLED = {"r", "alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                    "layers_to_transform", "layers_pattern", "rank_dropout", "module_dropout",
                    "init_weights"}
_LYCORIS_IGNORED = {"use_effective_conv2d"}  # Conv layers only, which jpeft's PEFT format refuses

def from_peft(f: Factorisation, make: Callable[..., Any], factory: Callable[..., Transform],
              peft_names: dict[str, str], extra: dict[str, str],
              cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PC.PeftContext
              ) -> tuple[Transform, Any]:
    """A PEFT LyCORIS adapter as ``(factory(config), delta)``: ``peft_names`` maps jpeft leaves
    to PEFT's (transposed), ``extra`` PEFT config fields to the jpeft config's, ``make(**fields)``
    builds the config. The config selects exactly PEFT's targets with PEFT's ranks and alphas."""
    F._check_fields(cfg, _LYCORIS_HANDLED | set(extra), _LYCORIS_IGNORED)
    label, mods = ctx.label, ctx.mods
    assert mods is not None
    modules = PC.linear_only(mods, T._resolve_targets(cfg, mods, f.name), label, f.name)
    r0, alpha0 = int(cfg["r"]), float(cfg.get("alpha", 8))
    common = {"r": r0, "alpha": alpha0, "rank_dropout": float(cfg.get("rank_dropout") or 0.0),
              "module_dropout": float(cfg.get("module_dropout") or 0.0),
              **{ours: cfg[theirs] for theirs, ours in extra.items() if theirs in cfg}}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path in modules:
        name = mods.name(path)
        ranks[path] = int(T._peft_pattern_value(cfg.get("rank_pattern") or {}, name, r0))
        alphas[path] = float(T._peft_pattern_value(cfg.get("alpha_pattern") or {}, name, alpha0))
    probe = make(**common)
    flat_base = P.flatten(ctx.params)
    flat: dict[str, Any] = {}
    for path in modules:
        name, r = mods.name(path), ranks[path]
        spec = L.dense_spec(np.shape(flat_base[f"{path}/kernel"]))
        for leaf, shape in f.shapes(spec, r, probe).items():
            key = f"{PC.MODULE_KEY}{name}.{peft_names[leaf]}"
            if key not in tensors:
                present = sorted(k.rpartition(".")[2] for k in tensors if k.startswith(f"{PC.MODULE_KEY}{name}."))
                raise ValueError(f"{label}: {name}: PEFT's {f.name} at r={r} on a {spec.kernel_shape} "
                                 f"kernel has {sorted(peft_names[k] for k in f.shapes(spec, r, probe))}, "
                                 f"the adapter holds {present}; is the base the architecture it was "
                                 "trained on?")
            value = tensors.pop(key)
            if value.T.shape != shape:
                raise ValueError(f"{label}: {name}.{peft_names[leaf]} has shape {value.shape}, expected "
                                 f"{shape[::-1]} for r={r} on a {spec.kernel_shape} kernel; is the "
                                 "base the architecture the adapter was trained on?")
            flat[f"{path}/{leaf}"] = jnp.asarray(value.T)
    PC.refuse_leftover(tensors, tuple(f".{n}" for n in peft_names.values()), label)
    patterns = {"rank_pattern": PC.pattern_groups(ranks, r0, T._exact_regex),
                "alpha_pattern": PC.pattern_groups(alphas, alpha0, T._exact_regex)}
    config = config_for_peft_targets(
        cfg, modules, lambda **cand: make(**common, **patterns, **cand), ctx.params, f.name,
        lambda c: all(rank_and_scale(c, p) == (r, alphas[p] / r) for p, r in ranks.items()))
    return factory(config), P.unflatten(flat)


def to_peft(peft_type: str, peft_names: dict[str, str], extra: dict[str, str],
            transform_: Transform, delta: Any, ctx: PC.PeftContext
            ) -> tuple[dict[str, Any], dict[str, np.ndarray], P.Params]:
    """A LyCORIS delta as PEFT's config fields and tensors (``extra``: PEFT field -> config field)."""
    config, mods, body = transform_.config, ctx.mods, P.flatten(delta)
    assert mods is not None
    modules = PC.linear_only(mods, PC.delta_modules(delta, peft_type), "save_peft_adapter", peft_type)
    names = [mods.name(m) for m in modules]
    selection = T._peft_targets_for(names, list(mods.by_name), list(mods.head))
    tensors: dict[str, np.ndarray] = {}
    for path, name in zip(modules, names):
        for leaf, theirs in peft_names.items():
            if f"{path}/{leaf}" in body:
                tensors[f"{PC.MODULE_KEY}{name}.{theirs}"] = np.ascontiguousarray(
                    PC.to_numpy(body[f"{path}/{leaf}"]).T)
    fields = {
        "peft_type": peft_type, "r": int(config.r), "alpha": config.alpha,
        "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout,
        "init_weights": True, "layers_pattern": None,
        **peft_rank_patterns(config, modules, names),
        **{theirs: getattr(config, ours) for theirs, ours in extra.items()}, **selection,
    }
    return fields, tensors, ctx.params
