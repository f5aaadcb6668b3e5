"""What the experiment CLIs (``experiments.glue``, ``experiments.e2e``) share: the run config
(nested dataclasses), the layering of TOML configs, building the method, casting the frozen base,
and checkpointing/resuming a run directory.

Settings are layered (:func:`jpeft.config.parse`): the dataclass defaults < the experiment's TOML
layers (see :func:`method_layers`) < ``--config=FILE`` < command-line flags. A flag and a TOML key
have the same name: ``lr``, ``batch_size`` (the :data:`~jpeft.config.Flat` groups below keep
their fields' own names) and ``lora.r`` (one group per method).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from jpeft.config import Flat, parse, read_toml
from jpeft.methods import REGISTRY
from jpeft.train.optim import OptimConfig, check_number
from jpeft.checkpoint.atomic import atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BASE_DTYPES = ("float32", "bfloat16")
Layers = list[tuple[str, Mapping[str, Any]]]
Run = TypeVar("Run", bound="RunConfig")

# The numeric flags' allowed values: (low, high, low inclusive, high inclusive, integer, how to
# write "unset" (None allowed) or a special value, and what it means). Each group's
# __post_init__ checks its fields (:func:`check_ranges`), so a TOML layer, --config file and flag
# are all checked alike; OptimConfig checks its own.
INT, REAL = True, False
RANGES: dict[str, tuple[float, float, bool, bool, bool, str]] = {
    "epochs": (0, math.inf, False, False, REAL, ""),
    "max_steps": (1, math.inf, True, False, INT, "none: --epochs"),
    "batch_size": (1, math.inf, True, False, INT, ""),
    "eval_batch_size": (1, math.inf, True, False, INT, ""),
    "max_length": (2, math.inf, True, False, INT, ""),
    "max_train_samples": (1, math.inf, True, False, INT, "none: all"),
    "seed": (0, 2**32, True, False, INT, ""),
    "eval_every": (1, math.inf, True, False, INT, "none: 4 times per run"),
    "log_every": (1, math.inf, True, False, INT, ""),
    "save_every": (1, math.inf, True, False, INT, "none: at each evaluation; -1: never"),
    "save_minutes": (0, math.inf, False, False, REAL, "none: by steps only"),
    "keep_checkpoints": (1, math.inf, True, False, INT, ""),
    "divergence_factor": (1, math.inf, False, False, REAL, "none: only non-finite values stop"),
    "num_processes": (1, math.inf, True, False, INT, "none: single process"),
    "process_id": (0, math.inf, True, False, INT, "none: single process"),
    "coordinator_timeout": (1, math.inf, True, False, INT, ""),
    "max_eval_samples": (1, math.inf, True, False, INT, "none: all"),
    "max_test_mrs": (1, math.inf, True, False, INT, "none: all"),
    "num_beams": (1, math.inf, True, False, INT, ""),
    "length_penalty": (-math.inf, math.inf, False, False, REAL, ""),
    "max_new_tokens": (1, math.inf, True, False, INT, ""),
    "decode_batch_size": (1, math.inf, True, False, INT, ""),
}
SPECIAL = {"save_every": (-1,)}  # values allowed outside the range


def check_ranges(group: object) -> None:
    """Every field of ``cfg`` named in :data:`RANGES` in its range (``ValueError`` naming the flag)."""
    for f in dataclasses.fields(group):
        if f.name not in RANGES:
            continue
        low, high, low_in, high_in, integer, note = RANGES[f.name]
        value = getattr(group, f.name)
        if (value is None and note.startswith("none")) or value in SPECIAL.get(f.name, ()):
            continue
        check_number(f"--{f.name.replace('_', '-')}", value, low, high, low_in, high_in, integer, note)


def setting(default: Any, help: str) -> Any:
    """A config field with a default and the ``--help`` text of its flag."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """How the frozen base is stored and computed, and on which devices."""

    base_dtype: str = setting("float32", "dtype of the frozen base and of the model's compute: float32 or bfloat16 (the delta, trained base leaves, gradients and optimizer state stay float32); int8 (per output channel), nf4 (4-bit NormalFloat, blocks of 64) or nf4-dq (nf4 with QLoRA's double quantization: the block scales stored as int8 in blocks of 256) or q4_1 (GGUF's Q4_1: blocks of 32, a float16 step and minimum; a Q4_1 GGUF file keeps its own codes) quantize the frozen matmul weights, computed in float32 (docs/quantized-base.md)")
    matmul_dtype: str = setting("float32", "operand dtype of the transformer's matmuls: float32, or bfloat16 (bf16 products accumulated in float32, forward and backward; uses AMX on recent x86 CPUs and tensor cores on GPUs)")
    remat: bool = setting(False, "rematerialise each transformer layer (recompute activations in the backward pass: less memory, more compute)")
    mesh: str | None = setting(None, "device mesh, e.g. 'data=4,fsdp=2' (default: all devices on data when there are several)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data is, how it is cut and batched."""

    data_dir: str | None = setting(None, "folder with the data files (default: ../shared/data/<dataset>, else the Hub)")
    max_length: int = setting(128, "tokens per example (truncation)")
    buckets: tuple[int, ...] = setting((), "padded lengths (default: GLUE powers of two from 16 to max_length, E2E 48, 64, 80, 96, 128 up to max_length); batches group examples of one bucket")
    group_by_length: bool = setting(True, "batch examples of the same length bucket together (less padding)")
    max_train_samples: int | None = setting(None, "use only the first N training examples (none: all)")
    batch_size: int = setting(32, "training batch size")
    eval_batch_size: int = setting(128, "evaluation batch size")

    def __post_init__(self) -> None:
        check_ranges(self)
        for size in self.buckets:
            check_number("--buckets entry", size, 1, math.inf, True, False, INT)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How long to train, and how often to evaluate and log (the loop's LoopConfig once the
    number of steps is known)."""

    epochs: float = setting(1.0, "passes over the training set (ignored with --max-steps)")
    max_steps: int | None = setting(None, "train exactly this many steps (none: --epochs)")
    eval_every: int | None = setting(None, "evaluate every N steps (none: 4 times per run)")
    log_every: int = setting(1, "log training metrics every N steps")
    progress: bool = setting(True, "show a progress bar")
    divergence_factor: float | None = setting(10.0, "stop when a step's loss exceeds this many times the run's starting loss (none: stop only on non-finite values)")

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """The run directory and its checkpoints."""

    output_dir: str | None = setting(None, "run directory (default runs/<task>-<method>-s<seed>)")
    save_every: int | None = setting(None, "checkpoint every N steps (none: at each evaluation and at the end; -1: never)")
    save_minutes: float | None = setting(15.0, "also checkpoint when this many minutes have passed since the run started or last checkpointed, so a run killed on a shared or preemptible machine loses at most that much (none: by steps only; --save-every=-1 turns all checkpoints off)")
    keep_checkpoints: int = setting(2, "how many recent checkpoints to keep (>= 1)")
    resume: bool = setting(True, "continue from the run directory's latest checkpoint if there is one; false: start afresh (an earlier run's files are moved into superseded-<time>/, never deleted)")
    allow_base_mismatch: bool = setting(False, "restore a checkpoint made on another base model")

    def __post_init__(self) -> None:
        check_ranges(self)


def default_of(cls: type, **values: Any) -> Any:
    """A ``default_factory`` giving ``cls(**values)``."""
    return dataclasses.field(default_factory=lambda: cls(**values))


def with_method_fields(cls: type) -> type:
    """Add one field per registered method (``lora: LoraConfig`` -> ``--lora.r``) to ``cls``
    before it becomes a dataclass: a method registered in its own file gets its flags here."""
    for name, spec in REGISTRY.items():
        cls.__annotations__[name] = spec.config_cls
        setattr(cls, name, default_of(spec.config_cls))
    return cls


@dataclasses.dataclass(frozen=True)
@with_method_fields
class RunConfig:
    """What every experiment takes: the method and its per-method configs (``--lora.r``), the
    base model, the seed, and the groups above (their flags unprefixed: ``--lr``, ``--batch-size``)."""

    method: str = setting("lora", "method or '+'-joined combination")
    model: str = setting("sentence-transformers/all-MiniLM-L6-v2", "model folder, Hub id or .gguf file")
    seed: int = setting(0, "seed for init, data order and dropout")
    data: Flat[DataConfig] = default_of(DataConfig)
    optim: Flat[OptimConfig] = default_of(OptimConfig)
    loop: Flat[LoopSettings] = default_of(LoopSettings)
    checkpoint: Flat[CheckpointSettings] = default_of(CheckpointSettings)
    compute: Flat[ComputeConfig] = default_of(ComputeConfig)
    # and one field per registered method (with_method_fields)

    def __post_init__(self) -> None:
        check_ranges(self)
        check_method_spec(self.method)

    def method_config(self, name: str) -> Any:
        """The config of method ``name`` (one of :data:`jpeft.methods.REGISTRY`)."""
        return getattr(self, name)


def check_method_spec(spec: str) -> None:
    """Refuse a malformed ``--method`` ('lora+', 'lora ', '+bitfit', unknown names, repeats)."""
    from jpeft.methods import REGISTRY

    parts = spec.split("+")
    bad = [p for p in parts if p not in REGISTRY]
    if not bad and len(set(parts)) == len(parts):
        return
    if any(p != p.strip() for p in parts):
        why = "has spaces around a name"
    elif any(not p for p in parts):
        why = "has an empty part (a leading, trailing or doubled '+')"
    elif bad:
        why = f"names unknown method(s) {bad}"
    else:
        why = "names a method twice"
    raise ValueError(f"--method={spec!r} {why}; give known method names joined by '+' without "
                     f"spaces, e.g. 'lora' or 'lora+bitfit'. Known methods: {', '.join(REGISTRY)}")


def scan_flag(argv: Sequence[str], flag: str, default: str | None) -> str | None:
    """The value of ``--flag`` in ``argv`` before full parsing (to pick config files)."""
    value = default
    for i, arg in enumerate(argv):
        if arg == f"--{flag}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{flag}="):
            value = arg.split("=", 1)[1]
    return value


def method_layers(method: str, config_dir: Path, task_key: str | None = None,
                  argv: Sequence[str] = ()) -> Layers:
    """The TOML layers of ``config_dir``: ``tasks/<task_key>.toml`` (if any), then
    ``<name>.toml`` for each part of ``method`` and its ``[tasks.<task_key>]`` table.

    In a combination a later part's top-level setting (``lr``, ``weight_decay``…) replaces an
    earlier part's; where two parts disagree and ``argv`` does not set it, a note on stderr names
    both values (pass the flag, e.g. ``--lr``, to choose)."""
    from jpeft.methods import parse_spec

    layers: Layers = []
    top_level: dict[str, tuple[str, Any]] = {}
    if task_key is not None:
        task_file = config_dir / "tasks" / f"{task_key}.toml"
        if task_file.is_file():
            layers.append((str(task_file), read_toml(task_file)))
    for name in parse_spec(method):
        path = config_dir / f"{name}.toml"
        if not path.is_file():
            continue
        data = read_toml(path)
        per_task = data.pop("tasks", {})
        for key, value in data.items():
            if not isinstance(value, dict):
                if key in top_level and top_level[key][1] != value and not any(
                        scan_flag(argv, flag, None) is not None for flag in {key, key.replace('_', '-')}):
                    earlier, old_value = top_level[key]
                    print(f"note: {key} = {value!r} from {path.name} replaces {old_value!r} from {earlier} "
                          f"(in '{method}' the last part's setting wins; pass --{key.replace('_', '-')} "
                          "to choose)", file=sys.stderr)
                top_level[key] = (path.name, value)
        layers.append((str(path), data))
        if task_key is not None and task_key in per_task:
            layers.append((f"{path} [tasks.{task_key}]", per_task[task_key]))
    return layers


def parse_experiment_args(cls: type[Run], argv: Sequence[str] | None,
                          layers_for: Callable[[Sequence[str]], Layers], prog: str,
                          description: str) -> Run:
    """Parse ``argv`` into ``cls`` over the layers ``layers_for(argv)`` returns."""
    return parse(cls, argv, prog=prog, description=description, layers=layers_for)


def build_method(cfg: RunConfig, tokenizer: Any = None):
    from jpeft.methods import build, parse_spec

    configs = {name: cfg.method_config(name) for name in parse_spec(cfg.method)}
    return build(cfg.method, configs, tokenizer=tokenizer)


def method_configs(transform: Any, spec: str) -> dict[str, Any]:
    """The (prepared) config of every part of ``transform``, as :func:`jpeft.methods.build` takes."""
    from jpeft.methods import parse_spec

    names = parse_spec(spec)
    return dict(transform.config) if len(names) > 1 else {names[0]: transform.config}


def model_matmul_dtype(matmul_dtype: str) -> str | None:
    """The model config's ``matmul_dtype`` for the CLI's ``--matmul-dtype``."""
    if matmul_dtype not in BASE_DTYPES:
        raise ValueError(f"--matmul-dtype={matmul_dtype!r}; choose one of {', '.join(BASE_DTYPES)}")
    return None if matmul_dtype == "float32" else matmul_dtype


def check_base_dtype(dtype: str) -> None:
    from jpeft.quant import FORMATS

    if dtype not in (*BASE_DTYPES, *FORMATS):
        raise ValueError(f"--base-dtype={dtype!r}; choose one of {', '.join((*BASE_DTYPES, *FORMATS))}")


def cast_frozen_base(base: Any, keep: Sequence[str], dtype: str, transform: Any = None,
                     info: Any = None) -> Any:
    """``base`` with every floating leaf not in ``keep`` (the trained base paths) cast to
    ``dtype``; the kept leaves stay float32 (they are trained, with float32 optimizer state).

    ``int8`` / ``nf4`` / ``nf4-dq`` / ``q4_1``: the frozen matmul kernels quantized
    (:func:`jpeft.quant.quantize_base`; the leaves ``transform`` rewrites stay float too), every
    other leaf float32 as loaded."""
    import jax.numpy as jnp

    from jpeft import quant
    from jpeft.core import paths as P

    check_base_dtype(dtype)
    if dtype in quant.FORMATS:
        return quant.quantize_base(base, dtype, keep=keep, transform=transform, info=info)
    keep = set(keep)
    flat = P.flatten(base)
    out = {}
    for path, leaf in flat.items():
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        target = jnp.float32 if path in keep else jnp.dtype(dtype)
        out[path] = jnp.asarray(leaf, target) if floating else leaf
    return P.unflatten(out)


def requantization_note(model: str, base_dtype: str) -> str | None:
    """A note when ``--base-dtype`` quantizes weights that a GGUF file already stored in 4 or 5
    bits (they get rounded a second time), naming ``q4_1`` when the file is Q4_1; else ``None``."""
    from jpeft import quant
    from jpeft.models import _gguf_file
    from jpeft.models.gguf import matmul_tensor_types

    if base_dtype not in quant.FORMATS:
        return None
    path = _gguf_file(model)
    if path is None:
        return None
    types = matmul_tensor_types(path)
    low = {t: n for t, n in types.items() if t not in ("F32", "F16", "BF16") and not t.startswith("Q8")}
    if not low or (base_dtype == "q4_1" and set(low) == {"Q4_1"}):
        return None
    stored = ", ".join(f"{n} {t}" for t, n in sorted(low.items()))
    fix = (" --base-dtype=q4_1 keeps the file's own Q4_1 codes (no second rounding)."
           if "Q4_1" in low else " A float or 8-bit source file avoids the second rounding.")
    return (f"note: {path.name} stores its matmul weights quantized already ({stored}); "
            f"--base-dtype={base_dtype} rounds them a second time, onto other levels (on SmolLM2's Q4_1 "
            f"file nf4 costs 0.38 nats of dev loss before training, docs/quantized-base.md).{fix}")


def check_base(model: str, base: Any) -> None:
    """Refuse a base whose weights hold non-finite values (a damaged weights file)."""
    import jax.numpy as jnp

    from jpeft.core import paths as P

    for path, leaf in P.flatten(base).items():
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all()):
            raise CliError(f"--model={model}: the weight {path} holds non-finite values; the weights "
                           "file is damaged. Download the model again.")


def check_max_length(max_length: int, config: Any) -> None:
    """Refuse a ``--max-length`` beyond the model's position embeddings (positions past the table
    would be clamped silently)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return
    usable = positions - (config.pad_token_id + 1 if getattr(config, "is_roberta", False) else 0)
    if max_length > usable:
        raise CliError(f"--max-length={max_length} is out of range for this model: give an integer "
                       f"in [2, {usable}] (it has {positions} position embeddings)")


