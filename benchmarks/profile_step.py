"""Where the time of a jpeft train step goes: a JAX profiler trace, summed by XLA operation.

    python -m benchmarks.profile_step [--config=lora|inference|...] [--matmul-dtype=float32|bfloat16]
                                      [--steps=2] [--batch=32] [--length=128] [--out=benchmarks/results]

MiniLM with a 2-class head, the same fixed batch and AdamW step as ``benchmarks.train_step``
(``--config=inference``: the base model's forward pass instead).
After compilation, ``--steps`` steps run under ``jax.profiler.trace`` (Perfetto JSON); the
executed XLA thunks are summed per step and grouped by what they compute, read from the compiled
HLO's ``op_name`` metadata: matmul fusions (``ynn_fusion``/``dot``), dropout's random bits and
masks, the GELU, softmax, LayerNorm, dtype conversions, materialised broadcasts, copies and
transposes, and the rest. Writes
``profile_<config>_<dtype>.json`` (the groups, and the 60 slowest operations with their time and
HLO op name) and prints the
grouped table. The operations of one step run on the machine's cores in parallel, so their sum
can exceed the step's wall time; an asynchronous operation (XLA:CPU's large dots) counts from its
start to its ``end:`` event.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, run_meta
from benchmarks.train_step import _batch_arrays, _jpeft_method

TOP_OPS = 60  # the slowest operations kept in the JSON

# (group, regex searched in "<thunk name> <op_name>"), first match wins.
GROUPS = [
    ("dropout (random bits, masks)", r"Dropout|threefry|random_bits|shift_right_logical"),
    ("matmuls (dot / ynn fusions)", r"^(ynn_fusion|dot)"),
    ("GELU", r"erf|gelu|intermediate/(mul|add|integer_pow)"),
    ("softmax and attention mask", r"softmax|reduce_max|exp|/where|select_n"),
    ("LayerNorm", r"LayerNorm"),
    ("dtype conversions", r"convert"),
    ("optimizer (AdamW)", r"adam|optax|sqrt|clip"),
    ("materialised broadcasts", r"^wrapped_broadcast"),
    ("copies and transposes", r"^(copy|transpose|bitcast)"),
]


def _hlo_op_names(hlo_text: str) -> dict[str, str]:
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]+)\"", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _op_spans(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(operation, ms) for every executed XLA thunk of a trace. An asynchronous thunk (XLA:CPU
    runs its large dots that way) records a short event when it starts and an ``end: <name>``
    event when it completes; its time is the span from one to the other (so it includes any
    wait for a free core while other thunks run)."""
    pending: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    spans: list[tuple[str, float]] = []
    for e in sorted((e for e in events if e.get("ph") == "X" and "dur" in e), key=lambda e: e["ts"]):
        name = e.get("name", "")
        if name.startswith("end: "):
            if pending[name[5:]]:
                start = pending[name[5:]].pop(0)
                spans[start["_index"]] = (name[5:], (e["ts"] + e["dur"] - start["ts"]) / 1e3)
        elif not name.startswith(("ThunkExecutor", "$", "Slinky")):
            pending[name].append({**e, "_index": len(spans)})
            spans.append((name, e["dur"] / 1e3))
    return spans


def profile(config: str, matmul_dtype: str, steps: int, batch: int, length: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from experiments.common import model_matmul_dtype
    from jpeft.core.compile import jit
    from jpeft.models.bert import from_pretrained
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, base = from_pretrained(num_labels=2, matmul_dtype=model_matmul_dtype(matmul_dtype))
    ids, mask, types, labels = (jnp.asarray(x) for x in _batch_arrays(batch, length))
    if config == "inference":  # the base model's forward pass, as in benchmarks.train_step
        fwd = jit(lambda p, i, m, t: model.apply({"params": p}, i, m, t, deterministic=True),
                  matmul_dtype=model.info().matmul_dtype)
        names = _hlo_op_names(fwd.lower(base, ids, mask, types).compile().as_text())

        def step() -> None:
            jax.block_until_ready(fwd(base, ids, mask, types))
    else:
        data = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
                "weights": jnp.ones((batch,), jnp.float32)}
        trainer = Trainer(model, _jpeft_method(config), base,
                          optim=OptimConfig(lr=1e-4, warmup_ratio=0.0, clip_norm=0.0), total_steps=10_000)
        box = [trainer.init_state(jax.random.key(0))]
        names = _hlo_op_names(trainer.train_step.lower(box[0], trainer.frozen, data).compile().as_text())

        def step() -> None:
            box[0], metrics = trainer.train_step(box[0], trainer.frozen, data)
            jax.block_until_ready(metrics["loss"])
    step()
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                step()
        wall = (time.perf_counter() - t0) / steps
        trace = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
        with gzip.open(trace) as fh:
            events = json.load(fh)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: collections.Counter[str] = collections.Counter()
    for name, ms in _op_spans(events):
        if name in names or re.match(r"^[a-z_]+(\.\d+)?$", name):
            per_op[name] += ms / steps  # ms per step
    groups: collections.Counter[str] = collections.Counter()
    for name, ms in per_op.items():
        key = f"{name} {names.get(name, '')}"
        group = next((g for g, pattern in GROUPS if re.search(pattern, key)), "other")
        groups[group] += ms
    return {"config": config, "matmul_dtype": matmul_dtype, "wall_ms_per_step": wall * 1e3,
            "groups_ms": dict(groups.most_common()),
            "top_ops": [{"op": n, "ms": round(ms, 3), "hlo": names.get(n, "")}
                        for n, ms in per_op.most_common(TOP_OPS)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="lora",
                        help="a benchmarks.train_step configuration; 'inference': the base model's forward pass")
    parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    result = profile(args.config, args.matmul_dtype, args.steps, args.batch, args.length)
    total = sum(result["groups_ms"].values())
    print(f"{args.config}, {args.matmul_dtype} matmuls: {result['wall_ms_per_step']:.0f} ms per step (wall), "
          f"{total:.0f} ms of operations")
    print("| group | ms per step | share |\n|---|---|---|")
    for group, ms in result["groups_ms"].items():
        print(f"| {group} | {ms:.0f} | {100 * ms / total:.0f}% |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(command_line("benchmarks.profile_step", argv))
    (out / f"profile_{args.config}_{args.matmul_dtype}.json").write_text(
        json.dumps({**meta, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
