"""Inference latency of adapted MiniLM: LoRA merged vs unmerged, and the adapter methods, relative
to the base model.

    python -m benchmarks.inference [--batches=1,32] [--length=128] [--reps=20] [--rounds=3]
                                   [--out=benchmarks/results]

Every configuration is a jitted forward pass of all-MiniLM-L6-v2 with a 2-class head on fixed
random ids (``B × T``), timed after compilation; configurations are interleaved round by round
so that machine load hits all of them alike. Medians over all rounds, spread, and the ratio to
the base model's forward pass. Merged = the delta folded into the weights (``jpeft.merge``): the
same graph as the base. Writes ``inference.json`` and ``inference.md``.
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
from jpeft.core.compile import jit
from jpeft.core.transform import apply, merge
from jpeft.methods import (
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PrefixConfig,
    PromptConfig,
    build,
)
from jpeft.models.bert import from_pretrained
from jpeft.checkpoint.atomic import atomic_write_text
from tests.helpers import perturb

SPECS = {
    "lora": ("lora", {"lora": LoraConfig(r=8, alpha=16, targets=r"attention/self/(query|value)$")}),
    "ia3": ("ia3", {"ia3": IA3Config()}),
    "houlsby": ("houlsby", {"houlsby": AdapterConfig(size=64)}),
    "pfeiffer": ("pfeiffer", {"pfeiffer": AdapterConfig(size=64)}),
    "prefix": ("prefix", {"prefix": PrefixConfig(num_virtual_tokens=20, projection=False)}),
    "prompt": ("prompt", {"prompt": PromptConfig(num_virtual_tokens=20)}),
}
MERGEABLE = ("lora", "ia3")




def build_cases(model, base):
    """name -> (jitted fn, args)."""
    base_fwd = jit(lambda p, *x: model.apply({"params": p}, *x))
    cases = {"base": (base_fwd, base)}
    for name, (spec, configs) in SPECS.items():
        t = build(spec, configs)
        delta = perturb(t.init(jax.random.key(0), base, model.info()), scale=0.01)
        fwd = jit(lambda p, d, *x, t=t: apply(model, t, p, d, *x))
        cases[f"{name} (unmerged)" if name in MERGEABLE else name] = (fwd, base, delta)
        if name in MERGEABLE:
            cases[f"{name} (merged)"] = (base_fwd, merge(t, base, delta))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--length", type=positive_int, default=128)
    parser.add_argument("--reps", type=positive_int, default=20)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    model, base = from_pretrained(num_labels=2)
    cases = build_cases(model, base)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rng = np.random.default_rng(0)
        inputs = (jnp.asarray(rng.integers(1000, 30000, (batch, args.length)), jnp.int32),
                  jnp.ones((batch, args.length), jnp.int32), jnp.zeros((batch, args.length), jnp.int32))
        times: dict[str, list[float]] = {name: [] for name in cases}
        for fn, *params in cases.values():
            jax.block_until_ready(fn(*params, *inputs))  # compile
        for _ in range(args.rounds):
            for name, (fn, *params) in cases.items():
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*params, *inputs))
                    times[name].append(time.perf_counter() - t0)
        base_med = statistics.median(times["base"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"config": name, "batch": batch, "length": args.length, "median_ms": 1e3 * med,
                         "p10_ms": 1e3 * float(np.percentile(ts, 10)), "p90_ms": 1e3 * float(np.percentile(ts, 90)),
                         "vs_base": med / base_med})
            print(f"B={batch} {name:18s} {1e3 * med:8.2f} ms  x{med / base_med:.2f}", flush=True)
    lines = ["| config | batch | median latency (ms) | p10–p90 (ms) | / base |", "|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['batch']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}–{r['p90_ms']:.2f} | "
              f"{r['vs_base']:.2f} |" for r in rows]
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(command_line("benchmarks.inference", argv))
    atomic_write_text(out / "inference.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "inference.md", md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
