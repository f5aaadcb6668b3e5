"""The training loop's divergence guard and its asynchronous read-back of metrics."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jpeft.methods import LoraConfig, lora
from jpeft.train import loop as L
from jpeft.train.logging import MetricsLog
from jpeft.train.optim import OptimConfig
from jpeft.train.trainer import Trainer
from tests.helpers import tiny_batch, tiny_bert


def _trainer(lr: float, total: int, clip: float = 1.0) -> Trainer:
    model, params = tiny_bert()
    optim = OptimConfig(lr=lr, warmup_ratio=0.0, schedule="constant", clip_norm=clip)
    return Trainer(model, lora(LoraConfig(r=2)), params, total_steps=total, optim=optim)


def _batches(total: int):
    batch = {k: np.asarray(v) for k, v in tiny_batch(batch=8, seed=2).items()}

    def batches(epoch, start):
        for _ in range(start, total):
            yield batch
    return batches


class _Saver:
    def __init__(self, every: int) -> None:
        self.every, self.saved = every, []

    def due(self, step, evaluated):
        return step % self.every == 0

    def save(self, state, info):
        assert L.state_is_finite(state)
        self.saved.append((int(state.step), info))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_of_a_step_are_read_only_after_the_next_step_is_dispatched(tmp_path, monkeypatch):
    """Every read-back of step k's metrics happens after step k + 1 was dispatched (except the
    last step, read at the final evaluation): the loop never waits for the step it just queued."""
    total = 6
    trainer = _trainer(1e-2, total)
    events: list[tuple[str, object]] = []
    step_of = {}
    dispatch = trainer.train_step

    def train_step(state, frozen, batch):
        new, metrics = dispatch(state, frozen, batch)
        n = len([e for e in events if e[0] == "dispatch"]) + 1
        events.append(("dispatch", n))
        step_of[id(metrics["loss"])] = n
        return new, metrics

    trainer.train_step = train_step
    real_fetch = L._fetch

    def fetch(tree):
        for metrics in tree:
            events.append(("read", step_of[id(metrics["loss"])]))
        return real_fetch(tree)

    monkeypatch.setattr(L, "_fetch", fetch)
    state = trainer.init_state(jax.random.key(0))
    with MetricsLog(tmp_path / "m.jsonl") as log:
        L.fit(trainer, state, _batches(total), lambda t, s: {"x": 0.0},
              L.LoopConfig(total, total, log_every=1, eval_every=0, progress=False), log)
    reads = [(i, k) for i, (kind, k) in enumerate(events) if kind == "read"]
    assert sorted(k for _, k in reads) == list(range(1, total + 1))  # every step read once
    for index, k in reads:
        if k < total:
            dispatched_next = events.index(("dispatch", k + 1))
            assert dispatched_next < index, events
    assert [r["step"] for r in _records(tmp_path / "m.jsonl") if r["split"] == "train"] == \
        list(range(1, total + 1))


def test_nan_loss_stops_the_run_names_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    total = 12
    trainer = _trainer(1e3, total, clip=0.0)
    saver = _Saver(every=2)
    state = trainer.init_state(jax.random.key(0))
    with MetricsLog(tmp_path / "m.jsonl") as log, pytest.raises(L.DivergenceError) as err:
        L.fit(trainer, state, _batches(total), lambda t, s: {"x": 0.0},
              L.LoopConfig(total, total, log_every=5, progress=False, divergence_factor=None), log,
              checkpoint=saver)
    message = str(err.value)
    assert "non-finite" in message
    assert f"step {err.value.step}" in message and "learning rate" in message and "1000" in message
    assert saver.saved and all(step < err.value.step for step, _ in saver.saved)
    assert err.value.last_checkpoint == saver.saved[-1][0]
    records = _records(tmp_path / "m.jsonl")
    assert records[-1]["step"] == err.value.step  # the bad step is logged (non-finite as null)


def test_a_loss_growing_past_the_factor_stops_the_run(tmp_path):
    total = 6
    trainer = _trainer(1e-2, total)
    state = trainer.init_state(jax.random.key(0))
    with MetricsLog(tmp_path / "m.jsonl") as log, pytest.raises(L.DivergenceError, match="more than 10x"):
        # a tiny starting loss from an earlier (resumed) part of the run: the first step is 10x above
        L.fit(trainer, state, _batches(total), lambda t, s: {"x": 0.0},
              L.LoopConfig(total, total, log_every=1, progress=False), log, start_loss=1e-3)


def test_a_healthy_run_passes_its_starting_loss_to_the_checkpoints(tmp_path):
    total = 4
    trainer = _trainer(1e-2, total)
    saver = _Saver(every=2)
    state = trainer.init_state(jax.random.key(0))
    with MetricsLog(tmp_path / "m.jsonl") as log:
        L.fit(trainer, state, _batches(total), lambda t, s: {"x": 0.0},
              L.LoopConfig(total, total, log_every=3, progress=False), log, checkpoint=saver)
    assert [s for s, _ in saver.saved] == [2, 4]
    records = [r for r in _records(tmp_path / "m.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == [3, 4]  # the logged steps and the last one
    # the same steps replayed by hand: the starting loss is the mean loss of the steps read so far
    replay = _trainer(1e-2, total)
    state = replay.init_state(jax.random.key(0))
    batch = next(_batches(total)(0, 0))
    losses = []
    for _ in range(total):
        state, metrics = replay.train_step(state, replay.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert [r["loss"] for r in records] == pytest.approx(losses[2:], rel=1e-6)
    assert len(set(losses)) == total  # the loss moves, so a wrong step's loss is told apart
    for step, info in saver.saved:
        assert info["start_loss"] == pytest.approx(np.mean(losses[:step]), rel=1e-6), (step, losses)


@pytest.mark.parametrize("kwargs", [dict(log_every=0), dict(total_steps=0), dict(divergence_factor=1.0),
                                    dict(divergence_factor=float("nan")), dict(eval_every=-1)])
def test_loop_config_refuses_nonsense(kwargs):
    base = dict(total_steps=4, steps_per_epoch=4)
    with pytest.raises(ValueError, match="LoopConfig"):
        L.LoopConfig(**{**base, **kwargs})
