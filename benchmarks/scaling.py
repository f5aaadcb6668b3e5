"""How the train step's time grows with batch size and sequence length, for ``full`` and ``lora``.

    python -m benchmarks.scaling [--batches=8,16,32,64] [--lengths=64,128,256,512] [--steps=3]
                                 [--out=benchmarks/results]

all-MiniLM-L6-v2 with a 2-class head, AdamW, fixed random ids. Two sweeps: batch size at length
128, and sequence length at batch 32. For every point: the median of ``--steps`` timed steps after
compilation (``full`` and ``lora`` interleaved point by point), tokens/s, and the LoRA/full
ratio. Writes ``scaling.json``, ``scaling.md`` and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import command_line, cpu_name, positive_int, run_meta
from jpeft.methods import LoraConfig, build
from jpeft.models.bert import from_pretrained
from jpeft.train.optim import OptimConfig
from jpeft.train.trainer import Trainer
from jpeft.checkpoint.atomic import atomic_write_text

METHODS = {"full": ("full", {}),
           "lora": ("lora", {"lora": LoraConfig(r=8, alpha=16, targets=r"attention/self/(query|value)$")})}




def _batch(b: int, t: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {"input_ids": jnp.asarray(rng.integers(1000, 30000, (b, t)), jnp.int32),
            "attention_mask": jnp.ones((b, t), jnp.int32), "token_type_ids": jnp.zeros((b, t), jnp.int32),
            "labels": jnp.asarray(rng.integers(0, 2, b), jnp.int32), "weights": jnp.ones((b,), jnp.float32)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="8,16,32,64")
    parser.add_argument("--lengths", default="64,128,256,512")
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    model, base = from_pretrained(num_labels=2)
    trainers = {name: Trainer(model, build(spec, cfg), base, optim=OptimConfig(lr=1e-5, clip_norm=0.0),
                              total_steps=10_000) for name, (spec, cfg) in METHODS.items()}
    states = {name: tr.init_state(jax.random.key(0)) for name, tr in trainers.items()}
    points = [("batch", int(b), 128) for b in args.batches.split(",")] + \
             [("length", 32, int(t)) for t in args.lengths.split(",")]
    rows = []
    for sweep, b, t in points:
        data = _batch(b, t)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for name, tr in trainers.items():  # compile + warm up
            states[name], m = tr.train_step(states[name], tr.frozen, data)
            jax.block_until_ready(m)
        for _ in range(args.steps):
            for name, tr in trainers.items():
                t0 = time.perf_counter()
                states[name], m = tr.train_step(states[name], tr.frozen, data)
                jax.block_until_ready(m["loss"])
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        for name in trainers:
            rows.append({"sweep": sweep, "method": name, "batch": b, "length": t, "median_s": med[name],
                         "tokens_per_s": b * t / med[name], "lora_over_full": med["lora"] / med["full"]})
        print(f"{sweep:6s} B={b:3d} T={t:4d}: full {med['full']:.3f} s, lora {med['lora']:.3f} s "
              f"(x{med['lora'] / med['full']:.2f})", flush=True)
    lines = ["| sweep | batch | length | full step (s) | lora step (s) | lora / full | lora tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for sweep, b, t in points:
        f = next(r for r in rows if r["sweep"] == sweep and r["batch"] == b and r["length"] == t and r["method"] == "full")
        lo = next(r for r in rows if r["sweep"] == sweep and r["batch"] == b and r["length"] == t and r["method"] == "lora")
        lines.append(f"| {sweep} | {b} | {t} | {f['median_s']:.3f} | {lo['median_s']:.3f} | "
                     f"{lo['median_s'] / f['median_s']:.2f} | {lo['tokens_per_s']:,.0f} |")
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, key, label in [(axes[0], "batch", "batch", "batch size (length 128)"),
                                  (axes[1], "length", "length", "sequence length (batch 32)")]:
        for name in trainers:
            pts = [(r[key], r["median_s"]) for r in rows if r["sweep"] == sweep and r["method"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("train step (s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"MiniLM train step, {cpu_name()} ({os.cpu_count()} cores)")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=100)
    meta = run_meta(command_line("benchmarks.scaling", argv))
    atomic_write_text(out / "scaling.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "scaling.md", md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
