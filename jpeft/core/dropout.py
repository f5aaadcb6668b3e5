"""Inverted dropout with half the random-number work of ``jax.random.bernoulli``.

``dropout(key, x, p) = x · m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` i.i.d. per element. The
mask comes from 16 random bits per element, two per 32-bit threefry word
(``m = bits ≥ round(p · 2¹⁶)``), instead of one float uniform per element: on CPU, generating
random bits is most of the cost of dropout (BERT's attention-probability dropout alone draws
``B·H·T²`` numbers per layer), and this halves it. ``p`` is thereby rounded to a multiple of
``2⁻¹⁶`` (0.1 → 0.100006); the scale uses the rounded rate, so ``E[dropout(x)] = x`` exactly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_LEVELS = 1 << 16


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """``x`` with each element zeroed with probability ``rate`` and the rest scaled by ``1/(1-rate)``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    threshold = round(rate * _LEVELS)
    if threshold == 0:
        return x
    n = x.size
    words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n].reshape(x.shape)
    keep = halves >= jnp.uint16(threshold)
    scale = _LEVELS / (_LEVELS - threshold)
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
