"""Run a method × task grid of the GLUE experiment and write a results table.

    python -m experiments.sweep --methods=full,lora,ia3 --tasks=sst2,mrpc --out=results/glue
    python -m experiments.sweep --methods=lora --tasks=sst2 --extra="--max-steps=200"
    python -m experiments.sweep --methods=lora,lora@all_linear --tasks=sst2
    python -m experiments.sweep --tasks=e2e --methods=full,lora,prefix,houlsby,freeze --out=results/e2e

    python -m experiments.sweep --seeds=0,1,2 --methods=lora,houlsby --tasks=mrpc,rte
    python -m experiments.sweep --rebuild --out=results/glue
    python -m experiments.sweep --rebuild --collect-from=/work/sweep_wt/results/glue --out=results/glue

A method written ``METHOD@VARIANT`` adds ``--config=configs/variants/<METHOD>_<VARIANT>.toml``.

Each cell runs ``python -m experiments.glue`` (``experiments.e2e`` for the task ``e2e``, whose
variants live in ``configs/e2e/variants``) in its own process (its own memory and
compilation cache) with the recipe of ``configs/`` plus ``--extra`` flags, and reads back its
``summary.json``. Finished cells are skipped when the sweep is started again, so a sweep can be
stopped and resumed. Results go to ``<out>/results.json`` and ``<out>/results.md``; a GLUE table
also rewrites ``<out>/claims.{json,md}``, the papers' claims next to it (``experiments.claims``).

With ``--seeds=0,1,2`` every cell runs once per seed (seed-major: every cell at the first seed,
then the next seed), each in ``<out>/runs/<task>-<method>-s<seed>/``, and the table gives the mean
± the sample standard deviation over the seeds with the number of seeds per cell. The run's
recipe (its ``config.json``) is stored in its ``summary.json`` under ``"config"`` and its dev
evaluations under ``"evals"``, so ``--rebuild`` rewrites the table from the stored summaries
alone. A finished run's ``checkpoints/`` folder is deleted (``--no-prune-checkpoints`` keeps it);
an unfinished run keeps it and resumes from it. ``--tag=NAME`` labels a seeded sweep's cells
``<method>~NAME`` (a search's settings side by side). The exit code is 1 when a run failed (the
table still shows the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.claims import write_claims
from experiments.common import RANGES, CliError, check_method_spec, reading
from jpeft.checkpoint.atomic import atomic_write_text
from jpeft.train.optim import check_number

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


SEEDED_RECIPES = (
    "Recipes: `configs/tasks/<task>.toml` and `configs/<method>.toml` with its `[tasks.<task>]` "
    "table (each file cites the paper its settings come from); every run's full recipe is the "
    "`config` of its `runs/<task>-<method>-s<seed>/summary.json`. The final evaluation is reported "
    "(no best-checkpoint selection). A dagger: the cell's seeds ran with different recipes. Wall "
    "time: mean per run; it depends on what else shared the 2 cores.")
# A run's recipe without what differs between its seeds or does not change the result.
NOT_RECIPE = ("seed", "output_dir", "progress", "data_dir", "resume", "log_every", "eval_every",
              "save_every", "keep_checkpoints", "allow_base_mismatch")
Runner = Callable[[list[str], Path], int]
# The seeded table's row order (other labels follow, sorted).
ROW_ORDER = ("full", "lora", "lora@all_linear", "lora@dora", "ia3", "bitfit", "houlsby", "pfeiffer",
             "prefix", "ptuning2", "prompt", "ptuning", "freeze", "diff_pruning")


def _run_logged(cmd: list[str], log: Path) -> int:
    with log.open("w") as fh:
        return subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)


def run_name(task: str, label: str, seed: int | None = None) -> str:
    """The run folder's name: ``<task>-<label>``, with ``-s<seed>`` in a seeded sweep."""
    return f"{task}-{label}" if seed is None else f"{task}-{label}-s{seed}"


def check_name(name: str, what: str) -> None:
    """Refuse a method or task name that would leave the run or config folder."""
    if not name or "/" in name or "\\" in name or ".." in name:
        raise ValueError(f"{what} {name!r}: names may not be empty or contain '/', '\\' or '..' "
                         "(they become file and folder names)")


# What a run's summary.json must hold for the tables (experiments.glue and experiments.e2e write them).
SUMMARY_KEYS = ("task", "metrics", "trainable_params", "trainable_percent", "wall_s")


