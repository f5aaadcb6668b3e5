"""How close to the GEMM peak a train step can get with XLA:CPU's own dot kernels: every dot of
the compiled step, timed alone at its shapes, against the whole step.

    python -m benchmarks.dot_bound [--configs=lora,full,inference] [--reps=20] [--steps=6]

For each configuration (MiniLM, ``benchmarks.train_step``'s fixed 32 × 128 batch, jpeft's
compiler options) the compiled step's HLO is read; every ``dot`` instruction's operand shapes,
physical layouts and dimension numbers are rebuilt as one ``lax.dot_general`` over parameters of
the same layout, compiled with the same options and timed alone (median of ``--reps`` calls, minus
the median time of an empty jitted call). Then, with ``F`` the step's FLOPs (XLA's cost
analysis), ``P`` the 2048² GEMM peak measured in the same process and ``D`` the summed
stand-alone time of all the step's dots:

- ``% of peak`` = ``F / step time / P``, as in ``benchmarks.train_step``;
- ``bound`` = ``F / D / P``: the fraction of the peak the step would reach if everything between
  the dots took no time at all and each dot ran as fast as it does alone.

``step − D`` is the time of the work between the dots. Writes ``dot_bound.{json,md}``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, positive_int, run_meta

_DEF = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\](?:\{([\d,]*)[^}]*\})?")
_DOT = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* dot\(%([^,\s]+), %([^)\s]+)\)(.*)$")
_DIMS = ("lhs_batch_dims", "rhs_batch_dims", "lhs_contracting_dims", "rhs_contracting_dims")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def hlo_dots(hlo_text: str) -> list[dict[str, Any]]:
    """Every ``dot`` of an HLO module's text: operand shapes, layouts (minor-to-major), dimension
    numbers, element type and FLOPs (2 × output elements × contracted size)."""
    shapes: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {}
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if m:
            dims = _ints(m.group(3))
            layout = _ints(m.group(4)) if m.group(4) is not None else tuple(reversed(range(len(dims))))
            shapes[m.group(1)] = (m.group(2), dims, layout)
    dots = []
    for line in hlo_text.splitlines():
        m = _DOT.match(line)
        if not m:
            continue
        attrs = {k: _ints(v) for k, v in re.findall(r"(\w+_dims)=\{([\d,]*)\}", m.group(6))}
        (ltype, lhs, llayout), (_, rhs, rlayout) = shapes[m.group(4)], shapes[m.group(5)]
        out = _ints(m.group(3))
        contracted = math.prod(lhs[d] for d in attrs.get("lhs_contracting_dims", ()))
        dots.append({"lhs": lhs, "rhs": rhs, "lhs_layout": llayout, "rhs_layout": rlayout,
                     "dtype": ltype, "out_dtype": m.group(2), "out": out,
                     **{k: attrs.get(k, ()) for k in _DIMS},
                     "flops": 2 * math.prod(out) * contracted})
    return dots


def _signature(dot: dict[str, Any]) -> tuple:
    return tuple(dot[k] for k in ("lhs", "rhs", "lhs_layout", "rhs_layout", "dtype", "out_dtype", *_DIMS))


def _dtype(hlo_type: str) -> str:
    return {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "s8": "int8"}[hlo_type]


def time_dot(dot: dict[str, Any], reps: int, options: Any = None) -> float:
    """Median seconds of ``dot`` alone: parameters stored in its operands' physical layouts
    (a transposed view feeds the dot, which XLA folds into the layout), compiled with ``options``."""
    import jax
    import jax.numpy as jnp

    from jpeft.core.compile import jit

    def physical(shape: tuple[int, ...], layout: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        major_to_minor = tuple(reversed(layout))  # logical dims, outermost first
        perm = tuple(major_to_minor.index(d) for d in range(len(shape)))
        return tuple(shape[d] for d in major_to_minor), perm

    (lshape, lperm), (rshape, rperm) = physical(dot["lhs"], dot["lhs_layout"]), physical(dot["rhs"], dot["rhs_layout"])
    lhs = jax.random.normal(jax.random.key(0), lshape, jnp.float32).astype(_dtype(dot["dtype"]))
    rhs = jax.random.normal(jax.random.key(1), rshape, jnp.float32).astype(_dtype(dot["dtype"]))
    dims = ((dot["lhs_contracting_dims"], dot["rhs_contracting_dims"]), (dot["lhs_batch_dims"], dot["rhs_batch_dims"]))
    fn = jit(lambda a, b: jax.lax.dot_general(jnp.transpose(a, lperm), jnp.transpose(b, rperm), dims,
                                              preferred_element_type=_dtype(dot["out_dtype"])),
             compiler_options=options)
    jax.block_until_ready(fn(lhs, rhs))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(lhs, rhs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def call_overhead(reps: int) -> float:
    """Median seconds of a jitted call that does almost nothing (dispatch and synchronisation)."""
    import jax
    import jax.numpy as jnp

    from jpeft.core.compile import jit

    fn, x = jit(lambda a: a + 1.0), jnp.zeros((8,), jnp.float32)
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(reps * 5):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _kind(dot: dict[str, Any]) -> str:
    if dot["lhs_batch_dims"]:
        return "batched (attention)"
    small = min(*dot["out"], *(dot["lhs"][d] for d in dot["lhs_contracting_dims"]))
    return "2-D, a side ≤ 64 (LoRA factors, head)" if small <= 64 else "2-D (dense layers)"


def measure(config: str, reps: int, steps: int, overhead: float, peak: float) -> dict[str, Any]:
    from benchmarks.compiler_options import compiled_call

    step, compiled = compiled_call(config, None)
    flops = compiled.cost_analysis().get("flops", 0.0)
    dots = hlo_dots(compiled.as_text())
    counts = collections.Counter(_signature(d) for d in dots)
    first = {_signature(d): d for d in reversed(dots)}
    rows = []
    for sig, n in counts.most_common():
        dot = first[sig]
        t = max(time_dot(dot, reps) - overhead, 1e-7)
        rows.append({**{k: list(v) if isinstance(v, tuple) else v for k, v in dot.items()}, "count": n,
                     "kind": _kind(dot), "seconds": t, "gflops": dot["flops"] / t / 1e9})
    step()
    step_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t0)
    step_s = statistics.median(step_times)
    dot_s = sum(r["seconds"] * r["count"] for r in rows)
    kinds = {}
    for r in rows:
        k = kinds.setdefault(r["kind"], {"dots": 0, "gflop": 0.0, "seconds": 0.0})
        k["dots"] += r["count"]
        k["gflop"] += r["flops"] * r["count"] / 1e9
        k["seconds"] += r["seconds"] * r["count"]
    return {"config": config, "flops": flops, "dot_flops": sum(r["flops"] * r["count"] for r in rows),
            "step_s": step_s, "step_times": step_times, "dots_alone_s": dot_s, "peak_gflops": peak,
            "peak_fraction": flops / step_s / 1e9 / peak, "bound": flops / dot_s / 1e9 / peak,
            "kinds": kinds, "dots": rows}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| config | step GFLOP | dots | step (s) | % of peak | dots alone (s) | between the dots (s) | bound |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['flops'] / 1e9:.1f} | {sum(d['count'] for d in r['dots'])} | "
                     f"{r['step_s']:.3f} | {r['peak_fraction']:.0%} | {r['dots_alone_s']:.3f} | "
                     f"{r['step_s'] - r['dots_alone_s']:.3f} | {r['bound']:.0%} |")
    lines += ["", "| config | dot kind | dots | GFLOP | alone (s) | GFLOP/s | % of peak |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for kind, k in sorted(r["kinds"].items()):
            rate = k["gflop"] / k["seconds"]
            lines.append(f"| {r['config']} | {kind} | {k['dots']} | {k['gflop']:.1f} | {k['seconds']:.3f} | "
                         f"{rate:.0f} | {rate / r['peak_gflops']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dot_bound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="lora,full,inference")
    parser.add_argument("--reps", type=positive_int, default=20, help="timed calls per distinct dot")
    parser.add_argument("--steps", type=positive_int, default=6, help="timed steps per configuration")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from benchmarks.train_step import matmul_peak_gflops

    overhead = call_overhead(args.reps)
    results = []
    for config in args.configs.split(","):
        peak = matmul_peak_gflops()
        results.append(measure(config, args.reps, args.steps, overhead, peak))
        print(table(results[-1:]), flush=True)
    meta = run_meta(command_line("benchmarks.dot_bound", argv))
    text = table(results)
    peaks = ", ".join(f"{r['peak_gflops']:.0f}" for r in results)
    md = (f"# Dots alone against the step\n\n{meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
          f"{meta['date']}; GEMM peak (2048², float32) {peaks} "
          f"GFLOP/s before each configuration; dispatch overhead subtracted per dot "
          f"{overhead * 1e6:.0f} µs.\n\n{text}\n")
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "dot_bound.json", json.dumps({**meta, "call_overhead_s": overhead, "results": results},
                                                   indent=2) + "\n")
    atomic_write_text(out / "dot_bound.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
