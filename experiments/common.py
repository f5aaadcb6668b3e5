"""What the experiment CLIs (``experiments.glue``, ``experiments.e2e``) share: the training
flags, the layering of TOML configs, building the method, casting the frozen base, and
checkpointing/resuming a run directory.

Settings are layered: the dataclass defaults < the experiment's TOML layers (see
:func:`method_layers`) < ``--config=FILE`` < command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BASE_DTYPES = ("float32", "bfloat16")
Field = tuple[str, Any, dataclasses.Field]


def training_fields(*, method: str = "lora", model: str, epochs: float = 1.0, batch_size: int = 32,
                    eval_batch_size: int = 128, max_length: int = 128, lr: float = 5e-4) -> list[Field]:
    """The flags every experiment has (model, data, schedule, optimizer, logging, scale,
    checkpointing); defaults that differ between experiments are arguments."""
    f = dataclasses.field
    return [
        ("method", str, f(default=method, metadata={"help": "method or '+'-joined combination"})),
        ("model", str, f(default=model, metadata={"help": "model folder, Hub id or .gguf file"})),
        ("data_dir", str | None, f(default=None, metadata={"help": "folder with the data files (default: ../shared/data/<dataset>, else the Hub)"})),
        ("output_dir", str | None, f(default=None, metadata={"help": "run directory (default runs/<task>-<method>-s<seed>)"})),
        ("epochs", float, f(default=epochs, metadata={"help": "passes over the training set (ignored with --max-steps)"})),
        ("max_steps", int | None, f(default=None, metadata={"help": "train exactly this many steps"})),
        ("batch_size", int, f(default=batch_size, metadata={"help": "training batch size"})),
        ("eval_batch_size", int, f(default=eval_batch_size, metadata={"help": "evaluation batch size"})),
        ("max_length", int, f(default=max_length, metadata={"help": "tokens per example (truncation)"})),
        ("buckets", tuple[int, ...], f(default=(), metadata={"help": "padded lengths (default: powers of two from 16 to max_length); batches group examples of one bucket"})),
        ("group_by_length", bool, f(default=True, metadata={"help": "batch examples of the same length bucket together (less padding)"})),
        ("max_train_samples", int | None, f(default=None, metadata={"help": "use only the first N training examples"})),
        ("seed", int, f(default=0, metadata={"help": "seed for init, data order and dropout"})),
        ("lr", float, f(default=lr, metadata={"help": "peak learning rate"})),
        ("weight_decay", float, f(default=0.01, metadata={"help": "AdamW decoupled weight decay"})),
        ("warmup_ratio", float, f(default=0.06, metadata={"help": "linear warmup fraction of the steps"})),
        ("schedule", str, f(default="linear", metadata={"help": "linear, cosine or constant"})),
        ("clip_norm", float, f(default=1.0, metadata={"help": "gradient clipping by global norm (0: off)"})),
        ("group_lr", dict[str, float], f(default_factory=dict, metadata={"help": "lr multiplier per parameter group (head: the task head)"})),
        ("group_weight_decay", dict[str, float], f(default_factory=dict, metadata={"help": "weight decay per parameter group"})),
        ("eval_every", int, f(default=0, metadata={"help": "evaluate every N steps (0: 4 times per run)"})),
        ("log_every", int, f(default=1, metadata={"help": "log training metrics every N steps"})),
        ("progress", bool, f(default=True, metadata={"help": "show a progress bar"})),
        ("mesh", str | None, f(default=None, metadata={"help": "device mesh, e.g. 'data=4,fsdp=2' (default: all devices on data when there are several)"})),
        ("remat", bool, f(default=False, metadata={"help": "rematerialise each transformer layer (recompute activations in the backward pass: less memory, more compute)"})),
        ("base_dtype", str, f(default="float32", metadata={"help": "dtype of the frozen base and of the model's compute: float32 or bfloat16 (the delta, trained base leaves, gradients and optimizer state stay float32)"})),
        ("matmul_dtype", str, f(default="float32", metadata={"help": "operand dtype of the transformer's matmuls: float32, or bfloat16 (bf16 products accumulated in float32, forward and backward; uses AMX on recent x86 CPUs and tensor cores on GPUs)"})),
        ("save_every", int, f(default=0, metadata={"help": "checkpoint every N steps (0: at each evaluation and at the end; -1: never)"})),
        ("keep_checkpoints", int, f(default=2, metadata={"help": "how many recent checkpoints to keep"})),
        ("resume", bool, f(default=True, metadata={"help": "continue from the run directory's latest checkpoint if there is one"})),
        ("allow_base_mismatch", bool, f(default=False, metadata={"help": "restore a checkpoint made on another base model"})),
    ]


def make_config_class(name: str, fields: list[Field]) -> type:
    """A frozen config dataclass: ``fields`` plus one sub-config per known method."""
    from jpeft.methods import REGISTRY

    fields = list(fields)
    for method, spec in REGISTRY.items():
        fields.append((method, spec.config_cls, dataclasses.field(default_factory=spec.config_cls)))
    return dataclasses.make_dataclass(name, fields, frozen=True)


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
                  argv: Sequence[str] = ()) -> list[tuple[str, dict]]:
    """The TOML layers of ``config_dir``: ``tasks/<task_key>.toml`` (if any), then
    ``<name>.toml`` for each part of ``method`` and its ``[tasks.<task_key>]`` table.

    In a combination a later part's top-level setting (``lr``, ``weight_decay``…) replaces an
    earlier part's; where two parts disagree and ``argv`` does not set it, a note on stderr names
    both values (pass the flag, e.g. ``--lr``, to choose)."""
    from jpeft.methods import parse_spec

    layers: list[tuple[str, dict]] = []
    top_level: dict[str, tuple[str, Any]] = {}
    if task_key is not None:
        task_file = config_dir / "tasks" / f"{task_key}.toml"
        if task_file.is_file():
            layers.append((str(task_file), tomllib.loads(task_file.read_text())))
    for name in parse_spec(method):
        path = config_dir / f"{name}.toml"
        if not path.is_file():
            continue
        data = tomllib.loads(path.read_text())
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


def parse_experiment_args(cls: type, argv: Sequence[str] | None, layers_for, prog: str,
                          description: str) -> Any:
    """Parse ``argv`` into ``cls`` over the layers ``layers_for(argv)`` returns."""
    from jpeft.config import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    layers: list[tuple[str, dict]] = []
    if not any(a in ("-h", "--help") for a in argv):
        try:
            layers = layers_for(argv)
        except ValueError as err:
            print(f"{prog.split()[-1]}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    return parse_config(cls, argv, prog=prog, description=description, layers=layers)


def build_method(cfg: Any, tokenizer: Any = None):
    from jpeft.methods import build, parse_spec

    configs = {name: getattr(cfg, name) for name in parse_spec(cfg.method)}
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
    if dtype not in BASE_DTYPES:
        raise ValueError(f"--base-dtype={dtype!r}; choose one of {', '.join(BASE_DTYPES)}")


def cast_frozen_base(base: Any, keep: Sequence[str], dtype: str) -> Any:
    """``base`` with every floating leaf not in ``keep`` (the trained base paths) cast to
    ``dtype``; the kept leaves stay float32 (they are trained, with float32 optimizer state)."""
    import jax.numpy as jnp

    from jpeft.core import paths as P

    check_base_dtype(dtype)
    keep = set(keep)
    flat = P.flatten(base)
    out = {}
    for path, leaf in flat.items():
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        target = jnp.float32 if path in keep else jnp.dtype(dtype)
        out[path] = jnp.asarray(leaf, target) if floating else leaf
    return P.unflatten(out)


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


def checkpointing(cfg: Any, out_dir: Path, trainer: Any, state: Any, base: Any, total_steps: int,
                  steps_per_epoch: int, metrics_path: Path, meta: dict[str, Any]):
    """Resume from the run directory's latest checkpoint (if any, and ``--resume``), and return
    ``(state, on_step)`` where ``on_step`` saves checkpoints on the configured schedule.
    ``meta`` (e.g. the task) is stored with every checkpoint."""
    import shutil

    import jax

    import jpeft
    from jpeft.checkpoint import CheckpointError, CheckpointManager, fingerprint
    from jpeft.config import to_dict
    from jpeft.train.logging import read_metrics
    from jpeft.train.trainer import head_paths

    if cfg.save_every < 0 or jax.process_count() > 1:
        if cfg.save_every >= 0:
            print("multi-process run: checkpointing is off (not supported across processes yet)")
        metrics_path.unlink(missing_ok=True)
        return state, None
    ckpt_dir = out_dir / "checkpoints"
    if not cfg.resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # a fresh run replaces older checkpoints
    manager = CheckpointManager(ckpt_dir, max_to_keep=cfg.keep_checkpoints)
    base_fp = fingerprint(base, exclude=head_paths(base, trainer.info))
    latest = manager.latest_step()
    method_config = {name: to_dict(getattr(cfg, name)) for name in cfg.method.split("+")}
    if latest is not None:
        saved = manager.read_meta(latest)
        if (saved.get("method"), saved.get("method_config")) != (cfg.method, method_config):
            raise CheckpointError(
                f"{manager.directory} holds checkpoints of another configuration (method "
                f"{saved.get('method')!r}, {saved.get('method_config')}); pick another --output-dir "
                "or pass --resume=false to start afresh there.")
        state, _ = manager.restore(state, fingerprint=base_fp,
                                   allow_base_mismatch=cfg.allow_base_mismatch)
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= latest] \
            if metrics_path.is_file() else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        print(f"resumed from {manager.directory}/{latest} (step {int(state.step)} of {total_steps})")
    else:
        metrics_path.unlink(missing_ok=True)

    meta = {
        "jpeft_version": jpeft.__version__,
        "method": cfg.method,
        "method_config": method_config,
        "base_model": str(cfg.model),
        "base_fingerprint": base_fp,
        **meta,
        "total_steps": total_steps,
    }

    def on_step(state, evaluated: bool) -> None:
        step = int(state.step)
        due = (cfg.save_every > 0 and step % cfg.save_every == 0) or \
              (cfg.save_every == 0 and evaluated)
        if due:
            epoch, batch = divmod(step, steps_per_epoch)
            position = {"epoch": epoch, "batch": batch}
            manager.save(step, state, {**meta, "step": step, "data_position": position})

    return state, on_step


def optim_config(cfg: Any):
    """The :class:`jpeft.train.optim.OptimConfig` of the run's flags."""
    from jpeft.train.optim import OptimConfig

    return OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                       schedule=cfg.schedule, clip_norm=cfg.clip_norm, group_lr=dict(cfg.group_lr),
                       group_weight_decay=dict(cfg.group_weight_decay))