def _fix(path: Path) -> str:
    return (f"Restore {path.name} or delete its run folder {path.parent} (a sweep then runs that "
            "cell again).")


def read_json(path: Path, fix: str) -> Any:
    """``path``'s JSON; unreadable or malformed: a :class:`CliError` naming the file and ``fix``."""
    with reading(str(path), fix):
        return json.loads(path.read_text(encoding="utf-8"))


def read_summary(path: Path) -> dict[str, Any]:
    """A run's ``summary.json``, refused (naming the file) when it is not a finished run's summary."""
    data = read_json(path, _fix(path))
    missing = [k for k in SUMMARY_KEYS if k not in data] if isinstance(data, dict) else list(SUMMARY_KEYS)
    if missing or not isinstance(data["metrics"], dict):
        raise CliError(f"{path}: not a finished run's summary (it lacks {', '.join(missing) or 'a metrics object'}). "
                       f"{_fix(path)}")
    return data


def _summary_with_recipe(run_dir: Path) -> tuple[dict[str, Any], bool]:
    """The run's summary with its ``config.json`` as ``"config"`` and its dev evaluations
    (``metrics.jsonl``'s dev records) as ``"evals"``, and whether either was added."""
    summary = read_summary(run_dir / "summary.json")
    config, metrics = run_dir / "config.json", run_dir / "metrics.jsonl"
    changed = False
    if "config" not in summary and config.is_file():
        summary["config"] = read_json(config, _fix(config))
        changed = True
    if "evals" not in summary and metrics.is_file():
        with reading(str(metrics), _fix(metrics)):
            records = [json.loads(line) for line in metrics.read_text().splitlines() if '"dev"' in line]
        summary["evals"] = [r for r in records if r.get("split") == "dev"]
        changed = True
    return summary, changed


def _with_recipe(run_dir: Path) -> dict[str, Any]:
    """The run's summary, its recipe and dev evaluations stored in its ``summary.json`` (once)."""
    summary, changed = _summary_with_recipe(run_dir)
    if changed:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def variant_file(entry: str, task: str) -> Path:
    """The settings file that ``METHOD@VARIANT`` adds to its cell's run (``configs/variants/``, or
    ``configs/e2e/variants/`` for the task ``e2e``)."""
    method, _, variant = entry.partition("@")
    variants = VARIANTS.parent / "e2e" / "variants" if task == "e2e" else VARIANTS
    return variants / f"{method}_{variant}.toml"


def check_variants(methods: Sequence[str], tasks: Sequence[str]) -> None:
    """Refuse a ``METHOD@VARIANT`` whose settings file does not exist, before any cell runs."""
    for entry in methods:
        if "@" not in entry:
            continue
        for task in tasks:
            path = variant_file(entry, task)
            if not path.is_file():
                known = sorted(p.name for p in path.parent.glob("*.toml"))
                raise ValueError(f"--methods: {entry!r} needs {path}, which does not exist (files "
                                 f"there: {', '.join(known) or 'none'})")


def run_cell(entry: str, task: str, run_dir: Path, extra: list[str], seed: int | None = None,
             runner: Runner = _run_logged, prune: bool = False, tag: str = "") -> dict[str, Any] | None:
    """Run (or read back) one cell; ``entry`` is ``METHOD`` or ``METHOD@VARIANT``; ``seed`` adds
    ``--seed``; ``tag`` labels the cell ``<entry>~<tag>``. ``prune`` deletes the finished run's
    ``checkpoints/``."""
    method, _, variant = entry.partition("@")
    summary = run_dir / "summary.json"
    if not summary.is_file():
        variant_flags = [f"--config={variant_file(entry, task)}"] if variant else []
        experiment = ["experiments.e2e"] if task == "e2e" else ["experiments.glue", f"--task={task}"]
        seed_flag = [] if seed is None else [f"--seed={seed}"]
        cmd = [sys.executable, "-m", *experiment, f"--method={method}", f"--output-dir={run_dir}",
               "--progress=false", *seed_flag, *variant_flags, *extra]
        print("$", shlex.join(cmd), flush=True)
        log = run_dir.parent / f"{run_dir.name}.log"  # not with_suffix: a tag may hold a dot (lr1.5e-4)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        code = runner(cmd, log)
        if code != 0 or not summary.is_file():
            print(f"  failed (exit {code}); see {log}", flush=True)
            return None
    if prune:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {**_with_recipe(run_dir), "label": f"{entry}~{tag}" if tag else entry}


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in metrics.values())


