"""Optimizers over the trainable tree only: ``optax.multi_transform`` over group labels.

The trainable tree is ``{"delta": δ, "base": {path: leaf}}``. Every leaf gets a group label:
``"default"``, ``"no_decay"`` (biases and LayerNorm of trainable base leaves, as the Hugging Face
Trainer does), ``"head"`` and ``"head_no_decay"`` (the task head's leaves, split the same way) or a
method's own label (``transform.labels``, e.g. ``"prompt"``, ``"gates"``).
Each group is an AdamW with its own learning-rate multiplier and weight decay; a group whose multiplier is 0 gets
``optax.set_to_zero()`` and no optimizer state. A group ``<name>_no_decay`` takes ``<name>``'s
learning-rate multiplier unless it has its own, and is not decayed unless
``group_weight_decay`` names it: ``group_lr={"head": 10}`` trains the whole task head 10× faster."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Collection, Sequence
from typing import Any

import jax
import optax

HEAD = "head"
NO_DECAY = "no_decay"


def range_text(low: float, high: float, low_in: bool, high_in: bool, integer: bool) -> str:
    """``"an integer >= 1"``, ``"a finite number in [0, 1)"`` ..."""
    kind = "an integer" if integer else "a finite number"
    lo, hi = (str(int(x)) if float(x).is_integer() else f"{x:g}" for x in (low, high))
    if math.isinf(low) and math.isinf(high):
        return kind
    if math.isinf(high):
        return f"{kind} {'>=' if low_in else '>'} {lo}"
    if math.isinf(low):
        return f"{kind} {'<=' if high_in else '<'} {hi}"
    return f"{kind} in {'[' if low_in else '('}{lo}, {hi}{']' if high_in else ')'}"


def check_number(flag: str, value: Any, low: float, high: float, low_in: bool, high_in: bool,
                 integer: bool, note: str = "") -> None:
    """Raise ``ValueError`` naming ``flag``, its value and the allowed range unless ``value`` is in it."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and (not integer or float(value).is_integer()) \
        and (low < value or (low_in and value == low)) and (value < high or (high_in and value == high))
    if not ok:
        extra = f" ({note})" if note else ""
        raise ValueError(f"{flag}={value!r} is out of range: give "
                         f"{range_text(low, high, low_in, high_in, integer)}{extra}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = dataclasses.field(default=5e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = dataclasses.field(default=0.01, metadata={"help": "AdamW decoupled decay"})
    warmup_ratio: float = dataclasses.field(default=0.06, metadata={"help": "linear warmup fraction"})
    schedule: str = dataclasses.field(default="linear", metadata={"help": "'linear' decay, 'cosine' or 'constant'"})
    clip_norm: float = dataclasses.field(default=1.0, metadata={"help": "global gradient-norm clip (0: off)"})
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    group_lr: dict[str, float] = dataclasses.field(
        default_factory=dict,
        metadata={"help": "learning-rate multiplier per group, e.g. {\"prompt\": 10} or {\"head\": 10} "
                          "(the task head)"}
    )
    group_weight_decay: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata={"help": "weight decay per group (default: weight_decay; 0 for no_decay and <name>_no_decay)"}
    )

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant, got {self.schedule!r}")
        inf = math.inf
        check_number("lr", self.lr, 0, inf, False, False, False)
        check_number("weight_decay", self.weight_decay, 0, inf, True, False, False)
        check_number("warmup_ratio", self.warmup_ratio, 0, 1, True, False, False)
        check_number("clip_norm", self.clip_norm, 0, inf, True, False, False, "0: no clipping")
        check_number("b1", self.b1, 0, 1, True, False, False)
        check_number("b2", self.b2, 0, 1, True, False, False)
        check_number("eps", self.eps, 0, inf, False, False, False)
        for name, groups in (("group_lr", self.group_lr), ("group_weight_decay", self.group_weight_decay)):
            for group, value in dict(groups).items():
                check_number(f"{name}[{group!r}]", value, 0, inf, True, False, False)


def learning_rate_schedule(config: OptimConfig, total_steps: int,
                           stage_starts: Sequence[int] = ()) -> optax.Schedule:
    """Warmup to ``lr`` then linear/cosine decay to 0 over ``total_steps``; with ``stage_starts``
    (steps in ``(0, total_steps)``), the same shape over each stage, restarting at every start."""
    total_steps = max(int(total_steps), 1)
    starts = sorted({int(s) for s in stage_starts if 0 < int(s) < total_steps})
    if starts:
        bounds = [0, *starts, total_steps]
        stages = [_stage_schedule(config, b - a) for a, b in zip(bounds, bounds[1:])]
        return optax.join_schedules(stages, starts)
    return _stage_schedule(config, total_steps)


def _stage_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = int(round(config.warmup_ratio * total_steps))
    if config.schedule == "constant":
        decay: optax.Schedule = optax.constant_schedule(config.lr)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(config.lr, max(total_steps - warmup, 1))
    else:
        decay = optax.linear_schedule(config.lr, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay], [warmup])


def base_labels(flat_base: dict[str, Any], head: Collection[str] = ()) -> dict[str, str]:
    """``no_decay`` for biases and LayerNorm parameters, ``default`` otherwise; the paths in
    ``head`` (the task head) get ``head_no_decay`` and ``head`` instead."""
    labels = {}
    for path in flat_base:
        no_decay = path.endswith("/bias") or "LayerNorm" in path or "layer_norm" in path
        if path in head:
            labels[path] = f"{HEAD}_{NO_DECAY}" if no_decay else HEAD
        else:
            labels[path] = NO_DECAY if no_decay else "default"
    return labels


def group_family(group: str) -> str:
    """The group whose learning-rate multiplier ``group`` shares: ``"head_no_decay"`` -> ``"head"``."""
    return group.removesuffix(f"_{NO_DECAY}")


def make_optimizer(config: OptimConfig, labels: Any, total_steps: int,
                   stage_starts: Sequence[int] = ()) -> optax.GradientTransformation:
    """``optax.multi_transform`` of AdamW groups for the label tree ``labels`` (the learning
    rate follows :func:`learning_rate_schedule`)."""
    schedule = learning_rate_schedule(config, total_steps, stage_starts)
    groups = sorted(set(jax.tree_util.tree_leaves(labels)))
    transforms: dict[str, optax.GradientTransformation] = {}
    for group in groups:
        family = group_family(group)
        mult = float(config.group_lr.get(group, config.group_lr.get(family, 1.0)))
        if mult == 0.0:
            transforms[group] = optax.set_to_zero()
            continue
        no_decay = group == NO_DECAY or family != group
        decay = config.group_weight_decay.get(group, 0.0 if no_decay else config.weight_decay)
        transforms[group] = optax.adamw(
            lambda step, m=mult: schedule(step) * m,
            b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=decay,
        )
    known = set(groups) | {group_family(g) for g in groups}
    unknown = (set(config.group_lr) | set(config.group_weight_decay)) - known
    if unknown:
        raise ValueError(f"group_lr/group_weight_decay name unknown groups {sorted(unknown)}; "
                         f"groups here: {sorted(known)}")
    tx = optax.multi_transform(transforms, labels)
    if config.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)
    return tx
