"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024, arXiv:2310.11454), with
Hugging Face PEFT's semantics (``peft/tuners/vera``).

One pair of random projections is shared by every adapted layer and never trained; each layer
trains two vectors. For a target kernel ``W (d_in, d_out)`` (any layer kind: its input axis group
flattened to ``d_in``, its output group to ``d_out``)

    h = x W + b + ((dropout(x) A_{d_in}) ⊙ λ_d) B_{d_out} ⊙ λ_b,
    A_{d_in} (d_in, r),  B_{d_out} (r, d_out),  λ_d (r,) = d_initial,  λ_b (d_out,) = 0

so a fresh delta is the identity. ``A_n`` and ``B_n`` are slices of two shared matrices: row
``i`` of ``A`` is ``U(−1, 1)^r`` drawn from ``fold_in(key(projection_seed), i)`` (column ``j``
of ``B`` likewise from a second stream), so every layer sees the first ``d_in`` rows and the
first ``d_out`` columns of the same pair, as PEFT slices its ``vera_A``/``vera_B``. ``A_n`` is
scaled by PyTorch's Kaiming bound of a ``(r, n)`` weight, ``√(6/n)``, ``B`` by ``√(6/r)``.

The projections are a pure function of ``projection_seed`` and the shapes: they are regenerated
where they are used and never stored, so the delta holds only the trained vectors (and jpeft's
checkpoints only those). With ``projection_shape = (max d_in, max d_out)`` they are PEFT's own
instead, bit for bit: PyTorch's CPU generator (Mersenne Twister, reproduced in NumPy) seeded with
``projection_seed`` draws ``vera_A (r, max d_in)`` then ``vera_B (max d_out, r)`` Kaiming-uniform
(bounds ``√(6/max d_in)`` and ``√(6/r)``), and each layer takes the first ``d_in`` columns and
``d_out`` rows, as PEFT slices them. PEFT's format carries the projections
(``save_projection``): export writes them (for jpeft's draw with ``λ_d`` rescaled so that PEFT's
one ``vera_A`` of the widest layer gives each layer the same update), and import recognises
either draw from the adapter's ``projection_prng_key`` (PEFT's own adapters, with or without
saved projections, load as ``projection_shape`` configs); projections that are neither are
refused.

Example::

    method = jpeft.vera(VeraConfig(r=4, targets=r"(query|value)$"))
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
import functools
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
from jpeft.core.dropout import dropout
from jpeft.core.model import group_by_module
from jpeft.core.registry import register
from jpeft.core.transform import ApplyContext, ModelInfo, Transform, resolve_info
from jpeft.methods.kernel_delta import add_to_kernels
from jpeft.methods.lora import _stack_mask, check_bias, config_for_peft_targets, target_specs, trained_biases


