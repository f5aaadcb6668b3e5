"""LoHa: low-rank Hadamard product updates (Hyeon-Woo et al., 2022, FedPara, arXiv:2108.06098;
the LyCORIS method, Yeh et al., 2024, arXiv:2309.14859), with Hugging Face PEFT's semantics
(``peft/tuners/loha``).

For a target layer with kernel ``W (d_in, d_out)`` (any layer kind: its input axis group
flattened to ``d_in``, its output group to ``d_out``)

    ΔW = s · (U₁ V₁) ⊙ (U₂ V₂),     U (d_in, r),  V (r, d_out),  s = α / r

whose rank can reach ``r²`` with ``2r(d_in + d_out)`` parameters (twice LoRA's at the same ``r``). ``U₂ = 0`` at init (PEFT zeroes ``hada_w2_b``), so a fresh delta is the identity; the
other factors are PyTorch's ``kaiming_uniform_(a=√5)`` of PEFT's tensors. The update is built
whole and applied with the layer's operation (:mod:`jpeft.methods.kernel_delta`); ``merge``
folds it into the kernel. The delta holds ``w1_in``, ``w1_out``, ``w2_in``, ``w2_out`` per
adapted module (stack axes first under ``nn.scan``).

Example::

    method = jpeft.loha(LohaConfig(r=4, alpha=8, targets=r"(query|value)$"))
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp

from jpeft.checkpoint import peft_convert as PC
from jpeft.core import layers as L
from jpeft.core.registry import register
from jpeft.core.transform import Transform
from jpeft.methods import kernel_delta as K


@dataclasses.dataclass(frozen=True)
class LohaConfig(K.KernelDeltaConfig):
    """LoHa's config: :class:`~jpeft.methods.kernel_delta.KernelDeltaConfig`'s fields (LoRA's
    ``r``, ``alpha``, ``targets``, ``layers``, patterns; PEFT's dropouts, LoHa rescaling the
    columns ``rank_dropout`` keeps)."""

    method: ClassVar[str] = "loha"


def _shapes(spec: L.LayerSpec, r: int, config: LohaConfig) -> K.Shapes:
    return {"w1_in": (*spec.in_shape, r), "w1_out": (r, *spec.out_shape),
            "w2_in": (*spec.in_shape, r), "w2_out": (r, *spec.out_shape)}


def _init(key: jax.Array, leaf: str, shape: tuple[int, ...], spec: L.LayerSpec, r: int,
          config: LohaConfig) -> jax.Array:
    if leaf == "w2_in":
        return jnp.zeros(shape, jnp.float32)
    # PEFT's hada_w*_a (d_out, r) have fan-in r; hada_w1_b (r, d_in) has fan-in d_in
    return K.kaiming(key, shape, r if leaf.endswith("_out") else spec.fan_in)


def _matrix(leaves: Mapping[str, jax.Array], spec: L.LayerSpec, r: int, config: LohaConfig) -> jax.Array:
    def product(i: int) -> jax.Array:
        return (L.as_matrix(spec, leaves[f"w{i}_in"], "in", r)
                @ L.as_matrix(spec, leaves[f"w{i}_out"], "out", r))
    return product(1) * product(2)


FACTORS = K.Factorisation(
    name="loha", shapes=_shapes, init=_init, matrix=_matrix,
    layout=lambda leaf: ("stack", "in", "rank") if leaf.endswith("_in") else ("stack", "rank", "out"))


def loha(config: LohaConfig = LohaConfig(), *, name: str = "loha") -> Transform:
    """LoHa as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""
    return K.transform(FACTORS, config, name)


# PEFT's hada_w1_a (d_out, r) is w1_out transposed, hada_w1_b (r, d_in) w1_in transposed, ...
PEFT_NAMES = {"w1_in": "hada_w1_b", "w1_out": "hada_w1_a", "w2_in": "hada_w2_b", "w2_out": "hada_w2_a"}

register("loha", LohaConfig, loha, peft=PC.PeftConverter(
    peft_type="LOHA", layout="modules",
    load=functools.partial(K.from_peft, FACTORS, LohaConfig, loha, PEFT_NAMES, {}),
    save=functools.partial(K.to_peft, "LOHA", PEFT_NAMES, {})))
