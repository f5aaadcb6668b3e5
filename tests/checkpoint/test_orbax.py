"""Orbax checkpoints: save∘restore is the identity, wrong bases are refused, damage is reported,
and a process killed at any moment leaves only complete, restorable steps."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jpeft.checkpoint import CheckpointError, CheckpointManager, fingerprint
from jpeft.core import paths as P
from jpeft.methods import build
from tests.helpers import tiny_batch, tiny_bert


def _leaves(state):
    out = []
    for x in jax.tree_util.tree_leaves(state):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x))
    return out


def _trained_state(spec, steps=2):
    from jpeft.train.trainer import Trainer

    model, params = tiny_bert()
    trainer = Trainer(model, build(spec), params, total_steps=10)
    state = trainer.init_state(jax.random.key(0))
    for _ in range(steps):
        state, _ = trainer.train_step(state, trainer.frozen, tiny_batch())
    return trainer, state, params


@pytest.mark.parametrize("spec", ["lora", "full", "lora+ia3", "houlsby"])
def test_save_restore_is_identity_and_holds_no_frozen_weight(tmp_path, spec):
    trainer, state, params = _trained_state(spec)
    manager = CheckpointManager(tmp_path)
    expected = _leaves(state)
    manager.save(2, state, {"base_fingerprint": fingerprint(params)})
    like = trainer.init_state(jax.random.key(9))
    restored, meta = manager.restore(like, fingerprint=fingerprint(params))
    assert meta["base_fingerprint"] == fingerprint(params)
    for got, want in zip(_leaves(restored), expected):
        np.testing.assert_array_equal(got, want)
    saved = P.flatten(jax.device_get(manager.read_state()["trainable"]))
    if spec != "full":
        assert P.count_params(saved) == P.count_params(state.trainable)
        assert not any("word_embeddings" in p for p in saved)
    # the restored state keeps training
    state2, metrics = trainer.train_step(restored, trainer.frozen, tiny_batch())
    assert np.isfinite(float(metrics["loss"])) and int(state2.step) == 3


def test_other_base_is_refused_with_both_fingerprints(tmp_path):
    trainer, state, params = _trained_state("lora")
    manager = CheckpointManager(tmp_path)
    manager.save(2, state, {"base_fingerprint": fingerprint(params), "base_model": "tiny-a"})
    _, other = tiny_bert(seed=5)
    fp_other = fingerprint(other)
    assert fp_other != fingerprint(params)
    with pytest.raises(CheckpointError) as err:
        manager.restore(state, fingerprint=fp_other)
    assert fingerprint(params) in str(err.value) and fp_other in str(err.value)
    assert "allow_base_mismatch" in str(err.value)
    restored, _ = manager.restore(state, fingerprint=fp_other, allow_base_mismatch=True)
    assert int(restored.step) == 2


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    trainer, state, params = _trained_state("lora")
    manager = CheckpointManager(tmp_path)
    manager.save(2, state, {"base_fingerprint": fingerprint(params)})
    files = sorted(f for f in (tmp_path / "2" / "state").rglob("*") if f.is_file() and f.stat().st_size > 100)
    assert files
    for f in files:  # truncate every data file
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="incomplete or corrupted|cannot read"):
        CheckpointManager(tmp_path).restore(state)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        CheckpointManager(tmp_path / "empty").restore(state)


CHILD = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from jpeft.checkpoint import CheckpointManager
    from jpeft.train.trainer import TrainState
    manager = CheckpointManager(sys.argv[1], max_to_keep=3)
    step = 0
    while True:
        step += 1
        big = jnp.full((1_000_000,), float(step), jnp.float32)   # 4 MB: saves take a while
        state = TrainState(jnp.asarray(step), {"delta": {"w": big}, "base": {}}, (), jax.random.key(step))
        manager.save(step, state, {"step": step})
        print(step, flush=True)
""")


@pytest.mark.parametrize("delay", [0.8, 1.7, 2.9])
def test_sigkill_at_any_moment_leaves_complete_steps(tmp_path, delay):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    first = proc.stdout.readline()  # at least one save done
    assert first.strip() == b"1", first
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert time.time() < deadline
    import jax.numpy as jnp
    from jpeft.train.trainer import TrainState

    manager = CheckpointManager(tmp_path / "ck")
    steps = manager.all_steps()
    assert steps and manager.latest_step() == max(steps)
    like = TrainState(jnp.asarray(0), {"delta": {"w": jnp.zeros(1_000_000)}, "base": {}}, (),
                      jax.random.key(0))
    for step in steps:
        restored, meta = manager.restore(like, step=step)
        assert meta["step"] == step and int(restored.step) == step
        np.testing.assert_array_equal(np.asarray(restored.trainable["delta"]["w"][:3]), [step] * 3)


def test_old_steps_are_renamed_away_before_deletion(tmp_path):
    """Steps beyond max_to_keep leave the root in one rename (into _deleted/, then emptied): a
    half-deleted step (a kill during deletion) sits in the trash, never among the steps."""
    import jax.numpy as jnp

    from jpeft.checkpoint.orbax_ckpt import TRASH
    from jpeft.train.trainer import TrainState

    def state(step):
        return TrainState(jnp.asarray(step), {"delta": {"w": jnp.full((8,), float(step))}, "base": {}}, (),
                          jax.random.key(0))

    manager = CheckpointManager(tmp_path, max_to_keep=2)
    for step in (1, 2, 3, 4):
        manager.save(step, state(step), {"step": step})
    assert manager.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
    half_deleted = tmp_path / TRASH / "2" / "state"  # what a kill during the deletion leaves
    half_deleted.mkdir(parents=True)
    (half_deleted / "_METADATA").write_text("{}")
    reopened = CheckpointManager(tmp_path, max_to_keep=2)
    assert reopened.all_steps() == [3, 4] and not (tmp_path / TRASH).exists()
    restored, meta = reopened.restore(state(0))
    assert meta["step"] == 4 and float(restored.trainable["delta"]["w"][0]) == 4.0
