"""Throughput of mixed-adapter batches against one batch per adapter, one after the other.

    python -m benchmarks.mixed_batches [--methods=lora,ia3,prefix] [--k=1,4,16] [--batch=32]
                                       [--length=128] [--reps=5] [--out=benchmarks/results]

A MiniLM-sized BERT (6 layers, hidden 384, 12 heads, randomly initialised: speed does not depend
on the weights) serves ``K`` adapters of one method. For a batch of ``B`` examples spread evenly
over the ``K`` adapters it times (inference, jitted, after compilation):

* ``mixed``: one call of the bank's forward pass (``jpeft.bank``) on the whole mixed batch;
* ``sequential``: ``K`` calls of the ordinary adapted forward pass, each on the ``B/K``
  examples of one adapter (what a server without banks does);

both interleaved rep by rep, medians reported. Writes ``mixed_batches.json`` and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import command_line, positive_int, run_meta
from jpeft import bank as B
from jpeft.core.compile import jit
from jpeft.core.transform import ApplyContext, apply
from jpeft.methods import build
from jpeft.models.bert import BertConfig, BertModel, init_params
from jpeft.checkpoint.atomic import atomic_write_text

MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "max_position_embeddings": 512, "num_labels": 2}




def _time(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def run(methods: list[str], ks: list[int], batch: int, length: int, reps: int) -> list[dict]:
    model = BertModel(BertConfig(**MINILM))
    base = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 30000, (batch, length)), jnp.int32)
    mask = jnp.ones((batch, length), jnp.int32)
    types = jnp.zeros((batch, length), jnp.int32)
    rows = []
    for spec in methods:
        inner = build(spec)
        single = jit(lambda d, i, m, t, inner=inner: apply(model, inner, base, d, i, m, t))
        for k in ks:
            if batch % k:
                raise SystemExit(f"--batch={batch} must be a multiple of every K (got K={k})")
            method = B.bank(inner, k, heads=False)
            bank_delta = method.init(jax.random.key(1), base, model.info())
            deltas = B.unstack(bank_delta["adapters"])
            index = jnp.asarray(np.repeat(np.arange(k), batch // k), jnp.int32)
            mixed = jit(lambda d, i, m, t, x, method=method: apply(
                model, method, base, d, i, m, t, ctx=ApplyContext(adapter_index=x)))
            per = batch // k

            def sequential(deltas=deltas, per=per, single=single):
                return [single(d, ids[j * per:(j + 1) * per], mask[j * per:(j + 1) * per],
                               types[j * per:(j + 1) * per]) for j, d in enumerate(deltas)]

            t0 = time.perf_counter()
            jax.block_until_ready(mixed(bank_delta, ids, mask, types, index))
            compile_mixed = time.perf_counter() - t0
            jax.block_until_ready(sequential())
            times = {"mixed": [], "sequential": []}
            for _ in range(reps):
                times["mixed"].append(_time(mixed, bank_delta, ids, mask, types, index))
                times["sequential"].append(_time(sequential))
            med = {name: statistics.median(v) for name, v in times.items()}
            row = {"method": spec, "K": k, "batch": batch, "length": length,
                   "mixed_s": med["mixed"], "sequential_s": med["sequential"],
                   "mixed_spread_s": [min(times["mixed"]), max(times["mixed"])],
                   "sequential_spread_s": [min(times["sequential"]), max(times["sequential"])],
                   "mixed_tokens_per_s": batch * length / med["mixed"],
                   "sequential_tokens_per_s": batch * length / med["sequential"],
                   "speedup": med["sequential"] / med["mixed"], "compile_mixed_s": compile_mixed}
            rows.append(row)
            print(f"{spec} K={k}: mixed {med['mixed']:.3f} s, sequential {med['sequential']:.3f} s, "
                  f"x{row['speedup']:.2f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | K | mixed (s / batch) | sequential (s) | mixed tokens/s | sequential tokens/s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['K']} | {r['mixed_s']:.3f} | {r['sequential_s']:.3f} | "
                     f"{r['mixed_tokens_per_s']:,.0f} | {r['sequential_tokens_per_s']:,.0f} | "
                     f"{r['speedup']:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mixed_batches", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,ia3,prefix")
    parser.add_argument("--k", default="1,4,16")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--length", type=positive_int, default=128)
    parser.add_argument("--reps", type=positive_int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    rows = run(args.methods.split(","), [int(k) for k in args.k.split(",")], args.batch, args.length, args.reps)
    md = table(rows)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(command_line("benchmarks.mixed_batches", argv))
    atomic_write_text(out / "mixed_batches.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "mixed_batches.md", md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
