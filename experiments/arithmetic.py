"""Combine two trained GLUE LoRA adapters and evaluate the combinations on both tasks.

    python -m experiments.arithmetic --a=results/glue/runs/sst2-lora --b=results/glue/runs/mrpc-lora

``--a`` and ``--b`` are GLUE run directories (their ``adapter/`` folders, written by
``experiments.glue``) or adapter folders themselves, LoRA on the same base. For every
combination (each adapter alone; ``linear`` with weights 1/1 at rank r₁+r₂ (exact task addition)
and 0.5/0.5 at rank max(r); ``cat`` 1/1; ``ties`` with density 0.2 and ``dare`` with density 0.5,
both 1/1 at rank r₁+r₂; the negation of each adapter) the script evaluates the combined delta on
both tasks' dev sets, each task with its own trained head (the heads are not combined), and writes
``<out>/results.md`` and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _adapter_dir(path: str) -> Path:
    p = Path(path)
    return p / "adapter" if (p / "adapter").is_dir() else p


def _task_of(adapter: Path) -> str:
    from experiments.common import CliError, reading

    for name in ("summary.json", "config.json"):
        path = adapter.parent / name
        if path.is_file():
            with reading(str(path), "Pass --a/--b the GLUE run directory experiments.glue wrote."):
                data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("task"), str):
                raise CliError(f"{path} names no GLUE task (no \"task\" string); pass --a/--b the GLUE "
                               "run directory experiments.glue wrote")
            return data["task"]
    raise CliError(f"cannot tell the GLUE task of {adapter}: no summary.json or config.json beside it; "
                   "pass --a/--b the GLUE run directory experiments.glue wrote")


def combinations(cfg_a: Any, delta_a: Any, cfg_b: Any, delta_b: Any) -> dict[str, tuple[Any, Any]]:
    """name -> (LoRA config, delta) of every combination the script evaluates."""
    import jax

    from jpeft.arithmetic import combine_lora, negate_lora

    both = [delta_a, delta_b]
    cfgs = [cfg_a, cfg_b]
    full = cfg_a.r + cfg_b.r
    out = {"A alone": (cfg_a, delta_a), "B alone": (cfg_b, delta_b)}
    out["linear 1/1 (rank r₁+r₂)"] = combine_lora(both, cfgs, [1.0, 1.0], how="linear", rank=full)
    out["linear 0.5/0.5 (rank r)"] = combine_lora(both, cfgs, [0.5, 0.5], how="linear")
    out["cat 1/1"] = combine_lora(both, cfgs, [1.0, 1.0], how="cat")
    out["ties 1/1 (density 0.2)"] = combine_lora(both, cfgs, [1.0, 1.0], how="ties", density=0.2, rank=full)
    out["dare 1/1 (density 0.5)"] = combine_lora(both, cfgs, [1.0, 1.0], how="dare", density=0.5, rank=full,
                                                 rng=jax.random.key(0))
    out["−A"] = (cfg_a, negate_lora(delta_a))
    out["−B"] = (cfg_b, negate_lora(delta_b))
    return out


def evaluate(model: Any, transform: Any, params: Any, delta: Any, task: Any, dev: Any,
             batch_size: int = 128) -> dict[str, float]:
    import numpy as np

    from jpeft.core.compile import jit
    from jpeft.core.transform import apply
    from jpeft.data import glue as G
    from jpeft.metrics import glue_metrics

    fwd = jit(lambda p, d, i, m, t: apply(model, transform, p, d, i, m, t),
              matmul_dtype=model.info().matmul_dtype)
    outputs, labels = [], []
    for batch in G.iterate_batches(dev, batch_size, buckets=G.default_buckets(128), shuffle=False):
        keep = np.asarray(batch["weights"]) > 0
        out = fwd(params, delta, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        outputs.append(np.asarray(out)[keep])
        labels.append(np.asarray(batch["labels"])[keep])
    return glue_metrics(task, np.concatenate(outputs), np.concatenate(labels))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.arithmetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="GLUE run directory (or adapter folder) of task A")
    parser.add_argument("--b", required=True, help="GLUE run directory (or adapter folder) of task B")
    parser.add_argument("--data-dir", default=None, help="GLUE data folder (default: ../shared/data/glue)")
    parser.add_argument("--out", default="results/arithmetic")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out={args.out} is a file; pass a folder (it is created if missing)")
    return args


def main(argv: list[str] | None = None) -> int:
    from experiments.common import cli_main

    return cli_main("experiments.arithmetic", parse_args, run, argv)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from experiments.common import CliError
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax

    from jpeft.checkpoint.export import load_adapter, read_adapter_meta
    from jpeft.data import glue as G
    from jpeft.methods.lora import lora
    from jpeft.models import bert
    from jpeft.models.hub import resolve_model_dir

    t0 = time.perf_counter()
    dirs = [_adapter_dir(args.a), _adapter_dir(args.b)]
    metas = [read_adapter_meta(d) for d in dirs]
    if any(m["method_spec"] != "lora" for m in metas):
        raise CliError(f"both adapters must be LoRA, got {[m['method_spec'] for m in metas]} "
                       f"(--a={args.a}, --b={args.b}); pass two GLUE runs of --method=lora")
    model_dir = resolve_model_dir(metas[0]["base_model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tasks = [G.get_task(_task_of(d)) for d in dirs]
    loaded, devs, models, bases = [], [], [], []
    for d, task in zip(dirs, tasks):
        model, base = bert.from_pretrained(model_dir, num_labels=task.num_labels)
        loaded.append(load_adapter(d, model, base))
        dev_ds = G.load_glue(task, "validation", args.data_dir)
        devs.append(G.encode(dev_ds, tokenizer, task, 128))
        models.append(model)
        bases.append(base)
    (ta, da, pa), (tb, db, pb) = loaded
    combos = combinations(ta.config, da, tb.config, db)
    rows = []
    for name, (cfg, delta) in combos.items():
        row = {"combination": name, "rank": cfg.r}
        for label, task, model, params, dev in zip("AB", tasks, models, (pa, pb), devs):
            row[f"{label}:{task.name}"] = evaluate(model, lora(cfg), params, delta, task, dev)
        rows.append(row)
        print(name, {k: v for k, v in row.items() if ":" in k}, flush=True)
    keys = [f"A:{tasks[0].name}", f"B:{tasks[1].name}"]
    lines = [f"| combination | rank | {tasks[0].name} ({tasks[0].main_metric}) | {tasks[1].name} ({tasks[1].main_metric}) |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['combination']} | {r['rank']} | " + " | ".join(
            f"{100 * r[k][t.main_metric]:.1f}" for k, t in zip(keys, tasks)) + " |")
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    note = (f"`python -m experiments.arithmetic --a={args.a} --b={args.b}`: A = {tasks[0].name}, B = "
            f"{tasks[1].name}; each task evaluated with its own trained head; {time.perf_counter() - t0:.0f} s.")
    atomic_write_text(out / "results.md", note + "\n\n" + md + "\n")
    atomic_write_text(out / "results.json", json.dumps({"note": note, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
