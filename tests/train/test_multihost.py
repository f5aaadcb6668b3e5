"""Multi-process training (``jax.distributed``, gloo collectives on CPU): two processes with 4
forced CPU devices each, a localhost coordinator and a ``data=4,fsdp=2`` mesh over the 8 global
devices, each feeding its half of every global batch, train exactly as one process with 8
devices on the same mesh and batches.

Tolerance: losses equal within 2e-5 absolute (float32; as tests/train/test_sharding.py, the
cross-process reductions may be ordered differently). Every subprocess has a 300 s timeout so a
hung rendezvous fails the test instead of blocking.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jpeft.train import distributed

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 2e-5
TIMEOUT_S = 300
STEPS = 3
MESH = "data=4,fsdp=2"

SCRIPT = textwrap.dedent("""
    import json, sys
    from jpeft.train import distributed
    multi = distributed.initialize()  # from JPEFT_COORDINATOR / JPEFT_NUM_PROCESSES / JPEFT_PROCESS_ID
    import jax, numpy as np
    from tests.helpers import tiny_bert, tiny_batch
    from jpeft.methods import build
    from jpeft.train.trainer import Trainer
    from jpeft.train.sharding import make_mesh
    assert jax.device_count() == 8, jax.devices()
    model, params = tiny_bert(hidden=32, heads=4)
    trainer = Trainer(model, build("lora"), params, total_steps=4, mesh=make_mesh("MESH"),
                      min_shard_size=16)
    state = trainer.init_state(jax.random.key(0))
    losses = []
    for i in range(STEPS):
        batch = {k: np.asarray(v) for k, v in tiny_batch(batch=8, seed=i).items()}
        local = distributed.process_rows(batch)  # rows [pid*B/n, (pid+1)*B/n)
        state, metrics = trainer.train_step(state, trainer.frozen, trainer.shard_batch(local))
        losses.append(float(metrics["loss"]))
    print("RESULT" + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                                 "local_devices": jax.local_device_count(), "multi": multi,
                                 "losses": losses}), flush=True)
    distributed.shutdown()
""").replace("MESH", MESH).replace("STEPS", str(STEPS))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JPEFT_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    env.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra})
    return env


def _result(stdout: str) -> dict:
    line = next(l for l in stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def runs():
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=_env(4, JPEFT_COORDINATOR=f"127.0.0.1:{port}",
                                  JPEFT_NUM_PROCESSES="2", JPEFT_PROCESS_ID=str(pid)))
        for pid in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(_result(out))
    finally:
        for proc in procs:  # a hang or a failure must not leave the other process behind
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    single = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=_env(8), text=True,
                            capture_output=True, timeout=TIMEOUT_S, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    return outputs, _result(single.stdout)


def test_two_processes_match_one(runs):
    multi, single = runs
    diff = max(abs(a - b) for r in multi for a, b in zip(r["losses"], single["losses"]))
    print(f"\nlosses 2 processes: {multi[0]['losses']} / {multi[1]['losses']}; "
          f"1 process: {single['losses']}; max |diff| = {diff:.3g}")
    assert single["count"] == 1 and not single["multi"]
    assert sorted(r["process"] for r in multi) == [0, 1]
    for r in multi:
        assert r["count"] == 2 and r["local_devices"] == 4 and r["multi"]
        assert len(r["losses"]) == STEPS
        np.testing.assert_allclose(r["losses"], single["losses"], atol=TOLERANCE, rtol=0)
    # every process sees the same (replicated) loss
    np.testing.assert_array_equal(multi[0]["losses"], multi[1]["losses"])
    assert single["losses"][-1] != single["losses"][0]  # the steps did train


def test_settings_and_single_process_noop(monkeypatch):
    for name in ("JPEFT_COORDINATOR", "JPEFT_NUM_PROCESSES", "JPEFT_PROCESS_ID", "JPEFT_DISTRIBUTED",
                 "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False  # nothing configured: single process
    assert distributed.initialize(num_processes=1) is False
    monkeypatch.setenv("JPEFT_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("JPEFT_NUM_PROCESSES", "4")
    monkeypatch.setenv("JPEFT_PROCESS_ID", "2")
    assert distributed.settings() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                      "process_id": 2, "local_device_ids": None}
    assert distributed.settings(process_id=3)["process_id"] == 3  # arguments win
    with pytest.raises(ValueError, match="outside"):
        distributed.initialize(process_id=5)
    monkeypatch.setenv("JPEFT_NUM_PROCESSES", "four")
    with pytest.raises(ValueError, match="not an integer"):
        distributed.settings()


def test_process_rows():
    batch = {"x": np.arange(8), "y": np.arange(16).reshape(8, 2)}
    assert distributed.process_rows(batch, 1, 2)["x"].tolist() == [4, 5, 6, 7]
    assert distributed.process_rows(batch, 0, 4)["y"].tolist() == [[0, 1], [2, 3]]
    assert distributed.process_rows(batch, 0, 1)["x"].tolist() == list(range(8))
    with pytest.raises(ValueError, match="multiple"):
        distributed.process_rows(batch, 0, 3)
