"""The learning-rate search for failing cells: which cells fail (at or below the majority class at
the reported seed), the settings (the failing run's lr times the factors), its runs at its own
seed with their tags, resume, and refused arguments."""

from __future__ import annotations

import json

import pytest

from experiments.search import main
from experiments.sweep import main as sweep_main
from tests.test_sweep import SCORES, _fake_runner


def _recording(scores, cmds):
    calls = []
    inner = _fake_runner(scores, calls)

    def run(cmd, log):
        cmds.append(cmd)
        return inner(cmd, log)
    return run


def test_failing_cells_are_searched_at_their_own_seed_and_resume(tmp_path, capsys):
    src, out = tmp_path / "glue", tmp_path / "search"
    assert sweep_main([f"--out={src}", "--methods=lora,bitfit", "--tasks=sst2,mrpc", "--seeds=0"],
                      runner=_fake_runner(SCORES, [])) == 0
    capsys.readouterr()
    # bitfit on SST-2 (0.50 against the majority's 0.509) is the one failing cell at seed 0
    assert main([f"--from={src}", f"--out={out}", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "sst2 bitfit: accuracy 0.5000 at seed 0 (majority 0.5090), lr 0.001 -> search 0.003, 0.0003" in printed
    assert "lora" not in printed and "mrpc" not in printed
    assert not out.exists()  # a dry run runs nothing

    scores = {**SCORES, ("bitfit", "sst2", 42): 0.8}
    cmds = []
    assert main([f"--from={src}", f"--out={out}"], runner=_recording(scores, cmds)) == 0
    assert [c[-1] for c in cmds] == ["--lr=0.003", "--lr=0.0003"]
    assert all("--seed=42" in c and "--task=sst2" in c and "--method=bitfit" in c for c in cmds)
    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert runs == ["sst2-bitfit~lr0.0003-s42", "sst2-bitfit~lr0.003-s42"]
    md = (out / "results.md").read_text()
    assert "| bitfit~lr0.003 | " in md and "| bitfit~lr0.0003 | " in md
    assert main([f"--from={src}", f"--out={out}"], runner=_recording(scores, cmds)) == 0
    assert len(cmds) == 2  # finished settings are skipped
    # the search's own runs are not cells of the table: a search of the search finds nothing
    assert main([f"--from={out}", f"--out={tmp_path / 'again'}", "--seed-of=42", "--seed=7", "--dry-run"]) == 0
    assert "no failing cells" in capsys.readouterr().out


def test_filters_and_a_run_without_its_recipe(tmp_path, capsys):
    src = tmp_path / "glue"
    assert sweep_main([f"--out={src}", "--methods=bitfit", "--tasks=sst2", "--seeds=0"],
                      runner=_fake_runner(SCORES, [])) == 0
    assert main([f"--from={src}", "--tasks=mrpc", "--dry-run"]) == 0
    assert "no failing cells" in capsys.readouterr().out
    summary = src / "runs" / "sst2-bitfit-s0" / "summary.json"
    data = json.loads(summary.read_text())
    data["config"] = {}
    summary.write_text(json.dumps(data))
    assert main([f"--from={src}", "--dry-run"]) == 2
    assert "records no learning rate" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--from={tmp}/nothing"], "has no runs/ folder"),
    (["--from={tmp}", "--seed=0"], "never reported"),
    (["--from={tmp}", "--factors=3,-1"], "factors > 0"),
    (["--from={tmp}", "--factors=x"], "comma-separated numbers"),
    (["--from={tmp}", "--methods=../x"], "may not be empty"),
])
def test_bad_arguments_are_refused_by_name(tmp_path, capsys, argv, needle):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit) as info:
        main([a.format(tmp=tmp_path) for a in argv])
    assert info.value.code == 2 and needle in capsys.readouterr().err
