"""Fine-tune a decoder LM on the E2E NLG challenge with any PEFT method, decode the test MRs and
score them (BLEU, NIST, METEOR, ROUGE-L, CIDEr).

    python -m experiments.e2e --method=lora                 # SmolLM2-135M-Instruct, subset recipe
    python -m experiments.e2e --method=prefix --full-recipe # every pair for 5 epochs, every test MR
    python -m experiments.e2e --method=houlsby --max-steps=50 --max-test-mrs=16
    python -m experiments.e2e --help                        # every flag with its default

Training sequences are ``"Data: {MR}\\nText: {reference}<EOS>"`` with the loss on the reference
and EOS only (:mod:`jpeft.data.e2e`). The dev loss (on ``--max-eval-samples`` dev pairs) is
evaluated during training; after training the finalized delta decodes the first
``--max-test-mrs`` distinct test MRs (greedy, or beam search with ``--num-beams``) with the KV
cache, and the outputs are scored against all references of each MR (:mod:`jpeft.nlg_metrics`).

The default recipe trains 300 steps of batch 8 (2,400 of the 42,061 training pairs) and decodes
100 test MRs: 17–33 minutes per method on a 2-core CPU shared with other jobs. ``--full-recipe`` sets the papers'
budget (5 epochs, every test MR, beam search with 5 beams); it takes days on such a CPU.

Settings are layered: the defaults below < ``configs/e2e/<method>.toml`` for each part of the
method (targets for the decoder's module names, learning rates) < ``--config=FILE`` < flags.
The run directory receives ``metrics.jsonl``, ``curves.png``, ``config.json``, ``summary.json``,
``predictions.jsonl`` (MR, output, references), ``checkpoints/`` and ``adapter/``.
Batches group sequences of similar length (``--buckets``, default 48, 64, 80, 96, 128).
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

from experiments.common import (
    CONFIG_DIR,
    CliError,
    DataConfig,
    LoopSettings,
    RunConfig,
    build_method,
    cast_frozen_base,
    check_base,
    check_base_dtype,
    check_ranges,
    checkpointing,
    cli_main,
    default_of,
    finalize_state,
    method_layers,
    model_matmul_dtype,
    parse_experiment_args,
    reading,
    requantization_note,
    run_directory,
    run_mesh,
    scan_flag,
    setting,
    train_loop,
    write_adapter,
)
from jpeft.config import Flat, apply
from jpeft.train.optim import OptimConfig
from jpeft.checkpoint.atomic import atomic_write_text

E2E_CONFIG_DIR = CONFIG_DIR / "e2e"
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What --full-recipe sets (the LoRA and prefix-tuning papers train 5 epochs on every pair and
# decode every test MR with beam search).
FULL_RECIPE = {"epochs": 5.0, "max_steps": None, "max_train_samples": None, "max_test_mrs": None,
               "max_eval_samples": None, "num_beams": 5, "eval_every": None}


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """What is decoded and scored after training, and how."""

    max_eval_samples: int | None = setting(256, "dev pairs for the dev loss (none: all 4,672)")
    max_test_mrs: int | None = setting(100, "distinct test MRs decoded and scored (none: all 630)")
    decode_split: str = setting("test", "split decoded and scored: test or dev")
    num_beams: int = setting(1, "1: greedy; N > 1: beam search")
    length_penalty: float = setting(1.0, "beam search: score / length**length_penalty")
    max_new_tokens: int = setting(64, "tokens generated per MR at most")
    decode_batch_size: int = setting(32, "MRs decoded together")

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclasses.dataclass(frozen=True)
class E2EConfig(RunConfig):
    """An E2E run: :class:`~experiments.common.RunConfig` with this experiment's defaults, and
    the decoding."""

    model: str = setting(DEFAULT_MODEL, "model folder, Hub id or .gguf file")
    data: Flat[DataConfig] = default_of(DataConfig, batch_size=8, eval_batch_size=32)
    optim: Flat[OptimConfig] = default_of(OptimConfig, lr=2e-4)
    loop: Flat[LoopSettings] = default_of(LoopSettings, max_steps=300)
    decode: Flat[DecodeConfig] = default_of(DecodeConfig)
    full_recipe: bool = setting(False, "5 epochs over every pair, every test MR, 5 beams (overrides those flags)")


def e2e_buckets(max_length: int) -> tuple[int, ...]:
    """Padded lengths for E2E sequences (SmolLM2 tokens: median 62, 95th percentile 89): steps of
    16 from 48, then ``max_length`` (about 24% fewer padded tokens than powers of two)."""
    return (*(b for b in (48, 64, 80, 96) if b < max_length), int(max_length))


def parse_args(argv: Sequence[str] | None = None) -> E2EConfig:
    cfg = parse_experiment_args(
        E2EConfig, argv,
        lambda a: method_layers(scan_flag(a, "method", "lora"), E2E_CONFIG_DIR, argv=a),
        prog="python -m experiments.e2e", description=__doc__.split("\n\n")[0])
    return apply(cfg, FULL_RECIPE) if cfg.full_recipe else cfg


def load_model(cfg: E2EConfig) -> tuple[Any, Any, Any]:
    """``(model, params, tokenizer)`` for ``cfg.model`` (folder, Hub id or GGUF file)."""
    from jpeft.models import auto_from_pretrained, auto_tokenizer

    with reading(f"--model={cfg.model}", "Pass --model=FOLDER (config.json, *.safetensors and "
                 "tokenizer files) or a .gguf file of a decoder LM; download it again if a file is "
                 "damaged."):
        model, base = auto_from_pretrained(cfg.model, remat=cfg.compute.remat,
                                           matmul_dtype=model_matmul_dtype(cfg.compute.matmul_dtype))
        tokenizer = auto_tokenizer(cfg.model)
    if not hasattr(model, "init_cache"):
        raise ValueError(f"--model={cfg.model} is a {type(model).__name__}; the E2E experiment needs a "
                         "decoder LM (Llama family or GPT-2)")
    check_base(cfg.model, base)
    return model, base, tokenizer


def run(cfg: E2EConfig) -> dict[str, Any]:
    """Train, decode and score one configuration; returns the summary (also written to disk)."""
    from jpeft.config import to_dict

    t_start = time.perf_counter()
    build_method(cfg)  # refuse a bad method spec or config before loading anything
    check_base_dtype(cfg.compute.base_dtype)
    model_matmul_dtype(cfg.compute.matmul_dtype)  # these two before the run folder is touched
    run_mesh(cfg)
    if cfg.decode.decode_split not in ("test", "dev", "validation"):
        raise ValueError(f"--decode-split={cfg.decode.decode_split!r}; choose test or dev")
    out_dir = Path(cfg.checkpoint.output_dir or f"runs/e2e-{cfg.method}-s{cfg.seed}")
    with run_directory(cfg, out_dir, "e2e"):
        atomic_write_text(out_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
        return _run(cfg, out_dir, t_start)


def load_split(split: str, data_dir: str | None) -> Any:
    """One E2E split; a file that is empty, not UTF-8, without the ``mr``/``ref`` header or
    without rows is a message naming it."""
    from jpeft.data import e2e as D

    folder = Path(data_dir) if data_dir is not None else D.default_data_dir()
    path = folder / D.FILES[D._split(split)]
    fix = ("--data-dir must hold the E2E CSV files (UTF-8, header mr,ref) from "
           "tuetschek/e2e-dataset")
    if path.is_file():
        raw = path.read_bytes()
        if not raw.strip():
            raise CliError(f"{path} is empty; {fix}")
        try:
            header, _, body = raw.decode("utf-8").partition("\n")
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            raise CliError(f"{path} is not UTF-8 text (byte {raw[err.start]:#04x} on line {line}); "
                           f"{fix}") from None
        columns = [c.strip().strip('"') for c in header.split(",")]
        if columns[:2] != ["mr", "ref"]:
            raise CliError(f"{path}: the header (line 1) is {header[:80]!r}, not 'mr,ref'; {fix}")
        if not body.strip():
            raise CliError(f"{path} holds no examples (only a header); {fix}")
    with reading(str(path), fix):
        dataset = D.load_e2e(split, data_dir)
    if len(dataset) == 0:
        raise CliError(f"{path} holds no examples; {fix}")
    return dataset


def _run(cfg: E2EConfig, out_dir: Path, t_start: float) -> dict[str, Any]:
    """The run proper, inside the owned run directory."""
    import jax
    import numpy as np

    from jpeft.core import paths as P
    from jpeft.data import e2e as D
    from jpeft.data.batching import num_epoch_batches
    from jpeft.generate import generate
    from jpeft.nlg_metrics import e2e_scores
    from jpeft.train.logging import MetricsLog, plot_curves, read_metrics
    from jpeft.train.trainer import Trainer, causal_lm_loss, trainable_base_paths

    train_ds = load_split("train", cfg.data.data_dir)
    dev_ds = load_split("validation", cfg.data.data_dir)
    decode_ds = load_split(cfg.decode.decode_split, cfg.data.data_dir)
    if cfg.data.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.data.max_train_samples, len(train_ds))))
    if cfg.decode.max_eval_samples:
        dev_ds = dev_ds.select(range(min(cfg.decode.max_eval_samples, len(dev_ds))))
    mrs, references = D.group_references(decode_ds)
    if cfg.decode.max_test_mrs:
        mrs, references = mrs[:cfg.decode.max_test_mrs], references[:cfg.decode.max_test_mrs]

    model, base, tokenizer = load_model(cfg)
    transform = build_method(cfg, tokenizer)
    # a method that cannot adapt this model is refused now, before the data are encoded (shapes only)
    jax.eval_shape(lambda: transform.init(jax.random.key(cfg.seed), base, model.info()))
    train = D.encode(train_ds, tokenizer, cfg.data.max_length)
    dev = D.encode(dev_ds, tokenizer, cfg.data.max_length)
    buckets = tuple(cfg.data.buckets) or e2e_buckets(cfg.data.max_length)
    if cfg.compute.base_dtype != "float32":
        from jpeft.quant import base_compute_dtype

        note = requantization_note(str(cfg.model), cfg.compute.base_dtype)
        if note:
            print(note)

        model = type(model)(dataclasses.replace(model.config, dtype=base_compute_dtype(cfg.compute.base_dtype)))
        base = cast_frozen_base(base, trainable_base_paths(transform, base, model.info()), cfg.compute.base_dtype,
                                transform, model.info())
    model_name = str(cfg.model).rstrip("/").split("/")[-1]
    steps_per_epoch = num_epoch_batches(train, cfg.data.batch_size, buckets=buckets,
                                        group_by_length=cfg.data.group_by_length)
    total_steps = cfg.loop.max_steps or max(1, math.ceil(cfg.loop.epochs * steps_per_epoch))
    mesh = run_mesh(cfg)
    trainer = Trainer(model, transform, base, optim=cfg.optim, total_steps=total_steps, mesh=mesh,
                      loss=causal_lm_loss, model_inputs=("input_ids", "attention_mask"))
    state = trainer.init_state(jax.random.key(cfg.seed))
    counts = trainer.counts(state)
    print(f"e2e | {cfg.method} | {model_name} | {total_steps} steps "
          f"({total_steps / steps_per_epoch:.3f} epochs of {steps_per_epoch}) | "
          f"{len(train)} train pairs, {len(dev)} dev pairs, {len(mrs)} {cfg.decode.decode_split} MRs")
    print(counts)

    def batches(epoch: int, start: int):
        return D.iterate_batches(train, cfg.data.batch_size, buckets=buckets, shuffle=True, seed=cfg.seed,
                                 epoch=epoch, start_batch=start, group_by_length=cfg.data.group_by_length)

    def evaluate(trainer: Trainer, state) -> dict[str, float]:
        """Mean loss per reference token over the dev pairs."""
        total, count = 0.0, 0.0
        for batch in D.iterate_batches(dev, cfg.data.eval_batch_size, buckets=buckets, shuffle=False,
                                       group_by_length=cfg.data.group_by_length):
            tokens = float((batch["loss_mask"][:, 1:] * batch["weights"][:, None]).sum())
            loss = trainer.eval_loss(state, trainer.frozen, trainer.shard_batch(batch))
            total += float(loss) * tokens
            count += tokens
        return {"dev_loss": total / max(count, 1.0)}

    metrics_path = out_dir / "metrics.jsonl"
    state, saver, start_loss = checkpointing(cfg, out_dir, trainer, state, base, total_steps,
                                             steps_per_epoch, metrics_path, {"task": "e2e"})
    first_eval = evaluate(trainer, state) if int(state.step) == 0 else None
    with MetricsLog(metrics_path) as log:
        if first_eval is not None:
            log.write({"split": "dev", "step": 0, **first_eval})
            print(f"step 0: dev_loss={first_eval['dev_loss']:.4f}")
        state, final, _ = train_loop(trainer, state, batches, evaluate, cfg, total_steps,
                                     steps_per_epoch, log, saver, start_loss)
    state, kept, changed = finalize_state(transform, state)
    if changed:
        final = evaluate(trainer, state)
        with MetricsLog(metrics_path) as log:
            log.write({"split": "dev", "step": int(state.step), **final, "finalized": True})
        print(f"after finalize: dev_loss={final['dev_loss']:.4f}")
    train_wall = time.perf_counter() - t_start

    # -- decode and score ----------------------------------------------------------------------
    params = trainer.params(state)
    eos = int(tokenizer.eos_token_id)
    outputs: list[str] = []
    generated_tokens, decode_s = 0, 0.0
    for count, batch in D.prompt_batches(mrs, tokenizer, cfg.decode.decode_batch_size):
        t0 = time.perf_counter()
        tokens = np.asarray(generate(model, transform, params, kept, batch["input_ids"],
                                     batch["attention_mask"], max_new_tokens=cfg.decode.max_new_tokens,
                                     num_beams=cfg.decode.num_beams, length_penalty=cfg.decode.length_penalty,
                                     eos_token_id=eos, pad_token_id=eos))[:count]
        elapsed = time.perf_counter() - t0
        for row in tokens:
            outputs.append(D.decode_text(tokenizer, row))
            ends = np.flatnonzero(row == eos)
            generated_tokens += int(ends[0]) + 1 if ends.size else len(row)
        decode_s += elapsed
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for mr, out, refs in zip(mrs, outputs, references):
            fh.write(json.dumps({"mr": mr, "output": out, "references": refs}, ensure_ascii=False) + "\n")
    scores = e2e_scores(outputs, references)
    print(f"{cfg.decode.decode_split} ({len(mrs)} MRs): " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    with MetricsLog(metrics_path) as log:
        log.write({"split": cfg.decode.decode_split, "step": int(state.step), **scores})
    plot_curves(read_metrics(metrics_path), out_dir / "curves.png", title=f"E2E {cfg.method} ({model_name})")

    wall = time.perf_counter() - t_start
    summary = {
        "task": "e2e",
        "method": cfg.method,
        "model": str(cfg.model),
        "metrics": scores,
        "dev_loss": final["dev_loss"],
        "dev_loss_start": first_eval["dev_loss"] if first_eval is not None else None,
        "decoded_mrs": len(mrs),
        "decode_split": cfg.decode.decode_split,
        "num_beams": cfg.decode.num_beams,
        "decode": {"generated_tokens": generated_tokens, "wall_s": round(decode_s, 2),
                   "tokens_per_s": round(generated_tokens / max(decode_s, 1e-9), 1),
                   "note": "includes the compilation of each new prompt width"},
        "trainable_params": counts.trainable,
        # what adapter/ keeps: the finalized delta (prefix tuning: P without its MLP) and the
        # trained base leaves
        "stored_params": P.count_params(kept) + P.count_params(state.trainable["base"]),
        "total_params": counts.total,
        "trainable_percent": counts.percent,
        "steps": int(state.step),
        "train_pairs": len(train),
        "epochs": int(state.step) / steps_per_epoch,
        "train_wall_s": round(train_wall, 2),
        "wall_s": round(wall, 2),
        "compilations": trainer.compilations(),
        "method_stats": transform.stats(kept),
        "seed": cfg.seed,
        "base_dtype": cfg.compute.base_dtype,
        "matmul_dtype": cfg.compute.matmul_dtype,
        "jax_backend": jax.default_backend(),
    }
    write_adapter(out_dir, cfg, transform, kept, params, model, base)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    print(f"[summary] e2e {cfg.method}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items())
          + f" | dev_loss {final['dev_loss']:.4f} | trainable {counts.trainable:,d} ({counts.percent:.2f}%)"
          f" | {summary['steps']} steps | decode {summary['decode']['tokens_per_s']} tok/s | wall "
          f"{wall:.1f}s | {out_dir}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main("experiments.e2e", parse_args, run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
