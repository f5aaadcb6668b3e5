"""benchmarks.dot_bound: reading the dots of a compiled HLO module and rebuilding one alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks.dot_bound import _kind, hlo_dots, time_dot
from jpeft.core.compile import jit


def _compiled_text(fn, *args) -> tuple[str, float]:
    compiled = jit(fn).lower(*args).compile()
    return compiled.as_text(), compiled.cost_analysis().get("flops", 0.0)


def test_a_batched_dot_is_read_with_its_shapes_dimensions_and_flops():
    q = jnp.ones((2, 3, 16, 8), jnp.float32)
    k = jnp.ones((2, 3, 16, 8), jnp.float32)
    text, flops = _compiled_text(lambda a, b: jnp.einsum("bhqd,bhkd->bhqk", a, b), q, k)
    (dot,) = hlo_dots(text)
    assert dot["lhs"] == (2, 3, 16, 8) and dot["rhs"] == (2, 3, 16, 8) and dot["out"] == (2, 3, 16, 16)
    assert dot["lhs_batch_dims"] == (0, 1) and dot["rhs_batch_dims"] == (0, 1)
    assert dot["lhs_contracting_dims"] == (3,) and dot["rhs_contracting_dims"] == (3,)
    assert dot["flops"] == 2 * 2 * 3 * 16 * 16 * 8 == flops
    assert _kind(dot) == "batched (attention)"


def test_every_dot_of_a_two_layer_function_is_found_and_classified():
    x, w1, w2 = jnp.ones((256, 128)), jnp.ones((128, 128)), jnp.ones((128, 8))
    text, flops = _compiled_text(lambda a, b, c: jnp.tanh(a @ b) @ c, x, w1, w2)
    dots = hlo_dots(text)
    assert sorted(d["flops"] for d in dots) == sorted([2 * 256 * 128 * 128, 2 * 256 * 128 * 8])
    assert sorted(_kind(d) for d in dots) == ["2-D (dense layers)", "2-D, a side ≤ 64 (LoRA factors, head)"]
    assert sum(d["flops"] for d in dots) <= flops


@pytest.mark.parametrize("layout", [(1, 0), (0, 1)])
def test_a_dot_is_rebuilt_alone_in_its_operand_layout(layout):
    dot = {"lhs": (64, 32), "rhs": (32, 16), "lhs_layout": layout, "rhs_layout": (1, 0), "dtype": "f32",
           "out_dtype": "f32", "out": (64, 16), "lhs_batch_dims": (), "rhs_batch_dims": (),
           "lhs_contracting_dims": (1,), "rhs_contracting_dims": (0,), "flops": 2 * 64 * 32 * 16}
    seconds = time_dot(dot, reps=3)
    assert 0.0 < seconds < 1.0
