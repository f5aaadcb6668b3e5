"""benchmarks.vs_pytorch: row selection, step times from a run's log, and a --quick run of one row
whose JSON names the machine and versions and holds both sides of every row."""

from __future__ import annotations

import json

import pytest

from benchmarks.common import cpu_name
from benchmarks.vs_pytorch import ROWS, cpu_slug, main, select_rows, spread, step_times


def test_rows_are_selected_by_name_or_prefix_and_gemm_always_runs():
    assert [r.name for r in select_rows("glue,inference")] == ["gemm", "glue-sst2", "glue-mrpc", "inference"]
    assert [r.name for r in select_rows("")] == list(ROWS)
    with pytest.raises(ValueError, match="unknown row 'lorax'"):
        select_rows("lorax")


def test_step_times_skip_the_first_step_and_count_from_an_evaluation_end():
    records = [{"split": "train", "step": 1, "wall_s": 5.0}, {"split": "train", "step": 2, "wall_s": 5.5},
               {"split": "dev", "step": 2, "wall_s": 9.0}, {"split": "train", "step": 3, "wall_s": 9.25}]
    assert step_times(records) == [0.5, 0.25]
    assert spread([3.0, 1.0, 2.0])["median_s"] == 2.0


def test_cpu_slug():
    assert cpu_slug("Intel(R) Xeon(R) Processor") == "intel-xeon-processor"
    assert cpu_slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"


@pytest.mark.real
@pytest.mark.slow
def test_quick_run_records_machine_versions_and_both_sides_of_every_row(minilm_dir, tmp_path):
    assert main(["--quick", "--rows=inference", "--repeats=1", f"--out={tmp_path}"]) == 0
    stem = f"vs_pytorch-{cpu_slug(cpu_name())}-quick"
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert result["machine"]["cpu"] == cpu_name() and result["machine"]["cores"] >= 1
    assert set(result["versions"]) >= {"jax", "jaxlib", "flax", "torch", "transformers", "peft"}
    assert all(result["gemm_peak_gflops"][side] > 0 for side in ("jpeft", "pytorch"))
    assert [r["row"] for r in result["rows"]] == ["gemm", "inference"]
    for row in result["rows"]:
        assert set(row["sides"]) == set(ROWS[row["row"]].sides)
        for side in row["sides"].values():
            assert "error" not in side and side["peak_rss_mb"] > 0
    inference = result["rows"][1]["sides"]
    assert all(s["median_s"] > 0 and s["n"] == result["sizes"]["steps"] for s in inference.values())
    assert cpu_name() in (tmp_path / f"{stem}.md").read_text()
