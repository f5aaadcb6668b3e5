"""The claims table: each verdict from constructed cells, the seed spread widening the tolerance,
"lags" claims as the complement, missing comparisons listed, the markdown (one row per claim),
the CLI on a results.json, and the sweep rewriting it with its table."""

from __future__ import annotations

import json

import pytest

from experiments.claims import (CLAIMS, GLUE_TASKS, README_BEGIN, README_END, Claim, Source, compare, main,
                               readme_table, update_readme, verdict, write_claims)
from experiments.sweep import write_seeded_table, write_table

MAIN = {"sst2": "accuracy", "mrpc": "accuracy", "rte": "accuracy", "stsb": "pearson",
        "cola": "matthews_correlation"}
SRC = (Source("Doe et al.", 2020, "2001.00001", "Table 1"),)
MATCHES = Claim("m", "Row matches full.", SRC, ("lora",), GLUE_TASKS)
LAGS = Claim("l", "Rows lag full.", SRC, ("prompt", "ptuning"), ("sst2", "mrpc"), direction="lags")


def cell(label, task, mean, std=0.0, n=3, **extra):
    """A seeded cell (fractions, as results.json holds them); MRPC also carries F1."""
    metric = MAIN[task]
    metrics = {metric: mean, **({"f1": mean + 0.05} if task == "mrpc" else {})}
    return {"task": task, "label": label, "seeds": list(range(n)), "n": n, "metrics": metrics,
            "std": {k: std for k in metrics}, "main_metric": metric, "majority_baseline": {},
            "above_majority": True, "mixed_recipes": False, "trainable_params": 10,
            "trainable_percent": 0.33, "wall_s": 60.0, **extra}


def keyed(*cells):
    return {(c["label"], c["task"]): c for c in cells}


def grid(deltas, row="lora", base=0.80, **kw):
    """full at ``base`` and ``row`` at ``base + delta`` (in points) for every task in ``deltas``."""
    cells = []
    for task, delta in deltas.items():
        cells += [cell("full", task, base, **kw), cell(row, task, base + delta / 100, **kw)]
    return keyed(*cells)


@pytest.mark.parametrize("deltas, expected", [
    ({t: -0.5 for t in GLUE_TASKS}, "holds"),
    ({"sst2": 0.3, "mrpc": 2.0, "rte": -3.0, "stsb": -0.9, "cola": -8.0}, "holds partly"),
    ({t: -2.5 for t in GLUE_TASKS}, "does not hold here"),
    ({}, "not measured yet"),
])
def test_each_verdict_from_constructed_cells(deltas, expected):
    record = verdict(MATCHES, grid(deltas))
    assert record["verdict"] == expected
    assert [c["task"] for c in record["comparisons"]] == list(deltas)
    for c in record["comparisons"]:
        assert c["delta"] == pytest.approx(deltas[c["task"]])
        assert c["holds"] == (deltas[c["task"]] >= -1.0)


def test_the_verdict_uses_each_tasks_main_metric_in_points():
    cells = keyed(cell("full", "stsb", 0.85), cell("lora", "stsb", 0.84))
    cells["lora", "stsb"]["metrics"]["spearmanr"] = 0.10  # not the main metric: ignored
    c = compare(MATCHES, "lora", "stsb", cells)
    assert c["metric"] == "pearson" and c["delta"] == pytest.approx(-1.0) and c["holds"]
    del cells["lora", "stsb"]["metrics"]["pearson"]
    with pytest.raises(ValueError, match="no 'pearson'"):
        compare(MATCHES, "lora", "stsb", cells)


def test_the_seed_spread_widens_the_tolerance():
    tight = grid({"rte": -2.0}, std=0.0)
    assert not compare(MATCHES, "lora", "rte", tight)["holds"]  # 2 points below, no spread
    spread = grid({"rte": -2.0}, std=0.0)
    spread["full", "rte"]["std"]["accuracy"] = 0.015  # the larger of the two stds counts
    c = compare(MATCHES, "lora", "rte", spread)
    assert c["tolerance"] == pytest.approx(2.5) and c["std_full"] == pytest.approx(1.5) and c["holds"]
    assert not compare(MATCHES, "lora", "rte", grid({"rte": -2.6}, std=0.015))["holds"]


