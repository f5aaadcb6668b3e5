"""Checkpoint integrity: checksums written with every step, verified on restore, and a fall back
to the newest step that verifies when bytes of the newest one are flipped."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.checkpoint import CheckpointError, CheckpointManager
from jpeft.checkpoint.orbax_ckpt import CHECKSUMS, CORRUPT
from jpeft.methods import LoraConfig, lora
from jpeft.train.trainer import Trainer
from tests.helpers import perturb, tiny_bert


@pytest.fixture(scope="module")
def states():
    model, params = tiny_bert()
    trainer = Trainer(model, lora(LoraConfig(r=2)), params, total_steps=4)
    state = trainer.init_state(jax.random.key(0))
    return [state._replace(step=jnp.asarray(i, jnp.int32), trainable=perturb(state.trainable, seed=i))
            for i in (1, 2, 3)]


def _save_all(directory: Path, states) -> CheckpointManager:
    manager = CheckpointManager(directory, max_to_keep=5)
    for state in states:
        manager.save(int(state.step), state, {"step": int(state.step)})
    return manager


def _largest_data_file(step_dir: Path) -> Path:
    """The largest file of the step's array data (what a restore reads)."""
    files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip(file: Path, count: int = 64) -> None:
    data = bytearray(file.read_bytes())
    start = len(data) // 3
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree_util.tree_leaves(a.trainable), jax.tree_util.tree_leaves(b.trainable)))


def test_every_step_records_file_and_array_checksums(tmp_path, states):
    manager = _save_all(tmp_path / "ck", states)
    for step in (1, 2, 3):
        assert (tmp_path / "ck" / str(step) / CHECKSUMS).is_file()
        assert manager.verify_files(step)
        assert manager.read_meta(step)["array_sha256"]
    restored, meta, step = manager.restore_verified(states[0])
    assert step == 3 and _same(restored, states[2])


def test_flipped_bytes_in_the_newest_step_fall_back_to_the_previous_one(tmp_path, states):
    _save_all(tmp_path / "ck", states)
    damaged = _largest_data_file(tmp_path / "ck" / "3")
    _flip(damaged)
    reports: list[str] = []
    manager = CheckpointManager(tmp_path / "ck", max_to_keep=5)
    restored, _, step = manager.restore_verified(states[0], report=reports.append)
    assert step == 2 and _same(restored, states[1])
    assert len(reports) == 1 and len(reports[0]) < 800, reports
    assert "step 3" in reports[0] and damaged.name in reports[0] and "resuming from step 2" in reports[0]
    assert manager.all_steps() == [1, 2]  # the damaged step was moved aside, not deleted
    assert len(list((tmp_path / "ck" / CORRUPT).iterdir())) == 1


@pytest.mark.parametrize("damage", ["data", "values"])
def test_without_the_file_record_the_array_checksums_still_catch_it(tmp_path, states, damage):
    """No jpeft_checksums.json (e.g. killed between the save and the record): flipped bytes
    either fail to decode or decode to values whose SHA-256 differs from the one in meta."""
    import json

    _save_all(tmp_path / "ck", states)
    (tmp_path / "ck" / "3" / CHECKSUMS).unlink()
    if damage == "data":
        _flip(_largest_data_file(tmp_path / "ck" / "3"))
    else:  # arrays that decode but differ: simulated by a different recorded checksum
        file = tmp_path / "ck" / "3" / "meta" / "metadata"
        meta = json.loads(file.read_text())
        first = sorted(meta["array_sha256"])[0]
        meta["array_sha256"][first] = "0" * 64
        file.write_text(json.dumps(meta))
    reports: list[str] = []
    manager = CheckpointManager(tmp_path / "ck", max_to_keep=5)
    restored, _, step = manager.restore_verified(states[0], report=reports.append)
    assert step == 2 and _same(restored, states[1]), reports
    assert "step 3" in reports[-1] and len(reports[-1]) < 800


def test_no_step_verifies_stops_with_one_short_message_and_moves_nothing(tmp_path, states):
    _save_all(tmp_path / "ck", states[:2])
    for step in (1, 2):
        _flip(_largest_data_file(tmp_path / "ck" / str(step)))
    manager = CheckpointManager(tmp_path / "ck", max_to_keep=5)
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies") as err:
        manager.restore_verified(states[0])
    assert len(str(err.value)) < 1200 and "step 1" in str(err.value) and "step 2" in str(err.value)
    assert manager.all_steps() == [1, 2] and not (tmp_path / "ck" / CORRUPT).exists()


def test_a_truncated_file_is_reported_briefly(tmp_path, states):
    _save_all(tmp_path / "ck", states)
    damaged = _largest_data_file(tmp_path / "ck" / "3")
    damaged.write_bytes(damaged.read_bytes()[:10])
    reports: list[str] = []
    _, _, step = CheckpointManager(tmp_path / "ck", max_to_keep=5).restore_verified(
        states[0], report=reports.append)
    assert step == 2 and len(reports[0]) < 800
