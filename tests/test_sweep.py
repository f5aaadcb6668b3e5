"""The sweep's results table: cells merged from earlier results and finished runs, the majority row,
a dash for a cell not run, and the recipe note under the GLUE table only; seeded sweeps (one
folder per seed, mean ± std, resume, --rebuild from the summaries, failures, refused names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


# Seeded sweeps, with a fake runner in place of the experiment's process.

def _fake_runner(scores, calls, fail=()):
    """A runner that writes what ``experiments.glue`` would: ``config.json``, ``checkpoints/``
    and ``summary.json`` whose metric is ``scores[(method, task, seed)]``; exits 1 for ``fail``."""
    def run(cmd, log):
        flags = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        key = (flags["method"], flags["task"], int(flags["seed"]))
        calls.append(key)
        log.write_text("log")
        if key in fail:
            return 1
        run_dir = Path(flags["output-dir"])
        (run_dir / "checkpoints" / "100").mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps({"lr": 1e-3, "seed": key[2],
                                                         "output_dir": str(run_dir)}))
        (run_dir / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "loss": 0.7}) + "\n"
                                               + json.dumps({"split": "dev", "step": 2, "accuracy": 0.6}) + "\n")
        majority = MRPC_MAJ if key[1] == "mrpc" else SST2_MAJ
        metrics = {"accuracy": scores[key], "f1": scores[key] + 0.05} if key[1] == "mrpc" \
            else {"accuracy": scores[key]}
        summary = {**_cell(key[1], key[0], metrics, majority), "seed": key[2], "main_metric": "accuracy",
                   "model": "sentence-transformers/all-MiniLM-L6-v2"}
        del summary["label"]
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return 0
    return run


SCORES = {("lora", "sst2", 0): 0.85, ("lora", "sst2", 1): 0.86, ("lora", "sst2", 2): 0.87,
          ("bitfit", "sst2", 0): 0.50, ("bitfit", "sst2", 1): 0.50, ("bitfit", "sst2", 2): 0.51,
          ("lora", "mrpc", 0): 0.80, ("lora", "mrpc", 1): 0.82, ("lora", "mrpc", 2): 0.81,
          ("bitfit", "mrpc", 0): 0.70, ("bitfit", "mrpc", 1): 0.72, ("bitfit", "mrpc", 2): 0.74}


def test_seeded_sweep_runs_each_seed_in_its_folder_and_tabulates_mean_std(tmp_path):
    calls = []
    argv = [f"--out={tmp_path}", "--methods=lora,bitfit", "--tasks=sst2,mrpc", "--seeds=0,1,2"]
    assert main(argv, runner=_fake_runner(SCORES, calls)) == 0
    assert calls[:4] == [("lora", "sst2", 0), ("bitfit", "sst2", 0), ("lora", "mrpc", 0),
                         ("bitfit", "mrpc", 0)]  # every cell at seed 0 first
    assert len(calls) == 12
    run = tmp_path / "runs" / "mrpc-lora-s1"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["lr"] == 1e-3 and summary["seed"] == 1  # the recipe is kept with it
    assert summary["evals"] == [{"split": "dev", "step": 2, "accuracy": 0.6}]  # and its dev curve
    assert not (run / "checkpoints").exists()  # pruned once finished
    md = (tmp_path / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | trainable params (%) | mrpc (accuracy/f1) | sst2 (accuracy) |"
    assert rows[2] == "| lora | 100 (1.00%) | 81.0 ± 1.0 / 86.0 ± 1.0 (n=3, 1 min) | 86.0 ± 1.0 (n=3, 1 min) |"
    assert rows[3].startswith("| bitfit | 100 (1.00%) | 72.0 ± 2.0 / 77.0 ± 2.0 (n=3, 1 min) | 50.3 ± 0.6 (n=3")
    # bitfit's MRPC mean (72.0) beats the majority's 68.4, its SST-2 mean (50.3) does not beat 50.9
    assert "is above the majority class: 3 of 4." in md
    assert "AMD" in md or "cores" in md
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    lora_sst2 = next(c for c in cells if (c["label"], c["task"]) == ("lora", "sst2"))
    assert lora_sst2["seeds"] == [0, 1, 2] and lora_sst2["n"] == 3 and not lora_sst2["mixed_recipes"]


def test_seeded_sweep_resumes_and_rebuilds_from_summaries_only(tmp_path):
    calls = []
    argv = [f"--out={tmp_path}", "--methods=lora", "--tasks=sst2", "--seeds=0,1"]
    assert main(argv, runner=_fake_runner(SCORES, calls)) == 0
    before = (tmp_path / "results.md").read_text()
    calls.clear()
    assert main(argv[:-1] + ["--seeds=0,1,2"], runner=_fake_runner(SCORES, calls)) == 0
    assert calls == [("lora", "sst2", 2)]  # finished runs are skipped
    assert "(n=3" in (tmp_path / "results.md").read_text() and "(n=2" in before
    # --rebuild reads the runs' summaries only (not results.json) and runs nothing
    (tmp_path / "results.json").write_text(json.dumps({"note": "stale", "cells": []}))
    (tmp_path / "results.md").unlink()
    calls.clear()
    assert main(["--rebuild", f"--out={tmp_path}"], runner=_fake_runner(SCORES, calls)) == 0
    assert calls == []
    md = (tmp_path / "results.md").read_text()
    assert "| lora | 100 (1.00%) | 86.0 ± 1.0 (n=3, 1 min) |" in md and "stale" not in md


def test_seeded_sweep_exits_nonzero_on_a_failed_run_and_tabulates_the_rest(tmp_path, capsys):
    calls = []
    runner = _fake_runner(SCORES, calls, fail={("bitfit", "sst2", 1)})
    code = main([f"--out={tmp_path}", "--methods=lora,bitfit", "--tasks=sst2", "--seeds=0,1"], runner=runner)
    assert code == 1 and len(calls) == 4  # the failure does not stop the other runs
    assert "sst2-bitfit-s1" in capsys.readouterr().err
    md = (tmp_path / "results.md").read_text()
    assert "| bitfit | 100 (1.00%) | 50.0 (n=1, 1 min) |" in md and "85.5 ± 0.7 (n=2" in md


def test_cell_with_different_recipes_across_seeds_is_marked(tmp_path):
    calls = []
    argv = [f"--out={tmp_path}", "--methods=lora", "--tasks=sst2", "--seeds=0,1"]
    assert main(argv, runner=_fake_runner(SCORES, calls)) == 0
    path = tmp_path / "runs" / "sst2-lora-s1" / "summary.json"
    summary = json.loads(path.read_text())
    summary["config"]["lr"] = 5e-4
    path.write_text(json.dumps(summary))
    assert main(["--rebuild", f"--out={tmp_path}"]) == 0
    assert "85.5 ± 0.7 † (n=2" in (tmp_path / "results.md").read_text()


def test_a_setting_added_between_seeds_does_not_mark_the_cell(tmp_path):
    """A seed run before jpeft grew a setting lacks its key (it ran at today's default): the cell
    is one recipe. The same setting with another value in both runs marks it."""
    calls = []
    argv = [f"--out={tmp_path}", "--methods=lora", "--tasks=sst2", "--seeds=0,1"]
    assert main(argv, runner=_fake_runner(SCORES, calls)) == 0
    path = tmp_path / "runs" / "sst2-lora-s1" / "summary.json"
    summary = json.loads(path.read_text())
    summary["config"]["b2"] = 0.999
    summary["config"].setdefault("lora", {})["use_dora"] = False
    path.write_text(json.dumps(summary))
    assert main(["--rebuild", f"--out={tmp_path}"]) == 0
    assert "85.5 ± 0.7 (n=2" in (tmp_path / "results.md").read_text()
    other = tmp_path / "runs" / "sst2-lora-s0" / "summary.json"
    first = json.loads(other.read_text())
    first["config"]["b2"] = 0.98
    other.write_text(json.dumps(first))
    assert main(["--rebuild", f"--out={tmp_path}"]) == 0
    assert "85.5 ± 0.7 † (n=2" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("methods", ["../lora", "lora/../../x", "lora@..", "a\\b", "lora,"])
def test_method_names_with_path_separators_are_refused(tmp_path, capsys, methods):
    calls = []
    with pytest.raises(SystemExit) as exc:
        main([f"--out={tmp_path}", f"--methods={methods}", "--tasks=sst2", "--seeds=0"],
             runner=_fake_runner(SCORES, calls))
    assert exc.value.code == 2 and calls == []
    assert "may not be empty or contain '/', '\\' or '..'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_variant_without_its_settings_file_is_refused_before_any_cell_runs(tmp_path, capsys):
    calls = []
    with pytest.raises(SystemExit) as exc:
        main([f"--out={tmp_path}", "--methods=lora,lora@no_such_variant", "--tasks=sst2", "--seeds=0"],
             runner=_fake_runner(SCORES, calls))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and calls == []
    assert "lora_no_such_variant.toml, which does not exist" in err and "lora_dora.toml" in err
    assert not (tmp_path / "runs").exists()


def test_bad_seeds_are_refused(tmp_path, capsys):
    for seeds in ("0,x", "1,1", ","):
        with pytest.raises(SystemExit):
            main([f"--out={tmp_path}", f"--seeds={seeds}"], runner=_fake_runner(SCORES, []))
        assert "--seeds=" in capsys.readouterr().err


def test_legacy_cells_ignore_seeded_runs(tmp_path):
    assert main([f"--out={tmp_path}", "--methods=lora", "--tasks=sst2", "--seeds=0"],
                runner=_fake_runner(SCORES, [])) == 0
    assert previous_cells(tmp_path) == {}


def test_tagged_search_runs_get_their_own_folders_and_rows(tmp_path):
    calls = []
    for tag, lr in (("lr1.5e-3", "1.5e-3"), ("lr1.5e-4", "1.5e-4")):  # tags with a dot
        argv = [f"--out={tmp_path}", "--methods=lora", "--tasks=sst2", "--seeds=42", f"--tag={tag}",
                f"--extra=--lr={lr}"]
        assert main(argv, runner=_fake_runner({("lora", "sst2", 42): 0.8}, calls)) == 0
    assert len(calls) == 2  # the second tag is not taken for a finished run of the first
    assert (tmp_path / "runs" / "sst2-lora~lr1.5e-3-s42" / "summary.json").is_file()
    logs = sorted(p.name for p in (tmp_path / "runs").glob("*.log"))  # one log per run, none shared
    assert logs == ["sst2-lora~lr1.5e-3-s42.log", "sst2-lora~lr1.5e-4-s42.log"]
    md = (tmp_path / "results.md").read_text()
    assert "| lora~lr1.5e-3 | " in md and "| lora~lr1.5e-4 | " in md
    with pytest.raises(SystemExit):
        main([f"--out={tmp_path}", "--tag=../x", "--seeds=0"], runner=_fake_runner(SCORES, []))


def test_collect_copies_finished_summaries_only_and_rebuilds(tmp_path):
    src, dst = tmp_path / "sweep", tmp_path / "repo"
    assert main([f"--out={src}", "--methods=lora", "--tasks=sst2", "--seeds=0,1"],
                runner=_fake_runner(SCORES, [])) == 0
    (src / "runs" / "sst2-lora-s2" / "checkpoints").mkdir(parents=True)  # a run still going
    first = src / "runs" / "sst2-lora-s0" / "summary.json"
    first.write_text(json.dumps({k: v for k, v in json.loads(first.read_text()).items() if k != "evals"}))
    before = first.read_text()
    with pytest.raises(SystemExit):
        main([f"--out={dst}", f"--collect-from={src}"])
    assert main(["--rebuild", f"--collect-from={src}", f"--out={dst}"]) == 0
    assert sorted(p.name for p in (dst / "runs").iterdir()) == ["sst2-lora-s0", "sst2-lora-s1"]
    assert [p.name for p in (dst / "runs" / "sst2-lora-s0").iterdir()] == ["summary.json"]
    summary = json.loads((dst / "runs" / "sst2-lora-s1" / "summary.json").read_text())
    assert summary["config"]["lr"] == 1e-3 and summary["evals"][0]["step"] == 2
    assert "evals" in json.loads((dst / "runs" / "sst2-lora-s0" / "summary.json").read_text())
    assert first.read_text() == before  # the sweep's own folder is only read
    assert "| lora | 100 (1.00%) | 85.5 ± 0.7 (n=2, 1 min) |" in (dst / "results.md").read_text()


# Bad input a user may type: refused before any cell runs (exit 2, one line naming the fix).

@pytest.mark.parametrize("flags, needle", [
    (["--seeds=0,,1"], "without empty entries"), (["--seeds=-1"], "--seeds entry=-1 is out of range"),
    (["--tasks=foo"], "unknown GLUE task 'foo'"), (["--methods=lorax"], "unknown method(s) ['lorax']"),
    (["--methods=lora,lora"], "--methods names lora twice"), (["--tasks=sst2,sst2"], "--tasks names sst2 twice"),
    (["--extra=--lr=\"3"], "No closing quotation"),
])
def test_bad_grids_are_refused_before_any_cell_runs(tmp_path, capsys, flags, needle):
    calls = []
    argv = [f"--out={tmp_path / 'out'}", "--methods=lora", "--tasks=sst2", "--seeds=0", *flags]
    with pytest.raises(SystemExit) as exc:
        main(argv, runner=_fake_runner(SCORES, calls))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and calls == [] and needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_out_folder_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main([f"--out={tmp_path / 'file'}", "--methods=lora", "--tasks=sst2"], runner=_fake_runner(SCORES, []))
    assert exc.value.code == 2 and "is a file; pass a folder" in capsys.readouterr().err
    assert main([f"--out={tmp_path / 'file' / 'sub'}", "--methods=lora", "--tasks=sst2", "--seeds=0"],
                runner=_fake_runner(SCORES, [])) == 2
    assert "cannot be created" in capsys.readouterr().err


@pytest.mark.parametrize("seeded", [True, False])
@pytest.mark.parametrize("damage, needle", [
    ('{"task": "sst2", "seed"', "JSONDecodeError"), ("{}", "not a finished run's summary"),
    ('{"task": "sst2", "seed": 0}', "lacks metrics"),
])
def test_rebuild_names_a_damaged_summary_and_writes_nothing(tmp_path, capsys, seeded, damage, needle):
    seeds = ["--seeds=0,1"] if seeded else []
    runner = _fake_runner(SCORES, []) if seeded else (
        lambda cmd, log: _fake_runner(SCORES, [])(cmd + ["--seed=0"], log))
    assert main([f"--out={tmp_path}", "--methods=lora,bitfit", "--tasks=sst2", *seeds], runner=runner) == 0
    summary = tmp_path / "runs" / ("sst2-lora-s0" if seeded else "sst2-lora") / "summary.json"
    summary.write_text(damage)
    before = (tmp_path / "results.md").read_text()
    assert main(["--rebuild", f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert str(summary) in err and needle in err and "delete its run folder" in err and "Traceback" not in err
    assert (tmp_path / "results.md").read_text() == before
    if seeded:  # nothing is copied from a folder holding a damaged summary
        assert main(["--rebuild", f"--collect-from={tmp_path}", f"--out={tmp_path / 'copy'}"]) == 2
        assert str(summary) in capsys.readouterr().err and not (tmp_path / "copy").exists()


def test_rebuild_names_a_damaged_results_json_and_an_empty_folder(tmp_path, capsys):
    (tmp_path / "results.json").write_text("[1, 2")
    assert main(["--rebuild", f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'results.json'}: JSONDecodeError" in err and "Restore it, or delete it" in err
    (tmp_path / "results.json").write_text('{"cells": [{"task": "sst2"}]}')
    assert main(["--rebuild", f"--out={tmp_path}"]) == 2
    assert "not a sweep's results.json" in capsys.readouterr().err
    assert main(["--rebuild", f"--out={tmp_path / 'empty'}"]) == 1
    assert "nothing to rebuild" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--rebuild", f"--collect-from={tmp_path / 'none'}", f"--out={tmp_path / 'x'}"])
    assert exc.value.code == 2 and "has no runs/ folder" in capsys.readouterr().err
