"""HRA: Householder reflection adaptation (Yuan et al., 2024, arXiv:2405.17484), with Hugging
Face PEFT's semantics (``peft/tuners/hra``).

Each target kernel ``W (d_in, d_out)`` (any layer kind: its input axis group flattened to
``d_in``) is multiplied on its input side by a chain of ``r`` Householder reflections:

    W' = Hᵀ W,     H = (I − 2 u₁u₁ᵀ)(I − 2 u₂u₂ᵀ) ⋯ (I − 2 u_r u_rᵀ),   u_i = U[:, i] / ‖U[:, i]‖

(PEFT's ``weight @ H`` on the ``(d_out, d_in)`` PyTorch weight); with ``apply_gs`` the columns
of ``U`` are first made orthonormal (Gram–Schmidt) and ``H = I − 2 U Uᵀ``. ``H`` is orthogonal.
PEFT's init repeats each of ``r/2`` Kaiming-uniform columns twice, so consecutive reflections
cancel and a fresh delta is the identity up to float rounding (about 1e-9 on the logits, as
PEFT's; ``r`` must be even; PEFT warns and starts from a random ``H`` otherwise, jpeft refuses).

Like :mod:`~jpeft.methods.oft`, HRA rewrites the parameters before the forward pass
(``adapt_params``): every layer kind and ``nn.scan`` stack, ``merge`` writes ``Hᵀ W`` and
``unmerge`` multiplies by ``H`` (its inverse). ``layers=`` keeps the other layers of a stack at
``H = I``. The delta holds ``hra_u (*stack, d_in, r)`` per module.

Example::

    method = jpeft.hra(HraConfig(r=4, targets=r"(query|value)$"))
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.checkpoint import peft_convert as PC
from jpeft.checkpoint import peft_fields as F
from jpeft.checkpoint import peft_targets as T
from jpeft.core import layers as L
from jpeft.core import paths as P
from jpeft.core.model import group_by_module
from jpeft.core.registry import register
from jpeft.core.transform import ModelInfo, Transform, resolve_info
from jpeft.methods.kernel_delta import map_kernels
from jpeft.methods.lora import check_bias, config_for_peft_targets, target_specs, trained_biases

LEAF = "hra_u"


@dataclasses.dataclass(frozen=True)
class HraConfig:
    r: int = dataclasses.field(default=8, metadata={"help": "number of Householder reflections (even)"})
    targets: str = dataclasses.field(
        default=r"(query|value)$", metadata={"help": "regex searched in layer module paths"})
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "only these layer indices (empty: all layers)"})
    apply_gs: bool = dataclasses.field(
        default=False, metadata={"help": "orthonormalise the vectors (Gram-Schmidt): H = I - 2UU^T"})
    bias: str = dataclasses.field(
        default="none", metadata={"help": "train biases too: 'none', 'all' or 'hra_only'"})

    def __post_init__(self) -> None:
        if not (isinstance(self.r, numbers.Integral) and not isinstance(self.r, bool) and self.r >= 2
                and self.r % 2 == 0):
            raise ValueError(f"hra.r must be an even integer >= 2 (pairs of equal reflections make the "
                             f"identity at init), got {self.r!r}")
        P.check_layer_indices("hra", self.layers)
        check_bias("hra", self.bias)


def _orthonormal(u: jax.Array) -> jax.Array:
    """PEFT's column-by-column Gram–Schmidt of ``U (…, d, r)``."""
    basis: list[jax.Array] = []
    for i in range(u.shape[-1]):
        v = u[..., i]
        for w in basis:
            v = v - jnp.sum(w * v, axis=-1, keepdims=True) * w
        basis.append(v / jnp.linalg.norm(v, axis=-1, keepdims=True))
    return jnp.stack(basis, axis=-1)


def reflect(config: HraConfig, u: jax.Array, m: jax.Array, transpose: bool) -> jax.Array:
    """``Hᵀ M`` (``transpose``) or ``H M`` for ``M (…, d, n)``, one reflection at a time
    (``2·r·d·n`` multiply-adds, never forming the ``d × d`` matrix ``H``)."""
    if config.apply_gs:  # H = I − 2 W Wᵀ is symmetric
        w = _orthonormal(u)
        return m - 2.0 * w @ (jnp.swapaxes(w, -1, -2) @ m)
    unit = u / jnp.linalg.norm(u, axis=-2, keepdims=True)
    order = range(u.shape[-1]) if transpose else reversed(range(u.shape[-1]))  # Hᵀ = H_r ⋯ H₁
    for i in order:
        col = unit[..., :, i:i + 1]
        m = m - 2.0 * col @ (jnp.swapaxes(col, -1, -2) @ m)
    return m


def reflections(config: HraConfig, u: jax.Array) -> jax.Array:
    """``H (…, d, d)`` from ``U (…, d, r)`` (module docstring)."""
    d = u.shape[-2]
    eye = jnp.broadcast_to(jnp.eye(d, dtype=u.dtype), (*u.shape[:-2], d, d))
    return reflect(config, u, eye, transpose=False)


