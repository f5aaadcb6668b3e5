"""The training loop: batches in, logs, evaluations and a summary out. Method-agnostic."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jpeft.train.logging import MetricsLog
from jpeft.train.trainer import Trainer, TrainState

BatchIter = Callable[[int, int], Iterator[dict[str, np.ndarray]]]
EvalFn = Callable[[Trainer, TrainState], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    total_steps: int
    steps_per_epoch: int
    log_every: int = 10
    eval_every: int = 0
    progress: bool = True


def predict(trainer: Trainer, state: TrainState, batches: Iterator[dict[str, np.ndarray]]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Stacked outputs and labels over real (weight > 0) rows of ``batches``."""
    outputs, labels = [], []
    for batch in batches:
        keep = batch["weights"] > 0 if "weights" in batch else slice(None)
        out = jax.device_get(trainer.eval_step(state, trainer.frozen, trainer.shard_batch(batch)))
        outputs.append(np.asarray(out)[keep])
        labels.append(np.asarray(batch["labels"])[keep])
    return np.concatenate(outputs), np.concatenate(labels)


def fit(
    trainer: Trainer,
    state: TrainState,
    batches: BatchIter,
    evaluate: EvalFn,
    config: LoopConfig,
    log: MetricsLog,
    on_step: Callable[[TrainState, bool], None] | None = None,
) -> tuple[TrainState, dict[str, float], list[dict[str, Any]]]:
    """Train ``config.total_steps`` steps, evaluating every ``eval_every`` steps and at the end.

    ``batches(epoch, start_batch)`` yields that epoch's batches from ``start_batch`` on (so a
    resumed run continues where the data order left off). ``on_step(state, evaluated)`` runs
    after every step (checkpointing). Returns the final state, the final dev metrics and every
    dev evaluation.
    """
    from tqdm.auto import tqdm

    start = int(state.step)
    t0 = time.perf_counter()
    evals: list[dict[str, Any]] = []
    bar = tqdm(total=config.total_steps, initial=start, disable=not config.progress,
               desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    pending: list[tuple[int, dict[str, Any]]] = []

    def flush() -> None:
        for step, metrics in pending:
            record = {"split": "train", "step": step, "lr": trainer.learning_rate(step - 1)}
            record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
            record["wall_s"] = round(time.perf_counter() - t0, 3)
            log.write(record)
        if pending:
            bar.set_postfix(loss=f"{float(pending[-1][1]['loss']):.4f}")
        pending.clear()

    def run_eval(step: int) -> dict[str, float]:
        flush()
        metrics = evaluate(trainer, state)
        record = {"split": "dev", "step": step, **metrics,
                  "wall_s": round(time.perf_counter() - t0, 3)}
        log.write(record)
        evals.append(record)
        bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    step = start
    final: dict[str, float] = {}
    while step < config.total_steps:
        epoch, offset = divmod(step, config.steps_per_epoch)
        for batch in batches(epoch, offset):
            state, metrics = trainer.train_step(state, trainer.frozen, trainer.shard_batch(batch))
            step += 1
            state = trainer.between_steps(state, step)
            bar.update(1)
            if step % config.log_every == 0 or step == config.total_steps:
                pending.append((step, metrics))
                flush()
            evaluated = bool(config.eval_every and step % config.eval_every == 0
                             and step < config.total_steps)
            if evaluated:
                run_eval(step)
            if on_step is not None and step < config.total_steps:
                on_step(state, evaluated)
            if step >= config.total_steps:
                break
    flush()
    final = run_eval(step)
    if on_step is not None:
        on_step(state, True)
    bar.close()
    return state, final, evals
