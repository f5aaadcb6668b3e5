"""The methods' papers' claims about full fine-tuning, side by side with what jpeft measured.

    python -m experiments.claims --results=results/glue/results.json      # claims.{json,md} next to it
    python -m experiments.claims --results=results/glue/results.json --out=/tmp/claims
    python -m experiments.claims --results=results/glue/results.json --readme=README.md

``--readme`` also rewrites the short claims table in the README, between the lines
``<!-- claims:begin -->`` and ``<!-- claims:end -->`` (:func:`readme_table`).

``python -m experiments.sweep`` rewrites ``claims.{json,md}`` whenever it (re)writes a GLUE
``results.md``. Each claim (:data:`CLAIMS`) names its source, the rows it compares with the
``full`` row, the tasks, a threshold ``t`` in points and a direction.

Verdict rule. For every (row, task) with both cells in the table, on the task's main metric
(accuracy on SST-2, MRPC and RTE, Pearson on STS-B, Matthews correlation on CoLA), in points
(×100): Δ = mean(row) − mean(full), with the sample standard deviations s_row and s_full over
each cell's seeds (0 for one seed), and the tolerance t + max(s_row, s_full).

* A ``within`` claim ("matches", "within about a point", "competitive", "close to") holds on the
  task when Δ ≥ −(t + max(s_row, s_full)): the row loses at most t points beyond the larger seed
  spread (any gain holds).
* A ``lags`` claim holds on the task when Δ < −(t + max(s_row, s_full)): the exact complement,
  so a lag has to exceed both the threshold and the seed spread, and a "matches" and a "lags"
  claim about the same two cells never both hold.

Over a claim's comparisons: ``holds`` when every measured one holds, ``holds partly`` when some
do, ``does not hold here`` when none does, ``not measured yet`` when none has both cells. The
verdict states how many seeds stand behind it (a cell of 1 seed is weak evidence) and lists the
comparisons still missing.

Claims left out: (IA)³ (Liu et al., 2022, arXiv:2205.05638) is evaluated few-shot (T-Few on T0,
held-out tasks and RAFT), not against full-data fine-tuning on GLUE; prefix tuning (Li and Liang,
2021, arXiv:2101.00190) on generation (E2E, WebNLG, DART, XSum); DoRA (Liu et al., 2024,
arXiv:2402.09353) against LoRA, not full fine-tuning, and on commonsense reasoning. None of them
is comparable with this table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Direction = Literal["within", "lags"]
VERDICTS = ("holds", "holds partly", "does not hold here", "not measured yet")
GLUE_TASKS = ("sst2", "mrpc", "rte", "stsb", "cola")
# BitFit's "small-to-medium training data": the GLUE tasks under 10k training examples here.
SMALL_TASKS = ("mrpc", "rte", "stsb", "cola")
RULE = (
    "Per task, on its main metric in points: Δ = mean(method) − mean(full), with the sample "
    "standard deviations over each cell's seeds (± method vs ± full; 0 for one seed) and n seeds "
    "(method vs full). A \"within\" claim holds on a task when Δ ≥ −(t + max(std method, std full)), "
    "t the claim's threshold (1 point); a \"lags\" claim when Δ < −(t + max(std method, std full)), "
    "the exact complement. Over the claim's tasks: holds (every measured task holds), holds partly "
    "(some do), does not hold here (none does), not measured yet (no task has both cells); the "
    "verdict gives the seeds behind it and the tasks still missing. ✓ / ✗: the task holds / does "
    "not; †: a cell's seeds ran with different recipes.")

EPS = 1e-9  # points
Cells = Mapping[tuple[str, str], Mapping[str, Any]]


@dataclass(frozen=True)
class Source:
    """A paper and where in it the claim is made."""

    authors: str
    year: int
    arxiv: str
    where: str

    def cite(self) -> str:
        return f"{self.authors} {self.year}, arXiv:{self.arxiv}, {self.where}"


@dataclass(frozen=True)
class Claim:
    """A claim: ``rows`` (sweep labels) against ``baseline`` on ``tasks``; ``threshold`` in
    points; ``direction`` ``within`` (the rows come within it) or ``lags`` (they fall beyond it);
    ``stat`` names a ``method_stats`` entry (a fraction) reported with the rows, ``stat_note`` after it."""

    id: str
    text: str
    sources: tuple[Source, ...]
    rows: tuple[str, ...]
    tasks: tuple[str, ...]
    threshold: float = 1.0
    direction: Direction = "within"
    baseline: str = "full"
    stat: str = ""
    stat_note: str = ""

    def __post_init__(self) -> None:
        if not self.rows or not self.tasks or not self.sources:
            raise ValueError(f"claim {self.id!r}: give at least one row, task and source")
        if self.direction not in ("within", "lags"):
            raise ValueError(f"claim {self.id!r}: direction {self.direction!r} is not 'within' or 'lags'")
        if self.threshold < 0:
            raise ValueError(f"claim {self.id!r}: threshold {self.threshold} must be ≥ 0 points")
        if self.baseline in self.rows:
            raise ValueError(f"claim {self.id!r}: the baseline {self.baseline!r} is one of its rows")


CLAIMS: tuple[Claim, ...] = (
    Claim("houlsby-within-1",
          "Houlsby adapters come within about a point of full fine-tuning on GLUE.",
          (Source("Houlsby et al.", 2019, "1902.00751",
                  "Table 1 (GLUE test, BERT-large: 80.0 vs 80.4 on average, 0.4 points below full "
                  "fine-tuning, with 3.6% of the parameters per task)"),),
          ("houlsby",), GLUE_TASKS),
    Claim("lora-matches",
          "LoRA on the query and value projections matches full fine-tuning while training a "
          "fraction of a percent of the parameters.",
          (Source("Hu et al.", 2021, "2106.09685",
                  "Table 2 (GLUE dev; 0.3M of RoBERTa-base's 125M, 0.8M of RoBERTa-large's 355M "
                  "parameters)"),),
          ("lora",), GLUE_TASKS),
    Claim("bitfit-small-data",
          "BitFit (biases only) is competitive with full fine-tuning with small-to-medium "
          "training data.",
          (Source("Ben Zaken et al.", 2022, "2106.10199",
                  "abstract and Table 1 (GLUE, BERT-large); the small tasks MRPC, RTE, STS-B, CoLA"),),
          ("bitfit",), SMALL_TASKS),
    Claim("ptuning2-matches",
          "P-tuning v2 (deep prompts) matches fine-tuning on NLU across model scales.",
          (Source("Liu et al.", 2022, "2110.07602",
                  "abstract, §4.2 and Fig. 1 (SuperGLUE dev, 335M to 10B parameters)"),),
          ("ptuning2",), GLUE_TASKS),
    # P-tuning's own paper (Liu et al., 2021, arXiv:2103.10385) reports gains over fine-tuning on
    # SuperGLUE in a different setting (prompt encoder plus anchors, often with the model tuned);
    # the lag of the frozen-model version on normal-sized models is P-tuning v2's finding (§1).
    Claim("prompt-ptuning-lag",
          "Prompt tuning and P-tuning (a frozen model) lag full fine-tuning on small models.",
          (Source("Lester et al.", 2021, "2104.08691",
                  "Fig. 1 (SuperGLUE, T5: the gap to model tuning closes only near 10B parameters)"),
           Source("Liu et al.", 2022, "2110.07602",
                  "§1 and Fig. 1 (prompt tuning and P-tuning below fine-tuning under 10B; P-tuning: "
                  "Liu et al. 2021, arXiv:2103.10385)")),
          ("prompt", "ptuning"), GLUE_TASKS, direction="lags"),
    Claim("diff-pruning-close",
          "Diff pruning comes close to full fine-tuning while changing 0.5% of the parameters.",
          (Source("Guo et al.", 2021, "2012.07463",
                  "Table 1 (GLUE test, BERT-large, 0.5% density)"),),
          ("diff_pruning",), GLUE_TASKS, stat="nonzero_fraction",
          stat_note="of the gated entries non-zero after the projection; the paper keeps 0.5%"),
    Claim("pfeiffer-on-par",
          "Single-task adapters in the Pfeiffer configuration perform on par with full fine-tuning.",
          (Source("Pfeiffer et al.", 2021, "2005.00247",
                  "Table 1 (AdapterFusion: Full vs ST-A on 16 tasks, SST-2, MRPC and RTE among "
                  "them)"),),
          ("pfeiffer",), ("sst2", "mrpc", "rte")),
)


def check_cells(cells: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """The cells keyed by (label, task), each checked for ``label``, ``task`` and ``metrics``."""
    keyed = {}
    for i, cell in enumerate(cells):
        if not isinstance(cell, Mapping):
            raise ValueError(f"cell {i} is {cell!r}, not an object: give the cells of a sweep's "
                             "results.json (each with label, task, metrics)")
        missing = [k for k in ("label", "task", "metrics") if k not in cell]
        if missing:
            raise ValueError(f"cell {i} has no {', '.join(missing)}: give the cells of a sweep's "
                             "results.json (each with label, task, metrics)")
        metrics = cell["metrics"]
        if not isinstance(metrics, Mapping) or not metrics or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
            raise ValueError(f"cell {i} ({cell['label']} on {cell['task']}): metrics {metrics!r} is not "
                             "an object of numbers, e.g. {\"accuracy\": 0.85}")
        keyed[cell["label"], cell["task"]] = cell
    return keyed


def _seeds(cell: Mapping[str, Any]) -> int:
    """The number of seeds behind a cell (a one-run cell, without ``n``, has one)."""
    return int(cell.get("n", len(cell.get("seeds", ())) or 1))


def compare(claim: Claim, row: str, task: str, cells: Cells) -> dict[str, Any] | None:
    """Δ = mean(row) − mean(baseline) on the task's main metric in points with both stds, and
    whether the claim holds there (see the module's rule); ``None`` when a cell is missing."""
    cell, base = cells.get((row, task)), cells.get((claim.baseline, task))
    if cell is None or base is None:
        return None
    metric = base.get("main_metric") or next(iter(base["metrics"]))
    if metric not in cell["metrics"]:
        raise ValueError(f"{row} on {task} has no {metric!r} (the main metric of {claim.baseline} "
                         f"there); its metrics: {', '.join(cell['metrics'])}")
    delta = 100 * (cell["metrics"][metric] - base["metrics"][metric])
    std_row = 100 * cell.get("std", {}).get(metric, 0.0)
    std_base = 100 * base.get("std", {}).get(metric, 0.0)
    tolerance = claim.threshold + max(std_row, std_base)
    # EPS: a Δ of exactly −t points, stored as fractions, lands on the boundary, not off it by rounding
    within = delta >= -tolerance - EPS
    holds = within if claim.direction == "within" else not within
    return {"row": row, "task": task, "metric": metric, "delta": delta, "std_row": std_row,
            "std_full": std_base, "n_row": _seeds(cell), "n_full": _seeds(base),
            "tolerance": tolerance, "holds": holds,
            "mixed_recipes": bool(cell.get("mixed_recipes") or base.get("mixed_recipes"))}


def _stat(label: str, name: str, cells: Cells, runs: Sequence[Mapping[str, Any]]) -> float | None:
    """The mean of ``method_stats[name]`` over the label's runs (or its cells, for a one-run table)."""
    values = [r["method_stats"][name] for r in [*runs, *cells.values()]
              if r.get("label") == label and name in r.get("method_stats", {})]
    return statistics.fmean(values) if values else None


def verdict(claim: Claim, cells: Cells, runs: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The claim's record: its comparisons, verdict, seeds behind it, the missing comparisons, and
    the rows' trainable percentage (and ``claim.stat``) as measured."""
    comparisons, missing = [], []
    for row in claim.rows:
        for task in claim.tasks:
            c = compare(claim, row, task, cells)
            if c is None:
                missing.append({"row": row, "task": task})
            else:
                comparisons.append(c)
    held = sum(c["holds"] for c in comparisons)
    result = ("not measured yet" if not comparisons else "holds" if held == len(comparisons)
              else "holds partly" if held else "does not hold here")
    seeds = [n for c in comparisons for n in (c["n_row"], c["n_full"])]
    rows = {}
    for row in claim.rows:
        cell = next((c for (label, _), c in cells.items() if label == row), None)
        rows[row] = {"trainable_percent": None if cell is None else cell.get("trainable_percent")}
        if claim.stat:
            rows[row][claim.stat] = _stat(row, claim.stat, cells, runs)
    return {"id": claim.id, "claim": claim.text, "sources": [s.cite() for s in claim.sources],
            "rows": rows, "baseline": claim.baseline, "tasks": list(claim.tasks),
            "direction": claim.direction, "threshold": claim.threshold, "verdict": result,
            "seeds": [min(seeds), max(seeds)] if seeds else None,
            "comparisons": comparisons, "missing": missing}


def _fmt_comparison(c: Mapping[str, Any]) -> str:
    """``task Δ (±std row vs ±std full, n=… vs …) ✓``; the stds only when a cell has seeds to spread."""
    spread = f"±{c['std_row']:.1f} vs ±{c['std_full']:.1f}, " if max(c["n_row"], c["n_full"]) > 1 else ""
    return (f"{c['task']} {c['delta']:+.1f} ({spread}n={c['n_row']} vs {c['n_full']})"
            f"{' †' if c['mixed_recipes'] else ''} {'✓' if c['holds'] else '✗'}")


def _fmt_row(row: str, info: Mapping[str, Any], claim: Claim) -> str:
    pct = info["trainable_percent"]
    parts = ["not run" if pct is None else f"trains {pct:.2f}% of its parameters"]
    if claim.stat:
        value = info.get(claim.stat)
        parts.append(f"{claim.stat} not recorded" if value is None else f"{100 * value:.2f}% {claim.stat_note}")
    return f"{row} ({'; '.join(parts)})"


def claims_markdown(claims: Sequence[Claim], records: Sequence[Mapping[str, Any]], results: str) -> str:
    """``claims.md``: the rule, then one table row per claim (``records``: their verdicts)."""
    lines = ["| claim | source | what jpeft measured (Δ vs full, points) | verdict |", "|---|---|---|---|"]
    for claim, r in zip(claims, records, strict=True):
        measured = []
        for row, info in r["rows"].items():
            mine = [_fmt_comparison(c) for c in r["comparisons"] if c["row"] == row]
            measured.append(f"{_fmt_row(row, info, claim)}: {'; '.join(mine) or '–'}")
        seeds = r["seeds"]
        text = r["verdict"]
        if seeds:
            low, high = seeds
            text += f" ({low} seed{'s' if high > 1 else ''})" if low == high else f" ({low}–{high} seeds)"
        if r["missing"]:
            names = [m["task"] if len(claim.rows) == 1 else f"{m['row']} {m['task']}" for m in r["missing"]]
            text += f"; missing: {', '.join(names)}"
        kind = "lags by more than" if claim.direction == "lags" else "within"
        lines.append(f"| {r['claim']} ({kind} {claim.threshold:g} point{'s' if claim.threshold != 1 else ''}) "
                     f"| {'; '.join(r['sources'])} | {'<br>'.join(measured)} | {text} |")
    return (f"# Claims, side by side\n\nThe methods' papers' claims about full fine-tuning next to "
            f"jpeft's GLUE cells in `{results}`.\n\n{RULE}\n\n" + "\n".join(lines) + "\n")


README_BEGIN, README_END = "<!-- claims:begin -->", "<!-- claims:end -->"


def _short_comparison(c: Mapping[str, Any], name_row: bool) -> str:
    """``[row ]task Δ[ ±larger std] ✓``."""
    row = f"{c['row']} " if name_row else ""
    spread = max(c["std_row"], c["std_full"])
    spread_text = f" ±{spread:.1f}" if max(c["n_row"], c["n_full"]) > 1 else ""
    return f"{row}{c['task']} {c['delta']:+.1f}{spread_text} {'✓' if c['holds'] else '✗'}"


def readme_table(claims: Sequence[Claim], records: Sequence[Mapping[str, Any]], claims_md: str) -> str:
    """The README's short claims table: claim, papers (linked), Δ vs full per measured task with
    ✓/✗, verdict with its seeds; the rule and the sources' tables and figures are in ``claims_md``."""
    lines = [f"| claim ([rule and sources]({claims_md})) | paper | Δ vs full fine-tuning, points (✓ holds) | verdict |",
             "|---|---|---|---|"]
    for claim, r in zip(claims, records, strict=True):
        papers = ", ".join(f"[{s.authors} {s.year}](https://arxiv.org/abs/{s.arxiv})" for s in claim.sources)
        measured = "; ".join(_short_comparison(c, len(claim.rows) > 1) for c in r["comparisons"]) or "–"
        text = r["verdict"]
        if r["seeds"]:
            low, high = r["seeds"]
            text += f", {low}{'' if low == high else f'–{high}'} seed{'s' if high > 1 else ''}"
        if r["comparisons"] and r["missing"]:
            text += f", {len(r['missing'])} of {len(r['missing']) + len(r['comparisons'])} cells to run"
        lines.append(f"| {claim.text} | {papers} | {measured} | {text} |")
    return "\n".join(lines)


def update_readme(readme: Path | str, table: str) -> bool:
    """Replace the lines between :data:`README_BEGIN` and :data:`README_END` in ``readme`` with
    ``table`` (written atomically); returns whether the file changed. ``ValueError`` when the
    markers are missing or out of order."""
    from jpeft.checkpoint.atomic import atomic_write_text

    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{path} has no '{README_BEGIN}' line followed by a '{README_END}' line; "
                         "add both where the claims table goes")
    new = text[:begin + len(README_BEGIN)] + "\n" + table + "\n" + text[end:]
    if new != text:
        atomic_write_text(path, new)
    return new != text


def write_claims(cells: Iterable[Mapping[str, Any]], out_dir: Path | str,
                 runs: Sequence[Mapping[str, Any]] = (), results: str = "results.json",
                 claims: Sequence[Claim] = CLAIMS) -> list[dict[str, Any]]:
    """Write ``<out_dir>/claims.json`` and ``claims.md`` for the sweep's ``cells`` (``runs``: its
    per-seed runs, for the rows' ``method_stats``; ``results``: the table's name in the md);
    returns the claims' records."""
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    keyed = check_cells(cells)
    records = [verdict(c, keyed, runs) for c in claims]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "claims.json", json.dumps({"rule": RULE, "results": results, "claims": records}, indent=2))
    atomic_write_text(out / "claims.md", claims_markdown(claims, records, results))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.claims", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="a sweep's results.json, e.g. results/glue/results.json")
    parser.add_argument("--out", default=None, help="folder for claims.{json,md} (default: the results' folder)")
    parser.add_argument("--readme", default=None,
                        help=f"also rewrite the short table of this file between {README_BEGIN} and {README_END}")
    args = parser.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        parser.error(f"--results={path}: no such file; give the results.json a sweep wrote "
                     "(python -m experiments.sweep --rebuild --out=results/glue writes one)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        parser.error(f"--results={path}: not JSON ({err})")
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        parser.error(f"--results={path}: no \"cells\" list; give a GLUE sweep's results.json")
    runs = data.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        parser.error(f"--results={path}: \"runs\" is not a list of objects; give a GLUE sweep's results.json")
    out = Path(args.out) if args.out else path.parent
    if out.exists() and not out.is_dir():
        parser.error(f"--out={out} is a file; pass a folder (it is created if missing)")
    try:
        records = write_claims(data["cells"], out, runs=runs, results=str(path))
    except ValueError as err:
        parser.error(f"--results={path}: {err}")
    except OSError as err:
        parser.error(f"--out={out}: cannot write claims.json and claims.md there ({err.strerror or err}); "
                     "choose a folder you can write to")
    print((out / "claims.md").read_text(), end="")
    if args.readme:
        readme = Path(args.readme)
        link = os.path.relpath(out / "claims.md", readme.resolve().parent if readme.exists() else ".")
        try:
            update_readme(readme, readme_table(CLAIMS, records, Path(link).as_posix()))
        except (OSError, ValueError) as err:
            parser.error(f"--readme={readme}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
