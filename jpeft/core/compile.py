"""XLA compiler options for jpeft's jitted functions, and ``jit`` with them applied.

On the CPU backend, for float32 matmuls, XLA's YNNPACK library fusions are off by default in
jpeft (``CPU_COMPILER_OPTIONS``): the dots run as XLA:CPU's own GEMMs, unfused with the
element-wise work around them. Measured on MiniLM (batch 32 × 128, 2-core Xeon, interleaved runs):
train steps of full fine-tuning, LoRA, LoRA on all linear layers and BitFit 1-10% faster; the
forward pass 18-22% faster at batch 32, level at batch 8 and 8% slower at batch 1 (pass
``compiler_options={}`` for single-example serving).

Models whose matmuls take bf16 operands (``matmul_dtype="bfloat16"``) keep XLA's defaults:
XLA:CPU's own GEMMs have no bf16 kernel that uses the CPU's AMX units, YNNPACK's do. Without
them, on the same machine, the bf16 LoRA step took 2.17 s instead of 1.55 s and the bf16 forward
pass 0.83 s instead of 0.44 s. A bf16 base (``dtype="bfloat16"``: bf16 operands accumulated in
bf16) runs faster with them off (forward pass 0.80 against 0.95 s, LoRA step 2.19 against 2.63 s),
so it keeps the float32 choice: the option follows ``matmul_dtype`` alone. The figures:
``python -m benchmarks.compiler_options``.

Nothing is set on other backends, or when ``XLA_FLAGS`` already names the option (the environment
then decides).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}
_FLOAT32_MATMULS = (None, "float32")


def default_compiler_options(matmul_dtype: str | None = None) -> dict[str, Any]:
    """The XLA options jpeft's jitted steps and predictors compile with unless told otherwise.

    ``matmul_dtype`` is the model config's (``None``: the compute dtype, float32). Returns
    ``CPU_COMPILER_OPTIONS`` on the CPU backend for float32 matmuls, minus any option
    ``XLA_FLAGS`` names; ``{}`` (XLA's defaults) for bf16 matmuls and on other backends.
    """
    if jax.default_backend() != "cpu" or matmul_dtype not in _FLOAT32_MATMULS:
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in CPU_COMPILER_OPTIONS.items() if f"--{k}" not in flags}


def jit(fun: Callable[..., Any], *, compiler_options: Mapping[str, Any] | None = None,
        matmul_dtype: str | None = None, **jit_kwargs: Any) -> Any:
    """``jax.jit(fun, **jit_kwargs)`` compiled with ``compiler_options``
    (``default_compiler_options(matmul_dtype)`` when None; ``{}`` keeps XLA's own defaults)."""
    options = (default_compiler_options(matmul_dtype) if compiler_options is None
               else dict(compiler_options))
    return jax.jit(fun, compiler_options=options or None, **jit_kwargs)


__all__ = ["CPU_COMPILER_OPTIONS", "default_compiler_options", "jit"]
