"""Inverted dropout whose mask is a keyed hash of each element's position.

``dropout(key, x, p) = x · m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` per element. On CPU,
drawing random bits is most of the cost of dropout (BERT's attention-probability dropout alone
draws ``B·H·T²`` numbers per layer), and ``jax.random``'s threefry spends 20 rounds per 64 bits.
Here the key gives only two 32-bit seeds ``s₀, s₁`` (one small threefry draw); every element's
32 bits are then a counter-based hash of its flat position ``i`` (row-major, ``uint32``):

    u(i) = fmix(fmix(i · φ + s₀) ⊕ s₁),   m(i) = [u(i) ≥ round(p · 2³²)]

where ``φ = 0x9E3779B9`` (odd, so ``i ↦ i·φ + s₀`` is a bijection of 32-bit words) and ``fmix``
is MurmurHash3's 32-bit finaliser (xor-shift, multiply, xor-shift, multiply, xor-shift), itself a
bijection with full avalanche. For fixed seeds ``u`` is a bijection of positions; different keys
give unrelated bijections. It is about a dozen integer operations per element, fused into the
``where`` that applies the mask: no random bits are stored, and the backward pass recomputes the
mask from the same positions. Tensors of 2³² elements or more hash their leading dimensions into
the seed, one group of dimensions (fewer than 2³² positions) at a time.

``p`` is rounded to a multiple of ``2⁻³²``; the scale uses the rounded rate, so
``E[dropout(x)] = x`` exactly. The mask is a pure function of ``(key, x.shape)``: the same key
gives the same mask, under ``jit``, ``grad`` and any sharding of ``x``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_WORD = 1 << 32
_GOLDEN = 0x9E3779B9


def _fmix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser (a bijection of ``uint32`` with full avalanche)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def position_groups(shape: tuple[int, ...], limit: int = _WORD) -> list[jax.Array]:
    """Row-major flat positions (``uint32``, broadcast to ``shape``) of groups of consecutive
    dimensions, each group with fewer than ``limit`` (2³²) positions, leading group first."""
    groups, index, stride = [], None, 1
    for axis in reversed(range(len(shape))):
        if shape[axis] >= limit:
            raise ValueError(f"dropout: axis {axis} of shape {shape} has {limit} or more elements")
        if stride * shape[axis] >= limit:
            groups.append(index)
            index, stride = None, 1
        term = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        term = term if stride == 1 else term * jnp.uint32(stride)
        index = term if index is None else index + term
        stride *= shape[axis]
    groups.append(index if index is not None else jnp.zeros(shape, jnp.uint32))
    return groups[::-1]


def random_words(key: jax.Array, shape: tuple[int, ...], group_limit: int = _WORD) -> jax.Array:
    """32 random bits per element of ``shape`` (``uint32``): the hash ``u`` of the module
    docstring, with positions grouped by :func:`position_groups` under ``group_limit``."""
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    h = seeds[0]
    for group in position_groups(tuple(shape), group_limit):
        h = _fmix(group * jnp.uint32(_GOLDEN) + h)
    return _fmix(h ^ seeds[1])


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """``x`` with each element zeroed with probability ``rate`` and the rest scaled by ``1/(1-rate)``."""
    if not (0.0 <= rate < 1.0 and math.isfinite(rate)):
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    threshold = min(round(rate * _WORD), _WORD - 1)
    if threshold == 0:
        return x
    keep = random_words(key, x.shape) >= jnp.uint32(threshold)
    scale = _WORD / (_WORD - threshold)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """:func:`dropout` as a Linen module (drop-in for ``flax.linen.Dropout``: the ``"dropout"``
    rng collection, ``deterministic`` at construction or call)."""

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return x
        return dropout(self.make_rng("dropout"), x, self.rate)
