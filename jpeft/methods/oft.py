"""OFT: orthogonal fine-tuning (Qiu et al., 2023, arXiv:2306.07280; Liu et al., 2024, OFTv2,
arXiv:2506.19847), with Hugging Face PEFT's semantics (``peft/tuners/oft``, PEFT >= 0.18).

Each target layer's input features are rotated by a block-diagonal matrix before the layer:

    h = (x R) W + b,     R = diag(R₁, …, R_n),   R_k = cayley(Q_k) ∈ (b, b),   n·b = d_in

so the adapted kernel is ``W' = R W``. ``Q_k`` is skew-symmetric, trained through its
``b(b−1)/2`` upper-triangle entries (zero at init: ``R = I``, the identity). ``cayley`` is, as in
PEFT, the Neumann series ``I + 2Q + 2Q² + … + 2Q^{m−2} + Q^{m−1}`` of ``(I+Q)(I−Q)⁻¹`` with
``m = num_cayley_neumann_terms`` (PEFT's exact terms, its ``m = 3`` included) (``use_cayley_neumann``, the default), else the exact
``(I−Q)(I+Q)⁻¹`` (PEFT's two forms differ in the sign of ``Q``; jpeft follows each). With
``block_share`` one ``Q`` serves every block.

Constrained OFT (``coft``, PEFT's COFT) keeps every block within a Frobenius ball of radius
``ε' = eps/√k`` (``k`` the blocks of the module's ``oft_q``): ``Q ← ε'·Q/‖Q‖_F`` where
``‖Q‖_F > ε'``. As PEFT (which projects its stored weight before each use), jpeft projects the
delta after every training step (a ``between_steps`` hook) and uses the projection in the forward
pass with a straight-through gradient (any delta acts as PEFT makes it act); from a projected delta
(a fresh or imported one: import projects) the steps are PEFT's.

``block_size`` (or ``r``, the number of blocks; exactly one of them non-zero) is adjusted per
layer to a divisor of ``d_in`` as PEFT does (the nearest one, the lower on a tie). OFT is a
rewrite of the parameters before the forward pass (``adapt_params``): every target kernel, its
input axis group flattened to ``d_in`` (any layer kind, stacks included), becomes ``R W``, which
is also what ``merge`` writes (``unmerge`` solves ``R X = W'``); it costs one rotated copy of
each target kernel per step, where PEFT rotates the activations. In a composition OFT rotates the
base kernels and the other methods act beside them: ``compose(lora, oft)`` computes
``x·R W + s·x A B``. The delta holds ``oft_q`` per module, ``(*stack, n or 1, b(b−1)/2)``.

Example::

    method = jpeft.oft(OftConfig(block_size=4, targets=r"(query|value)$"))
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
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
from jpeft.core.capabilities import TrainingHooks
from jpeft.core.model import group_by_module
from jpeft.core.registry import register
from jpeft.core.transform import ModelInfo, Transform, resolve_info
from jpeft.methods.kernel_delta import map_kernels
from jpeft.methods.lora import check_bias, config_for_peft_targets, target_specs, trained_biases

LEAF = "oft_q"


@dataclasses.dataclass(frozen=True)
class OftConfig:
    block_size: int = dataclasses.field(
        default=32, metadata={"help": "size b of each rotation block (0: set r instead)"})
    r: int = dataclasses.field(default=0, metadata={"help": "number of blocks (0: set block_size instead)"})
    targets: str = dataclasses.field(
        default=r"(query|value)$", metadata={"help": "regex searched in layer module paths"})
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "only these layer indices (empty: all layers)"})
    block_share: bool = dataclasses.field(default=False, metadata={"help": "one rotation for every block"})
    use_cayley_neumann: bool = dataclasses.field(
        default=True, metadata={"help": "Cayley transform by its Neumann series (PEFT's default)"})
    num_cayley_neumann_terms: int = dataclasses.field(
        default=5, metadata={"help": "terms of the Neumann series"})
    coft: bool = dataclasses.field(
        default=False, metadata={"help": "constrained OFT: keep each block within a ball of radius eps"})
    eps: float = dataclasses.field(
        default=6e-5, metadata={"help": "COFT's radius (divided by the square root of the block count)"})
    bias: str = dataclasses.field(
        default="none", metadata={"help": "train biases too: 'none', 'all' or 'oft_only'"})

    def __post_init__(self) -> None:
        for field in ("block_size", "r"):
            value = getattr(self, field)
            if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"oft.{field} must be an integer >= 0, got {value!r}")
        if (self.block_size == 0) == (self.r == 0):
            raise ValueError(f"oft: set exactly one of block_size and r (r · block_size = d_in), got "
                             f"block_size={self.block_size}, r={self.r}")
        if not (isinstance(self.num_cayley_neumann_terms, numbers.Integral)
                and self.num_cayley_neumann_terms >= 1):
            raise ValueError(f"oft.num_cayley_neumann_terms must be an integer >= 1, got "
                             f"{self.num_cayley_neumann_terms!r}")
        if not (isinstance(self.eps, numbers.Real) and not isinstance(self.eps, bool) and self.eps > 0):
            raise ValueError(f"oft.eps must be a number > 0 (COFT's radius), got {self.eps!r}")
        P.check_layer_indices("oft", self.layers)
        check_bias("oft", self.bias)


def _nearest_divisor(d_in: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: ``value`` if it divides ``d_in``, else the nearest divisor
    (the lower one on a tie); ``d_in`` when ``value >= d_in``."""
    if value >= d_in:
        return d_in
    higher = value
    while higher <= d_in and d_in % higher:
        higher += 1
    lower = value
    while lower > 1 and d_in % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def blocks(config: OftConfig, d_in: int) -> tuple[int, int]:
    """``(n, b)``: the number of blocks and their size for a layer with ``d_in`` inputs."""
    if config.r == 0:
        b = _nearest_divisor(d_in, config.block_size)
        return d_in // b, b
    n = _nearest_divisor(d_in, config.r)
    return n, d_in // n


