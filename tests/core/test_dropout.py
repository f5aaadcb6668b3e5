"""Dropout: the drop rate, unbiasedness, determinism, the independence of its bits, the grouping
of large shapes, and the Linen module's switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.core.dropout import Dropout, dropout, position_groups, random_words


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(64, 129), (3, 5, 7)])
def test_rate_and_mean(rate, shape):
    x = jnp.ones(shape, jnp.float32)
    draws = jnp.stack([dropout(jax.random.key(i), x, rate) for i in range(200)])
    zero = float((draws == 0).mean())
    assert abs(zero - rate) < 4 * np.sqrt(rate * (1 - rate) / draws.size) + 1e-4
    assert abs(float(draws.mean()) - 1.0) < 4 * np.sqrt(rate / (1 - rate) / draws.size)
    kept = draws[draws != 0]
    np.testing.assert_allclose(kept, 1.0 / (1.0 - round(rate * 2**32) / 2**32), rtol=1e-6)


def test_same_key_same_mask_and_dtype():
    x = jnp.arange(1, 101, dtype=jnp.bfloat16).reshape(10, 10)
    a, b = dropout(jax.random.key(0), x, 0.3), dropout(jax.random.key(0), x, 0.3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == jnp.bfloat16
    assert not np.array_equal(a, dropout(jax.random.key(1), x, 0.3))
    np.testing.assert_array_equal(dropout(jax.random.key(0), x, 0.0), x)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="rate"):
            dropout(jax.random.key(0), x, bad)


def _bits(words: np.ndarray) -> np.ndarray:
    """(n, 32) array of the bits of ``n`` uint32 words."""
    return ((words[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.float64)


def test_words_are_balanced_and_uncorrelated():
    """Every bit is 1 half the time; a word's bits are uncorrelated with its neighbours' along
    either axis, and with the words of another key at the same position."""
    shape = (256, 1024)
    n = shape[0] * shape[1]
    words = np.asarray(random_words(jax.random.key(0), shape)).reshape(-1)
    bound = 5 / np.sqrt(n)
    bits = _bits(words)
    assert np.abs(bits.mean(0) - 0.5).max() < 0.5 * bound
    signs = 2 * bits - 1
    others = {
        "next element": np.roll(words, 1),
        "next row": np.roll(words, shape[1]),
        "another key": np.asarray(random_words(jax.random.key(1), shape)).reshape(-1),
    }
    for name, other in others.items():
        corr = (signs * (2 * _bits(other) - 1)).mean(0)  # bit k against bit k
        assert np.abs(corr).max() < bound, name
    assert len(np.unique(words)) == n  # one key: a bijection of positions


def test_mask_survives_jit_and_is_the_gradient():
    x = jax.random.normal(jax.random.key(2), (8, 33))
    key = jax.random.key(3)
    eager = dropout(key, x, 0.25)
    np.testing.assert_array_equal(jax.jit(dropout, static_argnums=2)(key, x, 0.25), eager)
    grad = jax.grad(lambda x: dropout(key, x, 0.25).sum())(x)
    np.testing.assert_allclose(grad, jnp.where(eager != 0, 1 / 0.75, 0.0), rtol=1e-6)


def test_position_groups_cover_every_position_once():
    shape = (3, 5, 7)
    groups = position_groups(shape, limit=64)  # 7·5 = 35 < 64 ≤ 105: two groups
    assert len(groups) == 2
    lead, trail = (np.asarray(g) for g in groups)
    assert lead.max() < 64 and trail.max() < 64
    pairs = set(zip(lead.reshape(-1).tolist(), trail.reshape(-1).tolist()))
    assert len(pairs) == 105
    np.testing.assert_array_equal(np.asarray(position_groups(shape)[0]).reshape(-1), np.arange(105))
    with pytest.raises(ValueError, match="axis 1"):
        position_groups((2, 70, 3), limit=64)


def test_grouped_words_keep_their_rate():
    """A shape split into several groups (as one of 2³² elements or more would be) still drops
    at the rate, with few collisions between positions."""
    shape = (64, 32, 32)
    grouped = np.asarray(random_words(jax.random.key(4), shape, group_limit=1 << 11)).reshape(-1)
    assert len(position_groups(shape, 1 << 11)) == 2
    n = grouped.size
    assert abs(float((grouped < np.uint32(0.3 * 2**32)).mean()) - 0.3) < 5 * np.sqrt(0.21 / n)
    assert len(np.unique(grouped)) > n - 5


def test_module_is_identity_when_deterministic():
    x = jnp.ones((4, 8))
    layer = Dropout(0.5)
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    y = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert 0 < int((y == 0).sum()) < x.size


@pytest.mark.parametrize("limit", [1 << 32, 1 << 9])  # one group, and several (7·6·5 = 210 ≥ 2⁹ / 7)
def test_a_block_gets_the_mask_of_the_whole_tensor(limit):
    shape, key = (7, 6, 5, 4), jax.random.key(3)
    whole = np.asarray(random_words(key, shape, limit))
    for start, size in [((0, 0, 0, 0), (3, 6, 5, 4)), ((3, 0, 0, 0), (4, 6, 5, 4)), ((2, 1, 3, 1), (1, 5, 2, 3))]:
        block = random_words(key, size, limit, start=start, full_shape=shape)
        index = tuple(slice(s, s + n) for s, n in zip(start, size))
        np.testing.assert_array_equal(block, whole[index])
    x = jnp.ones(shape, jnp.float32)
    halves = [dropout(key, x[i:i + 4], 0.3, start=(i, 0, 0, 0), full_shape=shape) for i in (0, 4)]
    np.testing.assert_array_equal(jnp.concatenate(halves), dropout(key, x, 0.3))
    with pytest.raises(ValueError, match=r"does not fit in \(7, 6, 5, 4\)"):
        random_words(key, (3, 6, 5, 4), start=(5, 0, 0, 0), full_shape=shape)


def test_the_module_key_is_the_key_its_call_draws():
    x = jnp.ones((4, 8), jnp.float32)
    rngs = {"dropout": jax.random.key(5)}
    called = Dropout(0.25).apply({}, x, deterministic=False, rngs=rngs)
    key = Dropout(0.25).apply({}, False, rngs=rngs, method=Dropout.key)
    np.testing.assert_array_equal(dropout(key, x, 0.25), called)
    assert Dropout(0.25).apply({}, True, rngs=rngs, method=Dropout.key) is None
    assert Dropout(0.0).apply({}, False, rngs=rngs, method=Dropout.key) is None
