"""Dropout: the drop rate, unbiasedness, determinism, and the Linen module's switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.core.dropout import Dropout, dropout


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(64, 129), (3, 5, 7)])  # odd sizes: the last word is split
def test_rate_and_mean(rate, shape):
    x = jnp.ones(shape, jnp.float32)
    draws = jnp.stack([dropout(jax.random.key(i), x, rate) for i in range(200)])
    zero = float((draws == 0).mean())
    assert abs(zero - rate) < 4 * np.sqrt(rate * (1 - rate) / draws.size) + 1e-4
    assert abs(float(draws.mean()) - 1.0) < 4 * np.sqrt(rate / (1 - rate) / draws.size)
    kept = draws[draws != 0]
    np.testing.assert_allclose(kept, 1.0 / (1.0 - round(rate * 65536) / 65536), rtol=1e-6)


def test_same_key_same_mask_and_dtype():
    x = jnp.arange(1, 101, dtype=jnp.bfloat16).reshape(10, 10)
    a, b = dropout(jax.random.key(0), x, 0.3), dropout(jax.random.key(0), x, 0.3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == jnp.bfloat16
    assert not np.array_equal(a, dropout(jax.random.key(1), x, 0.3))
    np.testing.assert_array_equal(dropout(jax.random.key(0), x, 0.0), x)
    with pytest.raises(ValueError, match="rate"):
        dropout(jax.random.key(0), x, 1.0)


def test_module_is_identity_when_deterministic():
    x = jnp.ones((4, 8))
    layer = Dropout(0.5)
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    y = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert 0 < int((y == 0).sum()) < x.size