def test_a_lag_claim_is_the_complement_of_matching():
    cells = keyed(cell("full", "sst2", 0.85), cell("prompt", "sst2", 0.75),
                  cell("full", "mrpc", 0.80), cell("prompt", "mrpc", 0.785, std=0.01),
                  cell("ptuning", "sst2", 0.70))
    record = verdict(LAGS, cells)
    holds = {(c["row"], c["task"]): c["holds"] for c in record["comparisons"]}
    # 10 points below lags; 1.5 below with a 1-point spread is within t + std = 2, so no lag
    assert holds == {("prompt", "sst2"): True, ("prompt", "mrpc"): False, ("ptuning", "sst2"): True}
    assert record["verdict"] == "holds partly"
    assert record["missing"] == [{"row": "ptuning", "task": "mrpc"}]
    matches = Claim("x", "x", SRC, ("prompt",), ("sst2", "mrpc"))
    assert [c["holds"] for c in verdict(matches, cells)["comparisons"]] == [False, True]
    assert verdict(LAGS, grid({"sst2": -0.2, "mrpc": 0.5}, row="prompt"))["verdict"] == "does not hold here"


def test_missing_comparisons_are_listed_and_the_verdict_uses_the_rest():
    cells = grid({"sst2": 0.0, "mrpc": -0.5})
    cells.update(keyed(cell("full", "rte", 0.6)))  # the row is missing on RTE
    cells.update(keyed(cell("lora", "cola", 0.2, n=1)))  # full is missing on CoLA
    record = verdict(MATCHES, cells)
    assert record["verdict"] == "holds"
    assert [m["task"] for m in record["missing"]] == ["rte", "stsb", "cola"]
    assert record["seeds"] == [3, 3]  # the CoLA cell of one seed has no full cell to compare with


