"""Quality over a quantized base: collect the runs of ``experiments.glue`` / ``experiments.e2e``
that differ only in ``--base-dtype`` and write their metrics side by side.

    python -m experiments.glue --method=lora --seed=0 --max-steps=300 --eval-every=300 \\
        --base-dtype=int8 --output-dir=runs/quant/sst2-lora-int8      # and float32, nf4
    python -m benchmarks.quant_quality runs/quant/sst2-lora-float32 runs/quant/sst2-lora-int8 ...

The first run given is the reference; every other row reports its difference in points. A run
without ``summary.json`` (stopped early) is reported with its last evaluation. Writes
``benchmarks/results/quant_quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def read_run(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("split") == "dev"]
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    last = evals[-1] if evals else {}
    metric = summary["main_metric"] if summary and "main_metric" in summary else next(
        (k for k in last if k not in ("split", "step", "wall_s")), None)
    if summary and "main_metric" not in summary:  # experiments.e2e: the decoded test MRs' BLEU
        metric, last = "BLEU", {**last, "BLEU": summary["metrics"]["BLEU"], "step": summary["steps"]}
    compute = config.get("compute", config)
    return {"run": str(folder), "task": summary["task"] if summary else config.get("task", "e2e"),
            "base_dtype": compute.get("base_dtype"), "seed": config.get("seed", config.get("train", {}).get("seed")),
            "finished": summary is not None, "step": last.get("step"), "metric": metric,
            "value": last.get(metric), "train_steps_done": max((r["step"] for r in rows if r.get("split") == "train"),
                                                               default=0),
            "wall_s": summary.get("wall_s") if summary else None}


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories; the first is the reference")
    parser.add_argument("--name", default="quant_quality")
    parser.add_argument("--cpu", default="", help="the CPU model the runs used (lscpu)")
    args = parser.parse_args(argv)
    runs = [read_run(Path(r)) for r in args.runs]
    ref = runs[0]
    lines = [f"Same seed, only `--base-dtype` differs; reference: {ref['base_dtype']}. {args.cpu}", "",
             "| task | base | steps | metric | value | Δ vs reference (points; a loss in nats) | finished | wall s |",
             "|---|---|---:|---|---:|---:|---|---:|"]
    for r in runs:
        scale = 100.0 if r["metric"] in ("accuracy", "f1", "matthews_correlation") else 1.0
        value = "–" if r["value"] is None else f"{r['value'] * scale:.2f}"
        delta = ("–" if r["value"] is None or ref["value"] is None or r is ref or r["metric"] != ref["metric"]
                 else f"{(r['value'] - ref['value']) * scale:+.2f}")
        lines.append(f"| {r['task']} | {r['base_dtype']} | {r['train_steps_done']} | {r['metric']} | {value} | "
                     f"{delta} | {'yes' if r['finished'] else 'no'} | {r['wall_s'] or '–'} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(
        {"command": "python -m benchmarks.quant_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
         "cpu": args.cpu, "runs": runs, "table": table}, indent=2) + "\n")
    atomic_write_text(RESULTS / f"{args.name}.md", "# Quantized base: quality\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
