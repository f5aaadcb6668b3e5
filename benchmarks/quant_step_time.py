"""Step time of a LoRA train step over quantized frozen bases (nf4, q4_1, ...) vs a bfloat16 one,
interleaved.

Each side runs in its own process (SmolLM2-135M's shapes, random weights, the base built as
``--base-dtype`` builds it: bf16 casts the frozen leaves and computes in bf16; nf4 quantizes
the frozen matmul kernels and computes in float32, dequantizing each kernel in the step). Both
processes compile and warm up first; then the driver asks them in turn for ``--steps`` timed
steps, ``--rounds`` times, alternating which goes first, so that both sides see the same
machine load. Writes ``benchmarks/results/quant_step_time.{json,md}``.

    python -m benchmarks.quant_step_time --rounds=6 --steps=3
    python -m benchmarks.quant_step_time --sides=bfloat16,nf4,q4_1   # each ratio to the first side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def worker(side: str, batch: int, seq: int, layers: int | None) -> None:
    """Build one side, then answer ``run N`` lines on stdin with the seconds of N steps."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.quant_memory import MODELS
    from experiments.common import cast_frozen_base
    from jpeft.methods.lora import LoraConfig, lora
    from jpeft.models import llama
    from jpeft.quant import base_compute_dtype
    from jpeft.train.trainer import Trainer, causal_lm_loss, trainable_base_paths

    config = MODELS["smollm2"]
    if layers:
        config = dataclasses.replace(config, num_hidden_layers=layers)
    model = llama.LlamaForCausalLM(dataclasses.replace(config, dtype=base_compute_dtype(side)))
    base = llama.init_params(model, jax.random.key(0))
    transform = lora(LoraConfig(r=8, alpha=16.0, targets=r"self_attn/(q_proj|v_proj)$"))
    base = cast_frozen_base(base, trainable_base_paths(transform, base, model.info()), side,
                            transform, model.info())
    trainer = Trainer(model, transform, base, total_steps=1000, loss=causal_lm_loss,
                      model_inputs=("input_ids", "attention_mask"))
    state = trainer.init_state(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq)), jnp.int32),
             "attention_mask": jnp.ones((batch, seq), jnp.int32),
             "loss_mask": jnp.ones((batch, seq), jnp.int32), "weights": jnp.ones((batch,), jnp.float32)}
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, trainer.frozen, batch)  # compile + first step
    jax.block_until_ready(metrics)
    print(json.dumps({"ready": side, "compile_s": time.perf_counter() - t0}), flush=True)
    for line in sys.stdin:
        cmd, _, n = line.strip().partition(" ")
        if cmd != "run":
            break
        t0 = time.perf_counter()
        for _ in range(int(n)):
            state, metrics = trainer.train_step(state, trainer.frozen, batch)
        jax.block_until_ready(metrics)
        print(json.dumps({"side": side, "s_per_step": (time.perf_counter() - t0) / int(n),
                          "loss": float(metrics["loss"])}), flush=True)


def _read(proc: subprocess.Popen) -> dict[str, Any]:
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a worker stopped: {proc.args}")
    return json.loads(line)


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="bfloat16,nf4")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than SmolLM2's 30")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS / "quant_step_time.json"))
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.batch, args.seq, args.layers)
        return 0
    sides = args.sides.split(",")
    base_cmd = [sys.executable, "-m", "benchmarks.quant_step_time", f"--batch={args.batch}",
                f"--seq={args.seq}"] + ([f"--layers={args.layers}"] if args.layers else [])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {s: subprocess.Popen([*base_cmd, f"--worker={s}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env, cwd=Path(__file__).resolve().parents[1]) for s in sides}
    compile_s = {s: _read(p)["compile_s"] for s, p in procs.items()}
    times: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for s in (sides if r % 2 == 0 else sides[::-1]):
            procs[s].stdin.write(f"run {args.steps}\n")
            procs[s].stdin.flush()
            times[s].append(_read(procs[s])["s_per_step"])
    for p in procs.values():
        p.stdin.write("quit\n")
        p.stdin.close()
        p.wait()
    from benchmarks.quant_memory import cpu_model

    med = {s: statistics.median(v) for s, v in times.items()}
    ratios = {s: med[s] / med[sides[0]] for s in sides[1:]}
    cpu = cpu_model()
    md = [f"SmolLM2-135M shapes{f' ({args.layers} layers)' if args.layers else ''}, LoRA r=8 q/v, "
          f"batch {args.batch}×{args.seq}, {args.rounds} interleaved rounds of {args.steps} steps, "
          f"one process per side; {cpu}, load average {os.getloadavg()[0]:.1f} at the end.", "",
          "| base | median s/step | rounds (s/step) | compile + first step s |", "|---|---:|---|---:|"]
    for s in sides:
        md.append(f"| {s} | {med[s]:.3f} | {', '.join(f'{t:.2f}' for t in times[s])} | {compile_s[s]:.0f} |")
    md += [""] + [f"{s} / {sides[0]} step time: **{r:.2f}×**" for s, r in ratios.items()]
    table = "\n".join(md)
    print(table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({
        "command": "python -m benchmarks.quant_step_time " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu, "cpu_count": os.cpu_count(), "load_average_end": os.getloadavg(),
        "times_s_per_step": times, "median_s_per_step": med, "compile_s": compile_s,
        "ratios": ratios, "table": table}, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), "# Quantized base: step time\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