def _table_rows(by: dict[tuple[str, str], dict[str, Any]], fmt: Callable[[dict[str, Any]], str]) -> list[str]:
    """The GLUE table's lines (header, majority class, one row per method) for the cells ``by``
    (label, task); ``fmt`` writes one cell."""
    tasks = sorted({t for _, t in by})
    methods = list(dict.fromkeys(m for m, _ in by))
    first = {t: by[next(m for m in methods if (m, t) in by), t] for t in tasks}
    header = "| method | trainable params (%) | " + " | ".join(
        f"{t} ({'/'.join(first[t]['metrics'])})" for t in tasks) + " |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    majority = {t: first[t].get("majority_baseline", {}) for t in tasks}
    lines.append("| majority class | – | " + " | ".join(_fmt_metrics(majority[t]) for t in tasks) + " |")
    for m in methods:
        any_cell = next(by[m, t] for t in tasks if (m, t) in by)
        row = [m, f"{any_cell['trainable_params']:,d} ({any_cell['trainable_percent']:.2f}%)"]
        row += [fmt(by[m, t]) if (m, t) in by else "–" for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_table(cells: list[dict[str, Any]], out: Path, note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps({"note": note, "cells": cells}, indent=2))
    lines = _table_rows({(c["label"], c["task"]): c for c in cells},
                        lambda c: f"{_fmt_metrics(c['metrics'])} ({c['wall_s'] / 60:.1f} min)")
    body = "\n".join(lines)
    atomic_write_text(out / "results.md", f"{note}\n\n{body}\n\n{GLUE_RECIPES}\n")
    write_claims(cells, out)
    print("\n".join(lines))


def recipe(run: dict[str, Any]) -> dict[str, Any]:
    """The run's recipe: its ``config`` without the seed and bookkeeping flags."""
    return {k: v for k, v in run.get("config", {}).items() if k not in NOT_RECIPE}


def _differ(a: Any, b: Any) -> bool:
    """Whether two configs differ on a setting both have (a setting only one has was added to
    jpeft between the runs, and the older run used what is now its default)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return any(_differ(a[k], b[k]) for k in a.keys() & b.keys())
    return a != b


def same_recipe(runs: list[dict[str, Any]]) -> bool:
    """Whether all ``runs`` share one recipe (see :func:`_differ`)."""
    return not any(_differ(recipe(runs[0]), recipe(r)) for r in runs[1:])


def aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The seeded runs grouped into cells keyed by (label, task): per metric the mean and the
    sample standard deviation (0 for one seed), the seeds, the mean wall time, whether the mean
    main metric is above the majority class, and whether the seeds' recipes differ."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    rank = {label: i for i, label in enumerate(ROW_ORDER)}
    for r in sorted(runs, key=lambda r: (rank.get(r["label"], len(rank)), r["label"], r["seed"])):
        groups.setdefault((r["label"], r["task"]), []).append(r)
    cells = {}
    for (label, task), rs in groups.items():
        names = list(rs[0]["metrics"])
        values = {k: [r["metrics"][k] for r in rs] for k in names}
        mean = {k: statistics.fmean(v) for k, v in values.items()}
        std = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
        main = rs[0].get("main_metric", names[0])
        majority = rs[0].get("majority_baseline", {})
        cells[label, task] = {
            "task": task, "label": label, "seeds": [r["seed"] for r in rs], "n": len(rs),
            "metrics": mean, "std": std, "main_metric": main, "majority_baseline": majority,
            "above_majority": mean[main] > majority.get(main, float("-inf")),
            "mixed_recipes": not same_recipe(rs),
            "trainable_params": rs[0]["trainable_params"], "trainable_percent": rs[0]["trainable_percent"],
            "wall_s": statistics.fmean(r["wall_s"] for r in rs),
        }
    return cells


def _fmt_seeded(cell: dict[str, Any]) -> str:
    values = " / ".join(f"{100 * v:.1f}" + (f" ± {100 * cell['std'][k]:.1f}" if cell["n"] > 1 else "")
                        for k, v in cell["metrics"].items())
    return f"{values}{' †' if cell['mixed_recipes'] else ''} (n={cell['n']}, {cell['wall_s'] / 60:.0f} min)"


def write_seeded_table(runs: list[dict[str, Any]], out: Path, note: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``<out>/results.{json,md}`` of a seeded sweep: mean ± sample std over seeds per cell, the
    number of seeds, and how many cells' mean main metric is above the majority class."""
    cells = aggregate(runs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(
        {"note": note, "cells": list(cells.values()), "runs": runs}, indent=2))
    lines = _table_rows(cells, _fmt_seeded)
    above = sum(c["above_majority"] for c in cells.values())
    mains = ", ".join(sorted({f"{c['task']}: {c['main_metric']}" for c in cells.values()}))
    count = f"Cells whose mean main metric ({mains}) is above the majority class: {above} of {len(cells)}."
    body = "\n".join(lines)
    atomic_write_text(out / "results.md", f"{note}\n\n{body}\n\n{count}\n\n{SEEDED_RECIPES}\n")
    write_claims(list(cells.values()), out, runs=runs)
    print("\n".join(lines) + "\n" + count)
    return cells


def write_e2e_table(cells: list[dict[str, Any]], out: Path, note: str) -> None:
    """The E2E table: the five metrics (BLEU on 0–100, the others as the scorers return them),
    dev loss before → after, parameters trained and stored (the adapter after finalize), wall time."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps({"note": note, "cells": cells}, indent=2))
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
    atomic_write_text(out / "results.md", f"{note}\n\n{body}\n")
    print("\n".join(lines))


def seeded_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished seeded run under ``<out>/runs/<task>-<label>-s<seed>/summary.json``, with
    its label (from the folder's name); the summaries are the only source."""
    runs = []
    for summary in sorted((out / "runs").glob("*/summary.json")):
        data = read_summary(summary)
        prefix, suffix = f"{data.get('task')}-", f"-s{data.get('seed')}"
        name = summary.parent.name
        if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix):
            runs.append({**data, "label": name[len(prefix):-len(suffix)]})
    return runs