def _check(name: str, path: str, config: HraConfig, spec: L.LayerSpec, leaves: Mapping[str, Any]
           ) -> tuple[jax.Array, jax.Array | None]:
    """The module's ``U`` (unselected layers of a stack replaced by ones, a safe constant) and
    the ``keep`` mask of the stack (``None``: every layer)."""
    want = (*spec.stack, spec.fan_in, config.r)
    if set(leaves) != {LEAF} or tuple(jnp.shape(leaves[LEAF])) != want:
        raise ValueError(f"{name}: the delta holds {({k: jnp.shape(v) for k, v in leaves.items()})} for "
                         f"'{path}', expected HRA's {LEAF} {want}; was it made by another method, config "
                         "or model? Init it with this transform on this model's parameters")
    u = jnp.asarray(leaves[LEAF], jnp.float32)
    if not (config.layers and spec.stack):
        return u, None
    keep = jnp.isin(jnp.arange(spec.stack[0]), jnp.asarray(config.layers))
    keep = keep.reshape((spec.stack[0],) + (1,) * (u.ndim - 1))
    return jnp.where(keep, u, 1.0), keep  # no gradient reaches the unselected layers


def hra(config: HraConfig = HraConfig(), *, name: str = "hra") -> Transform:
    """HRA as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        specs = target_specs(config, base, resolve_info(info), "hra")
        flat: dict[str, jax.Array] = {}
        for key, (path, spec) in zip(jax.random.split(rng, len(specs)), specs.items()):
            half = config.r // 2  # PyTorch's kaiming_uniform_(a=√5) of a (d_in, r/2) tensor: U(±1/√(r/2))
            bound = 1.0 / math.sqrt(half)
            u = jax.random.uniform(key, (*spec.stack, spec.fan_in, half), jnp.float32, -bound, bound)
            flat[f"{path}/{LEAF}"] = jnp.repeat(u, 2, axis=-1)
        return P.unflatten(flat)

    def transformed(path: str, spec: L.LayerSpec, leaves: Mapping[str, Any], m: jax.Array,
                    inverse: bool) -> jax.Array:
        u, keep = _check(name, path, config, spec, leaves)
        out = reflect(config, u, m, transpose=not inverse)  # merge: Hᵀ W; unmerge: H W' (H orthogonal)
        return out if keep is None else jnp.where(keep, out, m)

    def merge(params: P.Params, delta: Any, info: ModelInfo | None = None) -> P.Params:
        return map_kernels(params, delta, info, "hra merge",
                           lambda path, spec, leaves, m: transformed(path, spec, leaves, m, False))

    def unmerge(params: P.Params, delta: Any, info: ModelInfo | None = None) -> P.Params:
        return map_kernels(params, delta, info, "hra unmerge",
                           lambda path, spec, leaves, m: transformed(path, spec, leaves, m, True))

    return Transform(
        name=name, config=config, init=init,
        adapt_params=lambda base, delta, ctx: merge(base, delta, ctx.info),
        delta_layout=lambda path, leaf: ("stack", "in", "rank"),
        trainable_base=lambda base: trained_biases("hra", config, base),
        merge=merge, unmerge=unmerge,
    )


# -- Hugging Face PEFT format ------------------------------------------------------------------
# Per target ``<module>.hra_u (d_in, r)``: the same vectors.

_HRA_HANDLED = {"r", "apply_GS", "target_modules", "exclude_modules", "layers_to_transform",
                "layers_pattern", "init_weights", "bias"}


def _from_peft(cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PC.PeftContext) -> tuple[Transform, Any]:
    F._check_fields(cfg, _HRA_HANDLED)
    label, mods = ctx.label, ctx.mods
    assert mods is not None
    modules = PC.linear_only(mods, T._resolve_targets(cfg, mods, "HRA"), label, "HRA")
    common = {"r": int(cfg["r"]), "apply_gs": bool(cfg.get("apply_GS", False)), "bias": cfg.get("bias", "none")}
    flat_base = P.flatten(ctx.params)
    flat: dict[str, Any] = {}
    for path in modules:
        name = mods.name(path)
        value = PC.take(tensors, f"{PC.MODULE_KEY}{name}.{LEAF}", label, "HRA vectors")
        want = (int(np.shape(flat_base[f"{path}/kernel"])[0]), common["r"])
        if value.shape != want:
            raise ValueError(f"{label}: {name}.{LEAF} has shape {value.shape}, expected {want}; is the "
                             "base the architecture the adapter was trained on?")
        flat[f"{path}/{LEAF}"] = jnp.asarray(value)
    PC.refuse_leftover(tensors, (f".{LEAF}",), label)
    config = config_for_peft_targets(cfg, modules, lambda **cand: HraConfig(**common, **cand),
                                     ctx.params, "hra")
    return hra(config), P.unflatten(flat)


def _to_peft(transform: Transform, delta: Any, ctx: PC.PeftContext
             ) -> tuple[dict[str, Any], dict[str, np.ndarray], P.Params]:
    config, mods = transform.config, ctx.mods
    assert mods is not None
    leaves = group_by_module(delta)
    modules = PC.linear_only(mods, PC.delta_modules(delta, "HRA"), "save_peft_adapter", "HRA")
    names = [mods.name(m) for m in modules]
    tensors = {f"{PC.MODULE_KEY}{name}.{LEAF}": PC.to_numpy(leaves[m][LEAF]) for m, name in zip(modules, names)}
    tensors.update(PC.bias_tensors(ctx, modules))
    fields = {"peft_type": "HRA", "r": config.r, "apply_GS": config.apply_gs, "bias": config.bias,
              "init_weights": True, "layers_pattern": None,
              **T._peft_targets_for(names, list(mods.by_name), list(mods.head))}
    return fields, tensors, ctx.params


register("hra", HraConfig, hra,
         peft=PC.PeftConverter(peft_type="HRA", layout="modules", load=_from_peft, save=_to_peft))
