"""What the benchmark scripts record about how they were invoked."""

from __future__ import annotations

import sys

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
