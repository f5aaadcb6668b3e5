"""Hugging Face PEFT (PyTorch) on jpeft's GLUE recipe: LoRA and full fine-tuning, side by side.

    python -m experiments.peft_compare --tasks=sst2,mrpc --methods=lora,full --seeds=0,1,2
    python -m experiments.peft_compare --table                 # only the side-by-side table

Each (task, method, seed) trains ``transformers``' ``BertForSequenceClassification`` (LoRA
through ``peft``) with jpeft's own recipe: ``experiments.glue.parse_args`` reads the same layers
of ``configs/`` (task file, ``configs/<method>.toml`` and its ``[tasks.<task>]`` table, flags), and
the run uses the same

- data: the local GLUE files, tokenised by ``jpeft.data.glue.encode`` (max length, truncation) and
  batched by ``jpeft.data.glue.iterate_batches`` (the same examples in the same order and padding
  buckets per seed, short last batches padded with weight-0 rows);
- steps (``max_steps``, else ``ceil(epochs × batches per epoch)``) and evaluations (every
  ``eval_every`` steps, 4 per run by default, and at the end; the final one is reported);
- optimizer: AdamW (β 0.9/0.999, ε 1e-8), weight decay on every trainable tensor except biases
  and LayerNorm parameters (LoRA's A and B are decayed, as in jpeft), the peak learning rate with
  jpeft's schedule (:func:`lr_factor`: linear warm-up over ``round(warmup_ratio × steps)`` steps,
  then linear or cosine decay to 0, as optax computes it), clipping of the global gradient norm;
- model: the same checkpoint and config (dropout 0.1 in the encoder and before the classifier),
  LoRA's rank, alpha, dropout and target layers (jpeft's regex, searched in the module path), the
  task head trained with the adapter and the pooler frozen, as jpeft does.

A run writes ``checkpoint/`` in its folder every ``--save-every`` steps (the trained tensors, AdamW's
moments, the learning-rate schedule's position, the torch random state and the metrics so far;
safetensors and JSON, written atomically) and a run started again with the same recipe resumes
from it, with the same batches and random draws as without the interruption; a recipe that
differs from the checkpoint's is refused. The checkpoint is removed when the run's
``summary.json`` is written.

What differs: the framework and the random draws (the head's and LoRA A's initial values, dropout
masks). Recipes that use features not reproduced here (group learning rates, bf16, other methods)
are refused. Runs go to ``<out>/runs/<task>-<method>-s<seed>/summary.json`` (with the recipe);
``<out>/results.md`` sets each cell's mean ± std next to jpeft's from
``<jpeft>/runs/<task>-<method>-s<seed>/summary.json`` with this agreement criterion: jpeft's mean
lies within the seeds' spread of PEFT's, |Δmean| ≤ the larger std + 0.5 points.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from experiments.glue import GlueConfig
from experiments.sweep import (
    _parse_seeds,
    aggregate,
    check_grid,
    check_name,
    cpu_name,
    same_recipe,
    seeded_runs,
    split_extra,
)

METHODS = ("lora", "full")


def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: str = "linear") -> float:
    """The learning-rate multiplier of update ``step`` (0-based), as
    :func:`jpeft.train.optim.learning_rate_schedule` gives it for one stage."""
    total = max(int(total_steps), 1)
    warmup = int(round(warmup_ratio * total))
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    frac = min(step - warmup, max(total - warmup, 1)) / max(total - warmup, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0 - frac


def decays(name: str) -> bool:
    """jpeft's weight-decay rule on a (PyTorch) parameter name: no decay for biases and LayerNorm."""
    return not (name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)


def lora_targets(model: Any, pattern: str) -> list[str]:
    """The encoder's ``nn.Linear`` modules whose path (``bert.`` dropped, ``.`` as ``/``) the
    regex ``pattern`` finds, as jpeft matches its Dense module paths; never the classifier."""
    import re

    import torch

    regex = re.compile(pattern)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.startswith("classifier"):
            continue
        path = name.removeprefix("bert.").replace(".", "/")
        if regex.search(path):
            names.append(name)
    if not names:
        raise ValueError(f"lora.targets {pattern!r} matches no linear layer of the model")
    return names


