"""Fine-tune a BERT-family model on a GLUE task with any PEFT method (or combination).

    python -m experiments.glue --method=lora                      # SST-2, all-MiniLM-L6-v2
    python -m experiments.glue --method=lora+bitfit --task=mrpc --lora.r=16 --lr=3e-4
    python -m experiments.glue --help                             # every flag with its default

Settings are layered: the dataclass defaults below < ``configs/tasks/<task>.toml`` <
``configs/<method>.toml`` for each part of the method (and its ``[tasks.<task>]`` table) <
``--config=FILE`` < command-line flags. The run directory receives ``metrics.jsonl`` (one JSON
object per logged step and per evaluation), ``curves.png``, ``config.json``, ``summary.json``,
``checkpoints/`` (Orbax, for resuming) and ``adapter/`` (the finalized delta and the trained head,
:func:`jpeft.checkpoint.export.load_adapter` loads it onto the base in one call).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomllib

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _base_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    from jpeft.models.hub import DEFAULT_MODEL

    f = dataclasses.field
    return [
        ("method", str, f(default="lora", metadata={"help": "method or '+'-joined combination"})),
        ("task", str, f(default="sst2", metadata={"help": "GLUE task: cola sst2 mrpc stsb rte wnli qnli mnli qqp"})),
        ("model", str, f(default=DEFAULT_MODEL, metadata={"help": "model folder or Hub id"})),
        ("data_dir", str | None, f(default=None, metadata={"help": "folder with <TASK>/{train,dev}.tsv (default: ../shared/data/glue, else the Hub)"})),
        ("output_dir", str | None, f(default=None, metadata={"help": "run directory (default runs/<task>-<method>-s<seed>)"})),
        ("epochs", float, f(default=1.0, metadata={"help": "passes over the training set (ignored with --max-steps)"})),
        ("max_steps", int | None, f(default=None, metadata={"help": "train exactly this many steps"})),
        ("batch_size", int, f(default=32, metadata={"help": "training batch size"})),
        ("eval_batch_size", int, f(default=128, metadata={"help": "evaluation batch size"})),
        ("max_length", int, f(default=128, metadata={"help": "tokens per example (truncation)"})),
        ("buckets", tuple[int, ...], f(default=(), metadata={"help": "padded lengths (default: powers of two from 16 to max_length); batches group examples of one bucket"})),
        ("group_by_length", bool, f(default=True, metadata={"help": "batch examples of the same length bucket together (less padding)"})),
        ("max_train_samples", int | None, f(default=None, metadata={"help": "use only the first N training examples"})),
        ("seed", int, f(default=0, metadata={"help": "seed for init, data order and dropout"})),
        ("lr", float, f(default=5e-4, metadata={"help": "peak learning rate"})),
        ("weight_decay", float, f(default=0.01, metadata={"help": "AdamW decoupled weight decay"})),
        ("warmup_ratio", float, f(default=0.06, metadata={"help": "linear warmup fraction of the steps"})),
        ("schedule", str, f(default="linear", metadata={"help": "linear, cosine or constant"})),
        ("clip_norm", float, f(default=1.0, metadata={"help": "gradient clipping by global norm (0: off)"})),
        ("group_lr", dict[str, float], f(default_factory=dict, metadata={"help": "lr multiplier per parameter group"})),
        ("group_weight_decay", dict[str, float], f(default_factory=dict, metadata={"help": "weight decay per parameter group"})),
        ("eval_every", int, f(default=0, metadata={"help": "evaluate every N steps (0: 4 times per run)"})),
        ("log_every", int, f(default=1, metadata={"help": "log training metrics every N steps"})),
        ("progress", bool, f(default=True, metadata={"help": "show a progress bar"})),
        ("mesh", str | None, f(default=None, metadata={"help": "device mesh, e.g. 'data=4,fsdp=2' (default: all devices on data when there are several)"})),
        ("remat", bool, f(default=False, metadata={"help": "rematerialise each transformer layer (recompute activations in the backward pass: less memory, more compute)"})),
        ("base_dtype", str, f(default="float32", metadata={"help": "dtype of the frozen base and of the encoder's compute: float32 or bfloat16 (the delta, trained base leaves, gradients and optimizer state stay float32)"})),
        ("coordinator_address", str | None, f(default=None, metadata={"help": "multi-process: host:port of process 0 (else JPEFT_COORDINATOR / JAX_COORDINATOR_ADDRESS; none: single process)"})),
        ("num_processes", int | None, f(default=None, metadata={"help": "multi-process: number of processes (else JPEFT_NUM_PROCESSES)"})),
        ("process_id", int | None, f(default=None, metadata={"help": "multi-process: this process's id in [0, num_processes) (else JPEFT_PROCESS_ID)"})),
        ("save_every", int, f(default=0, metadata={"help": "checkpoint every N steps (0: at each evaluation and at the end; -1: never)"})),
        ("keep_checkpoints", int, f(default=2, metadata={"help": "how many recent checkpoints to keep"})),
        ("resume", bool, f(default=True, metadata={"help": "continue from the run directory's latest checkpoint if there is one"})),
        ("allow_base_mismatch", bool, f(default=False, metadata={"help": "restore a checkpoint made on another base model"})),
    ]


def make_config_class() -> type:
    """The experiment's config dataclass: base fields plus one sub-config per known method."""
    from jpeft.methods import REGISTRY

    fields = _base_fields()
    for name, spec in REGISTRY.items():
        fields.append((name, spec.config_cls, dataclasses.field(default_factory=spec.config_cls)))
    return dataclasses.make_dataclass("GlueConfig", fields, frozen=True)