def run_mesh(cfg: Any):
    """``--mesh`` as a device mesh; all devices on ``data`` when there are several; else ``None``."""
    import jax

    from jpeft.train.sharding import make_mesh

    return make_mesh(cfg.mesh) if (cfg.mesh or jax.device_count() > 1) else None


def write_adapter(out_dir: Path, cfg: Any, transform: Any, delta: Any, params: Any, model: Any,
                  base: Any) -> None:
    """``<out_dir>/adapter``: the finalized delta and the trained base leaves, which
    :func:`jpeft.checkpoint.export.load_adapter` loads onto the base in one call."""
    from jpeft.checkpoint.export import base_fingerprint, save_adapter

    save_adapter(out_dir / "adapter", transform, delta, params, base_model=str(cfg.model),
                 base_fingerprint=base_fingerprint(model, base), method_spec=cfg.method,
                 method_configs=method_configs(transform, cfg.method), model=model, overwrite=True)


def cli_main(prog: str, parse_args, run, argv: Sequence[str] | None) -> int:
    """Parse, run, and turn the errors a user can fix into ``prog: error: ...`` and exit code 2."""
    from jpeft.checkpoint import CheckpointError

    cfg = parse_args(argv)
    try:
        run(cfg)
    except (FileNotFoundError, ValueError, CheckpointError, RuntimeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
