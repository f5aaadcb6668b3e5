"""LoKr: Kronecker product updates (Edalati et al., 2022, KronA, arXiv:2212.10650; the LyCORIS
method, Yeh et al., 2024, arXiv:2309.14859), with Hugging Face PEFT's semantics
(``peft/tuners/lokr``).

For a target layer with kernel ``W (d_in, d_out)`` (any layer kind: its input axis group
flattened to ``d_in``, its output group to ``d_out``), ``d_in = m·n`` and ``d_out = l·k`` are
factored as :func:`factorization` does (near the square root, or with ``decompose_factor``) and

    ΔW = s · W₁ ⊗ W₂,     W₁ (m, l),  W₂ (n, k),  s = α / r

``W₂`` is itself low rank, ``U₂ (n, r) · V₂ (r, k)``, when ``r < max(n, k)/2`` (else a full
matrix), and so is ``W₁`` when ``decompose_both`` and ``r < max(m, l)/2``: the same rule as
PEFT, so an adapter reads back with the same factors. ``W₁ = 0`` at init (its
``V₁`` when factored: PEFT zeroes ``lokr_w1`` / ``lokr_w1_a``), so a fresh delta is the
identity; the other factors are PyTorch's ``kaiming_uniform_(a=√5)`` of PEFT's tensors. The
update is built whole and applied with the layer's operation (:mod:`jpeft.methods.kernel_delta`);
``merge`` folds it into the kernel. The delta holds ``w1`` or ``w1_in``/``w1_out``, and ``w2`` or ``w2_in``/``w2_out``, per
adapted module (stack axes first under ``nn.scan``).

Example::

    method = jpeft.lokr(LokrConfig(r=4, alpha=8, targets=r"(query|value)$"))
    delta = method.init(jax.random.key(0), base, model.info())
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
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
class LokrConfig(K.KernelDeltaConfig):
    """LoKr's config: :class:`~jpeft.methods.kernel_delta.KernelDeltaConfig`'s fields (LoRA's
    ``r``, ``alpha``, ``targets``, ``layers``, patterns; PEFT's dropouts) and how ``ΔW`` is
    split."""

    decompose_both: bool = dataclasses.field(
        default=False, metadata={"help": "factor W1 as well as W2 into rank-r products"})
    decompose_factor: int = dataclasses.field(
        default=-1, metadata={"help": "split each dimension as factor x rest (-1: near its square root)"})
    rank_dropout_scale: bool = dataclasses.field(
        default=False, metadata={"help": "training: rescale the kept columns by the kept fraction"})

    method: ClassVar[str] = "lokr"

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.decompose_factor
        if not (isinstance(f, numbers.Integral) and not isinstance(f, bool) and (f == -1 or f >= 1)):
            raise ValueError(f"lokr.decompose_factor must be -1 (near the square root) or an integer "
                             f">= 1, got {f!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dimension`` and ``m <= n``: ``(factor, dimension/factor)`` when
    ``factor`` divides it, else the most balanced split with ``m <= factor`` (PEFT's rule:
    ``factorization(128) == (8, 16)``, ``factorization(127) == (1, 127)``)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _sizes(spec: L.LayerSpec, config: LokrConfig) -> tuple[int, int, int, int]:
    """``(m, n, l, k)``: ``d_in = m·n``, ``d_out = l·k``."""
    m, n = factorization(spec.fan_in, config.decompose_factor)
    l, k = factorization(math.prod(spec.out_shape), config.decompose_factor)
    return m, n, l, k


def _shapes(spec: L.LayerSpec, r: int, config: LokrConfig) -> K.Shapes:
    m, n, l, k = _sizes(spec, config)
    shapes: K.Shapes = {}
    if config.decompose_both and r < max(m, l) / 2:
        shapes.update(w1_in=(m, r), w1_out=(r, l))
    else:
        shapes["w1"] = (m, l)
    if r < max(n, k) / 2:
        shapes.update(w2_in=(n, r), w2_out=(r, k))
    else:
        shapes["w2"] = (n, k)
    return shapes


def _init(key: jax.Array, leaf: str, shape: tuple[int, ...], spec: L.LayerSpec, r: int,
          config: LokrConfig) -> jax.Array:
    if leaf in ("w1", "w1_out"):  # PEFT zeroes lokr_w1 / lokr_w1_a
        return jnp.zeros(shape, jnp.float32)
    # PyTorch's fan-in of PEFT's tensor (the transpose of ours): our first axis, or r
    return K.kaiming(key, shape, r if leaf.endswith("_out") else shape[-2])


def _matrix(leaves: Mapping[str, jax.Array], spec: L.LayerSpec, r: int, config: LokrConfig) -> jax.Array:
    def factor(i: int) -> jax.Array:
        if f"w{i}" in leaves:
            return leaves[f"w{i}"]
        return leaves[f"w{i}_in"] @ leaves[f"w{i}_out"]
    w1, w2 = factor(1), factor(2)
    kron = jnp.einsum("...ml,...nk->...mnlk", w1, w2)
    return kron.reshape((*kron.shape[:-4], spec.fan_in, math.prod(spec.out_shape)))


FACTORS = K.Factorisation(name="lokr", shapes=_shapes, init=_init, matrix=_matrix,
                          layout=lambda leaf: ("stack", "replicated", "replicated"))


def lokr(config: LokrConfig = LokrConfig(), *, name: str = "lokr") -> Transform:
    """LoKr as a :class:`~jpeft.core.transform.Transform` (see the module docstring)."""
    return K.transform(FACTORS, config, name)


# PEFT's lokr_w1 (l, m) is w1 transposed, lokr_w1_a (l, r) w1_out transposed, ...
PEFT_NAMES = {"w1": "lokr_w1", "w1_in": "lokr_w1_b", "w1_out": "lokr_w1_a",
              "w2": "lokr_w2", "w2_in": "lokr_w2_b", "w2_out": "lokr_w2_a"}
PEFT_FIELDS = {"decompose_both": "decompose_both", "decompose_factor": "decompose_factor",
               "rank_dropout_scale": "rank_dropout_scale"}

register("lokr", LokrConfig, lokr, peft=PC.PeftConverter(
    peft_type="LOKR", layout="modules",
    load=functools.partial(K.from_peft, FACTORS, LokrConfig, lokr, PEFT_NAMES, PEFT_FIELDS),
    save=functools.partial(K.to_peft, "LOKR", PEFT_NAMES, PEFT_FIELDS)))
