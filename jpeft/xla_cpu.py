"""Default XLA:CPU flags that make jpeft's steps faster on CPU, applied by the CLIs and benchmarks.

``--xla_cpu_experimental_ynn_fusion_type=`` turns off XLA:CPU's YNNPACK library fusions (on by
default in jaxlib 0.10). Measured on this project's 2-core Xeon (AVX-512/AMX, float32):
MiniLM forward at batch 32 × 128 0.62 s → 0.43 s, the LoRA train step 1.70 s → 1.56 s, full
fine-tuning unchanged (``benchmarks/``). XLA reads ``XLA_FLAGS`` when its CPU backend starts, so
:func:`configure` must run before the first computation; flags the user set already win, and
``JPEFT_XLA_CPU_DEFAULTS=0`` turns this off.
"""

from __future__ import annotations

import os

DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def configure(flags: tuple[str, ...] = DEFAULT_FLAGS) -> str:
    """Append ``flags`` to ``XLA_FLAGS`` (those whose name is not set there already) and return it."""
    current = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("JPEFT_XLA_CPU_DEFAULTS", "1") == "0":
        return current
    names = {f.split("=", 1)[0] for f in current.split()}
    extra = [f for f in flags if f.split("=", 1)[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ["XLA_FLAGS"]