def _scan(argv: Sequence[str], flag: str, default: str) -> str:
    """The value of ``--flag`` in ``argv`` before full parsing (to pick config files)."""
    value = default
    for i, arg in enumerate(argv):
        if arg == f"--{flag}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{flag}="):
            value = arg.split("=", 1)[1]
    return value


def config_layers(method: str, task: str, config_dir: Path = CONFIG_DIR) -> list[tuple[str, dict]]:
    """The TOML layers for this method and task, in the order they apply."""
    from jpeft.data.glue import get_task
    from jpeft.methods import parse_spec

    task_key = get_task(task).name
    layers: list[tuple[str, dict]] = []
    task_file = config_dir / "tasks" / f"{task_key}.toml"
    if task_file.is_file():
        layers.append((str(task_file), tomllib.loads(task_file.read_text())))
    for name in parse_spec(method):
        path = config_dir / f"{name}.toml"
        if not path.is_file():
            continue
        data = tomllib.loads(path.read_text())
        per_task = data.pop("tasks", {})
        layers.append((str(path), data))
        if task_key in per_task:
            layers.append((f"{path} [tasks.{task_key}]", per_task[task_key]))
    return layers


def parse_args(argv: Sequence[str] | None = None) -> Any:
    from jpeft.config import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    cls = make_config_class()
    layers: list[tuple[str, dict]] = []
    if not any(a in ("-h", "--help") for a in argv):
        try:
            layers = config_layers(_scan(argv, "method", "lora"), _scan(argv, "task", "sst2"))
        except ValueError as err:
            print(f"experiments.glue: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    return parse_config(cls, argv, prog="python -m experiments.glue",
                        description=__doc__.split("\n\n")[0], layers=layers)


def build_method(cfg: Any, tokenizer: Any = None):
    from jpeft.methods import build, parse_spec

    configs = {name: getattr(cfg, name) for name in parse_spec(cfg.method)}
    return build(cfg.method, configs, tokenizer=tokenizer)


def _method_configs(transform: Any, spec: str) -> dict[str, Any]:
    """The (prepared) config of every part of ``transform``, as :func:`jpeft.methods.build` takes."""
    from jpeft.methods import parse_spec

    names = parse_spec(spec)
    return dict(transform.config) if len(names) > 1 else {names[0]: transform.config}


BASE_DTYPES = ("float32", "bfloat16")


def cast_frozen_base(base: Any, keep: Sequence[str], dtype: str) -> Any:
    """``base`` with every floating leaf not in ``keep`` (the trained base paths) cast to
    ``dtype``; the kept leaves stay float32 (they are trained, with float32 optimizer state)."""
    import jax.numpy as jnp

    from jpeft.core import paths as P

    if dtype not in BASE_DTYPES:
        raise ValueError(f"--base-dtype={dtype!r}; choose one of {', '.join(BASE_DTYPES)}")
    keep = set(keep)
    flat = P.flatten(base)
    out = {}
    for path, leaf in flat.items():
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        target = jnp.float32 if path in keep else jnp.dtype(dtype)
        out[path] = jnp.asarray(leaf, target) if floating else leaf
    return P.unflatten(out)


