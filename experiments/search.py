"""The documented learning-rate search for GLUE cells that stay at the majority class.

    python -m experiments.search --from=results/glue --out=results/glue/search
    python -m experiments.search --from=results/glue --tasks=cola --methods=prefix --dry-run

A cell *fails* when its run at ``--seed-of`` (default 0) in ``<from>/runs/`` ends at or below the
majority class on the task's main metric. For every failing cell this runs the cell's recipe
with its learning rate (the ``lr`` of that run's recorded recipe) times each ``--factors`` entry
(default ×3 and ×0.3) at ``--seed`` (default 42, a seed that is never reported), one
``python -m experiments.sweep`` cell per setting, tagged ``lr<value>``: runs in
``<out>/runs/<task>-<method>~lr<value>-s42/`` and rows ``<method>~lr<value>`` in
``<out>/results.md``. The recipe's own value is the failing run itself, so it is not rerun.
Group multipliers (``group_lr``) are relative to ``lr`` and scale with it. Choosing is left to the
reader of the table, on the dev set, as the papers do (``results/glue/PLAN.md``); the chosen
value goes into the method's ``configs/<method>.toml`` ``[tasks.<task>]`` table before the
reported seeds are run. Finished settings are skipped, so the search resumes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from experiments.sweep import Runner, _run_logged, check_name, seeded_runs
from experiments.sweep import main as sweep_main


def failing_cells(runs: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The runs at ``seed`` whose main metric is at or below the task's majority class (labels
    with a search tag ``~`` are not cells of the table and are left out)."""
    out = []
    for run in runs:
        if run.get("seed") != seed or "~" in run["label"]:
            continue
        main = run.get("main_metric")
        value, majority = run["metrics"].get(main), run.get("majority_baseline", {}).get(main)
        if value is not None and majority is not None and value <= majority:
            out.append(run)
    return sorted(out, key=lambda r: (r["task"], r["label"]))


def search_settings(run: dict[str, Any], factors: list[float]) -> list[tuple[str, str]]:
    """``(tag, lr)`` for each factor times the run's recorded ``lr``; a run without its recipe is
    a ``ValueError`` naming it."""
    lr = run.get("config", {}).get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ValueError(f"{run['task']}-{run['label']}-s{run.get('seed')}: its summary.json records no "
                         "learning rate (\"config\": {\"lr\": ...}); rebuild it with python -m "
                         "experiments.sweep --rebuild --collect-from=<the sweep's --out>")
    values = [f"{lr * f:.3g}" for f in factors]
    return [(f"lr{v}", v) for v in values]


def _factors(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 3,0.3") from None
    if not values or any(not v > 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct factors > 0, e.g. 3,0.3")
    return values


def main(argv: list[str] | None = None, runner: Runner = _run_logged) -> int:
    """The CLI; ``runner`` runs one cell's command (tests fake it, as for the sweep)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", default="results/glue",
                        help="the seeded sweep's --out folder whose runs decide which cells fail")
    parser.add_argument("--out", default="results/glue/search")
    parser.add_argument("--tasks", default=None, help="only these tasks (comma-separated)")
    parser.add_argument("--methods", default=None, help="only these method labels (comma-separated)")
    parser.add_argument("--seed-of", type=int, default=0, help="the reported seed whose runs decide")
    parser.add_argument("--seed", type=int, default=42, help="the search's own seed (never reported)")
    parser.add_argument("--factors", type=_factors, default=[3.0, 0.3],
                        help="learning-rate factors relative to the failing run's lr")
    parser.add_argument("--dry-run", action="store_true", help="list the failing cells and settings only")
    args = parser.parse_args(argv)
    source = Path(args.source)
    if not (source / "runs").is_dir():
        parser.error(f"--from={source} has no runs/ folder; give the --out folder of a seeded sweep")
    if args.seed == args.seed_of:
        parser.error(f"--seed={args.seed} is the reported seed --seed-of; search at a seed that is never reported")
    wanted = {}
    for flag, text in (("tasks", args.tasks), ("methods", args.methods)):
        if text is not None:
            names = text.split(",")
            for n in names:
                try:
                    check_name(n, flag[:-1])
                except ValueError as err:
                    parser.error(str(err))
            wanted[flag] = set(names)
    from experiments.common import CliError

    try:
        cells = [r for r in failing_cells(seeded_runs(source), args.seed_of)
                 if r["task"] in wanted.get("tasks", {r["task"]})
                 and r["label"] in wanted.get("methods", {r["label"]})]
        plan = [(r, search_settings(r, args.factors)) for r in cells]
    except (CliError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    for run, settings in plan:
        main_metric = run["main_metric"]
        print(f"{run['task']} {run['label']}: {main_metric} {run['metrics'][main_metric]:.4f} at seed "
              f"{args.seed_of} (majority {run['majority_baseline'][main_metric]:.4f}), lr "
              f"{run['config']['lr']:g} -> search {', '.join(lr for _, lr in settings)}", flush=True)
    if not plan:
        print(f"no failing cells at seed {args.seed_of} in {source}/runs")
    if args.dry_run:
        return 0
    status = 0
    for run, settings in plan:
        for tag, lr in settings:
            code = sweep_main([f"--out={args.out}", f"--tasks={run['task']}", f"--methods={run['label']}",
                               f"--seeds={args.seed}", f"--tag={tag}", f"--extra=--lr={lr}"], runner=runner)
            status = max(status, code)
    return status


if __name__ == "__main__":
    sys.exit(main())
