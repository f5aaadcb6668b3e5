"""What XLA:CPU's compilation costs a run, and what JAX's persistent compilation cache saves.

    python -m benchmarks.compile_cache [--models=minilm,smollm2,smollm2-no-dropout] [--out=benchmarks/results]

A run compiles its train step once per batch shape (each length bucket), and its eval step
likewise; every new process compiles them again. JAX can keep compiled programs on disk
(``JAX_COMPILATION_CACHE_DIR``, or ``jax.config.update("jax_compilation_cache_dir", ...)``), so
that a second run with the same model, method and shapes (another seed, a resumed run) loads them
instead. For each model this benchmark starts three processes, one after the other: without a
cache, with an empty cache directory (cold: compiles and writes), and with the same directory
again (warm: reads). Each times its train step's first call (tracing, compilation, one step) and
then three more steps; the first call minus a step is the compilation. Models: ``minilm``,
MiniLM's LoRA step at 32 × 128 (the GLUE recipe's batch); ``smollm2``, a step of LoRA on every
linear layer with LoRA dropout 0.1 (QLoRA's targets, as the E2E runs with ``--lora.targets`` use
them) of a decoder with SmolLM2-135M's 30 layers and random weights at 8 × 128 (the E2E recipe's
batch); ``smollm2-no-dropout``, the same with LoRA dropout 0.
Writes ``compile_cache.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, run_meta, run_worker

MODELS = ("minilm", "smollm2", "smollm2-no-dropout")
ALL_LINEAR = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"  # the E2E runs' QLoRA targets


def worker(model: str) -> dict[str, Any]:
    """Time one process's first train step and three more (the cache, if any, comes from the
    environment, as a user would set it)."""
    import jax

    from benchmarks.profile_step import decoder_trainer, minilm_trainer

    if model == "minilm":
        trainer, data = minilm_trainer("lora", "float32", 32, 128)
    else:
        dropout = 0.0 if model == "smollm2-no-dropout" else 0.1
        trainer, data = decoder_trainer(None, None, 8, 128, targets=ALL_LINEAR, dropout=dropout)
    box = [trainer.init_state(jax.random.key(0))]

    def timed_step() -> float:
        t0 = time.perf_counter()
        box[0], metrics = trainer.train_step(box[0], trainer.frozen, data)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - t0

    first = timed_step()  # tracing, compilation (or the cache's copy) and one step
    step = statistics.median(timed_step() for _ in range(3))
    return {"first_call_s": first, "step_s": step, "compile_s": max(first - step, 0.0),
            "cache_dir": jax.config.jax_compilation_cache_dir}


def _run(model: str, cache_dir: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    return run_worker([sys.executable, "-m", "benchmarks.compile_cache", "--worker", model],
                      f"the {model} worker", env=env)


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | cache | first step s | of which compiling s | a step s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['cache']} | {r['first_call_s']:.1f} | {r['compile_s']:.1f} | {r['step_s']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_cache",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker)), flush=True)
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        parser.error(f"--models takes {', '.join(MODELS)}; got {args.models!r}")
    rows = []
    for model in models:
        with tempfile.TemporaryDirectory() as cache_dir:
            for cache, path in (("none", None), ("cold (empty)", cache_dir), ("warm", cache_dir)):
                result = _run(model, path)
                rows.append({"model": model, "cache": cache, **result})
                print(f"{model}, cache {cache}: first step {result['first_call_s']:.1f} s, "
                      f"compiling {result['compile_s']:.1f} s, a step {result['step_s']:.2f} s", flush=True)
    meta = run_meta(command_line("benchmarks.compile_cache", argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = _table(rows)
    atomic_write_text(out / "compile_cache.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "compile_cache.md", 
        f"# Compilation and the persistent cache\n\n{meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"{meta['date']}; `{meta['command']}`\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
