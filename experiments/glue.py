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

from experiments.common import (  # noqa: F401  (cast_frozen_base is part of this module's API)
    BASE_DTYPES,
    CONFIG_DIR,
    CliError,
    Layers,
    RunConfig,
    build_method,
    cast_frozen_base,
    check_base,
    check_base_dtype,
    check_max_length,
    check_ranges,
    checkpointing,
    cli_main,
    default_of,
    finalize_state,
    method_configs,
    method_layers,
    model_matmul_dtype,
    parse_experiment_args,
    reading,
    run_directory,
    run_mesh,
    scan_flag,
    setting,
    train_loop,
    write_adapter,
)
from jpeft.config import Flat
from jpeft.checkpoint.atomic import atomic_write_text


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Several processes (hosts) sharing one device mesh; unset: a single process."""

    coordinator_address: str | None = setting(None, "multi-process: host:port of process 0 (else JPEFT_COORDINATOR / JAX_COORDINATOR_ADDRESS; none: single process)")
    num_processes: int | None = setting(None, "multi-process: number of processes (else JPEFT_NUM_PROCESSES)")
    process_id: int | None = setting(None, "multi-process: this process's id in [0, num_processes) (else JPEFT_PROCESS_ID)")
    coordinator_timeout: int = setting(300, "multi-process: seconds to wait for all processes to join before giving up")

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.num_processes is not None and self.process_id is not None \
                and self.process_id >= self.num_processes:
            raise ValueError(f"--process-id={self.process_id} is out of range: give an integer in "
                             f"[0, {self.num_processes}) (--num-processes={self.num_processes})")


@dataclasses.dataclass(frozen=True)
class GlueConfig(RunConfig):
    """A GLUE run: :class:`~experiments.common.RunConfig` and the task."""

    task: str = setting("sst2", "GLUE task: cola sst2 mrpc stsb rte wnli qnli mnli qqp")
    regression_bias: str = setting("label_mean", "regression tasks (STS-B): the head's output bias starts at the training labels' mean ('label_mean') or at 0 ('zero')")
    distributed: Flat[DistributedConfig] = default_of(DistributedConfig)


def start_regression_head_at(base: Any, head_patterns: Sequence[str], value: float) -> Any:
    """``base`` with the output bias of the regression head (the head's bias leaf of shape
    ``(1,)``: BERT's ``head/classifier/bias``, RoBERTa's ``head/out_proj/bias``) set to ``value``.

    STS-B scores lie in [0, 5] (mean 2.7 on train). A head whose bias starts at 0 must first learn
    that offset: with Adam the bias moves about ``lr`` per step, so in a 3-epoch recipe a method
    whose own parameters barely move the pooled features (LoRA, adapters, prompts) spends most of
    training fitting the mean. Starting the bias at the label mean leaves the method only the
    variation around it; the initial MSE is then the label variance."""
    import jax.numpy as jnp

    from jpeft.core import paths as P

    flat = P.flatten(base)
    head = P.select(base, head_patterns, what="task head")
    biases = [p for p in head if p.endswith("/bias") and flat[p].shape == (1,)]
    if len(biases) != 1:
        raise ValueError(f"expected one regression output bias of shape (1,) in the head, found "
                         f"{biases or 'none'} among {sorted(head)}")
    flat[biases[0]] = jnp.full((1,), value, flat[biases[0]].dtype)
    return P.unflatten(flat)


def config_layers(method: str, task: str, config_dir: Path = CONFIG_DIR,
                  argv: Sequence[str] = ()) -> Layers:
    """The TOML layers for this method and task, in the order they apply (``argv``: the command
    line, whose flags silence the note on settings a combination's parts disagree on)."""
    from jpeft.data.glue import get_task

    return method_layers(method, config_dir, get_task(task).name, argv)


def parse_args(argv: Sequence[str] | None = None) -> GlueConfig:
    return parse_experiment_args(
        GlueConfig, argv,
        lambda a: config_layers(scan_flag(a, "method", "lora"), scan_flag(a, "task", "sst2"), argv=a),
        prog="python -m experiments.glue", description=__doc__.split("\n\n")[0])


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


def run(cfg: GlueConfig) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the summary (also written to disk)."""
    from jpeft.train import distributed

    # Before anything touches a device: join the other processes (no-op for a single one).
    dist = cfg.distributed
    distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id,
                           timeout_s=dist.coordinator_timeout)

    import jax

    from jpeft.config import to_dict
    from jpeft.data import glue as G

    t_start = time.perf_counter()
    task = G.get_task(cfg.task)
    build_method(cfg)  # refuse a bad method spec or config before loading anything
    if cfg.regression_bias not in ("label_mean", "zero"):
        raise ValueError(f"--regression-bias={cfg.regression_bias!r}; choose 'label_mean' or 'zero'")
    check_base_dtype(cfg.compute.base_dtype)
    model_matmul_dtype(cfg.compute.matmul_dtype)  # these two before the run folder is touched
    run_mesh(cfg)
    out_dir = Path(cfg.checkpoint.output_dir or f"runs/{task.name}-{cfg.method}-s{cfg.seed}")
    multi = jax.process_count() > 1
    if multi and jax.process_index() > 0:
        out_dir = out_dir / f"process-{jax.process_index()}"  # process 0 owns the run directory
    with run_directory(cfg, out_dir, cfg.task):
        atomic_write_text(out_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
        return _run(cfg, task, out_dir, multi, t_start)


def load_split(task: Any, split: str, data_dir: str | None) -> Any:
    """One split, its local file checked first (:func:`check_glue_file`): a bad file is a
    message naming it and the problem."""
    from jpeft.data import glue as G

    root = Path(data_dir) if data_dir is not None else G.default_data_dir()
    if data_dir is None and not root.is_dir():
        return G.load_glue(task, split, data_dir)  # the Hub
    path = G.local_file(task, split, root)
    if path.is_file():
        check_glue_file(task, path)
    with reading(str(path), "Pass --data-dir=FOLDER holding the task's files in the original GLUE "
                            "TSV layout."):
        dataset = G.load_glue(task, split, data_dir)
    if len(dataset) == 0:
        raise CliError(f"{path} holds no examples; --data-dir must hold the task's files in the "
                       "original GLUE TSV layout")
    return dataset


def check_glue_file(task: Any, path: Path) -> None:
    """Refuse an empty file, one that is not UTF-8, or one whose header lacks the task's columns."""
    raw = path.read_bytes()
    fix = "--data-dir must hold the task's files in the original GLUE TSV layout (tab separated, UTF-8)"
    if not raw.strip():
        raise CliError(f"{path} is empty; {fix}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise CliError(f"{path} is not UTF-8 text (byte {raw[err.start]:#04x} on line {line}); {fix}") from None
    head, _, body = text.partition("\n")
    if task.columns is None and not body.strip():
        raise CliError(f"{path} holds no examples (only a header); {fix}")
    first = head.rstrip("\r").split("\t")
    if task.columns is not None:  # no header row (CoLA): a fixed number of columns
        if len(first) != len(task.columns):
            raise CliError(f"{path}: line 1 has {len(first)} tab-separated columns, {task.name} files have "
                           f"{len(task.columns)} ({', '.join(task.columns)}) and no header; {fix}")
        return
    missing = [c for c in (*task.local_text, task.local_label) if c not in first]
    if missing:
        raise CliError(f"{path}: the header (line 1) lacks the column(s) {missing}; found {first[:8]}. "
                       f"{task.name} files need {[*task.local_text, task.local_label]}; {fix}")


def _run(cfg: GlueConfig, task: Any, out_dir: Path, multi: bool, t_start: float) -> dict[str, Any]:
    """The run proper, inside the owned run directory."""
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from jpeft.data import glue as G
    from jpeft.metrics import glue_metrics, majority_baseline
    from jpeft.models import bert
    from jpeft.models.hub import resolve_model_dir
    from jpeft.train import distributed
    from jpeft.train.logging import MetricsLog, plot_curves, read_metrics
    from jpeft.train.loop import predict
    from jpeft.train.trainer import Trainer, classification_loss, regression_loss

    train_ds = load_split(task, "train", cfg.data.data_dir)
    dev_ds = load_split(task, "validation", cfg.data.data_dir)
    if cfg.data.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.data.max_train_samples, len(train_ds))))
    fix = ("Pass --model=FOLDER holding a BERT-family config.json, model.safetensors and tokenizer "
           "files (download it again if a file is damaged).")
    with reading(f"--model={cfg.model}", fix):
        model_dir = resolve_model_dir(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model, base = bert.from_pretrained(model_dir, num_labels=task.num_labels, seed=cfg.seed,
                                           remat=cfg.compute.remat,
                                           matmul_dtype=model_matmul_dtype(cfg.compute.matmul_dtype))
    check_base(cfg.model, base)
    check_max_length(cfg.data.max_length, model.config)
    transform = build_method(cfg, tokenizer)
    train = G.encode(train_ds, tokenizer, task, cfg.data.max_length)
    dev = G.encode(dev_ds, tokenizer, task, cfg.data.max_length)
    buckets = tuple(cfg.data.buckets) or G.default_buckets(cfg.data.max_length)

    if task.is_regression and cfg.regression_bias == "label_mean":
        base = start_regression_head_at(base, model.info().head_patterns, float(train.labels.mean()))
    if cfg.compute.base_dtype != "float32":
        from jpeft.quant import base_compute_dtype
        from jpeft.train.trainer import trainable_base_paths

        model = bert.BertModel(dataclasses.replace(model.config, dtype=base_compute_dtype(cfg.compute.base_dtype)))
        base = cast_frozen_base(base, trainable_base_paths(transform, base, model.info()),
                                cfg.compute.base_dtype, transform, model.info())
    model_name = str(cfg.model).rstrip("/").split("/")[-1]
    steps_per_epoch = G.num_epoch_batches(train, cfg.data.batch_size, buckets=buckets,
                                          group_by_length=cfg.data.group_by_length)
    total_steps = cfg.loop.max_steps or max(1, math.ceil(cfg.loop.epochs * steps_per_epoch))
    mesh = run_mesh(cfg)
    if mesh is not None and cfg.data.batch_size % mesh.shape["data"]:
        raise ValueError(f"--batch-size={cfg.data.batch_size} must be a multiple of the mesh's data "
                         f"axis ({mesh.shape['data']}); change --batch-size or --mesh")
    if multi and (cfg.data.batch_size % jax.process_count() or cfg.data.eval_batch_size % jax.process_count()):
        raise ValueError(f"--batch-size and --eval-batch-size must be multiples of the "
                         f"{jax.process_count()} processes")
    task_loss = regression_loss if task.is_regression else classification_loss

    def loss(logits, batch):  # float32 loss whatever the compute dtype
        return task_loss(logits.astype(jnp.float32), batch)

    trainer = Trainer(model, transform, base, optim=cfg.optim, total_steps=total_steps, mesh=mesh,
                      loss=loss)
    state = trainer.init_state(jax.random.key(cfg.seed))
    counts = trainer.counts(state)
    print(f"{task.name} | {cfg.method} | {model_name} | {total_steps} steps "
          f"({total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch})")
    print(counts)

    def batches(epoch: int, start: int):
        # Every process draws the same global batches and feeds its own rows of each.
        it = G.iterate_batches(train, cfg.data.batch_size, buckets=buckets, shuffle=True,
                               seed=cfg.seed, epoch=epoch, start_batch=start,
                               group_by_length=cfg.data.group_by_length)
        return (distributed.process_rows(b) for b in it) if multi else it

    def evaluate(trainer: Trainer, state) -> dict[str, float]:
        dev_batches = G.iterate_batches(dev, cfg.data.eval_batch_size, buckets=buckets, shuffle=False,
                                        group_by_length=cfg.data.group_by_length)
        outputs, labels = (_predict_multihost if multi else predict)(trainer, state, dev_batches)
        return glue_metrics(task, outputs, labels)

    metrics_path = out_dir / "metrics.jsonl"
    state, saver, start_loss = checkpointing(cfg, out_dir, trainer, state, base, total_steps,
                                             steps_per_epoch, metrics_path, {"task": cfg.task})
    with MetricsLog(metrics_path) as log:
        state, final, _ = train_loop(trainer, state, batches, evaluate, cfg, total_steps,
                                     steps_per_epoch, log, saver, start_loss)
    # What is kept after training (prefix tuning without its MLP, diff pruning's sparse delta) is
    # what the final metrics describe.
    state, kept, changed = finalize_state(transform, state)
    if changed:
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
        "base_dtype": cfg.compute.base_dtype,
        "remat": cfg.compute.remat,
        "matmul_dtype": cfg.compute.matmul_dtype,
        "process_count": jax.process_count(),
        "jax_backend": jax.default_backend(),
    }
    if not multi:  # the inference export: finalized delta + trained head, loadable in one call
        write_adapter(out_dir, cfg, transform, kept, trainer.params(state), model, base)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    metric_text = ", ".join(f"{k}={v:.4f}" for k, v in final.items())
    print(f"[summary] {task.name} {cfg.method}: {metric_text} | trainable {counts.trainable:,d} "
          f"({counts.percent:.2f}%) of {counts.total:,d} | {summary['steps']} steps | "
          f"wall {wall:.1f}s | {out_dir}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main("experiments.glue", parse_args, run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
