"""The sweep's results table: cells merged from earlier results and finished runs, the majority row,
a dash for a cell not run, and the recipe note under the GLUE table only."""

from __future__ import annotations

import json

from experiments.sweep import GLUE_RECIPES, main, previous_cells, write_table


def _cell(task, label, metrics, majority, params=100, wall=60.0):
    return {"task": task, "label": label, "metrics": metrics, "majority_baseline": majority,
            "trainable_params": params, "trainable_percent": 1.0, "wall_s": wall}


SST2_MAJ = {"accuracy": 0.509}
MRPC_MAJ = {"accuracy": 0.684, "f1": 0.812}


def test_table_has_majority_row_dashes_and_recipes(tmp_path):
    cells = [_cell("sst2", "lora", {"accuracy": 0.851}, SST2_MAJ),
             _cell("mrpc", "lora", {"accuracy": 0.814, "f1": 0.872}, MRPC_MAJ),
             _cell("sst2", "bitfit", {"accuracy": 0.811}, SST2_MAJ)]
    write_table(cells, tmp_path, "note")
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("note\n") and md.rstrip().endswith(GLUE_RECIPES)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | trainable params (%) | mrpc (accuracy/f1) | sst2 (accuracy) |"
    assert rows[1] == "| majority class | – | 68.4 / 81.2 | 50.9 |"
    assert rows[2] == "| lora | 100 (1.00%) | 81.4 / 87.2 (1.0 min) | 85.1 (1.0 min) |"
    assert rows[3] == "| bitfit | 100 (1.00%) | – | 81.1 (1.0 min) |"
    assert json.loads((tmp_path / "results.json").read_text())["cells"] == cells


def test_finished_runs_replace_older_cells_and_rebuild(tmp_path):
    write_table([_cell("sst2", "lora", {"accuracy": 0.5}, SST2_MAJ)], tmp_path, "old")
    run = tmp_path / "runs" / "sst2-lora@all_linear"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(_cell("sst2", "lora", {"accuracy": 0.877}, SST2_MAJ)))
    rerun = tmp_path / "runs" / "sst2-lora"
    rerun.mkdir()
    (rerun / "summary.json").write_text(json.dumps(_cell("sst2", "lora", {"accuracy": 0.851}, SST2_MAJ)))
    cells = previous_cells(tmp_path)
    assert set(cells) == {("lora", "sst2"), ("lora@all_linear", "sst2")}
    assert cells["lora", "sst2"]["metrics"]["accuracy"] == 0.851  # the run on disk wins
    assert main(["--rebuild", f"--out={tmp_path}"]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| lora@all_linear | 100 (1.00%) | 87.7 (1.0 min) |" in md and "85.1" in md and "50.0" not in md