def rotations(config: OftConfig, q: jax.Array, b: int) -> jax.Array:
    """``(…, k, b, b)`` rotation blocks from upper-triangle entries ``q (…, k, b(b−1)/2)``."""
    rows, cols = np.triu_indices(b, 1)
    upper = jnp.zeros((*q.shape[:-1], b, b), q.dtype).at[..., rows, cols].set(q)
    skew = upper - jnp.swapaxes(upper, -1, -2)
    eye = jnp.broadcast_to(jnp.eye(b, dtype=q.dtype), skew.shape)
    if not config.use_cayley_neumann:  # PEFT: solve(I + Q, I − Q, left=False) = (I − Q)(I + Q)⁻¹
        return jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye + skew, -1, -2),
                                             jnp.swapaxes(eye - skew, -1, -2)), -1, -2)
    m = config.num_cayley_neumann_terms  # PEFT's _cayley_batch, term by term
    out = eye + 2.0 * skew if m > 1 else eye
    if m > 2:
        power = skew @ skew
        out = out + 2.0 * power
        for _ in range(3, m - 1):
            power = power @ skew
            out = out + 2.0 * power
        out = out + power @ skew
    return out


def constrain(config: OftConfig, q: jax.Array) -> jax.Array:
    """COFT's projection of ``q (…, k, b(b−1)/2)``, PEFT's ``_project_batch``: each block's
    skew-symmetric ``Q`` (Frobenius norm ``√2·‖q‖``) scaled back onto the ball of radius
    ``eps/√k`` when outside it."""
    radius = config.eps / np.sqrt(q.shape[-2])
    norm = jnp.sqrt(2.0) * jnp.linalg.norm(q, axis=-1, keepdims=True)
    return jnp.where(norm <= radius, q, radius * q / jnp.where(norm > 0, norm, 1.0))


