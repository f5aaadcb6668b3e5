"""The GEMMs of a MiniLM train step, alone: XLA:CPU (as jpeft compiles them) against PyTorch.

    python -m benchmarks.gemm [--tokens=4096] [--reps=40] [--out=benchmarks/results]

Each shape ``(M, K) · (K, N)`` is one of the products in a MiniLM layer at ``--tokens`` = batch ×
length rows (32 × 128 by default): the attention projections (384 → 384), the FFN's two layers
(384 → 1536, 1536 → 384) and the FFN's weight gradient ``xᵀ · g``, whose ``x`` is stored
``(tokens, 384)`` and is read transposed (384 × tokens × 1536). Each runs in
float32 through ``jpeft.core.compile.jit`` (YNNPACK off, XLA's own GEMM), through XLA's defaults,
and as ``torch.matmul`` (oneDNN) on as many threads as cores; the sides alternate call by call.
Reports GFLOP/s (median over ``--reps`` calls). Writes ``gemm.json`` and ``gemm.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import command_line, positive_int, run_meta
from benchmarks.compiler_options import time_round_robin


TRANSPOSED_LHS = frozenset({"weight_grad"})


def shapes(tokens: int, hidden: int = 384, ffn: int = 1536) -> dict[str, tuple[int, int, int]]:
    """``name -> (M, K, N)`` of the layer's products at ``tokens`` rows."""
    return {"projection": (tokens, hidden, hidden), "ffn_in": (tokens, hidden, ffn),
            "ffn_out": (tokens, ffn, hidden), "weight_grad": (hidden, tokens, ffn)}


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    import jax
    import jax.numpy as jnp
    import torch

    from jpeft.core.compile import jit

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gemm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=positive_int, default=4096)
    parser.add_argument("--reps", type=positive_int, default=40)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    rows = []
    for name, (m, k, n) in shapes(args.tokens).items():
        transposed = name in TRANSPOSED_LHS
        a = rng.standard_normal((k, m) if transposed else (m, k), np.float32)
        b = rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        if transposed:
            ta = ta.T
        product = (lambda x, y: x.T @ y) if transposed else jnp.matmul
        ours, xla = jit(product), jax.jit(product)
        times = time_round_robin({"jpeft": lambda: jax.block_until_ready(ours(ja, jb)),
                                  "xla_defaults": lambda: jax.block_until_ready(xla(ja, jb)),
                                  "torch": lambda: torch.matmul(ta, tb)}, args.reps)
        gflops = {side: 2 * m * k * n / statistics.median(ts) / 1e9 for side, ts in times.items()}
        rows.append({"gemm": name, "m": m, "k": k, "n": n, "gflops": gflops})
        print(name, (m, k, n), {s: round(g) for s, g in gflops.items()}, flush=True)
    md = [f"float32 GEMMs, GFLOP/s (median of {args.reps} alternating calls)", "",
          "| product | M × K × N | jpeft (XLA, YNNPACK off) | XLA defaults | PyTorch | jpeft / PyTorch |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['gemm']} | {r['m']} × {r['k']} × {r['n']} | {r['gflops']['jpeft']:.0f} | "
           f"{r['gflops']['xla_defaults']:.0f} | {r['gflops']['torch']:.0f} | "
           f"{r['gflops']['jpeft'] / r['gflops']['torch']:.2f} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(command_line("benchmarks.gemm", argv), torch=torch.__version__)
    atomic_write_text(out / "gemm.json", json.dumps({**meta, "tokens": args.tokens, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "gemm.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