def check_recipe(cfg: GlueConfig) -> None:
    """Refuse the recipe features this script does not reproduce."""
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r}: this comparison runs {', '.join(METHODS)}")
    if cfg.optim.group_lr or cfg.optim.group_weight_decay:
        raise ValueError(f"{cfg.method} on {cfg.task}: group_lr/group_weight_decay are not reproduced")
    if cfg.compute.base_dtype != "float32" or cfg.compute.matmul_dtype != "float32":
        raise ValueError("only float32 recipes are reproduced")
    if cfg.optim.schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"schedule {cfg.optim.schedule!r}")
    if cfg.method == "lora":
        lo = cfg.lora
        if lo.use_rslora or lo.init != "kaiming" or lo.bias != "none" or lo.layers or lo.rank_pattern \
                or lo.alpha_pattern:
            raise ValueError("LoRA: only r, alpha, dropout and targets (kaiming init, no bias, all "
                             "layers) are reproduced")


def build_model(cfg: GlueConfig, model_dir: Path, num_labels: int) -> Any:
    """``BertForSequenceClassification`` from ``model_dir`` (LoRA-wrapped by ``peft`` for
    ``cfg.method == "lora"``); the head is drawn from torch's RNG (seeded by the caller)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=num_labels)
    if cfg.method == "full":
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    lo = cfg.lora
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lo.r, lora_alpha=lo.alpha,
                        lora_dropout=lo.dropout, target_modules=lora_targets(model, lo.targets),
                        bias="none", init_lora_weights=True)
    return get_peft_model(model, config)


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if decays(n)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]


CHECKPOINT = "checkpoint"
SAVE_EVERY = 200


def save_checkpoint(folder: Path, model: Any, opt: Any, sched: Any, meta: dict[str, Any]) -> None:
    """Write the resumable state of a PyTorch run to ``folder`` (replaced atomically): the trained
    tensors ``p/<name>``, AdamW's state ``opt/<index>/<key>`` and the torch random state in
    ``state.safetensors``; ``meta`` with the optimizer's groups and the schedule's state in
    ``meta.json``."""
    import torch
    from safetensors.torch import save_file

    from jpeft.checkpoint.atomic import atomic_dir

    tensors = {f"p/{n}": p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt_state = opt.state_dict()
    for index, entry in opt_state["state"].items():
        tensors.update({f"opt/{index}/{k}": torch.as_tensor(v).contiguous() for k, v in entry.items()})
    tensors["rng/torch"] = torch.get_rng_state()
    sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    meta = {**meta, "param_groups": opt_state["param_groups"], "scheduler": sched_state}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    atomic_dir(folder, write, overwrite=True)


def load_checkpoint(folder: Path, model: Any, opt: Any, sched: Any, recipe: dict[str, Any]) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model``, ``opt`` and ``sched``; returns
    its ``meta``. Refuses a checkpoint of another recipe or model (``ValueError``, naming the fix)."""
    import torch
    from safetensors.torch import load_file

    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("recipe") != recipe:
        changed = sorted(k for k in set(recipe) | set(meta.get("recipe", {}))
                         if recipe.get(k) != meta.get("recipe", {}).get(k))
        raise ValueError(f"{folder} holds a checkpoint of another recipe ({', '.join(changed)} differ); "
                         "delete the run's folder to start it again with this recipe")
    tensors = load_file(str(folder / "state.safetensors"))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k[2:] for k in tensors if k.startswith("p/")}
    if saved != set(trained):
        raise ValueError(f"{folder}: the checkpoint's tensors are not this model's trainable ones; "
                         "delete the run's folder to start it again")
    with torch.no_grad():
        for name, param in trained.items():
            param.copy_(tensors[f"p/{name}"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, field = key.split("/", 2)
            state.setdefault(int(index), {})[field] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
    sched.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(opt.param_groups)})
    torch.set_rng_state(tensors["rng/torch"])
    return meta


