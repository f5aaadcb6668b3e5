"""Multi-process start-up says whom it waits for and gives up with a message, not a hang or a
C++ stack dump."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jpeft.train import distributed

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("process_id, needle", [
    (1, "connecting to the coordinator (process 0)"),
    (0, "waiting for the other 1 process(es)"),
])
def test_a_missing_peer_times_out_with_a_message(process_id, needle):
    address = f"127.0.0.1:{_free_port()}"
    code = (f"from jpeft.train import distributed\n"
            f"distributed.initialize({address!r}, 2, {process_id}, timeout_s=3)\n"
            "print('joined')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and address in proc.stderr
    assert "start-up failed" in proc.stderr and "--coordinator-timeout" in proc.stderr
    assert "Check failure" not in proc.stderr and "joined" not in proc.stdout


@pytest.mark.parametrize("kwargs", [dict(num_processes=2, process_id=1),
                                    dict(coordinator_address="127.0.0.1:1", num_processes=2)])
def test_incomplete_settings_are_refused_up_front(kwargs, monkeypatch):
    for name in ("JPEFT_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "JPEFT_NUM_PROCESSES",
                 "JPEFT_PROCESS_ID", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="coordinator address"):
        distributed.initialize(**kwargs)


@pytest.mark.slow
def test_two_process_glue_run_reads_metrics_and_checks_the_state_on_each_process(tmp_path):
    """The loop's read-back, learning rate and finiteness check work when the state spans two
    processes (each with one CPU device)."""
    from tests.reliability.tiny_cli import glue_args, tiny_glue_dir, tiny_model_dir

    model, data = tiny_model_dir(tmp_path), tiny_glue_dir(tmp_path)
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.glue",
         *glue_args(model, data, tmp_path / "run", "--eval-batch-size=8"),
         f"--coordinator-address={address}", "--num-processes=2", f"--process-id={i}",
         "--coordinator-timeout=120"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in (0, 1)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        assert "[summary]" in out