def finalize_state(transform: Any, state: Any) -> tuple[Any, Any, bool]:
    """``(state with the finalized delta, finalized delta, changed)``: what is kept after
    training (prefix tuning without its MLP, diff pruning's sparse delta)."""
    import jax
    import numpy as np

    delta = state.trainable["delta"]
    kept = transform.finalize(delta)
    same = jax.tree_util.tree_structure(kept) == jax.tree_util.tree_structure(delta) and all(
        np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(delta)))
    if same:
        return state, kept, False
    return state._replace(trainable={**state.trainable, "delta": kept}), kept, True


# ----------------------------------------------------------------------------------------------
# The run directory: owned (locked) for the run's lifetime, resumed only by the same run

OUTPUTS = ("checkpoints", "adapter", "metrics.jsonl", "summary.json", "curves.png", "config.json",
           "predictions.jsonl")  # what a run writes into its directory
IDENTITY = ("task", "method", "method_config")  # a resumed checkpoint must match these


class CliError(Exception):
    """An expected failure whose message already says what to fix (printed without traceback)."""


def run_identity(cfg: RunConfig, task: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this configuration."""
    from jpeft.config import to_dict

    return {"task": task, "method": cfg.method,
            "method_config": {name: to_dict(cfg.method_config(name)) for name in cfg.method.split("+")}}


def identity_mismatch(saved: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """The first field of ``identity`` the checkpoint metadata ``saved`` differs in, as text."""
    for field in IDENTITY:
        if saved.get(field) != identity[field]:
            if field == "method_config":
                old, new = saved.get(field) or {}, identity[field]
                diff = [f"{name}.{k}: {old.get(name, {}).get(k)!r} -> {v!r}"
                        for name, cfg in new.items() for k, v in cfg.items()
                        if old.get(name, {}).get(k) != v]
                return f"method config ({'; '.join(diff[:4]) or f'{old} -> {new}'})"
            return f"{field} ({saved.get(field)!r} there, {identity[field]!r} now)"
    return None


def prepare_output_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` (normal permissions) or refuse it with a message naming --output-dir."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"--output-dir={out_dir} is a file; pass a folder (it is created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"--output-dir={out_dir} cannot be created ({err.strerror or err}); choose a "
                       "folder you can write to") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise CliError(f"--output-dir={out_dir} is not writable; choose a folder you can write to")
    return out_dir


def _newest_meta(ckpt_dir: Path) -> dict[str, Any] | None:
    """The metadata of the newest checkpoint step whose metadata is readable (``None``: none)."""
    from jpeft.checkpoint import CheckpointError, CheckpointManager

    if not ckpt_dir.is_dir():
        return None
    manager = CheckpointManager(ckpt_dir)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return manager.read_meta(step)
        except CheckpointError:
            continue
    return None


def move_aside(out_dir: Path, report=print) -> Path | None:
    """Move an earlier run's outputs (:data:`OUTPUTS`) into ``out_dir/superseded-<UTC time>/``;
    nothing else in ``out_dir`` is touched. Returns that folder (``None``: nothing to move)."""
    import datetime

    present = [name for name in OUTPUTS if (out_dir / name).exists()]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = out_dir / f"superseded-{stamp}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = out_dir / f"superseded-{stamp}-{suffix}"
    target.mkdir()
    for name in present:
        os.replace(out_dir / name, target / name)
    report(f"fresh start in {out_dir}: moved the earlier run's {', '.join(present)} into {target}")
    return target


@contextlib.contextmanager
def run_directory(cfg: RunConfig, out_dir: Path, task: str):
    """Own ``out_dir`` for the run: create it, lock it (:class:`jpeft.train.logging.RunDirLock`),
    refuse to resume another configuration's checkpoints (naming the field and both values),
    and on a fresh start move an earlier run's outputs aside. Yields the directory."""
    from jpeft.train.logging import RunDirLock

    prepare_output_dir(out_dir)
    with RunDirLock(out_dir):
        checkpointed = cfg.checkpoint.save_every != -1
        saved = _newest_meta(out_dir / "checkpoints") if cfg.checkpoint.resume and checkpointed else None
        if saved is not None:
            mismatch = identity_mismatch(saved, run_identity(cfg, task))
            if mismatch is not None:
                raise CliError(
                    f"{out_dir} holds checkpoints of another run: its {mismatch}. Resuming would "
                    "train that run's state on this configuration. Choose another --output-dir, or "
                    "pass --resume=false to start afresh there (the earlier run's files are moved "
                    "into superseded-<time>/, not deleted).")
        else:
            move_aside(out_dir)
        yield out_dir


class Saver:
    """Checkpoints on the configured schedule (:class:`jpeft.train.loop.Checkpointer`)."""

    def __init__(self, cfg: RunConfig, manager: Any, meta: dict[str, Any], steps_per_epoch: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.manager, self.meta, self.steps_per_epoch = cfg, manager, meta, steps_per_epoch
        self.clock = clock
        self.last_saved = clock()

    def due(self, step: int, evaluated: bool) -> bool:
        """At every ``--save-every`` steps (or evaluation), or once ``--save-minutes`` have passed."""
        every, minutes = self.cfg.checkpoint.save_every, self.cfg.checkpoint.save_minutes
        return ((every is not None and every > 0 and step % every == 0) or (every is None and evaluated)
                or (minutes is not None and self.clock() - self.last_saved >= 60.0 * minutes))

    def save(self, state: Any, info: dict[str, Any]) -> None:
        step = int(state.step)
        epoch, batch = divmod(step, self.steps_per_epoch)
        self.manager.save(step, state, {**self.meta, **info, "step": step,
                                        "data_position": {"epoch": epoch, "batch": batch}})
        self.last_saved = self.clock()

    def describe(self, step: int | None) -> str:
        if step is None:
            return "No checkpoint of this run holds a finite state."
        return (f"The newest checkpoint, {self.manager.directory}/{step}, holds the last finite state "
                "(it may already carry the start of the divergence: to start over with a lower "
                "--lr, pass --resume=false; the old files are moved aside).")


def checkpointing(cfg: RunConfig, out_dir: Path, trainer: Any, state: Any, base: Any, total_steps: int,
                  steps_per_epoch: int, metrics_path: Path, meta: dict[str, Any]):
    """Resume from the run directory's newest checkpoint that verifies (if any, and
    ``--resume``) and return ``(state, saver, start_loss)``: ``saver`` (``None`` when
    checkpointing is off) saves on the configured schedule, ``start_loss`` is the resumed run's
    starting loss (for the divergence guard). ``meta`` (e.g. the task) is stored with every
    checkpoint. Call inside :func:`run_directory`."""
    import jax

    import jpeft
    from jpeft.checkpoint import CheckpointError, CheckpointManager, fingerprint
    from jpeft.train.logging import read_metrics
    from jpeft.train.trainer import head_paths

    if cfg.checkpoint.save_every == -1 or jax.process_count() > 1:
        if cfg.checkpoint.save_every != -1:
            print("multi-process run: checkpointing is off (not supported across processes yet)")
        metrics_path.unlink(missing_ok=True)
        return state, None, None
    manager = CheckpointManager(out_dir / "checkpoints", max_to_keep=cfg.checkpoint.keep_checkpoints)
    base_fp = fingerprint(base, exclude=head_paths(base, trainer.info))
    identity = run_identity(cfg, meta.get("task", ""))

    def check_meta(step: int, saved: dict[str, Any]) -> None:
        mismatch = identity_mismatch(saved, identity)
        if mismatch is not None:
            raise CheckpointError(f"checkpoint {manager.directory}/{step} is of another run: its "
                                  f"{mismatch}; pass --resume=false to start afresh")

    start_loss = None
    restored = manager.restore_verified(state, fingerprint=base_fp, check_meta=check_meta,
                                        allow_base_mismatch=cfg.checkpoint.allow_base_mismatch) \
        if cfg.checkpoint.resume else None
    if restored is not None:
        state, saved, step = restored
        start_loss = saved.get("start_loss")
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= step] \
            if metrics_path.is_file() else []
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        print(f"resumed from {manager.directory}/{step} (step {int(state.step)} of {total_steps})")
    else:
        metrics_path.unlink(missing_ok=True)
    meta = {"jpeft_version": jpeft.__version__, **identity, "base_model": str(cfg.model),
            "base_fingerprint": base_fp, **meta, "total_steps": total_steps}
    return state, Saver(cfg, manager, meta, steps_per_epoch), start_loss


def train_loop(trainer: Any, state: Any, batches, evaluate, cfg: RunConfig, total_steps: int,
               steps_per_epoch: int, log: Any, saver: Saver | None, start_loss: float | None):
    """:func:`jpeft.train.loop.fit` with the run's flags; a divergence names the checkpoint that
    holds the last finite state."""
    from jpeft.train.loop import DivergenceError, LoopConfig, fit

    flags = cfg.loop
    loop = LoopConfig(total_steps, steps_per_epoch, flags.log_every,
                      flags.eval_every or max(1, total_steps // 4), flags.progress, flags.divergence_factor)
    try:
        return fit(trainer, state, batches, evaluate, loop, log, checkpoint=saver,
                   start_loss=start_loss)
    except DivergenceError as err:
        kept = saver.describe(err.last_checkpoint) if saver is not None else \
            "Checkpointing was off (--save-every=-1)."
        raise DivergenceError(f"{err} {kept} No adapter or summary was written.", err.step,
                              err.last_checkpoint) from None


def run_mesh(cfg: RunConfig):
    """``--mesh`` as a device mesh; all devices on ``data`` when there are several; else ``None``."""
    import jax

    from jpeft.train.sharding import make_mesh

    mesh = cfg.compute.mesh
    try:
        return make_mesh(mesh) if (mesh or jax.device_count() > 1) else None
    except ValueError as err:
        raise CliError(f"--mesh={mesh!r}: {err}; give axis sizes whose product is the device count "
                       f"({jax.device_count()} here), e.g. 'data={jax.device_count()}'") from None


def write_adapter(out_dir: Path, cfg: RunConfig, transform: Any, delta: Any, params: Any, model: Any,
                  base: Any) -> None:
    """``<out_dir>/adapter``: the finalized delta and the trained base leaves, which
    :func:`jpeft.checkpoint.export.load_adapter` loads onto the base in one call."""
    from jpeft.checkpoint.export import base_fingerprint, save_adapter

    save_adapter(out_dir / "adapter", transform, delta, params, base_model=str(cfg.model),
                 base_fingerprint=base_fingerprint(model, base), method_spec=cfg.method,
                 method_configs=method_configs(transform, cfg.method), model=model, overwrite=True)


def expected_errors() -> tuple[type[BaseException], ...]:
    """The failures a user can fix (bad input, files, permissions, corrupt files, divergence)."""
    from jpeft.checkpoint import CheckpointError
    from jpeft.train.logging import RunDirLocked
    from jpeft.train.loop import DivergenceError

    errors: list[type[BaseException]] = [CliError, ValueError, OSError, CheckpointError, RunDirLocked,
                                         DivergenceError]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    with contextlib.suppress(ImportError):
        from datasets.exceptions import DatasetGenerationError

        errors.append(DatasetGenerationError)
    return tuple(errors)


def one_paragraph(err: BaseException, limit: int = 1500) -> str:
    """``err``'s message on one line (at most ``limit`` characters); the cause's message is added
    when the error's own says little (``datasets``' wrappers)."""
    text = " ".join(str(err).split())
    cause = err.__cause__ or err.__context__
    if cause is not None and len(text) < 80 and not isinstance(err, CliError):
        text = f"{text} ({type(cause).__name__}: {' '.join(str(cause).split())})"
    return text if len(text) <= limit else text[:limit] + " ..."


@contextlib.contextmanager
def reading(what: str, fix: str):
    """Turn an expected failure while reading ``what`` (a file, naming its flag) into a
    :class:`CliError` that names it and says ``fix``."""
    try:
        yield
    except CliError:
        raise
    except expected_errors() as err:
        raise CliError(f"{what}: {type(err).__name__}: {one_paragraph(err, 600)}. {fix}") from err


def cli_main(prog: str, parse_args: Callable[[Sequence[str] | None], Run],
             run: Callable[[Run], Any], argv: Sequence[str] | None) -> int:
    """Parse and run. Every expected failure (:func:`expected_errors`) becomes one paragraph,
    ``prog: error: ...``, and exit code 2 (3 for a divergence); anything else keeps its
    traceback. ``JPEFT_TRACEBACK=1`` shows the traceback of expected failures too."""
    from jpeft.train.loop import DivergenceError

    cfg = parse_args(argv)
    try:
        run(cfg)
    except expected_errors() as err:
        if os.environ.get("JPEFT_TRACEBACK"):
            raise
        print(f"{prog}: error: {one_paragraph(err)}", file=sys.stderr)
        return 3 if isinstance(err, DivergenceError) else 2
    return 0