def _rotated(config: OftConfig, spec: L.LayerSpec, q: jax.Array, matrix: jax.Array) -> jax.Array:
    """``R M`` for a kernel matrix ``M (*stack, d_in, d_out)``."""
    n, b = blocks(config, spec.fan_in)
    r = rotations(config, q, b)
    if config.block_share:
        r = jnp.broadcast_to(r, (*r.shape[:-3], n, b, b))
    grouped = matrix.reshape((*matrix.shape[:-2], n, b, matrix.shape[-1]))
    return jnp.einsum("...kij,...kjo->...kio", r, grouped).reshape(matrix.shape)


def _check(name: str, path: str, config: OftConfig, spec: L.LayerSpec, leaves: Mapping[str, Any]) -> jax.Array:
    """The module's ``oft_q``, checked, and zeroed (``R = I``, no gradient) for the layers of a
    stack that ``layers=`` leaves out."""
    n, b = blocks(config, spec.fan_in)
    want = (*spec.stack, 1 if config.block_share else n, b * (b - 1) // 2)
    if set(leaves) != {LEAF} or tuple(jnp.shape(leaves[LEAF])) != want:
        raise ValueError(f"{name}: the delta holds {({k: jnp.shape(v) for k, v in leaves.items()})} for "
                         f"'{path}', expected OFT's {LEAF} {want} ({n} blocks of {b}); was it made by "
                         "another method, config or model? Init it with this transform on this model")
    q = jnp.asarray(leaves[LEAF], jnp.float32)
    if config.coft:  # straight through, as PEFT's projection of its stored weight (no gradient)
        q = q + jax.lax.stop_gradient(constrain(config, q) - q)
    if config.layers and spec.stack:
        keep = jnp.isin(jnp.arange(spec.stack[0]), jnp.asarray(config.layers)).astype(q.dtype)
        q = q * keep.reshape((spec.stack[0],) + (1,) * (q.ndim - 1))
    return q


def oft(config: OftConfig = OftConfig(), *, name: str = "oft") -> Transform:
    """OFT as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        flat: dict[str, jax.Array] = {}
        for path, spec in target_specs(config, base, resolve_info(info), "oft").items():
            n, b = blocks(config, spec.fan_in)
            flat[f"{path}/{LEAF}"] = jnp.zeros((*spec.stack, 1 if config.block_share else n,
                                                b * (b - 1) // 2), jnp.float32)
        return P.unflatten(flat)

    def merge(params: P.Params, delta: Any, info: ModelInfo | None = None) -> P.Params:
        return map_kernels(params, delta, info, "oft merge", lambda path, spec, leaves, m: _rotated(
            config, spec, _check(name, path, config, spec, leaves), m))

    def unmerge(params: P.Params, delta: Any, info: ModelInfo | None = None) -> P.Params:
        def solve(path: str, spec: L.LayerSpec, leaves: Mapping[str, Any], merged: jax.Array) -> jax.Array:
            n, b = blocks(config, spec.fan_in)
            r = rotations(config, _check(name, path, config, spec, leaves), b)
            r = jnp.broadcast_to(r, (*r.shape[:-3], n, b, b))
            grouped = merged.reshape((*merged.shape[:-2], n, b, merged.shape[-1]))
            return jnp.linalg.solve(r, grouped).reshape(merged.shape)
        return map_kernels(params, delta, info, "oft unmerge", solve)

    project = jax.jit(lambda delta: jax.tree_util.tree_map(lambda q: constrain(config, q), delta))
    return Transform(
        name=name, config=config, init=init,
        adapt_params=lambda base, delta, ctx: merge(base, delta, ctx.info),
        delta_layout=lambda path, leaf: ("stack", "replicated", "replicated"),
        merge=merge, unmerge=unmerge,
        trainable_base=lambda base: trained_biases("oft", config, base),
        capabilities=(TrainingHooks(between_steps=lambda delta, step, total: project(delta)),)
        if config.coft else (),
    )


# -- Hugging Face PEFT format ------------------------------------------------------------------
# Per target ``<module>.oft_R.weight (n or 1, b(b−1)/2)``: the same upper-triangle entries.

_OFT_HANDLED = {"r", "oft_block_size", "target_modules", "exclude_modules", "layers_to_transform",
                "layers_pattern", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms",
                "init_weights", "fan_in_fan_out", "bias", "coft", "eps"}
_OFT_IGNORED = {"module_dropout"}  # PEFT's Linear forward does not apply it


def _from_peft(cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PC.PeftContext) -> tuple[Transform, Any]:
    F._check_fields(cfg, _OFT_HANDLED, _OFT_IGNORED)
    label, mods = ctx.label, ctx.mods
    assert mods is not None
    modules = PC.linear_only(mods, T._resolve_targets(cfg, mods, "OFT"), label, "OFT")
    common = {"block_size": int(cfg.get("oft_block_size") or 0), "r": int(cfg.get("r") or 0),
              "block_share": bool(cfg.get("block_share", False)),
              "use_cayley_neumann": bool(cfg.get("use_cayley_neumann", True)),
              "num_cayley_neumann_terms": int(cfg.get("num_cayley_neumann_terms", 5)),
              "coft": bool(cfg.get("coft", False)), "eps": float(cfg.get("eps", 6e-5)),
              "bias": cfg.get("bias", "none")}
    probe = OftConfig(**common)
    flat_base = P.flatten(ctx.params)
    flat: dict[str, Any] = {}
    for path in modules:
        name = mods.name(path)
        value = PC.take(tensors, f"{PC.MODULE_KEY}{name}.oft_R.weight", label, "OFT rotation")
        n, b = blocks(probe, int(np.shape(flat_base[f"{path}/kernel"])[0]))
        want = (1 if probe.block_share else n, b * (b - 1) // 2)
        if value.shape != want:
            raise ValueError(f"{label}: {name}.oft_R.weight has shape {value.shape}, expected {want} "
                             f"({n} blocks of {b}); is the base the architecture it was trained on?")
        q = jnp.asarray(value)
        flat[f"{path}/{LEAF}"] = constrain(probe, q) if probe.coft else q  # PEFT projects it when used
    PC.refuse_leftover(tensors, (".oft_R.",), label)
    config = config_for_peft_targets(cfg, modules, lambda **cand: OftConfig(**common, **cand),
                                     ctx.params, "oft")
    return oft(config), P.unflatten(flat)


def _to_peft(transform: Transform, delta: Any, ctx: PC.PeftContext
             ) -> tuple[dict[str, Any], dict[str, np.ndarray], P.Params]:
    config, mods = transform.config, ctx.mods
    assert mods is not None
    leaves = group_by_module(delta)
    modules = PC.linear_only(mods, PC.delta_modules(delta, "OFT"), "save_peft_adapter", "OFT")
    names = [mods.name(m) for m in modules]
    tensors = {f"{PC.MODULE_KEY}{name}.oft_R.weight": PC.to_numpy(leaves[m][LEAF])
               for m, name in zip(modules, names)}
    tensors.update(PC.bias_tensors(ctx, modules))
    fields = {"peft_type": "OFT", "r": config.r, "oft_block_size": config.block_size,
              "block_share": config.block_share, "use_cayley_neumann": config.use_cayley_neumann,
              "num_cayley_neumann_terms": config.num_cayley_neumann_terms, "coft": config.coft, "eps": config.eps,
              "bias": config.bias, "init_weights": True, "fan_in_fan_out": False, "module_dropout": 0.0,
              "layers_pattern": None, **T._peft_targets_for(names, list(mods.by_name), list(mods.head))}
    return fields, tensors, ctx.params


register("oft", OftConfig, oft,
         peft=PC.PeftConverter(peft_type="OFT", layout="modules", load=_from_peft, save=_to_peft))
