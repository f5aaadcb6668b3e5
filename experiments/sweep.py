"""Run a method × task grid of the GLUE experiment and write a results table.

    python -m experiments.sweep --methods=full,lora,ia3 --tasks=sst2,mrpc --out=results/glue
    python -m experiments.sweep --methods=lora --tasks=sst2 --extra="--max-steps=200"
    python -m experiments.sweep --methods=lora,lora@all_linear --tasks=sst2
    python -m experiments.sweep --tasks=e2e --methods=full,lora,prefix,houlsby,freeze --out=results/e2e

A method written ``METHOD@VARIANT`` adds ``--config=configs/variants/<METHOD>_<VARIANT>.toml``.

Each cell runs ``python -m experiments.glue`` (``experiments.e2e`` for the task ``e2e``, whose
variants live in ``configs/e2e/variants``) in its own process (its own memory and
compilation cache) with the recipe of ``configs/`` plus ``--extra`` flags, and reads back its
``summary.json``. Finished cells are skipped when the sweep is started again, so a sweep can be
stopped and resumed. Results go to ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = Path(__file__).resolve().parents[1] / "configs" / "variants"
GLUE_RECIPES = (
    "Recipes: the task files in `configs/tasks/` (800 steps of batch 32 on SST-2; 5 epochs on MRPC, "
    "580 steps; 5 epochs on RTE, 405 steps; 3 epochs on CoLA, 807 steps; 3 epochs on STS-B, 543 "
    "steps) and the method files "
    "`configs/<method>.toml` (learning rates and sizes, and their `[tasks.<task>]` overrides: LoRA "
    "trains 1,600 steps on SST-2, prefix tuning 10 epochs on MRPC, P-tuning's head at lr 1e-2 on "
    "MRPC); "
    "`METHOD@VARIANT` adds `configs/variants/<method>_<variant>.toml`. Wall times depend on what "
    "else shared the 2 cores and are not comparable with one another. A dash: not run yet.")


def run_cell(entry: str, task: str, run_dir: Path, extra: list[str]) -> dict[str, Any] | None:
    """Run (or read back) one cell; ``entry`` is ``METHOD`` or ``METHOD@VARIANT``."""
    method, _, variant = entry.partition("@")
    summary = run_dir / "summary.json"
    if summary.is_file():
        return {**json.loads(summary.read_text()), "label": entry}
    variants = VARIANTS.parent / "e2e" / "variants" if task == "e2e" else VARIANTS
    variant_flags = [f"--config={variants / f'{method}_{variant}.toml'}"] if variant else []
    experiment = ["experiments.e2e"] if task == "e2e" else ["experiments.glue", f"--task={task}"]
    cmd = [sys.executable, "-m", *experiment, f"--method={method}",
           f"--output-dir={run_dir}", "--progress=false", *variant_flags, *extra]
    print("$", shlex.join(cmd), flush=True)
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0 or not summary.is_file():
        print(f"  failed (exit {code}); see {log}", flush=True)
        return None
    return {**json.loads(summary.read_text()), "label": entry}


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in metrics.values())


def write_table(cells: list[dict[str, Any]], out: Path, note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"note": note, "cells": cells}, indent=2))
    tasks = sorted({c["task"] for c in cells})
    methods = list(dict.fromkeys(c["label"] for c in cells))
    by = {(c["label"], c["task"]): c for c in cells}
    header = "| method | trainable params (%) | " + " | ".join(
        f"{t} ({'/'.join(by[next(m for m in methods if (m, t) in by), t]['metrics'])})" for t in tasks
    ) + " |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    majority = {t: by[next(m for m in methods if (m, t) in by), t].get("majority_baseline", {})
                for t in tasks}
    lines.append("| majority class | – | " + " | ".join(_fmt_metrics(majority[t]) for t in tasks) + " |")
    for m in methods:
        any_cell = next(by[m, t] for t in tasks if (m, t) in by)
        row = [m, f"{any_cell['trainable_params']:,d} ({any_cell['trainable_percent']:.2f}%)"]
        for t in tasks:
            c = by.get((m, t))
            row.append(f"{_fmt_metrics(c['metrics'])} ({c['wall_s'] / 60:.1f} min)" if c else "–")
        lines.append("| " + " | ".join(row) + " |")
    body = "\n".join(lines)
    (out / "results.md").write_text(f"{note}\n\n{body}\n\n{GLUE_RECIPES}\n")
    print("\n".join(lines))


def write_e2e_table(cells: list[dict[str, Any]], out: Path, note: str) -> None:
    """The E2E table: the five metrics (BLEU on 0–100, the others as the scorers return them),
    dev loss before → after, parameters trained and stored (the adapter after finalize), wall time."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"note": note, "cells": cells}, indent=2))
    lines = ["| method | trained params (%) | stored params | BLEU | NIST | METEOR | ROUGE-L | CIDEr | dev loss | wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        m = c["metrics"]
        stored = f"{c['stored_params']:,d}" if "stored_params" in c else "–"
        lines.append(f"| {c['label']} | {c['trainable_params']:,d} ({c['trainable_percent']:.2f}%) | {stored} | "
                     f"{m['BLEU']:.1f} | {m['NIST']:.2f} | {m['METEOR']:.3f} | {m['ROUGE_L']:.3f} | "
                     f"{m['CIDEr']:.2f} | {c['dev_loss_start']:.3f} → {c['dev_loss']:.3f} | "
                     f"{c['wall_s'] / 60:.1f} min |")
    body = "\n".join(lines)
    (out / "results.md").write_text(f"{note}\n\n{body}\n")
    print("\n".join(lines))


def previous_cells(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The cells of an earlier ``<out>/results.json`` and of every finished run in
    ``<out>/runs/<task>-<label>/summary.json`` (these win), keyed by (label, task)."""
    path = out / "results.json"
    cells = {}
    if path.is_file():
        cells = {(c["label"], c["task"]): c for c in json.loads(path.read_text())["cells"]}
    for summary in sorted((out / "runs").glob("*/summary.json")):
        data = json.loads(summary.read_text())
        prefix = f"{data['task']}-"
        name = summary.parent.name
        if name.startswith(prefix):
            label = name[len(prefix):]
            cells[label, data["task"]] = {**data, "label": label}
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="full,lora,houlsby,pfeiffer,prefix,prompt,ptuning,"
                        "ptuning2,bitfit,freeze,diff_pruning,ia3")
    parser.add_argument("--tasks", default="sst2,mrpc,rte,stsb,cola")
    parser.add_argument("--out", default="results/glue")
    parser.add_argument("--extra", default="", help="flags passed to every cell")
    parser.add_argument("--merge", default=True, action=argparse.BooleanOptionalAction,
                        help="keep the cells already in <out>/results.json (a rerun cell replaces its old "
                             "value); --no-merge writes only this invocation's cells")
    parser.add_argument("--rebuild", action="store_true",
                        help="run nothing: rewrite <out>/results.{md,json} from the cells on disk")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.rebuild:
        cells = list(previous_cells(out).values())
        machine = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
        note = json.loads((out / "results.json").read_text())["note"] if (out / "results.json").is_file() \
            else f"Results rebuilt from {out}/runs on {machine}."
        glue = [c for c in cells if c["task"] != "e2e"]
        e2e = [c for c in cells if c["task"] == "e2e"]
        if e2e:
            write_e2e_table(e2e, out, note)
        if glue:
            write_table(glue, out, note)
        return 0
    extra = shlex.split(args.extra)
    cells = previous_cells(out) if args.merge else {}
    t0 = time.time()
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            summary = run_cell(method, task, out / "runs" / f"{task}-{method}", extra)
            if summary is not None:
                if args.merge:  # other sweeps may have written cells meanwhile
                    cells.update(previous_cells(out))
                cells[summary["label"], summary["task"]] = summary
                machine = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
                if task == "e2e":
                    c = summary
                    search = "greedy search" if c["num_beams"] == 1 else f"beam search ({c['num_beams']} beams)"
                    note = (f"E2E NLG results of `python -m experiments.sweep --tasks=e2e` (cells merged over "
                            f"runs; the last: `--methods={args.methods}` {args.extra}), {c['model']}, seed "
                            f"{c['seed']}, {c['steps']} steps on {c['train_pairs']} training pairs, "
                            f"{c['decoded_mrs']} {c['decode_split']} MRs decoded with {search}, one run per "
                            f"cell, on {machine}.")
                    write_e2e_table([v for v in cells.values() if v["task"] == "e2e"], out, note)
                    continue
                note = (f"GLUE dev results of `python -m experiments.sweep` (cells merged over runs; "
                        f"the last: `--methods={args.methods} --tasks={args.tasks}` {args.extra}), "
                        f"all-MiniLM-L6-v2, seed 0, one run per cell, on {machine}. Wall time per "
                        "cell in brackets.")
                write_table([v for v in cells.values() if v["task"] != "e2e"], out, note)
    print(f"sweep done in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
