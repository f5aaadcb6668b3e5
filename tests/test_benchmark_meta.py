"""What the benchmark scripts record about how they were invoked, and how they refuse bad arguments."""

from __future__ import annotations

import importlib
import sys

import pytest

from benchmarks.common import command_line, run_meta


def test_command_line_records_the_given_or_the_process_arguments(monkeypatch):
    assert command_line("benchmarks.mixed_batches", ["--methods=lora,houlsby"]) == \
        "python -m benchmarks.mixed_batches --methods=lora,houlsby"
    monkeypatch.setattr(sys, "argv", ["benchmarks/scaling.py", "--steps=3"])
    assert command_line("benchmarks.scaling", None) == "python -m benchmarks.scaling --steps=3"
    assert command_line("benchmarks.scaling", []) == "python -m benchmarks.scaling"


def test_run_meta_records_machine_versions_and_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    meta = run_meta("python -m benchmarks.x", torch="2.13.0")
    assert meta["command"] == "python -m benchmarks.x"
    assert meta["xla_flags"] == "--xla_cpu_experimental_ynn_fusion_type="
    assert meta["versions"]["torch"] == "2.13.0" and "jax" in meta["versions"]
    assert meta["machine"]["cores"] >= 1



@pytest.mark.parametrize("module, argv, needle", [
    ("train_step", ["--steps=0"], "argument --steps: 0 is out of range; give an integer >= 1"),
    ("train_step", ["--rounds=x"], "argument --rounds: 'x' is not an integer"),
    ("train_step", ["--configs=nosuch"], "unknown --configs ['nosuch']; choose from full"),
    ("train_step", ["--sides=jpeft,torch"], "unknown --sides ['torch']; choose from jpeft, peft"),
    ("vs_pytorch", ["--repeats=0"], "argument --repeats: 0 is out of range"),
    ("revisions", ["--before=no-such-revision"], "--before: 'no-such-revision' is not a commit"),
    ("revisions", ["--before=HEAD", "--after=no-such-revision"], "--after: 'no-such-revision' is not a commit"),
    ("revisions", ["--before=HEAD", "--steps=-1"], "argument --steps: -1 is out of range"),
    ("attention_blocks", ["--rounds=0"], "argument --rounds: 0"), ("dot_bound", ["--reps=0"], "argument --reps: 0"),
    ("scaling", ["--steps=0"], "argument --steps: 0"), ("inference", ["--reps=0"], "argument --reps: 0"),
    ("decode", ["--repeats=0"], "argument --repeats: 0"), ("gemm", ["--tokens=0"], "argument --tokens: 0"),
    ("mixed_batches", ["--batch=0"], "argument --batch: 0"), ("profile_step", ["--steps=0"], "argument --steps: 0"),
    ("compiler_options", ["--reps=0"], "argument --reps: 0"), ("quant_base_loss", ["--pairs=0"], "argument --pairs: 0"),
])
def test_bad_benchmark_arguments_are_usage_errors(tmp_path, capsys, module, argv, needle):
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as exc:
        main([*argv, f"--out={tmp_path / 'out'}"] if module not in ("quant_base_loss",) else argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
