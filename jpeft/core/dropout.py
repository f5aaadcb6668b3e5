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


def position_groups(shape: tuple[int, ...], limit: int = _WORD, *,
                    start: tuple[int, ...] | None = None,
                    full_shape: tuple[int, ...] | None = None) -> list[jax.Array]:
    """Row-major flat positions (``uint32``, broadcast to ``shape``) of groups of consecutive
    dimensions, each group with fewer than ``limit`` (2³²) positions, leading group first.

    With ``start`` and ``full_shape``, the positions are those of a block of ``shape`` placed at
    ``start`` inside a tensor of ``full_shape`` (a slice ``x[start:start+shape]`` of it), so that
    a tensor processed in blocks gets the positions, and hence the dropout mask, of the whole."""
    full_shape = tuple(shape) if full_shape is None else tuple(full_shape)
    start = (0,) * len(shape) if start is None else tuple(start)
    if len(full_shape) != len(shape) or len(start) != len(shape) or any(
            s < 0 or s + n > f for s, n, f in zip(start, shape, full_shape)):
        raise ValueError(f"dropout: a block of shape {tuple(shape)} at {start} does not fit in {full_shape}")
    groups, index, stride = [], None, 1
    for axis in reversed(range(len(shape))):
        if full_shape[axis] >= limit:
            raise ValueError(f"dropout: axis {axis} of shape {full_shape} has {limit} or more elements")
        if stride * full_shape[axis] >= limit:
            groups.append(index)
            index, stride = None, 1
        term = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        term = term if start[axis] == 0 else term + jnp.uint32(start[axis])
        term = term if stride == 1 else term * jnp.uint32(stride)
        index = term if index is None else index + term
        stride *= full_shape[axis]
    groups.append(index if index is not None else jnp.zeros(shape, jnp.uint32))
    return groups[::-1]


def random_words(key: jax.Array, shape: tuple[int, ...], group_limit: int = _WORD, *,
                 start: tuple[int, ...] | None = None,
                 full_shape: tuple[int, ...] | None = None) -> jax.Array:
    """32 random bits per element of ``shape`` (``uint32``): the hash ``u`` of the module
    docstring, with positions grouped by :func:`position_groups` under ``group_limit`` (of the
    block at ``start`` of a ``full_shape`` tensor when given)."""
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    h = seeds[0]
    for group in position_groups(tuple(shape), group_limit, start=start, full_shape=full_shape):
        h = _fmix(group * jnp.uint32(_GOLDEN) + h)
    return _fmix(h ^ seeds[1])


def dropout(key: jax.Array, x: jax.Array, rate: float, *, start: tuple[int, ...] | None = None,
            full_shape: tuple[int, ...] | None = None) -> jax.Array:
    """``x`` with each element zeroed with probability ``rate`` and the rest scaled by ``1/(1-rate)``.

    With ``start`` and ``full_shape``, ``x`` is the block at ``start`` of a ``full_shape`` tensor
    and gets that block of the whole tensor's mask: dropout in blocks equals dropout at once."""
    if not (0.0 <= rate < 1.0 and math.isfinite(rate)):
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    threshold = min(round(rate * _WORD), _WORD - 1)
    if threshold == 0:
        return x
    keep = random_words(key, x.shape, start=start, full_shape=full_shape) >= jnp.uint32(threshold)
    scale = _WORD / (_WORD - threshold)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """:func:`dropout` as a Linen module (drop-in for ``flax.linen.Dropout``: the ``"dropout"``
    rng collection, ``deterministic`` at construction or call)."""

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        key = self.key(deterministic)
        return x if key is None else dropout(key, x, self.rate)

    def key(self, deterministic: bool | None = None) -> jax.Array | None:
        """The key ``__call__`` would draw (``None`` when it would be the identity), for applying
        :func:`dropout` to a tensor in blocks (``start``/``full_shape``) with the mask of the whole."""
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return None
        return self.make_rng("dropout")