@dataclasses.dataclass(frozen=True)
class VeraConfig:
    r: int = dataclasses.field(default=256, metadata={"help": "rank of the shared random projections"})
    targets: str = dataclasses.field(
        default=r"(query|value)$", metadata={"help": "regex searched in layer module paths"})
    layers: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "only these layer indices (empty: all layers)"})
    projection_seed: int = dataclasses.field(
        default=0, metadata={"help": "seed of the shared projections (PEFT's projection_prng_key)"})
    d_initial: float = dataclasses.field(default=0.1, metadata={"help": "initial value of lambda_d"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout on the VeRA input"})
    projection_shape: tuple[int, ...] = dataclasses.field(
        default=(), metadata={"help": "(max d_in, max d_out): PEFT's projections (PyTorch's generator, "
                                      "sliced per layer); empty: jpeft's draw"})
    bias: str = dataclasses.field(
        default="none", metadata={"help": "train biases too: 'none', 'all' or 'vera_only'"})

    def __post_init__(self) -> None:
        if not (isinstance(self.r, numbers.Integral) and not isinstance(self.r, bool) and self.r >= 1):
            raise ValueError(f"vera.r must be an integer >= 1, got {self.r!r}")
        if not (isinstance(self.projection_seed, numbers.Integral) and 0 <= self.projection_seed < 2**31):
            raise ValueError(f"vera.projection_seed must be an integer in [0, 2**31), got "
                             f"{self.projection_seed!r}")
        if not (isinstance(self.d_initial, numbers.Real) and math.isfinite(self.d_initial)):
            raise ValueError(f"vera.d_initial must be a finite number, got {self.d_initial!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"vera.dropout must be in [0, 1), got {self.dropout}")
        P.check_layer_indices("vera", self.layers)
        check_bias("vera", self.bias)
        shape = tuple(self.projection_shape)
        if shape and not (len(shape) == 2 and all(isinstance(n, numbers.Integral) and not isinstance(n, bool)
                                                  and n >= 1 for n in shape)):
            raise ValueError(f"vera.projection_shape must be empty (jpeft's projections) or two integers "
                             f">= 1, (max d_in, max d_out) of PEFT's projections, got {self.projection_shape!r}")
        object.__setattr__(self, "projection_shape", tuple(int(n) for n in shape))


def _rows(key: jax.Array, n: int, r: int) -> jax.Array:
    """``(n, r)``: row ``i`` is ``U(−1, 1)^r`` from ``fold_in(key, i)`` (any prefix of rows is the
    same whatever ``n`` is)."""
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (r,), jnp.float32,
                                                 -1.0, 1.0))(jnp.arange(n))


def projections(seed: int, r: int, d_in: int, d_out: int) -> tuple[jax.Array, jax.Array]:
    """``(A (d_in, r), B (r, d_out))``: the shared projections as one layer sees them."""
    key = jax.random.key(seed)
    a = _rows(jax.random.fold_in(key, 0), d_in, r) * math.sqrt(6.0 / d_in)
    b = _rows(jax.random.fold_in(key, 1), d_out, r).T * math.sqrt(6.0 / r)
    return a, b


@functools.lru_cache(maxsize=8)
def torch_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``vera_A (r, max_in)`` and ``vera_B (max_out, r)`` as PyTorch draws them, bit for bit:
    ``torch.Generator().manual_seed(seed)`` is MT19937 seeded like NumPy's ``RandomState(seed)``;
    ``uniform_(−b, b)`` on float32 takes the low 24 bits of each 32-bit draw, ``u = bits / 2²⁴``,
    and returns ``float32(u·(to − from) + from)`` computed in double from float32 limits; PEFT's
    Kaiming bound is ``b = √3·√2/√fan_in``. Read-only arrays (cached)."""
    bits = np.random.MT19937()
    bits.state = np.random.RandomState(seed).get_state(legacy=False)
    unit = (bits.random_raw(r * max_in + max_out * r) & 0xFFFFFF).astype(np.float64) / float(1 << 24)

    def kaiming(u: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        bound = np.float64(np.float32(math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))))
        out = (u * (2.0 * bound) - bound).astype(np.float32).reshape(shape)
        out.flags.writeable = False
        return out

    return kaiming(unit[:r * max_in], (r, max_in)), kaiming(unit[r * max_in:], (max_out, r))


def layer_projections(config: VeraConfig, d_in: int, d_out: int) -> tuple[jax.Array, jax.Array]:
    """``(A (d_in, r), B (r, d_out))`` of one layer: jpeft's draw, or PEFT's sliced when
    ``config.projection_shape`` is set."""
    if not config.projection_shape:
        return projections(config.projection_seed, config.r, d_in, d_out)
    max_in, max_out = config.projection_shape
    if d_in > max_in or d_out > max_out:
        raise ValueError(f"vera: a target layer of d_in={d_in}, d_out={d_out} is wider than "
                         f"projection_shape={config.projection_shape}; set it to (max d_in, max d_out) "
                         "over the adapted layers")
    a, b = torch_projections(config.projection_seed, config.r, max_in, max_out)
    return jnp.asarray(a[:, :d_in].T), jnp.asarray(b[:d_out].T)


def _check(name: str, path: str, spec: L.LayerSpec, leaves: Mapping[str, Any], r: int) -> None:
    want = {"lambda_d": (*spec.stack, r), "lambda_b": (*spec.stack, *spec.out_shape)}
    got = {k: tuple(jnp.shape(v)) for k, v in leaves.items()}
    if got != want:
        raise ValueError(f"{name}: the delta holds {got} for '{path}', expected VeRA's {want} for r={r} "
                         "on this kernel; was it made by another method, config or model? Init it "
                         "with this transform on this model's parameters")


def _delta_matrix(config: VeraConfig, spec: L.LayerSpec, leaves: Mapping[str, Any]) -> jax.Array:
    """``(A ⊙ λ_d)(B ⊙ λ_b)``, ``(*stack, d_in, d_out)`` float32."""
    fan_out = math.prod(spec.out_shape)
    a, b = layer_projections(config, spec.fan_in, fan_out)
    lam_d = jnp.asarray(leaves["lambda_d"], jnp.float32)[..., None, :]
    lam_b = jnp.reshape(jnp.asarray(leaves["lambda_b"], jnp.float32), (*spec.stack, 1, fan_out))
    return (a * lam_d) @ (b * lam_b)


def vera(config: VeraConfig = VeraConfig(), *, name: str = "vera") -> Transform:
    """VeRA as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""

    def init(rng: jax.Array, base: P.Params, info: ModelInfo | None = None) -> dict[str, Any]:
        flat: dict[str, jax.Array] = {}
        for path, spec in target_specs(config, base, resolve_info(info), "vera").items():
            lam_d = jnp.full((*spec.stack, config.r), config.d_initial, jnp.float32)
            mask = _stack_mask(config, spec)
            if mask is not None:  # unselected layers of a stack: λ_d = λ_b = 0, a fixed point
                lam_d = lam_d * mask.reshape(mask.shape[:1] + (1,) * (lam_d.ndim - 1))
            flat[f"{path}/lambda_d"] = lam_d
            flat[f"{path}/lambda_b"] = jnp.zeros((*spec.stack, *spec.out_shape), jnp.float32)
        return P.unflatten(flat)

    def layer_hook(ctx: ApplyContext):
        def adapt(call, x, layer, leaves):
            spec = layer.spec
            _check(name, layer.path, spec, leaves, config.r)
            y = call(x)
            if ctx.train and config.dropout > 0.0 and ctx.rng is not None:
                x = dropout(layer.key(ctx, name), x, config.dropout)
            a, b = layer_projections(config, spec.fan_in, math.prod(spec.out_shape))
            a = a.reshape((*spec.in_shape, config.r)).astype(x.dtype)
            h = L.contract(spec, x, a) * leaves["lambda_d"].astype(x.dtype)
            # λ_b scales B's output columns (not the layer's output: an einsum may sum some out)
            b = b.reshape((config.r, *spec.out_shape)) * leaves["lambda_b"].astype(jnp.float32)
            return y + L.expand(spec, h, b.astype(x.dtype)).astype(y.dtype)

        return adapt

    def fold(params: P.Params, delta: Any, sign: float, info: ModelInfo | None) -> P.Params:
        def matrix(path: str, spec: L.LayerSpec, leaves: Mapping[str, Any]) -> jax.Array:
            _check(name, path, spec, leaves, config.r)
            return _delta_matrix(config, spec, leaves)
        return add_to_kernels(params, delta, sign, info, "vera merge", matrix)

    return Transform(
        name=name, config=config, init=init, layer_hook=layer_hook,
        delta_layout=lambda path, leaf: ("stack", "rank") if leaf == "lambda_d" else ("stack", "out"),
        trainable_base=lambda base: trained_biases("vera", config, base),
        merge=lambda params, delta, info=None: fold(params, delta, 1.0, info),
        unmerge=lambda params, delta, info=None: fold(params, delta, -1.0, info),
    )


# -- Hugging Face PEFT format ------------------------------------------------------------------
# Per target ``<module>.vera_lambda_b (d_out,)`` and ``.vera_lambda_d (r,)``; once
# ``base_model.vera_A (r, max d_in)`` and ``base_model.vera_B (max d_out, r)``, sliced per layer.
# jpeft's own draw scales A_n by √(6/n) where PEFT's one vera_A has the widest layer's bound
# √(6/max d_in), so for that draw λ_d (PEFT) = λ_d (jpeft) · √(max d_in / d_in); PEFT's own draw
# (``projection_shape``) is PEFT's arithmetic and needs no rescaling.

_VERA_HANDLED = {"r", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                 "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                 "fan_in_fan_out", "init_weights", "bias"}
_A, _B = "base_model.vera_A", "base_model.vera_B"


def _shapes(params: P.Params, modules: list[str]) -> dict[str, tuple[int, int]]:
    """``{module: (d_in, d_out)}`` of PEFT's targets (Linear, or transformers' Conv1D, whose
    ``(in, out)`` weight is jpeft's kernel: VeRA's vectors do not depend on the layout)."""
    flat = P.flatten(params)
    return {m: tuple(np.shape(flat[f"{m}/kernel"])) for m in modules}


def _peft_draw(tensors: dict[str, np.ndarray], seed: int, r: int, max_in: int, max_out: int,
               label: str) -> bool:
    """Which generator drew the adapter's projections: ``False`` jpeft's, ``True`` PyTorch's
    (PEFT's own; also when the adapter holds none, ``save_projection=False``)."""
    if _A not in tensors and _B not in tensors:
        return True
    a, b = PC.take(tensors, _A, label, "VeRA projection A"), PC.take(tensors, _B, label, "VeRA projection B")
    if a.shape == (r, max_in) and b.shape == (max_out, r):
        ours_a, ours_b = projections(seed, r, max_in, max_out)
        if np.allclose(a, np.asarray(ours_a).T, atol=1e-6) and np.allclose(b, np.asarray(ours_b).T, atol=1e-6):
            return False
        torch_a, torch_b = torch_projections(seed, r, max_in, max_out)
        if np.allclose(a, torch_a, atol=1e-6) and np.allclose(b, torch_b, atol=1e-6):
            return True
    raise ValueError(
        f"{label}: the adapter's VeRA projections (vera_A {a.shape}, vera_B {b.shape}) are neither "
        f"PEFT's nor jpeft's draw for projection_prng_key={seed}, r={r} and the widest target "
        f"({max_in} in, {max_out} out): were they edited, or is the base model not the one the adapter "
        "was trained on? Load it on its own base model")


def _from_peft(cfg: dict[str, Any], tensors: dict[str, np.ndarray], ctx: PC.PeftContext) -> tuple[Transform, Any]:
    """A PEFT ``VERA`` adapter (projections drawn by PEFT or by jpeft) as ``(vera, delta)``."""
    F._check_fields(cfg, _VERA_HANDLED)
    label, mods = ctx.label, ctx.mods
    assert mods is not None
    modules = T._resolve_targets(cfg, mods, "VeRA")
    shapes = _shapes(ctx.params, modules)
    max_in, max_out = max(s[0] for s in shapes.values()), max(s[1] for s in shapes.values())
    r, seed = int(cfg["r"]), int(cfg.get("projection_prng_key", 0))
    peft_draw = _peft_draw(tensors, seed, r, max_in, max_out, label)
    flat: dict[str, Any] = {}
    for path in modules:
        name = mods.name(path)
        d_in, d_out = shapes[path]
        lam_d = PC.take(tensors, f"{PC.MODULE_KEY}{name}.vera_lambda_d", label, "VeRA lambda_d")
        lam_b = PC.take(tensors, f"{PC.MODULE_KEY}{name}.vera_lambda_b", label, "VeRA lambda_b")
        if lam_d.shape != (r,) or lam_b.shape != (d_out,):
            raise ValueError(f"{label}: {name}: vera_lambda_d {lam_d.shape} / vera_lambda_b {lam_b.shape}, "
                             f"expected ({r},) / ({d_out},); is the base the right architecture?")
        flat[f"{path}/lambda_d"] = jnp.asarray(lam_d) / (1.0 if peft_draw else math.sqrt(max_in / d_in))
        flat[f"{path}/lambda_b"] = jnp.asarray(lam_b)
    PC.refuse_leftover(tensors, (".vera_lambda_",), label)
    common = {"r": r, "projection_seed": seed, "d_initial": float(cfg.get("d_initial", 0.1)),
              "dropout": float(cfg.get("vera_dropout") or 0.0),
              "projection_shape": (max_in, max_out) if peft_draw else (), "bias": cfg.get("bias", "none")}
    config = config_for_peft_targets(cfg, modules, lambda **cand: VeraConfig(**common, **cand),
                                     ctx.params, "vera")
    return vera(config), P.unflatten(flat)


def _to_peft(transform: Transform, delta: Any, ctx: PC.PeftContext
             ) -> tuple[dict[str, Any], dict[str, np.ndarray], P.Params]:
    """A VeRA delta as PEFT's config fields and tensors, the projections included (sized, as PEFT
    sizes them, by the widest adapted layer)."""
    config, mods = transform.config, ctx.mods
    assert mods is not None
    leaves = group_by_module(delta)
    modules = PC.delta_modules(delta, "VeRA")
    shapes = _shapes(ctx.params, modules)
    max_in, max_out = max(s[0] for s in shapes.values()), max(s[1] for s in shapes.values())
    if config.projection_shape:
        a, b = layer_projections(config, max_in, max_out)  # PEFT's draw, sliced to PEFT's shapes
        scales = {path: 1.0 for path in modules}
    else:
        a, b = projections(config.projection_seed, config.r, max_in, max_out)
        scales = {path: math.sqrt(max_in / shapes[path][0]) for path in modules}
    names = [mods.name(m) for m in modules]
    tensors = {_A: PC.to_numpy(a).T.copy(), _B: PC.to_numpy(b).T.copy()}
    for path, name in zip(modules, names):
        tensors[f"{PC.MODULE_KEY}{name}.vera_lambda_d"] = PC.to_numpy(leaves[path]["lambda_d"]) * scales[path]
        tensors[f"{PC.MODULE_KEY}{name}.vera_lambda_b"] = PC.to_numpy(leaves[path]["lambda_b"])
    tensors.update(PC.bias_tensors(ctx, modules))
    fields = {"peft_type": "VERA", "r": int(config.r), "projection_prng_key": int(config.projection_seed),
              "save_projection": True, "vera_dropout": config.dropout, "d_initial": config.d_initial,
              "fan_in_fan_out": any(mods.is_conv1d(m) for m in modules), "bias": config.bias,
              "init_weights": True, "layers_pattern": None,
              **T._peft_targets_for(names, list(mods.by_name), list(mods.head))}
    return fields, tensors, ctx.params


register("vera", VeraConfig, vera,
         peft=PC.PeftConverter(peft_type="VERA", layout="modules", load=_from_peft, save=_to_peft))
