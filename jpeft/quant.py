"""A quantized frozen base (QLoRA-style): int8 per output channel, 4-bit NormalFloat with or
without double quantization of its scales, and GGUF's Q4_1.

The matmul kernels of the frozen base are stored as :class:`QuantizedArray` leaves (codes +
scales, a registered pytree, so it is jitted, sharded and donated like any array) and every
method trains its delta on top. The forward pass dequantizes each kernel on the fly, inside the
jitted step, at one place: :func:`dequantizing_interceptor`, installed by ``jpeft.apply`` on a
Linen model whose parameters hold quantized leaves, computes an ``nn.Dense`` layer from the
dequantized kernel (with the layer's own ``dot_general``, so ``matmul_dtype`` still applies).
Layer hooks (LoRA, (IA)³) wrap that call as they wrap any Dense call.

Formats (``W`` a kernel ``(…, K, N)``: ``K`` inputs, ``N`` outputs, as Flax stores it):

* ``int8``: symmetric per output channel, ``s_n = max_k |W_kn| / 127``,
  ``codes = round(W / s) ∈ [-127, 127]``; ``|W - s·codes| ≤ s_n / 2``.
* ``nf4``: NormalFloat-4 of QLoRA (Dettmers et al., 2023, arXiv:2305.14314, appendix E; the
  table of bitsandbytes). Blocks of 64 consecutive inputs of one output (as bitsandbytes blocks
  the flattened PyTorch ``(out, in)`` weight), ``a_b = max |W| over the block``,
  ``code = argmin_i |W/a_b - q_i|`` over the 16 levels ``q_i``, two codes packed per ``uint8``;
  ``|W - a_b·q_code| ≤ a_b · max_i (q_{i+1} - q_i) / 2``. Needs ``K`` divisible by 64 and
  ``N`` even. Scales float32: 4 + 32/64 = 4.5 bits per weight.
* ``nf4-dq``: ``nf4`` with QLoRA's double quantization (§3; bitsandbytes
  ``compress_statistics=True``): the codes are ``nf4``'s (from the float32 ``a_b``); the scales
  are stored quantized. ``μ = mean_b a_b`` per kernel is subtracted, the centred scales
  ``a_b - μ`` are taken in bitsandbytes' order (the ``(out, in)`` weight's blocks: output-major)
  in blocks of 256, and each block ``j`` is int8 absmax-quantized, ``t_j = max |a_b - μ| / 127``,
  ``c_b = round((a_b - μ) / t_j)``; stored: ``c_b`` int8, ``t_j`` and ``μ`` float32, so
  ``â_b = μ + t_j·c_b`` with ``|a_b - â_b| ≤ t_j / 2`` (QLoRA's FP8 and bitsandbytes' dynamic
  8-bit code are replaced by linear int8). With ``|q_i| ≤ 1``:
  ``|W - â_b·q_code| ≤ a_b·gap/2 + |a_b - â_b| ≤ (â_b + t_j/2)·gap/2 + t_j/2`` (``gap`` the
  largest NF4 gap). Bits per weight: 4 + 8/64 + 32/(64·256) ≈ 4.127 (plus 32 bits of ``μ``
  per kernel).

* ``q4_1``: llama.cpp's / GGUF's ``Q4_1`` (ggml ``quantize_row_q4_1_ref``): blocks of 32
  consecutive inputs of one output, affine, ``d_b = (max_b - min_b) / 15``,
  ``code = min(15, ⌊(W - min_b)/d_b + 0.5⌋)``, stored ``d_b`` and ``m_b = min_b`` as float16
  (:class:`AffineScales`), ``W ≈ d_b·code + m_b``; two codes per ``uint8`` as nf4. 4 + 32/32 = 5
  bits per weight. Quantizing the weights of a GGUF ``Q4_1`` file (as jpeft loads them,
  dequantized) gives back the file's own codes and scales, so the base computes exactly what
  the file holds: no second rounding, unlike NF4 over a 4-bit source. Needs ``K`` divisible by
  32 and ``N`` even. ``|W - Ŵ| ≤ d_b/2`` plus the float16 rounding of ``d_b`` and ``m_b``
  (:func:`error_bound`).

Which leaves: the ``kernel`` leaves (2-D or more) that are not trained (the task head, a
method's trained base leaves) and not rewritten by the method's ``adapt_params`` (BitFit's
biases, layer freezing's top layers, diff pruning's ``θ₀ + δ``: found by tracing the rewrite),
and not the LM head (``skip``). Embeddings, norms and biases stay float.

A quantized leaf refuses arithmetic: merging a delta into it (``jpeft.merge``) raises
:class:`QuantizedBaseError`; merge into the float base instead.

Example::

    method = jpeft.lora(jpeft.LoraConfig(r=2))
    qbase = jpeft.quantize_base(base, "int8", transform=method, info=model.info())  # nf4, nf4-dq, q4_1
    delta = method.init(key, qbase, model.info())
    logits = jpeft.apply(model, method, qbase, delta, ids, mask)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jpeft.core import paths as P

FORMATS = ("int8", "nf4", "nf4-dq", "q4_1")
NF4_FORMATS = ("nf4", "nf4-dq")  # 4-bit codes in blocks of 64 inputs
PACKED_FORMATS = (*NF4_FORMATS, "q4_1")  # two 4-bit codes per byte along the outputs
NF4_BLOCK = 64
Q4_1_BLOCK = 32  # GGUF's QK4_1
Q4_1_LEVELS = 15
_F16_REL = 2.0 ** -11  # float16's relative rounding error (half an ulp)
DQ_BLOCK = 256  # scales per block of the second quantization (nf4-dq)
INT8_MAX = 127
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
NF4_MAX_GAP = float(np.max(np.diff(NF4_LEVELS)))  # the error bound is a_b · NF4_MAX_GAP / 2
SKIP_DEFAULT = r"(^|/)lm_head/"  # the LM head stays float, as bitsandbytes keeps it
_DEQUANTIZED = "jpeft_dequantized"  # checkpoint name: never saved for the backward pass

class QuantizedBaseError(TypeError):
    """Arithmetic on a quantized base weight (a merge, a method rewriting base weights)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedScales:
    """The block absmax of an ``nf4-dq`` kernel, quantized again (QLoRA's double quantization).

    Attributes:
      codes: ``int8 (…, K/64, N)``, ``c_b = round((a_b - μ) / t_j)``.
      scales: ``float32 (…, ceil(K/64·N / 256))``, ``t_j``: the absmax / 127 of each block of 256
        centred scales, in bitsandbytes' order (output-major; the last block may be partial).
      mean: ``float32 (…, 1, 1)``, ``μ``: the mean of the kernel's block absmax.
    """

    codes: jax.Array
    scales: jax.Array
    mean: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AffineScales:
    """The block scales of a ``q4_1`` kernel (GGUF ``block_q4_1``'s ``d`` and ``m``).

    Attributes:
      step: ``float16 (…, K/32, N)``, ``d_b``: the distance between adjacent levels.
      offset: ``float16 (…, K/32, N)``, ``m_b``: the block minimum, the value of code 0.
    """

    step: jax.Array
    offset: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A frozen quantized kernel: ``codes`` and ``scales`` (pytree children) with the format
    and the dtype it dequantizes to (static).

    Attributes:
      codes: ``int8 (…, K, N)`` (int8), or ``uint8 (…, K, N/2)`` two 4-bit codes per byte (the
        even output in the high nibble; nf4, nf4-dq, q4_1).
      scales: ``float32 (…, 1, N)`` per output channel (int8), ``(…, K/64, N)`` block absmax
        (nf4), those absmax double-quantized, a :class:`QuantizedScales` (nf4-dq), or the
        blocks' step and minimum, an :class:`AffineScales` (q4_1).
      format: ``"int8"``, ``"nf4"``, ``"nf4-dq"`` or ``"q4_1"``.
      dtype: the dtype :meth:`dequantize` returns (the float base's).
    """

    codes: jax.Array
    scales: jax.Array | QuantizedScales | AffineScales
    format: str = dataclasses.field(metadata={"static": True})
    dtype: str = dataclasses.field(default="float32", metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the dequantized kernel."""
        *lead, n = self.codes.shape
        return (*lead, n * 2) if self.format in PACKED_FORMATS else (*lead, n)

    @property
    def ndim(self) -> int:
        return len(self.codes.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The kernel in ``dtype`` (default: :attr:`dtype`)."""
        return dequantize(self, dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # NumPy views (checkpoint fingerprints) see the dequantized values.
        out = np.asarray(jax.device_get(dequantize(self)))
        return out if dtype is None else out.astype(dtype)

    def _refuse(self, *_: Any) -> Any:
        raise QuantizedBaseError(
            f"this base weight is quantized ({self.format}, shape {self.shape}); jpeft computes with "
            "it only inside the nn.Dense layer that holds it, never as an array (merging a delta "
            "into it, rewriting or reading it). Merge into the float base instead (load the model "
            "without --base-dtype=int8/nf4/nf4-dq/q4_1, or jpeft.dequantize_base(base)) or keep the delta "
            "unmerged (jpeft.apply); a method that rewrites or reads base weights needs a float "
            "base (--base-dtype=float32 or bfloat16; jpeft.quantize_base(..., transform=method) "
            "keeps the weights the method rewrites float).")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __matmul__ = __rmatmul__ = __neg__ = _refuse
    astype = __jax_array__ = _refuse


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def dequantize_leaf(x: Any) -> Any:
    """``x`` dequantized if it is a :class:`QuantizedArray`, else ``x`` itself (the weight a
    layer hook sees: DoRA's column norms are those of the dequantized kernel)."""
    return x.dequantize() if is_quantized(x) else x


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _absmax_int8(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 along ``axis``: ``(codes, s)``, ``s = max |x| / 127`` (kept dims),
    ``codes = round(x / s) ∈ [-127, 127]``; ``|x - s·codes| ≤ s / 2``."""
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / INT8_MAX
    codes = jnp.clip(jnp.round(x / jnp.where(scale == 0, 1.0, scale)), -INT8_MAX, INT8_MAX)
    return codes.astype(jnp.int8), scale


def _dq_order(x: jax.Array) -> jax.Array:
    """``(…, K/64, N) -> (…, N·K/64)``: per-block values in bitsandbytes' order (output-major)."""
    return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], -1)


def _per_scale(t: jax.Array, blocks: tuple[int, int]) -> jax.Array:
    """The second-level ``t (…, ceil(M/256))`` repeated to every scale: ``(…, K/64, N)``."""
    kb, n = blocks
    flat = jnp.repeat(t, DQ_BLOCK, axis=-1, total_repeat_length=kb * n)
    return jnp.swapaxes(flat.reshape(*t.shape[:-1], n, kb), -1, -2)


def quantize_scales(absmax: jax.Array) -> QuantizedScales:
    """Double quantization of NF4's block absmax ``(…, K/64, N)`` (see ``nf4-dq`` in the module
    docstring): the kernel's mean subtracted, int8 absmax per block of 256 in bitsandbytes'
    order."""
    chex.assert_rank(absmax, {*range(2, 8)})
    *lead, kb, n = absmax.shape
    mean = jnp.mean(absmax, axis=(-2, -1), keepdims=True)
    flat = _dq_order(absmax - mean)
    pad = -flat.shape[-1] % DQ_BLOCK  # the last block is partial: padded with zeros
    blocks = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, DQ_BLOCK)
    codes, scale = _absmax_int8(blocks, axis=-1)
    codes = codes.reshape(*lead, -1)[..., :kb * n].reshape(*lead, n, kb)
    return QuantizedScales(jnp.swapaxes(codes, -1, -2), scale[..., 0], mean)


def dequantize_scales(s: QuantizedScales) -> jax.Array:
    """``â_b = μ + t_j·c_b``, float32 ``(…, K/64, N)``."""
    return s.codes.astype(jnp.float32) * _per_scale(s.scales, s.codes.shape[-2:]) + s.mean


def block_scales(q: QuantizedArray) -> jax.Array:
    """The float32 scales ``q`` dequantizes with (nf4-dq: the dequantized absmax ``â_b``)."""
    return dequantize_scales(q.scales) if q.format == "nf4-dq" else q.scales


def quantize(w: jax.Array, fmt: str) -> QuantizedArray:
    """Quantize a kernel ``w (…, K, N)`` (see the module docstring for the formats)."""
    check_format(fmt)
    chex.assert_rank(w, {*range(2, 8)})
    w32 = jnp.asarray(w, jnp.float32)
    if fmt == "int8":
        codes, scale = _absmax_int8(w32, axis=-2)
        return QuantizedArray(codes, scale, "int8", jnp.dtype(w.dtype).name)
    *lead, k, n = w32.shape
    block = block_size(fmt)
    if k % block or n % 2:
        raise ValueError(f"{fmt} needs a kernel whose input axis is a multiple of {block} and "
                         f"whose output axis is even, got shape {tuple(w32.shape)}")
    if fmt == "q4_1":
        return _quantize_q4_1(w32, jnp.dtype(w.dtype).name)
    blocks = w32.reshape(*lead, k // NF4_BLOCK, NF4_BLOCK, n)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)  # (…, K/64, N)
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None, :]
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, normed.reshape(*lead, k, n)).astype(jnp.uint8)  # nearest level
    scales = quantize_scales(absmax) if fmt == "nf4-dq" else absmax
    return QuantizedArray(_pack(codes), scales, fmt, jnp.dtype(w.dtype).name)