def collect(src: Path, out: Path) -> list[str]:
    """Copy every finished seeded run's ``summary.json`` under ``<src>/runs`` (with its recipe
    and dev evaluations added; the source is only read, a sweep may be writing there) into
    ``<out>/runs/<same name>/``; only the summary travels (no checkpoints, adapters or per-step
    logs). Returns the copied names."""
    copied = []
    # every summary read (and checked) before any is written: a damaged one copies nothing
    found = [(s.parent.name, _summary_with_recipe(s.parent)[0])
             for s in sorted((src / "runs").glob("*/summary.json"))]
    for name, data in found:
        if not name.endswith(f"-s{data.get('seed')}"):
            continue
        dest = out / "runs" / name
        dest.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest / "summary.json", json.dumps(data, indent=2))
        copied.append(name)
    return copied


def cpu_name() -> str:
    """The CPU's model name (as lscpu gives it) and the number of cores."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def previous_cells(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The cells of an earlier ``<out>/results.json`` and of every finished run in
    ``<out>/runs/<task>-<label>/summary.json`` (these win), keyed by (label, task)."""
    path = out / "results.json"
    cells = {}
    if path.is_file():
        data = read_results(path)
        if "runs" not in data:  # a seeded sweep's table holds means, not runs
            cells = {(c["label"], c["task"]): c for c in data["cells"]}
    for summary in sorted((out / "runs").glob("*/summary.json")):
        data = read_summary(summary)
        prefix = f"{data['task']}-"
        name = summary.parent.name
        if name.startswith(prefix) and not name.endswith(f"-s{data.get('seed')}"):  # not seeded runs
            label = name[len(prefix):]
            cells[label, data["task"]] = {**data, "label": label}
    return cells


def read_results(path: Path) -> dict[str, Any]:
    """An earlier ``results.json`` (a note and cells with label and task), else a :class:`CliError`."""
    fix = (f"Restore it, or delete it: --rebuild writes it anew from {path.parent}/runs (cells "
           "without a run folder there are then lost).")
    data = read_json(path, fix)
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list) or not all(
            isinstance(c, dict) and {"label", "task", "metrics"} <= c.keys() for c in data["cells"]):
        raise CliError(f"{path}: not a sweep's results.json (a \"cells\" list, each cell with "
                       f"label, task and metrics). {fix}")
    return data