def _predict_multihost(trainer: Any, state: Any, batches: Any) -> tuple[Any, Any]:
    """:func:`jpeft.train.loop.predict` when several processes share the mesh: each feeds its
    rows of every (global) batch and the outputs are gathered on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    from jpeft.train.distributed import process_rows

    outputs, labels = [], []
    for batch in batches:
        keep = batch["weights"] > 0 if "weights" in batch else slice(None)
        out = trainer.eval_step(state, trainer.frozen, trainer.shard_batch(process_rows(batch)))
        out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
        outputs.append(out[keep])
        labels.append(np.asarray(batch["labels"])[keep])
    return np.concatenate(outputs), np.concatenate(labels)


def run(cfg: Any) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the summary (also written to disk)."""
    from jpeft.train import distributed

    # Before anything touches a device: join the other processes (no-op for a single one).
    distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from transformers import AutoTokenizer

    from jpeft.config import to_dict
    from jpeft.data import glue as G
    from jpeft.metrics import glue_metrics, majority_baseline
    from jpeft.models import bert
    from jpeft.models.hub import resolve_model_dir
    from jpeft.train.logging import MetricsLog, plot_curves, read_metrics
    from jpeft.train.loop import LoopConfig, fit, predict
    from jpeft.train.optim import OptimConfig
    from jpeft.train.sharding import make_mesh
    from jpeft.train.trainer import Trainer, classification_loss, regression_loss

    t_start = time.perf_counter()
    task = G.get_task(cfg.task)
    build_method(cfg)  # refuse a bad method spec or config before loading anything
    if cfg.base_dtype not in BASE_DTYPES:
        raise ValueError(f"--base-dtype={cfg.base_dtype!r}; choose one of {', '.join(BASE_DTYPES)}")
    out_dir = Path(cfg.output_dir or f"runs/{task.name}-{cfg.method}-s{cfg.seed}")
    multi = jax.process_count() > 1
    if multi and jax.process_index() > 0:
        out_dir = out_dir / f"process-{jax.process_index()}"  # process 0 owns the run directory
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    train_ds = G.load_glue(task, "train", cfg.data_dir)
    dev_ds = G.load_glue(task, "validation", cfg.data_dir)
    if cfg.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.max_train_samples, len(train_ds))))
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    transform = build_method(cfg, tokenizer)
    train = G.encode(train_ds, tokenizer, task, cfg.max_length)
    dev = G.encode(dev_ds, tokenizer, task, cfg.max_length)
    buckets = tuple(cfg.buckets) or G.default_buckets(cfg.max_length)

    model, base = bert.from_pretrained(model_dir, num_labels=task.num_labels, seed=cfg.seed,
                                       remat=cfg.remat)
    if cfg.base_dtype != "float32":
        from jpeft.train.trainer import trainable_base_paths

        model = bert.BertModel(dataclasses.replace(model.config, dtype=cfg.base_dtype))
        base = cast_frozen_base(base, trainable_base_paths(transform, base, model.info()),
                                cfg.base_dtype)
    model_name = str(cfg.model).rstrip("/").split("/")[-1]
    steps_per_epoch = G.num_epoch_batches(train, cfg.batch_size, buckets=buckets,
                                          group_by_length=cfg.group_by_length)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optim = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                        schedule=cfg.schedule, clip_norm=cfg.clip_norm, group_lr=dict(cfg.group_lr),
                        group_weight_decay=dict(cfg.group_weight_decay))
    mesh = make_mesh(cfg.mesh) if (cfg.mesh or jax.device_count() > 1) else None
    if mesh is not None and cfg.batch_size % mesh.shape["data"]:
        raise ValueError(f"--batch-size={cfg.batch_size} must be a multiple of the mesh's data "
                         f"axis ({mesh.shape['data']}); change --batch-size or --mesh")
    if multi and (cfg.batch_size % jax.process_count() or cfg.eval_batch_size % jax.process_count()):
        raise ValueError(f"--batch-size and --eval-batch-size must be multiples of the "
                         f"{jax.process_count()} processes")
    task_loss = regression_loss if task.is_regression else classification_loss

    def loss(logits, batch):  # float32 loss whatever the compute dtype
        return task_loss(logits.astype(jnp.float32), batch)

    trainer = Trainer(model, transform, base, optim=optim, total_steps=total_steps, mesh=mesh,
                      loss=loss)
    state = trainer.init_state(jax.random.key(cfg.seed))
    counts = trainer.counts(state)
    print(f"{task.name} | {cfg.method} | {model_name} | {total_steps} steps "
          f"({total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch})")
    print(counts)

    def batches(epoch: int, start: int):
        # Every process draws the same global batches and feeds its own rows of each.
        it = G.iterate_batches(train, cfg.batch_size, buckets=buckets, shuffle=True,
                               seed=cfg.seed, epoch=epoch, start_batch=start,
                               group_by_length=cfg.group_by_length)
        return (distributed.process_rows(b) for b in it) if multi else it

    def evaluate(trainer: Trainer, state) -> dict[str, float]:
        dev_batches = G.iterate_batches(dev, cfg.eval_batch_size, buckets=buckets, shuffle=False,
                                        group_by_length=cfg.group_by_length)
        outputs, labels = (_predict_multihost if multi else predict)(trainer, state, dev_batches)
        return glue_metrics(task, outputs, labels)

    eval_every = cfg.eval_every or max(1, total_steps // 4)
    metrics_path = out_dir / "metrics.jsonl"
    state, save = _checkpointing(cfg, out_dir, trainer, state, base, total_steps,
                                 steps_per_epoch, metrics_path)
    with MetricsLog(metrics_path) as log:
        state, final, _ = fit(trainer, state, batches, evaluate,
                              LoopConfig(total_steps, steps_per_epoch, cfg.log_every, eval_every,
                                         cfg.progress), log, on_step=save)
    # What is kept after training (prefix tuning without its MLP, diff pruning's sparse delta) is
    # what the final metrics describe.
    kept = transform.finalize(state.trainable["delta"])
    if jax.tree_util.tree_structure(kept) != jax.tree_util.tree_structure(state.trainable["delta"]) \
            or not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(kept),
                                                            jax.tree_util.tree_leaves(state.trainable["delta"]))):
        state = state._replace(trainable={**state.trainable, "delta": kept})
        final = evaluate(trainer, state)
        with MetricsLog(metrics_path) as log:
            log.write({"split": "dev", "step": int(state.step), **final, "finalized": True})
        print("after finalize: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
    plot_curves(read_metrics(metrics_path), out_dir / "curves.png",
                title=f"{task.name} {cfg.method} ({model_name})")
    wall = time.perf_counter() - t_start
    summary = {
        "task": task.name,
        "method": cfg.method,
        "model": str(cfg.model),
        "metrics": final,
        "main_metric": task.main_metric,
        "majority_baseline": majority_baseline(task, train.labels, dev.labels),
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "trainable_percent": counts.percent,
        "steps": int(state.step),
        "epochs": int(state.step) / steps_per_epoch,
        "wall_s": round(wall, 2),
        "compilations": trainer.compilations(),
        "method_stats": transform.stats(kept),
        "seed": cfg.seed,
        "base_dtype": cfg.base_dtype,
        "remat": cfg.remat,
        "process_count": jax.process_count(),
        "jax_backend": jax.default_backend(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if not multi:  # the inference export: finalized delta + trained head, loadable in one call
        from jpeft.checkpoint.export import base_fingerprint, save_adapter

        save_adapter(out_dir / "adapter", transform, kept, trainer.params(state), base_model=str(cfg.model),
                     base_fingerprint=base_fingerprint(model, base), method_spec=cfg.method,
                     method_configs=_method_configs(transform, cfg.method), model=model, overwrite=True)
    metric_text = ", ".join(f"{k}={v:.4f}" for k, v in final.items())
    print(f"[summary] {task.name} {cfg.method}: {metric_text} | trainable {counts.trainable:,d} "
          f"({counts.percent:.2f}%) of {counts.total:,d} | {summary['steps']} steps | "
          f"wall {wall:.1f}s | {out_dir}")
    return summary


def _checkpointing(cfg, out_dir: Path, trainer, state, base, total_steps: int,
                   steps_per_epoch: int, metrics_path: Path):
    """Resume from the run directory's latest checkpoint (if any, and ``--resume``), and return
    ``(state, on_step)`` where ``on_step`` saves checkpoints on the configured schedule."""
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
        "task": cfg.task,
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


def main(argv: Sequence[str] | None = None) -> int:
    from jpeft.checkpoint import CheckpointError

    cfg = parse_args(argv)
    try:
        run(cfg)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"experiments.glue: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
