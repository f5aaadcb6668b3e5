"""The training loop: batches in, logs, evaluations and a summary out. Method-agnostic.

Dispatch stays asynchronous: the metrics of step ``k`` are read back to the host only after step
``k + 1`` has been dispatched (so an accelerator's queue never runs dry while the host logs), at
an evaluation, before a checkpoint is written, and at the end. Every step's metrics are read
back, logged or not, and checked by the divergence guard: a non-finite loss, penalty or gradient
norm, or a loss above ``LoopConfig.divergence_factor`` times the run's starting loss, stops the
run with :class:`DivergenceError` (naming the step and the learning rate). A checkpoint is
written only after every step up to it has been checked and the state itself is finite, so the
newest checkpoint of a diverged run is its last finite state.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.train.logging import MetricsLog
from jpeft.train.trainer import Trainer, TrainState

BatchIter = Callable[[int, int], Iterator[dict[str, np.ndarray]]]
EvalFn = Callable[[Trainer, TrainState], dict[str, float]]
START_STEPS = 10  # the starting loss is the mean loss of the run's first steps (at most this many)


def _fetch(tree: Any) -> Any:
    """Device -> host copy of step metrics (a module-level hook, so tests can watch when it runs)."""
    return jax.device_get(tree)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def state_is_finite(state: TrainState) -> bool:
    """Whether every floating leaf of the trainable state (and its optimizer state) is finite."""
    return bool(_all_finite((state.trainable, state.opt_state)))


class DivergenceError(RuntimeError):
    """Training diverged: the message names the step, what was seen and the likely cause."""

    def __init__(self, message: str, step: int, last_checkpoint: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


class Checkpointer(Protocol):
    """What :func:`fit` checkpoints through: ``due(step, evaluated)`` says whether step ``step``
    is saved, ``save(state, info)`` saves it (``info``: loop facts to keep, e.g. the starting
    loss) and returns nothing."""

    def due(self, step: int, evaluated: bool) -> bool: ...

    def save(self, state: TrainState, info: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """``divergence_factor``: stop when a step's loss exceeds this many times the starting loss
    (``None``: only non-finite values stop the run)."""

    total_steps: int
    steps_per_epoch: int
    log_every: int = 10
    eval_every: int = 0
    progress: bool = True
    divergence_factor: float | None = 10.0

    def __post_init__(self) -> None:
        for name in ("total_steps", "steps_per_epoch", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LoopConfig.{name} must be an integer >= 1, got {value!r}")
        if self.eval_every < 0:
            raise ValueError(f"LoopConfig.eval_every must be >= 0 (0: only at the end), got {self.eval_every}")
        factor = self.divergence_factor
        if factor is not None and not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"LoopConfig.divergence_factor must be a finite number > 1 or None, got {factor!r}")


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


class _Guard:
    """Reads back the metrics of dispatched steps, logs the due ones and checks every one."""

    def __init__(self, trainer: Trainer, config: LoopConfig, log: MetricsLog, t0: float,
                 start_loss: float | None, on_record: Callable[[dict[str, Any]], None]) -> None:
        self.trainer = trainer
        self.config = config
        self.log = log
        self.t0 = t0
        self.start_loss = start_loss
        self._first: list[float] = []
        self.pending: list[tuple[int, dict[str, Any]]] = []  # (step, device metrics), unread
        self.on_record = on_record
        self.last_checkpoint: int | None = None
        self._lr_device = _cpu_device()

    def learning_rate(self, step: int) -> float:
        # on the host's CPU device: the accelerator's queue (busy with the next step) is not touched
        if self._lr_device is None:
            return self.trainer.learning_rate(step)
        with jax.default_device(self._lr_device):
            return self.trainer.learning_rate(step)

    def read(self, before: int | None = None) -> None:
        """Read back (one transfer) every pending step ``< before`` (all when ``None``), log the
        due ones and raise :class:`DivergenceError` at the first bad one."""
        take = [(s, m) for s, m in self.pending if before is None or s < before]
        if not take:
            return
        self.pending = [(s, m) for s, m in self.pending if not (before is None or s < before)]
        values = _fetch([m for _, m in take])
        for (step, _), metrics in zip(take, values):
            metrics = {k: float(v) for k, v in metrics.items()}
            problem = self._problem(step, metrics)
            if problem is not None or step % self.config.log_every == 0 \
                    or step == self.config.total_steps:
                record = {"split": "train", "step": step, "lr": self.learning_rate(step - 1),
                          **metrics, "wall_s": round(time.perf_counter() - self.t0, 3)}
                self.log.write(record)
                self.on_record(record)
            if problem is not None:
                self.pending.clear()
                raise DivergenceError(problem, step, self.last_checkpoint)

    def _problem(self, step: int, metrics: dict[str, float]) -> str | None:
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            seen = ", ".join(f"{k}={metrics[k]}" for k in metrics)
            return (f"training diverged at step {step}: non-finite {' and '.join(bad)} ({seen}). "
                    f"{self._cause(step)}")
        loss = metrics.get("loss")
        if loss is None:
            return None
        if self.start_loss is None:  # during the first steps: compare with the earlier ones
            reference = float(np.mean(self._first)) if self._first else None
            self._first.append(loss)
            if len(self._first) >= START_STEPS or step >= self.config.total_steps:
                self.start_loss = float(np.mean(self._first))
        else:
            reference = self.start_loss
        factor = self.config.divergence_factor
        if factor is not None and reference is not None and reference > 0 and loss > factor * reference:
            return (f"training diverged at step {step}: the loss {loss:.6g} is more than {factor:g}x "
                    f"its start ({reference:.4g}). {self._cause(step)} (LoopConfig.divergence_factor"
                    " / --divergence-factor sets this threshold.)")
        return None

    def _cause(self, step: int) -> str:
        return (f"The likely cause is a learning rate too high for this method (peak lr "
                f"{self.trainer.optim_config.lr:g}, {self.learning_rate(step - 1):.3g} at this step): "
                "lower it, e.g. 3-10x, or keep gradient clipping on.")

    def info(self) -> dict[str, Any]:
        start = self.start_loss if self.start_loss is not None else (
            float(np.mean(self._first)) if self._first else None)
        return {"start_loss": start}


def _cpu_device() -> Any:
    """This process's first CPU device (``None`` when there is none)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def fit(
    trainer: Trainer,
    state: TrainState,
    batches: BatchIter,
    evaluate: EvalFn,
    config: LoopConfig,
    log: MetricsLog,
    on_step: Callable[[TrainState, bool], None] | None = None,
    checkpoint: Checkpointer | None = None,
    start_loss: float | None = None,
) -> tuple[TrainState, dict[str, float], list[dict[str, Any]]]:
    """Train ``config.total_steps`` steps, evaluating every ``eval_every`` steps and at the end.

    ``batches(epoch, start_batch)`` yields that epoch's batches from ``start_batch`` on (so a
    resumed run continues where the data order left off). ``on_step(state, evaluated)`` runs
    after every step (it must not read the state back if dispatch is to stay asynchronous);
    ``checkpoint`` saves the steps it says are due (after the guard has checked them; a step
    whose state is not finite is never saved). ``start_loss``: the run's starting loss when it
    resumes (what the divergence guard compares with; else the mean of the first steps' losses).
    Returns the final state, the final dev metrics and every dev evaluation; raises
    :class:`DivergenceError` when training diverges.
    """
    from tqdm.auto import tqdm

    start = int(state.step)
    t0 = time.perf_counter()
    evals: list[dict[str, Any]] = []
    bar = tqdm(total=config.total_steps, initial=start, disable=not config.progress,
               desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    guard = _Guard(trainer, config, log, t0, start_loss,
                   lambda record: bar.set_postfix(loss=f"{record['loss']:.4f}"))

    def run_eval(step: int) -> dict[str, float]:
        guard.read()
        metrics = evaluate(trainer, state)
        record = {"split": "dev", "step": step, **metrics,
                  "wall_s": round(time.perf_counter() - t0, 3)}
        log.write(record)
        evals.append(record)
        bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def save(step: int) -> None:
        guard.read()
        if not state_is_finite(state):
            raise DivergenceError(
                f"training diverged at step {step}: the parameters or optimizer state hold "
                "non-finite values (the update overflowed). The likely cause is a learning rate "
                f"too high for this method (peak lr {trainer.optim_config.lr:g}): lower it.",
                step, guard.last_checkpoint)
        checkpoint.save(state, guard.info())
        guard.last_checkpoint = step

    step = start
    read_due = False  # whether metrics are due to be read once the next step is dispatched
    try:
        while step < config.total_steps:
            epoch, offset = divmod(step, config.steps_per_epoch)
            for batch in batches(epoch, offset):
                state, metrics = trainer.train_step(state, trainer.frozen, trainer.shard_batch(batch))
                step += 1
                if read_due:  # step - 1's metrics: read now that step is queued behind it
                    guard.read(before=step)
                    read_due = False
                guard.pending.append((step, metrics))
                state = trainer.between_steps(state, step)
                bar.update(1)
                read_due = step % config.log_every == 0
                evaluated = bool(config.eval_every and step % config.eval_every == 0
                                 and step < config.total_steps)
                if evaluated:
                    run_eval(step)
                if on_step is not None and step < config.total_steps:
                    on_step(state, evaluated)
                if checkpoint is not None and step < config.total_steps \
                        and checkpoint.due(step, evaluated):
                    save(step)
                if step >= config.total_steps:
                    break
        final = run_eval(step)
        if on_step is not None:
            on_step(state, True)
        if checkpoint is not None and checkpoint.due(step, True):
            save(step)
        elif not state_is_finite(state):
            raise DivergenceError(f"training ended at step {step} with non-finite parameters; "
                                  "lower the learning rate", step)
    finally:
        bar.close()
    return state, final, evals