def seeded_note(runs: list[dict[str, Any]]) -> str:
    models = ", ".join(sorted({str(r.get("model", "?")).rstrip("/").split("/")[-1] for r in runs}))
    return (f"GLUE dev results of `python -m experiments.sweep --seeds=...`: {len(runs)} run{'s' if len(runs) != 1 else ''} of "
            f"{models}, one process each, every run's `summary.json` (with its recipe) under `runs/`; "
            f"`python -m experiments.sweep --rebuild` rewrites this table from them. Each cell: the mean "
            f"± the sample standard deviation over its seeds (n = number of seeds), in points, on "
            f"{cpu_name()}.")


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds={text!r}: give comma-separated integers without empty entries, "
                         "e.g. --seeds=0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds={text!r}: give distinct comma-separated integers, e.g. --seeds=0,1,2")
    low, high, low_in, high_in, integer, _ = RANGES["seed"]
    for seed in seeds:
        check_number("--seeds entry", seed, low, high, low_in, high_in, integer)
    return seeds


def split_extra(text: str) -> list[str]:
    """``--extra``'s flags, split as a shell would; an unclosed quote is a ``ValueError`` naming it."""
    try:
        return shlex.split(text)
    except ValueError as err:
        raise ValueError(f"--extra={text!r}: {err}; quote the flags as in a shell, e.g. "
                         "--extra='--lr=3e-4'") from None


def check_grid(methods: Sequence[str], tasks: Sequence[str]) -> None:
    """Refuse unknown or repeated tasks and methods before any cell runs (each cell would fail)."""
    from jpeft.data.glue import get_task

    for what, names in (("--methods", methods), ("--tasks", tasks)):
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{what} names {', '.join(repeated)} twice; give each once")
    for task in tasks:
        if task != "e2e":
            try:
                get_task(task)
            except ValueError as err:
                raise ValueError(f"--tasks: {err} (or e2e)") from None
    for entry in methods:
        try:
            check_method_spec(entry.partition("@")[0])
        except ValueError as err:
            raise ValueError(f"--methods: {err}".replace("--method=", "method ")) from None