def run(cfg: GlueConfig, out_dir: Path, dynamic_padding: bool = False,
        save_every: int | None = SAVE_EVERY) -> dict[str, Any]:
    """Train and evaluate one configuration with PyTorch (+ PEFT); returns the summary (also
    written to ``out_dir/summary.json``). ``dynamic_padding``: each batch (the same examples) is
    cut to its longest example, as a collator that pads to the longest in the batch does, instead
    of being padded to its length bucket. ``save_every``: steps between checkpoints (``None`` or
    0: none); a checkpoint of the same recipe in ``out_dir`` is resumed."""
    import numpy as np
    import peft
    import torch
    import transformers
    from transformers import AutoTokenizer

    from jpeft.checkpoint.atomic import atomic_write_text
    from jpeft.config import to_dict
    from jpeft.data import glue as G
    from jpeft.metrics import glue_metrics, majority_baseline
    from jpeft.models.hub import resolve_model_dir

    check_recipe(cfg)
    t_start = time.perf_counter()
    task = G.get_task(cfg.task)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_ds = G.load_glue(task, "train", cfg.data.data_dir)
    dev_ds = G.load_glue(task, "validation", cfg.data.data_dir)
    if cfg.data.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.data.max_train_samples, len(train_ds))))
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    train = G.encode(train_ds, tokenizer, task, cfg.data.max_length)
    dev = G.encode(dev_ds, tokenizer, task, cfg.data.max_length)
    buckets = tuple(cfg.data.buckets) or G.default_buckets(cfg.data.max_length)
    model = build_model(cfg, model_dir, task.num_labels)
    if task.is_regression and cfg.regression_bias == "label_mean":
        with torch.no_grad():
            head = model.classifier.modules_to_save.default if cfg.method == "lora" else model.classifier
            head.bias.fill_(float(train.labels.mean()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters()
                if "lora_" not in n and "modules_to_save" not in n)
    steps_per_epoch = G.num_epoch_batches(train, cfg.data.batch_size, buckets=buckets,
                                          group_by_length=cfg.data.group_by_length)
    total_steps = cfg.loop.max_steps or max(1, math.ceil(cfg.loop.epochs * steps_per_epoch))
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(0.9, 0.999),
                            eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, cfg.optim.warmup_ratio, cfg.optim.schedule))
    params = [p for p in model.parameters() if p.requires_grad]

    def tensors(batch: dict[str, Any]) -> dict[str, Any]:
        width = int(np.asarray(batch["attention_mask"]).sum(axis=1).max()) if dynamic_padding else None
        return {k: torch.from_numpy(np.asarray(batch[k])[:, :width].astype(np.int64))
                for k in ("input_ids", "attention_mask", "token_type_ids")}

    def loss_of(logits: Any, batch: dict[str, Any]) -> Any:
        weights = torch.from_numpy(np.asarray(batch["weights"], np.float32))
        if task.is_regression:
            labels = torch.from_numpy(np.asarray(batch["labels"], np.float32))
            rows = (logits.float()[:, 0] - labels) ** 2
        else:
            labels = torch.from_numpy(np.asarray(batch["labels"]).astype(np.int64))
            rows = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        return (rows * weights).sum() / weights.sum().clamp_min(1.0)

    def evaluate() -> dict[str, float]:
        model.eval()
        outputs, labels = [], []
        with torch.no_grad():
            for batch in G.iterate_batches(dev, cfg.data.eval_batch_size, buckets=buckets, shuffle=False,
                                           group_by_length=cfg.data.group_by_length):
                keep = np.asarray(batch["weights"]) > 0
                outputs.append(model(**tensors(batch)).logits.float().numpy()[keep])
                labels.append(np.asarray(batch["labels"])[keep])
        model.train()
        return glue_metrics(task, np.concatenate(outputs), np.concatenate(labels))

    torch.set_num_threads(os.cpu_count() or 1)
    eval_every = cfg.loop.eval_every or max(1, total_steps // 4)
    print(f"{task.name} | {cfg.method} (PyTorch {torch.__version__}, PEFT {peft.__version__}) | "
          f"{total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch}) | "
          f"trainable {trainable:,d}", flush=True)
    recipe = {**to_dict(cfg), "dynamic_padding": dynamic_padding}
    step, final, wall_before, rows = 0, {}, 0.0, []
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the data and the model have loaded
    if (out_dir / CHECKPOINT / "meta.json").is_file():
        meta = load_checkpoint(out_dir / CHECKPOINT, model, opt, sched, recipe)
        step, final, wall_before, rows = meta["step"], meta["final"], meta["wall_s"], meta["metrics"]
        print(f"resumed at step {step} from {out_dir / CHECKPOINT}", flush=True)
    log = (out_dir / "metrics.jsonl").open("w")
    for row in rows:
        log.write(json.dumps(row) + "\n")

    def write_row(row: dict[str, Any]) -> None:
        rows.append(row)
        log.write(json.dumps(row) + "\n")

    def elapsed() -> float:
        return round(wall_before + time.perf_counter() - t_start, 3)

    model.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        for batch in G.iterate_batches(train, cfg.data.batch_size, buckets=buckets, shuffle=True,
                                       seed=cfg.seed, epoch=epoch, start_batch=step % steps_per_epoch,
                                       group_by_length=cfg.data.group_by_length):
            loss = loss_of(model(**tensors(batch)).logits, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip = cfg.optim.clip_norm
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
            opt.step()
            sched.step()
            step += 1
            if step % cfg.loop.log_every == 0:
                write_row({"split": "train", "step": step, "loss": loss.item(), "grad_norm": float(norm),
                           "wall_s": elapsed()})
            if step % eval_every == 0 or step == total_steps:
                final = evaluate()
                write_row({"split": "dev", "step": step, **final, "wall_s": elapsed()})
                log.flush()
                print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()), flush=True)
            if save_every and step % save_every == 0 and step < total_steps:
                save_checkpoint(out_dir / CHECKPOINT, model, opt, sched,
                                {"step": step, "final": final, "wall_s": elapsed(), "metrics": rows,
                                 "recipe": recipe})
            if step >= total_steps:
                break
    log.close()
    wall = elapsed()
    summary = {
        "task": task.name, "method": cfg.method, "label": cfg.method, "library": "peft",
        "model": str(cfg.model), "metrics": final, "main_metric": task.main_metric,
        "majority_baseline": majority_baseline(task, train.labels, dev.labels),
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100.0 * trainable / total, "steps": step,
        "epochs": step / steps_per_epoch, "wall_s": round(wall, 2), "seed": cfg.seed,
        "torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
        "config": to_dict(cfg),
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)
    print(f"[summary] {task.name} {cfg.method} (PEFT): " + ", ".join(f"{k}={v:.4f}" for k, v in final.items())
          + f" | {step} steps | wall {wall:.1f}s | {out_dir}", flush=True)
    return summary