def block_size(fmt: str) -> int:
    """Inputs per block of a 4-bit format (64 for nf4 / nf4-dq, 32 for q4_1)."""
    return Q4_1_BLOCK if fmt == "q4_1" else NF4_BLOCK


def _pack(codes: jax.Array) -> jax.Array:
    """4-bit codes ``(…, K, N)`` two per byte ``(…, K, N/2)``, the even output in the high nibble."""
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def _unpack(packed: jax.Array) -> jax.Array:
    *lead, k, half = packed.shape
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*lead, k, 2 * half)


def _quantize_q4_1(w32: jax.Array, dtype: str) -> QuantizedArray:
    """ggml's ``quantize_row_q4_1_ref`` on blocks of 32 inputs: the codes from the float32 step,
    the step and minimum stored as float16."""
    *lead, k, n = w32.shape
    blocks = w32.reshape(*lead, k // Q4_1_BLOCK, Q4_1_BLOCK, n)
    low, high = jnp.min(blocks, axis=-2), jnp.max(blocks, axis=-2)  # (…, K/32, N)
    # A true division, as ggml's: XLA turns a division by a constant into a multiplication by
    # its reciprocal, which rounds differently; the barrier hides the constant from it.
    step = (high - low) / jax.lax.optimization_barrier(jnp.full_like(high, Q4_1_LEVELS))
    inverse = jnp.where(step == 0, 0.0, 1.0 / jnp.where(step == 0, 1.0, step))
    codes = jnp.floor((blocks - low[..., None, :]) * inverse[..., None, :] + 0.5)
    codes = jnp.minimum(codes, Q4_1_LEVELS).astype(jnp.uint8).reshape(*lead, k, n)
    scales = AffineScales(step.astype(jnp.float16), low.astype(jnp.float16))
    return QuantizedArray(_pack(codes), scales, "q4_1", dtype)


def dequantize(q: QuantizedArray, dtype: Any = None) -> jax.Array:
    """The float kernel ``(…, K, N)`` of ``q`` in ``dtype`` (default ``q.dtype``)."""
    dtype = jnp.dtype(dtype or q.dtype)
    if q.format == "int8":
        return (q.codes.astype(jnp.float32) * q.scales).astype(dtype)
    codes = _unpack(q.codes)
    *lead, k, n = codes.shape
    if q.format == "q4_1":
        step, offset = (jnp.asarray(x, jnp.float32)[..., None, :] for x in (q.scales.step, q.scales.offset))
        blocks = codes.reshape(*lead, k // Q4_1_BLOCK, Q4_1_BLOCK, n).astype(jnp.float32) * step + offset
        return blocks.reshape(*lead, k, n).astype(dtype)
    values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
    scales = block_scales(q)[..., None, :]
    blocks = values.reshape(*lead, k // NF4_BLOCK, NF4_BLOCK, n) * scales
    return blocks.reshape(*lead, k, n).astype(dtype)


def error_bound(q: QuantizedArray) -> jax.Array:
    """The largest ``|W - dequantize(q)|`` the format allows, per element ``(…, K, N)``: int8
    ``s_n/2``; nf4 ``a_b·gap/2``; nf4-dq ``(â_b + t_j/2)·gap/2 + t_j/2``; q4_1 ``d_b/2`` plus the
    float16 rounding of ``d_b`` (times 15 codes) and of ``m_b`` (twice float16's half ulp, to
    cover the rounding of the float32 arithmetic too)."""
    if q.format == "int8":
        return jnp.broadcast_to(q.scales / 2, q.shape)
    if q.format == "q4_1":  # half a float32 step, and 15 × the step's and 1 × the minimum's f16 rounding
        step = jnp.asarray(q.scales.step, jnp.float32)
        offset = jnp.abs(jnp.asarray(q.scales.offset, jnp.float32))
        bound = step / 2 * (1 + 2 * _F16_REL) + Q4_1_LEVELS * step * 2 * _F16_REL + offset * 2 * _F16_REL
        return jnp.repeat(bound + 2.0 ** -24, Q4_1_BLOCK, axis=-2)
    if q.format == "nf4":
        bound = q.scales * (NF4_MAX_GAP / 2)
    else:  # a_b ≤ â_b + t_j/2 in the 4-bit error, plus |q_i| ≤ 1 times |a_b - â_b| ≤ t_j/2
        half_t = _per_scale(q.scales.scales, q.scales.codes.shape[-2:]) / 2
        bound = (dequantize_scales(q.scales) + half_t) * (NF4_MAX_GAP / 2) + half_t
    return jnp.repeat(bound, NF4_BLOCK, axis=-2)


# ----------------------------------------------------------------------------------------------
# Which leaves of a base are quantized


def rewritten_paths(transform: Any, base: P.Params, info: Any = None) -> list[str]:
    """Base paths that ``transform.adapt_params`` rewrites (``θ₀ + δ``), found by tracing it
    once on abstract values: an output that is not its input passed through is rewritten."""
    from jpeft.core.transform import ApplyContext

    flat = P.flatten(base)
    paths = list(flat)
    abstract = [jax.ShapeDtypeStruct(v.shape, jnp.dtype(getattr(v, "dtype", jnp.float32)))
                for v in flat.values()]
    delta = jax.eval_shape(lambda k, b: transform.init(k, P.unflatten(dict(zip(paths, b))), info),
                           jax.random.key(0), abstract)
    ctx = ApplyContext(train=True, rng=jax.random.key(0))

    def rewrite(leaves, d):
        out = P.flatten(transform.adapt_params(P.unflatten(dict(zip(paths, leaves))), d, ctx))
        return [out[p] for p in paths]

    closed = jax.make_jaxpr(rewrite)(abstract, delta)
    invars = closed.jaxpr.invars[:len(paths)]
    return [p for p, i, o in zip(paths, invars, closed.jaxpr.outvars) if o is not i]


def _dense_paths(info: Any) -> set[str] | None:
    layers = getattr(info, "layers", None) or {}
    if not layers:
        return None  # no description: every kernel is taken for a Dense one
    return {f"{path}/kernel" for path, spec in layers.items() if spec.kind == "dense" and not spec.stack}


def quantize_base(base: P.Params, fmt: str, *, keep: Iterable[str] = (), transform: Any = None,
                  info: Any = None, skip: str = SKIP_DEFAULT) -> dict[str, Any]:
    """``base`` with its frozen matmul kernels quantized to ``fmt`` (``"int8"``, ``"nf4"``,
    ``"nf4-dq"`` or ``"q4_1"``).

    Quantized: every ``…/kernel`` leaf of rank 2 of a Dense layer (per ``info.layers`` when
    given), except the paths in ``keep`` (trained base leaves: the task head, a method's
    ``trainable_base``), those ``transform.adapt_params`` rewrites (:func:`rewritten_paths`) and
    those matching the regex ``skip`` (the LM head). Everything else is returned unchanged.
    Raises ``ValueError`` when nothing would be quantized (e.g. ``full``, which trains every
    weight), naming why.
    """
    check_format(fmt)
    flat = P.flatten(base)
    kept = set(keep)
    rewritten = set(rewritten_paths(transform, base, info)) if transform is not None else set()
    dense = _dense_paths(info)
    candidates = [p for p, v in flat.items() if p.rsplit("/", 1)[-1] == "kernel"
                  and len(getattr(v, "shape", ())) == 2 and not is_quantized(v)
                  and jnp.issubdtype(v.dtype, jnp.floating)
                  and (dense is None or p in dense) and not re.search(skip, p)]
    frozen = [p for p in candidates if p not in kept and p not in rewritten]
    chosen = frozen
    if fmt in PACKED_FORMATS:
        block = block_size(fmt)
        chosen = [p for p in frozen if flat[p].shape[-2] % block == 0 and flat[p].shape[-1] % 2 == 0]
    if not chosen:
        name = getattr(transform, "name", "the method")
        if not candidates:
            why = "the model has no Dense kernel jpeft can quantize"
        elif not frozen:
            why = f"'{name}' trains or rewrites all {len(candidates)} of them"
        else:
            why = (f"none of the {len(frozen)} frozen kernels has an input size that is a multiple of "
                   f"the {fmt} block ({block_size(fmt)}) and an even output size; int8 has no such "
                   "constraint")
        raise ValueError(
            f"base dtype {fmt!r}: no matmul weight would be quantized ({why}); a quantized base "
            "holds frozen weights only. Use a float base (--base-dtype=float32 or bfloat16) for "
            "this method, or a method that trains a delta on top of frozen weights (e.g. lora).")
    out = dict(flat)
    quantize_jit = jax.jit(quantize, static_argnums=1)
    for p in chosen:
        out[p] = quantize_jit(flat[p], fmt)
    return P.unflatten(out)


def dequantize_base(base: P.Params) -> dict[str, Any]:
    """``base`` with every :class:`QuantizedArray` leaf replaced by its float kernel."""
    return P.unflatten({p: dequantize(v) if is_quantized(v) else v for p, v in P.flatten(base).items()})


def has_quantized(tree: P.Params) -> bool:
    return any(is_quantized(v) for v in P.flatten(tree).values())


def quantized_paths(tree: P.Params) -> list[str]:
    return [p for p, v in P.flatten(tree).items() if is_quantized(v)]


# ----------------------------------------------------------------------------------------------
# The forward pass


def _dense_call(module: nn.Dense, x: jax.Array, q: QuantizedArray, bias: jax.Array | None) -> jax.Array:
    """``nn.Dense.__call__`` on the dequantized kernel (same promotion and ``dot_general``)."""
    w = checkpoint_name(q.dequantize(), _DEQUANTIZED)
    x, w, bias = module.promote_dtype(x, w, bias, dtype=module.dtype)
    if module.dot_general_cls is not None:
        dot_general = module.dot_general_cls()
    else:
        dot_general = module.dot_general or jax.lax.dot_general
    y = dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
    if bias is not None:
        y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def dequantizing_interceptor() -> Any:
    """A Linen interceptor computing every ``nn.Dense`` whose kernel is a
    :class:`QuantizedArray` from the dequantized kernel. The dequantized kernel is not saved for
    the backward pass (recomputed from the codes there, as QLoRA does): memory holds the codes."""
    policy = jax.checkpoint_policies.save_anything_except_these_names(_DEQUANTIZED)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None \
                or not module.has_variable("params", "kernel"):
            return next_fun(*args, **kwargs)
        kernel = module.get_variable("params", "kernel")
        if not is_quantized(kernel):
            return next_fun(*args, **kwargs)
        path = "/".join(str(p) for p in module.path)
        if type(module) is not nn.Dense or kwargs or len(args) != 1:
            raise QuantizedBaseError(
                f"the layer '{path}' ({type(module).__name__}) holds a quantized kernel; jpeft "
                "computes quantized kernels in nn.Dense layers only. Keep this layer float "
                "(jpeft.quantize_base(..., skip=...)).")
        x = args[0]
        if kernel.shape != (x.shape[-1], module.features):
            raise ValueError(f"'{path}': the quantized kernel has shape {kernel.shape}, the layer "
                             f"needs {(x.shape[-1], module.features)}; was it made for another model?")
        bias = module.get_variable("params", "bias") if module.use_bias else None
        fn = jax.checkpoint(lambda x, q, b: _dense_call(module, x, q, b), policy=policy)
        return fn(x, kernel, bias)

    return intercept


def interceptors_for(params: P.Params) -> Sequence[Any]:
    """``[dequantizing_interceptor()]`` when ``params`` hold quantized leaves, else ``[]``."""
    return [dequantizing_interceptor()] if has_quantized(params) else []


def base_compute_dtype(base_dtype: str) -> str:
    """The model's compute dtype for a ``--base-dtype``: a quantized base computes in float32
    (its kernels dequantize to the float base's dtype; ``--matmul-dtype`` sets the operands)."""
    return "float32" if base_dtype in FORMATS else base_dtype