def main(argv: list[str] | None = None, runner: Runner = _run_logged) -> int:
    """The CLI; ``runner(cmd, log_path) -> exit code`` runs one cell's command (tests fake it)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="full,lora,houlsby,pfeiffer,prefix,prompt,ptuning,"
                        "ptuning2,bitfit,freeze,diff_pruning,ia3")
    parser.add_argument("--tasks", default="sst2,mrpc,rte,stsb,cola")
    parser.add_argument("--out", default="results/glue")
    parser.add_argument("--extra", default="", help="flags passed to every cell")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds: every cell runs once per seed, in "
                             "<out>/runs/<task>-<method>-s<seed>/, and the table gives mean ± std")
    parser.add_argument("--tag", default="",
                        help="seeded sweeps: label the cells <method>~<tag> (their own run folders and "
                             "table rows), e.g. for a learning-rate search with --extra=--lr=3e-3")
    parser.add_argument("--merge", default=True, action=argparse.BooleanOptionalAction,
                        help="keep the cells already in <out>/results.json (a rerun cell replaces its old "
                             "value); --no-merge writes only this invocation's cells (seeded sweeps "
                             "always tabulate every seeded run on disk)")
    parser.add_argument("--prune-checkpoints", default=True, action=argparse.BooleanOptionalAction,
                        help="delete a finished seeded run's checkpoints/ (its summary, metrics and "
                             "adapter stay)")
    parser.add_argument("--rebuild", action="store_true",
                        help="run nothing: rewrite <out>/results.{md,json} from the runs' summary.json "
                             "files (a seeded table when <out>/runs holds seeded runs)")
    parser.add_argument("--collect-from", default=None, metavar="DIR",
                        help="with --rebuild: first copy the finished seeded runs' summary.json files "
                             "from DIR/runs (e.g. a sweep running in another worktree) into <out>/runs")
    args = parser.parse_args(argv)
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    try:
        for m in methods:
            check_name(m, "method")
        for t in tasks:
            check_name(t, "task")
        seeds = _parse_seeds(args.seeds)
        if not args.rebuild:
            check_grid(methods, tasks)
            check_variants(methods, tasks)
            split_extra(args.extra)
        if args.tag:
            check_name(args.tag, "tag")
            if seeds is None:
                raise ValueError("--tag needs --seeds")
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    if args.collect_from is not None and not args.rebuild:
        parser.error("--collect-from goes with --rebuild")
    if args.collect_from is not None and not (Path(args.collect_from) / "runs").is_dir():
        parser.error(f"--collect-from={args.collect_from} has no runs/ folder; give the --out folder "
                     "of the sweep to copy from")
    if out.exists() and not out.is_dir():
        parser.error(f"--out={out} is a file; pass a folder (it is created if missing)")
    try:
        return _sweep(args, seeds, methods, tasks, out, runner)
    except CliError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


def _sweep(args: argparse.Namespace, seeds: list[int] | None, methods: list[str], tasks: list[str],
           out: Path, runner: Runner) -> int:
    """Rebuild the table or run the grid (``main`` has checked the arguments)."""
    if args.rebuild:
        if args.collect_from is not None:
            names = collect(Path(args.collect_from), out)
            print(f"collected {len(names)} run(s) from {args.collect_from}: {', '.join(names)}")
        runs = seeded_runs(out)
        if runs or seeds is not None:
            if not runs:
                print(f"no seeded runs under {out}/runs", file=sys.stderr)
                return 1
            write_seeded_table(runs, out, seeded_note(runs))
            return 0
        cells = list(previous_cells(out).values())
        if not cells:
            print(f"nothing to rebuild: {out} holds no results.json cells and no runs/*/summary.json; "
                  "pass the --out folder of a sweep", file=sys.stderr)
            return 1
        note = read_results(out / "results.json").get("note", "") if (out / "results.json").is_file() \
            else f"Results rebuilt from {out}/runs on {cpu_name()}."
        glue = [c for c in cells if c["task"] != "e2e"]
        e2e = [c for c in cells if c["task"] == "e2e"]
        if e2e:
            write_e2e_table(e2e, out, note)
        if glue:
            write_table(glue, out, note)
        return 0
    extra = split_extra(args.extra)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"--out={out} cannot be created ({err.strerror or err}); choose a folder you "
                       "can write to") from None
    t0 = time.time()
    failed: list[str] = []
    if seeds is not None:
        for seed in seeds:
            for task in tasks:
                for method in methods:
                    name = run_name(task, f"{method}~{args.tag}" if args.tag else method, seed)
                    summary = run_cell(method, task, out / "runs" / name, extra, seed=seed,
                                       runner=runner, prune=args.prune_checkpoints, tag=args.tag)
                    if summary is None:
                        failed.append(name)
                        continue
                    runs = seeded_runs(out)  # every seeded run on disk, this sweep's and earlier ones
                    write_seeded_table(runs, out, seeded_note(runs))
    else:
        cells = previous_cells(out) if args.merge else {}
        for task in tasks:
            for method in methods:
                summary = run_cell(method, task, out / "runs" / run_name(task, method), extra,
                                   runner=runner)
                if summary is None:
                    failed.append(run_name(task, method))
                    continue
                if args.merge:  # other sweeps may have written cells meanwhile
                    cells.update(previous_cells(out))
                cells[summary["label"], summary["task"]] = summary
                if task == "e2e":
                    c = summary
                    search = "greedy search" if c["num_beams"] == 1 else f"beam search ({c['num_beams']} beams)"
                    note = (f"E2E NLG results of `python -m experiments.sweep --tasks=e2e` (cells merged over "
                            f"runs; the last: `--methods={args.methods}` {args.extra}), {c['model']}, seed "
                            f"{c['seed']}, {c['steps']} steps on {c['train_pairs']} training pairs, "
                            f"{c['decoded_mrs']} {c['decode_split']} MRs decoded with {search}, one run per "
                            f"cell, on {cpu_name()}.")
                    write_e2e_table([v for v in cells.values() if v["task"] == "e2e"], out, note)
                    continue
                note = (f"GLUE dev results of `python -m experiments.sweep` (cells merged over runs; "
                        f"the last: `--methods={args.methods} --tasks={args.tasks}` {args.extra}), "
                        f"all-MiniLM-L6-v2, seed 0, one run per cell, on {cpu_name()}. Wall time per "
                        "cell in brackets.")
                write_table([v for v in cells.values() if v["task"] != "e2e"], out, note)
    print(f"sweep done in {(time.time() - t0) / 60:.1f} min")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
