"""LoRA initialisations that move part of each weight into the factors: PiSSA and OLoRA, and the
conversion of such an adapter into a plain LoRA of the original weights.

PiSSA (Meng et al., 2024, arXiv:2404.02948) starts ``A``, ``B`` from the top ``r`` singular
triplets of each target kernel ``W (d_in, d_out) = U S Vᵀ`` and trains them on the residual:

    A₀ = U_r √(S_r / s),   B₀ = √(S_r / s) V_rᵀ,   W_res = W − s·A₀B₀

OLoRA (Büyükakyüz, 2024, arXiv:2406.01775) uses the QR decomposition of ``Wᵀ = Q R`` instead:
``A₀ = R_rᵀ``, ``B₀ = Q_rᵀ``, ``W_res = W − s·A₀B₀``. Both are Hugging Face PEFT's
``init_lora_weights="pissa"`` / ``"olora"`` (``peft/tuners/lora/layer.py``), computed in float32
with the residual cast back to the kernel's dtype.

PEFT rewrites the model's weights in place; here the rewrite is a function: :func:`pissa` and
:func:`olora` return ``(residual_base, delta)``, a new frozen base and a LoRA delta, and the
adapted model equals the original one at init (``apply(method, W_res, δ₀) = model(W)``). A
trained delta ``δ`` only runs on the residual base. :func:`to_plain_lora` turns it into a plain
LoRA of rank ``2r`` on the original base, as PEFT's ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)`` does:

    s·AB − s·A₀B₀ = s'·[A | A₀] [B ; −B₀],     s' = s  (α doubled with r; ×√2 under rsLoRA)

which :func:`jpeft.checkpoint.hf_peft.save_peft_adapter` writes in PEFT's format.

Example::

    config = LoraConfig(r=2, alpha=4, targets=r"(query|value)$")
    residual, delta0 = pissa(config, base, model.info())
    method = lora(config)
    # ... train delta0 on the residual base into delta ...
    plain_config, plain_delta = to_plain_lora(config, delta0, delta0, base, model.info())
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jpeft import quant as Q
from jpeft.arithmetic import factorize
from jpeft.core import layers as L
from jpeft.core import paths as P
from jpeft.core.transform import ModelInfo, resolve_info
from jpeft.methods.lora import LoraConfig, _stack_mask, rank_and_scale, target_specs

Factors = Callable[[jax.Array, int, float], tuple[jax.Array, jax.Array]]


def _pissa_factors(matrix: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """``(A₀ (…, d_in, r), B₀ (…, r, d_out))`` from the top ``r`` singular triplets of ``W/s``."""
    return factorize(matrix / scale, r)


def _olora_factors(matrix: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """``(A₀ = R_rᵀ, B₀ = Q_rᵀ)`` of ``Wᵀ = Q R`` (PEFT's QR of the ``(d_out, d_in)`` weight)."""
    q, rr = jnp.linalg.qr(jnp.swapaxes(matrix, -1, -2))
    return jnp.swapaxes(rr[..., :r, :], -1, -2), jnp.swapaxes(q[..., :, :r], -1, -2)


def _init_from_base(what: str, factors: Factors, config: LoraConfig, base: P.Params,
                    info: ModelInfo | None) -> tuple[P.Params, dict[str, Any]]:
    if config.use_dora:
        raise ValueError(f"{what}: use_dora=True is not supported with this init (the magnitude would "
                         "start from the residual); use plain LoRA factors")
    info = resolve_info(info)
    flat = dict(P.flatten(base))
    delta: dict[str, jax.Array] = {}
    for path, spec in target_specs(config, base, info).items():
        key = L.kernel_path(path, info.layers, flat)
        kernel = flat[key]
        if Q.is_quantized(kernel):
            raise ValueError(f"{what}: '{key}' is quantized; initialise on the float base and "
                             "quantize the residual base afterwards (jpeft.quantize_base)")
        r, scale = rank_and_scale(config, path)
        if r > min(spec.fan_in, math.prod(spec.out_shape)):
            raise ValueError(f"{what}: r={r} exceeds the rank of '{key}' ({spec.fan_in} × "
                             f"{math.prod(spec.out_shape)}); lower r or rank_pattern for it")
        a, b = factors(L.kernel_matrix(spec, kernel.astype(jnp.float32)), r, scale)
        mask = _stack_mask(config, spec)
        if mask is not None:  # layers of a stack that layers= leaves out: A = B = 0, W unchanged
            mask = mask.reshape(mask.shape[:1] + (1, 1))
            a, b = a * mask, b * mask
        a = a.reshape((*spec.stack, *spec.in_shape, r))
        b = b.reshape((*spec.stack, r, *spec.out_shape))
        flat[key] = (kernel.astype(jnp.float32) - scale * L.low_rank_kernel(spec, a, b)).astype(kernel.dtype)
        delta[f"{path}/lora_A"], delta[f"{path}/lora_B"] = a, b
    return P.unflatten(flat), P.unflatten(delta)


def pissa(config: LoraConfig, base: P.Params, info: ModelInfo | None = None
          ) -> tuple[P.Params, dict[str, Any]]:
    """``(residual_base, delta)``: PiSSA's factors of every target and ``W − s·A₀B₀`` in place of
    its kernel (module docstring); train ``lora(config)`` on the residual base."""
    return _init_from_base("pissa", _pissa_factors, config, base, info)


def olora(config: LoraConfig, base: P.Params, info: ModelInfo | None = None
          ) -> tuple[P.Params, dict[str, Any]]:
    """``(residual_base, delta)``: OLoRA's QR factors of every target and the residual kernels."""
    return _init_from_base("olora", _olora_factors, config, base, info)


def to_plain_lora(config: LoraConfig, delta: Any, initial: Any, base: P.Params,
                  info: ModelInfo | None = None) -> tuple[LoraConfig, dict[str, Any]]:
    """``(config', delta')``: a LoRA of rank ``2r`` on the *original* base computing what
    ``delta`` computes on the residual base made with ``initial`` (the delta :func:`pissa` or
    :func:`olora` returned): ``A' = [A | A₀]``, ``B' = [B ; −B₀]``, ``α`` scaled to keep ``s``
    (``base``: the original or the residual base, for the kernels' layouts)."""
    layers = resolve_info(info).layers
    flat, flat0, kernels = P.flatten(delta), P.flatten(initial), P.flatten(base)
    if set(flat) != set(flat0):
        raise ValueError("to_plain_lora: the trained delta and the initial delta hold different "
                         f"leaves ({sorted(set(flat) ^ set(flat0))[:4]}); pass the delta the init returned")
    out = {}
    for key, value in flat.items():
        module, _, leaf = key.rpartition("/")
        if leaf not in ("lora_A", "lora_B"):
            raise ValueError(f"to_plain_lora: '{key}' is not a LoRA factor (DoRA is not supported here)")
        kernel = kernels[L.kernel_path(module, layers, kernels)]
        stack = len(L.kernel_spec(module, jnp.shape(kernel), layers, "to_plain_lora").stack)
        rank_axis = value.ndim - 1 if leaf == "lora_A" else stack
        sign = 1.0 if leaf == "lora_A" else -1.0
        out[key] = jnp.concatenate([value, sign * flat0[key]], axis=rank_axis)
    grow = math.sqrt(2.0) if config.use_rslora else 2.0
    plain = dataclasses.replace(
        config, r=2 * config.r, alpha=config.alpha * grow,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * grow for k, v in config.alpha_pattern.items()})
    return plain, P.unflatten(out)