def test_markdown_has_one_row_per_claim_with_seeds_and_missing_tasks(tmp_path):
    cells = grid({"sst2": -0.5, "mrpc": 1.0}, row="houlsby")
    cells["houlsby", "mrpc"].update(n=1, seeds=[0], std={"accuracy": 0.0, "f1": 0.0})
    cells.update(grid({"sst2": -12.0}, row="prompt"))
    records = write_claims(cells.values(), tmp_path)
    assert [r["id"] for r in records] == [c.id for c in CLAIMS]
    md = (tmp_path / "claims.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(CLAIMS)  # the header, then one row per claim
    for claim, row in zip(CLAIMS, rows[1:], strict=True):
        assert row.startswith(f"| {claim.text} ")
    houlsby = rows[1 + [c.id for c in CLAIMS].index("houlsby-within-1")]
    assert "sst2 -0.5 (±0.0 vs ±0.0, n=3 vs 3) ✓" in houlsby
    assert "mrpc +1.0 (±0.0 vs ±0.0, n=1 vs 3) ✓" in houlsby
    assert houlsby.endswith("| holds (1–3 seeds); missing: rte, stsb, cola |")
    lag = rows[1 + [c.id for c in CLAIMS].index("prompt-ptuning-lag")]
    assert "lags by more than 1 point" in lag and "holds (3 seeds); missing: prompt mrpc" in lag
    assert "ptuning (not run): –" in lag
    assert "| not measured yet; missing: mrpc, rte, stsb, cola |" in md  # BitFit's small tasks
    saved = json.loads((tmp_path / "claims.json").read_text())
    assert saved["claims"] == json.loads(json.dumps(records)) and "Δ ≥ −(t + max" in saved["rule"]


def test_diff_pruning_reports_its_trained_share_and_kept_density():
    runs = [{"label": "diff_pruning", "task": t, "method_stats": {"nonzero_fraction": f}}
            for t, f in (("sst2", 0.05), ("mrpc", 0.07))]
    cells = grid({"sst2": -0.5}, row="diff_pruning")
    cells["diff_pruning", "sst2"]["trainable_percent"] = 64.43
    claim = next(c for c in CLAIMS if c.id == "diff-pruning-close")
    assert verdict(claim, cells, runs)["rows"] == {
        "diff_pruning": {"trainable_percent": 64.43, "nonzero_fraction": pytest.approx(0.06)}}


def test_claims_need_rows_tasks_and_a_known_direction():
    with pytest.raises(ValueError, match="direction"):
        Claim("x", "x", SRC, ("lora",), ("sst2",), direction="beats")
    with pytest.raises(ValueError, match="baseline"):
        Claim("x", "x", SRC, ("full",), ("sst2",))
    with pytest.raises(ValueError, match="at least one row"):
        Claim("x", "x", SRC, (), ("sst2",))


def test_cli_writes_next_to_the_results_or_to_out(tmp_path, capsys):
    results = tmp_path / "glue" / "results.json"
    results.parent.mkdir()
    cells = grid({t: -0.5 for t in GLUE_TASKS}, row="lora")
    results.write_text(json.dumps({"note": "n", "cells": list(cells.values()), "runs": []}))
    assert main([f"--results={results}"]) == 0
    assert "| holds (3 seeds) |" in capsys.readouterr().out
    saved = json.loads((results.parent / "claims.json").read_text())
    assert next(r for r in saved["claims"] if r["id"] == "lora-matches")["verdict"] == "holds"
    assert main([f"--results={results}", f"--out={tmp_path / 'elsewhere'}"]) == 0
    assert (tmp_path / "elsewhere" / "claims.md").is_file()


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("{", "not JSON"), ('{"note": "n"}', 'no "cells" list'),
    ('{"cells": [{"task": "sst2"}]}', "cell 0 has no label, metrics"),
    (b"\xff\xfe", "not JSON"), ('{"cells": [1]}', "cell 0 is 1, not an object"),
    ('{"cells": [{"label": "full", "task": "sst2", "metrics": {"accuracy": "x"}}]}', "not an object of numbers"),
    ('{"cells": [{"label": "full", "task": "sst2", "metrics": []}]}', "not an object of numbers"),
    ('{"cells": [], "runs": 5}', '"runs" is not a list of objects'),
])
def test_cli_refuses_bad_results_with_a_clear_message(tmp_path, capsys, content, message):
    results = tmp_path / "results.json"
    if isinstance(content, bytes):
        results.write_bytes(content)
    elif content is not None:
        results.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main([f"--results={results}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "claims.json").exists()


def test_cli_refuses_an_out_folder_that_is_a_file(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"cells": list(grid({"sst2": -0.5}, row="lora").values())}))
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot write")):
        with pytest.raises(SystemExit) as exit_info:
            main([f"--results={results}", f"--out={out}"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"--out={out}" in err and message in err


def test_the_sweep_rewrites_the_claims_with_its_tables(tmp_path):
    runs = [{**cell(label, "rte", mean, n=1), "seed": seed, "config": {}}
            for label, mean, seed in (("full", 0.60, 0), ("full", 0.62, 1), ("pfeiffer", 0.50, 0))]
    for r in runs:
        del r["n"], r["std"], r["seeds"]
    write_seeded_table(runs, tmp_path / "seeded", "note")
    saved = json.loads((tmp_path / "seeded" / "claims.json").read_text())
    pfeiffer = next(r for r in saved["claims"] if r["id"] == "pfeiffer-on-par")
    (c,) = pfeiffer["comparisons"]
    assert (c["n_row"], c["n_full"]) == (1, 2) and c["delta"] == pytest.approx(-11.0) and not c["holds"]
    assert pfeiffer["verdict"] == "does not hold here"
    one_run = [{k: v for k, v in cell(label, "sst2", mean).items() if k not in ("n", "std", "seeds")}
               for label, mean in (("full", 0.87), ("lora", 0.87))]
    write_table(one_run, tmp_path / "one", "note")
    saved = json.loads((tmp_path / "one" / "claims.json").read_text())
    lora = next(r for r in saved["claims"] if r["id"] == "lora-matches")
    assert lora["verdict"] == "holds" and lora["seeds"] == [1, 1]


def test_cli_rewrites_the_readme_table_between_its_markers(tmp_path, capsys):
    results = tmp_path / "glue" / "results.json"
    results.parent.mkdir()
    cells = grid({"sst2": -0.5, "mrpc": -3.0}, row="lora")
    results.write_text(json.dumps({"cells": list(cells.values()), "runs": []}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{README_BEGIN}\nold table\n{README_END}\nafter\n")
    assert main([f"--results={results}", f"--readme={readme}"]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    assert "old table" not in text and "(glue/claims.md)" in text
    lora = next(line for line in text.splitlines() if line.startswith("| LoRA"))
    assert "sst2 -0.5 ±0.0 ✓; mrpc -3.0 ±0.0 ✗" in lora and "holds partly, 3 seeds, 3 of 5 cells to run" in lora
    assert "[Hu et al. 2021](https://arxiv.org/abs/2106.09685)" in lora
    assert update_readme(readme, readme_table(CLAIMS, [verdict(c, cells) for c in CLAIMS],
                                              "glue/claims.md")) is False  # unchanged: not rewritten

    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit) as exit_info:
        main([f"--results={results}", f"--readme={readme}"])
    assert exit_info.value.code == 2 and "no '<!-- claims:begin -->' line" in capsys.readouterr().err


def test_the_readme_table_is_the_committed_results():
    """README.md's claims table is what ``--readme`` writes for results/glue/results.json: rerun
    ``python -m experiments.claims --results=results/glue/results.json --readme=README.md``
    after the results change."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = json.loads((root / "results" / "glue" / "results.json").read_text())
    keyed = {(c["label"], c["task"]): c for c in data["cells"]}
    table = readme_table(CLAIMS, [verdict(c, keyed, data.get("runs", [])) for c in CLAIMS],
                         "results/glue/claims.md")
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert f"{README_BEGIN}\n{table}\n{README_END}" in readme