def side_by_side(peft_out: Path, jpeft_out: Path, seeds: list[int] | None = None) -> list[str]:
    """The table's lines: per (task, method) jpeft's and PEFT's mean ± std over their seeds, Δmean
    and the criterion |Δmean| ≤ max(std) + 0.5 points, on the task's main metric."""
    def cells(out: Path) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[tuple[str, str, int], Any]]:
        runs = [r for r in seeded_runs(out) if r["label"] in METHODS and (seeds is None or r["seed"] in seeds)]
        return aggregate(runs), {(r["label"], r["task"], r["seed"]): r for r in runs}

    theirs, their_runs = cells(peft_out)
    ours, our_runs = cells(jpeft_out)
    lines = ["| task | method | metric | jpeft | PEFT | Δmean (jpeft − PEFT) | within max std + 0.5 | recipes |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(theirs, key=lambda k: (k[1], METHODS.index(k[0]))):
        p, j = theirs[key], ours.get(key)
        metric = p["main_metric"]

        def fmt(c):
            return f"{100 * c['metrics'][metric]:.1f} ± {100 * c['std'][metric]:.1f} (n={c['n']})"

        if j is None:
            lines.append(f"| {key[1]} | {key[0]} | {metric} | – | {fmt(p)} | – | – | – |")
            continue
        delta = 100 * (j["metrics"][metric] - p["metrics"][metric])
        bound = 100 * max(j["std"][metric], p["std"][metric]) + 0.5
        same = {same_recipe([our_runs[key[0], key[1], s], their_runs[key[0], key[1], s]])
                for s in set(j["seeds"]) & set(p["seeds"])}
        lines.append(f"| {key[1]} | {key[0]} | {metric} | {fmt(j)} | {fmt(p)} | {delta:+.1f} | "
                     f"{'yes' if abs(delta) <= bound else 'no'} (≤ {bound:.1f}) | "
                     f"{'same' if same == {True} else 'differ'} |")
    return lines


def write_table(peft_out: Path, jpeft_out: Path, seeds: list[int] | None = None) -> None:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    lines = side_by_side(peft_out, jpeft_out, seeds)
    note = (f"jpeft and Hugging Face PEFT (PyTorch) on the same GLUE recipe (`python -m "
            f"experiments.peft_compare`): the final dev score's mean ± sample std over the seeds, "
            f"in points, on {cpu_name()}. jpeft's runs: `{jpeft_out}/runs`; PEFT's: `{peft_out}/runs`. "
            "\"recipes\": whether the two libraries' runs of a cell have the same recipe (config "
            "without seed and bookkeeping).")
    peft_out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(peft_out / "results.md", note + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.peft_compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="sst2,mrpc")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="results/glue/peft_compare")
    parser.add_argument("--jpeft", default="results/glue", help="the jpeft sweep's folder (with runs/)")
    parser.add_argument("--extra", default="", help="flags for every run (jpeft's GLUE flags)")
    parser.add_argument("--save-every", type=int, default=SAVE_EVERY,
                        help="steps between checkpoints of a run (0: none); a stopped run resumes from its last")
    parser.add_argument("--table", action="store_true", help="run nothing: write the table only")
    args = parser.parse_args(argv)
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    try:
        for name in tasks + methods:
            check_name(name, "task or method")
        check_grid(methods, tasks)
        unsupported = [m for m in methods if m not in METHODS]
        if unsupported:
            raise ValueError(f"--methods: {', '.join(unsupported)} not compared; this comparison runs "
                             f"{', '.join(METHODS)}")
        seeds = _parse_seeds(args.seeds)
        extra = split_extra(args.extra)
    except ValueError as err:
        parser.error(str(err))
    if args.save_every < 0:
        parser.error(f"--save-every={args.save_every}: give the steps between checkpoints (0: none)")
    out, jpeft_out = Path(args.out), Path(args.jpeft)
    if out.exists() and not out.is_dir():
        parser.error(f"--out={out} is a file; pass a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out={out} cannot be created ({err.strerror or err}); choose a folder you can write to")
    failed = []
    if not args.table:
        from experiments.common import expected_errors, one_paragraph
        from experiments.glue import parse_args

        for seed in seeds:
            for task in tasks:
                for method in methods:
                    run_dir = out / "runs" / f"{task}-{method}-s{seed}"
                    if (run_dir / "summary.json").is_file():
                        continue
                    cfg = parse_args([f"--method={method}", f"--task={task}", f"--seed={seed}", *extra])
                    try:
                        run(cfg, run_dir, save_every=args.save_every)
                    except expected_errors() as err:
                        print(f"{task}-{method}-s{seed}: error: {one_paragraph(err)}", file=sys.stderr)
                        failed.append(f"{task}-{method}-s{seed}")
    from experiments.common import CliError

    try:
        write_table(out, jpeft_out, seeds)
    except CliError as err:  # a damaged summary.json, named
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
