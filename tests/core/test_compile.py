"""jpeft.core.compile: jpeft's default XLA options and the ``jit`` that applies them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core.compile import CPU_COMPILER_OPTIONS, default_compiler_options, jit


def _mlp(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    return jnp.tanh(x @ w1) @ w2 + 1.0


def _args():
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (64, 32)), jax.random.normal(keys[1], (32, 48)),
            jax.random.normal(keys[2], (48, 16)))


def test_jit_compiles_without_ynn_fusions_by_default_and_keeps_xla_defaults_on_request(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # read at each jit call; the backend is already up
    assert jax.default_backend() == "cpu"
    args = _args()
    ours, xla_own = jit(_mlp), jit(_mlp, compiler_options={})
    assert "__ynn_fusion" not in ours.lower(*args).compile().as_text()
    assert "__ynn_fusion" in xla_own.lower(*args).compile().as_text()
    np.testing.assert_allclose(ours(*args), xla_own(*args), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours(*args), _mlp(*args), rtol=1e-5, atol=1e-5)


def test_jit_passes_other_arguments_through():
    double = jit(lambda x, n: x * n, static_argnums=1)
    np.testing.assert_array_equal(double(jnp.arange(3.0), 2), [0.0, 2.0, 4.0])


def test_xla_flags_naming_the_option_wins(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert default_compiler_options() == CPU_COMPILER_OPTIONS
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert default_compiler_options() == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert default_compiler_options() == CPU_COMPILER_OPTIONS


def test_bf16_matmuls_keep_xla_defaults(monkeypatch):
    """XLA:CPU's own GEMMs have no AMX bf16 kernel, YNNPACK's dots do: a model with bf16 matmuls
    compiles with XLA's defaults, YNNPACK dots included."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert default_compiler_options("bfloat16") == {}
    assert default_compiler_options("float32") == default_compiler_options() == CPU_COMPILER_OPTIONS
    x, w1, w2 = (a.astype(jnp.bfloat16) for a in _args())

    def mixed(x, w1, w2):
        h = jnp.tanh(jnp.dot(x, w1, preferred_element_type=jnp.float32))
        return jnp.dot(h.astype(jnp.bfloat16), w2, preferred_element_type=jnp.float32)

    bf16, f32_defaults = jit(mixed, matmul_dtype="bfloat16"), jit(mixed)
    assert "__ynn_fusion" in bf16.lower(x, w1, w2).compile().as_text()
    assert "__ynn_fusion" not in f32_defaults.lower(x, w1, w2).compile().as_text()
    np.testing.assert_allclose(bf16(x, w1, w2), f32_defaults(x, w1, w2), rtol=2e-2, atol=2e-2)
