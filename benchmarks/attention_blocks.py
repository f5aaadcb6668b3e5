"""BERT attention in blocks of batch rows: jpeft's train step for each block size, interleaved.

    python -m benchmarks.attention_blocks [--rows=32,16,8,4] [--configs=lora,full] [--steps=5]
                                          [--rounds=3] [--batch=32] [--length=128]
                                          [--out=benchmarks/results]

``jpeft.models.bert.attention_in_blocks`` computes the attention of ``rows`` batch rows at a time
(``ATTENTION_BLOCK_ROWS``; default ``None``: the whole batch, one block); ``rows`` = the batch
is one block. Every (configuration, rows) runs ``benchmarks.train_step``'s jpeft worker
(MiniLM, AdamW, fixed random batch) in its own process with ``ATTENTION_BLOCK_ROWS`` set to
``rows``, the settings rotating round by round so that all see the same machine load. The
machine's float32 GEMM peak (2048²) is measured before and after; the step's FLOPs come from
XLA's cost analysis. Reports the median step per setting (steps slower than median + 3·MAD
dropped as disturbed), its ratio to one block and its % of the GEMM peak (the mean of the two
peak measurements); writes ``attention_blocks.json`` and ``attention_blocks.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, positive_int, run_meta, run_worker
from benchmarks.train_step import _robust, matmul_peak_gflops
from jpeft.checkpoint.atomic import atomic_write_text

_WORKER = """
import json, sys
import jpeft.models.bert as bert
bert.ATTENTION_BLOCK_ROWS = int(sys.argv[1])
from benchmarks.train_step import worker_jpeft
print("RESULT " + json.dumps(worker_jpeft(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), "float32")))
"""


def _worker(rows: int, config: str, steps: int, batch: int, length: int) -> dict[str, Any]:
    cmd = [sys.executable, "-c", _WORKER, str(rows), config, str(steps), str(batch), str(length)]
    return run_worker(cmd, f"rows={rows}/{config}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_blocks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="32,16,8,4", help="block sizes; the first is the baseline")
    parser.add_argument("--configs", default="lora,full")
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--length", type=positive_int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    settings = [int(r) for r in args.rows.split(",")]
    configs = args.configs.split(",")
    peaks = [matmul_peak_gflops()]
    times: dict[str, dict[int, list[float]]] = {c: {r: [] for r in settings} for c in configs}
    flops: dict[str, float] = {}
    for rnd in range(args.rounds):
        for config in configs:
            order = settings[rnd % len(settings):] + settings[:rnd % len(settings)]
            for rows in order:
                result = _worker(rows, config, args.steps, args.batch, args.length)
                times[config][rows].extend(result["times"])
                flops[config] = result["flops"]
                print(f"round {rnd} {config} rows={rows}: median {statistics.median(result['times']):.3f} s",
                      flush=True)
    peaks.append(matmul_peak_gflops())
    peak = statistics.mean(peaks)
    table = []
    for config in configs:
        base = _robust(times[config][settings[0]])[0]
        for rows in settings:
            med = _robust(times[config][rows])[0]
            table.append({"config": config, "rows": rows, "step_s": med, "ratio": med / base,
                          "peak_fraction": flops[config] / med / 1e9 / peak, "gflop": flops[config] / 1e9})
    meta = run_meta(command_line("benchmarks.attention_blocks", argv))
    result = {**meta, "batch": args.batch, "length": args.length, "gemm_peak_gflops": peaks, "rows": table,
              "times": {c: {str(r): t for r, t in ts.items()} for c, ts in times.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "attention_blocks.json", json.dumps(result, indent=2) + "\n")
    cpu = meta["machine"]["cpu"]
    lines = [f"`{meta['command']}`, {meta['date']}: {cpu}, {meta['machine']['cores']} cores; jax "
             f"{meta['versions']['jax']}. MiniLM train step, batch {args.batch} × {args.length}, float32, "
             f"{args.rounds} interleaved rounds × {args.steps} steps, each setting in its own process. "
             f"float32 GEMM peak (2048²) before / after: {peaks[0]:.0f} / {peaks[1]:.0f} GFLOP/s.", "",
             "| config | rows per attention block | step (s) | vs one block | % of GEMM peak |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['rows']}{' (one block)' if r['rows'] >= args.batch else ''} | "
              f"{r['step_s']:.3f} | {r['ratio']:.3f} | {100 * r['peak_fraction']:.0f}% |" for r in table]
    atomic_write_text(out / "attention_blocks.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
