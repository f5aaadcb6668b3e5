"""The MiniLM train step or forward pass under several sets of XLA compiler options, interleaved.

    python -m benchmarks.compiler_options [--configs=inference,lora,full] [--matmul-dtype=float32]
                                          [--base-dtype=float32] [--reps=8]
                                          [--variants='NAME=JSON;NAME=JSON']
                                          [--batch=32] [--length=128] [--out=benchmarks/results]

The evidence behind ``jpeft.core.compile.default_compiler_options``. For each config (the base
model's forward pass, or a train step of a method of ``benchmarks.train_step``) every variant is
compiled in this one process, then called round-robin ``--reps`` times (the order reversed every
other round, so that drift on a shared machine falls on all variants alike). Reports the median
and p10-p90 per call and the number of YNNPACK fusions in the compiled program.

``--base-dtype=bfloat16`` casts the frozen base to bf16 and computes in bf16, as the GLUE CLI's
``--base-dtype`` does. Default variants: ``jpeft`` (jpeft's default for the model), ``xla``
(XLA's own defaults, ``{}``), ``ynn_off`` (every YNNPACK fusion off) and ``ynn_dots`` (YNNPACK for
single dots only). Writes
``compiler_options_<matmul dtype>[_base_<base dtype>].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import command_line, positive_int, run_meta

YNN = "xla_cpu_experimental_ynn_fusion_type"


def default_variants(matmul_dtype: str | None) -> dict[str, dict[str, Any]]:
    from jpeft.core.compile import default_compiler_options

    return {"jpeft": default_compiler_options(matmul_dtype), "xla": {}, "ynn_off": {YNN: ""},
            "ynn_dots": {YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}}


def parse_variants(text: str) -> dict[str, dict[str, Any]]:
    """``'a={};b={"opt": false}'`` -> ``{"a": {}, "b": {"opt": False}}``."""
    variants = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, sep, options = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--variants: {item!r} is not NAME=JSON (e.g. 'off={{\"{YNN}\": \"\"}}')")
        variants[name] = json.loads(options)
    return variants


def time_round_robin(calls: Mapping[str, Callable[[], Any]], reps: int,
                     clock: Callable[[], float] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, called in turn ``reps`` times (one untimed warm-up
    call each first); odd rounds run the calls in reverse order."""
    clock = clock or time.perf_counter
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls.items())
    for r in range(reps):
        for name, call in (order if r % 2 == 0 else order[::-1]):
            t0 = clock()
            call()
            times[name].append(clock() - t0)
    return times


def compiled_call(config: str, options: Mapping[str, Any] | None, matmul_dtype: str | None = None,
                  base_dtype: str = "float32", batch: int = 32, length: int = 128) -> tuple[Callable[[], Any], Any]:
    """One call of MiniLM's train step of ``config`` (``"inference"``: the base model's forward pass)
    on ``benchmarks.train_step``'s fixed batch, compiled with ``options`` (None: jpeft's defaults),
    and its compiled executable (``.as_text()``, ``.cost_analysis()``)."""
    import jax
    import jax.numpy as jnp

    from benchmarks.train_step import LR, _batch_arrays, _jpeft_method
    from experiments.common import cast_frozen_base
    from jpeft.core.compile import jit
    from jpeft.models.bert import from_pretrained
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer, trainable_base_paths

    model, base = from_pretrained(num_labels=2, matmul_dtype=matmul_dtype, dtype=base_dtype)
    method = None if config == "inference" else _jpeft_method(config)
    if base_dtype != "float32":
        keep = () if method is None else trainable_base_paths(method, base, model.info())
        base = cast_frozen_base(base, keep, base_dtype)
    ids, mask, types, labels = (jnp.asarray(x) for x in _batch_arrays(batch, length))
    if config == "inference":
        fwd = jit(lambda p, i, m, t: model.apply({"params": p}, i, m, t, deterministic=True),
                  compiler_options=options)
        return (lambda: jax.block_until_ready(fwd(base, ids, mask, types))), fwd.lower(base, ids, mask, types).compile()
    trainer = Trainer(model, method, base, total_steps=10_000, compiler_options=options,
                      optim=OptimConfig(lr=LR, warmup_ratio=0.0, clip_norm=0.0))
    holder = {"state": trainer.init_state(jax.random.key(0))}
    data = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
            "weights": jnp.ones((batch,), jnp.float32)}

    def step() -> None:
        holder["state"], metrics = trainer.train_step(holder["state"], trainer.frozen, data)
        jax.block_until_ready(metrics["loss"])

    return step, trainer.train_step.lower(holder["state"], trainer.frozen, data).compile()


def _calls(config: str, variants: Mapping[str, dict[str, Any]], matmul_dtype: str | None,
           base_dtype: str, batch: int, length: int) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    calls, fusions = {}, {}
    for name, options in variants.items():
        calls[name], compiled = compiled_call(config, options, matmul_dtype, base_dtype, batch, length)
        fusions[name] = compiled.as_text().count("__ynn_fusion")
    return calls, fusions


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiler_options",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="inference,lora,full")
    parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--base-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--variants", default="",
                        help="NAME=JSON;... (default: jpeft, xla, ynn_off, ynn_dots)")
    parser.add_argument("--reps", type=positive_int, default=8)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--length", type=positive_int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    matmul_dtype = None if args.matmul_dtype == "float32" else args.matmul_dtype
    variants = parse_variants(args.variants) if args.variants else default_variants(matmul_dtype)
    rows = []
    for config in args.configs.split(","):
        calls, fusions = _calls(config, variants, matmul_dtype, args.base_dtype, args.batch, args.length)
        times = time_round_robin(calls, args.reps)
        for name, ts in times.items():
            rows.append({"config": config, "variant": name, "options": variants[name],
                         "median_s": statistics.median(ts), "p10_s": float(np.percentile(ts, 10)),
                         "p90_s": float(np.percentile(ts, 90)), "ynn_fusions": fusions[name], "times": ts})
            print(f"{config:9s} {name:9s} {statistics.median(ts):.3f} s  ({fusions[name]} YNNPACK fusions)",
                  flush=True)
        del calls
    md = [f"{args.matmul_dtype} matmuls, {args.base_dtype} base, batch {args.batch} × {args.length}, "
          f"median (p10–p90) of {args.reps} interleaved calls", "",
          "| config | variant | options | s per call | YNNPACK fusions |", "|---|---|---|---|---|"]
    md += [f"| {r['config']} | {r['variant']} | `{json.dumps(r['options'])}` | {r['median_s']:.3f} "
           f"({r['p10_s']:.3f}–{r['p90_s']:.3f}) | {r['ynn_fusions']} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compiler_options_{args.matmul_dtype}"
    if args.base_dtype != "float32":
        stem += f"_base_{args.base_dtype}"
    meta = run_meta(command_line("benchmarks.compiler_options", argv))
    atomic_write_text(out / f"{stem}.json", json.dumps({**meta, "batch": args.batch, "length": args.length,
                                                  "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
