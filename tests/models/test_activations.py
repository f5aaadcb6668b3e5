"""Activations by Hugging Face name: the exact GELU written with erf is jax.nn.gelu's exact GELU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.models.common import ACTIVATIONS, activation, gelu_erf


def test_gelu_erf_is_the_exact_gelu_and_its_gradient():
    x = jnp.linspace(-12.0, 12.0, 24_001, dtype=jnp.float32)
    np.testing.assert_allclose(gelu_erf(x), jax.nn.gelu(x, approximate=False), atol=2e-6, rtol=1e-6)
    g = jax.vmap(jax.grad(gelu_erf))(x)
    g_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(g, g_ref, atol=2e-6, rtol=1e-5)
    assert gelu_erf(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert ACTIVATIONS["gelu"] is gelu_erf


def test_unknown_activation_lists_the_supported_ones():
    with pytest.raises(ValueError, match="supported: .*gelu"):
        activation("mish")
