"""A GLUE run killed with SIGKILL and started again with the same command ends with the same
metrics and parameters, bit for bit, as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmd(out):
    return [sys.executable, "-m", "experiments.glue", "--method=lora", "--task=sst2",
            "--max-steps=10", "--save-every=2", "--max-train-samples=320", "--max-length=32",
            "--eval-every=1000", "--progress=false", "--lora.dropout=0.1", f"--output-dir={out}"]


@pytest.mark.real
def test_sigkill_and_restart_matches_uninterrupted_run(tmp_path, minilm_dir):
    from jpeft.checkpoint import CheckpointManager
    from jpeft.data.glue import default_data_dir

    if not (default_data_dir() / "SST-2" / "train.tsv").is_file():
        pytest.skip("real GLUE data not found")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(_cmd(a), cwd=ROOT, env=env, check=True, capture_output=True)

    proc = subprocess.Popen(_cmd(b), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in (b / "checkpoints").glob("[0-9]*") if p.name.isdigit()]
        if steps and max(steps) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "summary.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(_cmd(b), cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert "resumed from" in resumed.stdout

    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa["metrics"] == sb["metrics"] and sb["steps"] == 10
    losses = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                        if r["split"] == "train"]
    assert losses(a) == losses(b)
    ta, tb = CheckpointManager(a / "checkpoints").read_state(10), CheckpointManager(b / "checkpoints").read_state(10)
    import jax
    for x, y in zip(jax.tree_util.tree_leaves(ta), jax.tree_util.tree_leaves(tb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
