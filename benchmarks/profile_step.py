"""Where the time of a jpeft train step goes: a JAX profiler trace, summed by XLA operation.

    python -m benchmarks.profile_step [--config=lora|inference|...] [--matmul-dtype=float32|bfloat16]
                                      [--steps=2] [--batch=32] [--length=128] [--out=benchmarks/results]
    python -m benchmarks.profile_step --model=smollm2 --layers=8 --batch=4 [--vocab=4096]

MiniLM with a 2-class head, the same fixed batch and AdamW step as ``benchmarks.train_step``
(``--config=inference``: the base model's forward pass instead). ``--model=smollm2``: a LoRA (q, v,
r=8) step of a decoder with SmolLM2-135M's shapes and random weights (``--layers`` of its 30,
``--vocab`` to shrink the tied LM head and so measure what the head and its cross-entropy cost)
on a fixed batch of random tokens with the next-token loss.
After compilation, ``--steps`` steps run under ``jax.profiler.trace`` (Perfetto JSON); the
executed XLA thunks are summed per step and grouped by what they compute, read from the compiled
HLO's ``op_name`` metadata: matmul fusions (``ynn_fusion``/``dot``), dropout's random bits and
masks, the GELU, softmax, LayerNorm, dtype conversions, materialised broadcasts, copies and
transposes, and the rest. Writes
``profile_<config>_<dtype>.json`` (the groups, and the 60 slowest operations with their time and
HLO op name) and prints the
grouped table. The operations of one step run on the machine's cores in parallel, so their sum
can exceed the step's wall time; an asynchronous operation (XLA:CPU's large dots) counts from its
start to its ``end:`` event.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, positive_int, run_meta
from benchmarks.train_step import _batch_arrays, _jpeft_method

TOP_OPS = 60  # the slowest operations kept in the JSON

# (group, regex searched in "<thunk name> <op_name>"), first match wins.
GROUPS = [
    ("LM head (tied embeddings)", r"\.attend/"),
    ("dropout (random bits, masks)", r"Dropout|threefry|random_bits|shift_right_logical"),
    ("matmuls (dot / ynn fusions)", r"^(ynn_fusion|dot)"),
    ("GELU", r"erf|gelu|intermediate/(mul|add|integer_pow)"),
    ("softmax and attention mask", r"softmax|reduce_max|exp|/where|select_n"),
    ("LayerNorm", r"LayerNorm"),
    ("dtype conversions", r"convert"),
    ("optimizer (AdamW)", r"adam|optax|sqrt|clip"),
    ("materialised broadcasts", r"^wrapped_broadcast"),
    ("copies and transposes", r"^(copy|transpose|bitcast)"),
]


def _hlo_op_names(hlo_text: str) -> dict[str, str]:
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]+)\"", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _op_spans(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(operation, ms) for every executed XLA thunk of a trace. An asynchronous thunk (XLA:CPU
    runs its large dots that way) records a short event when it starts and an ``end: <name>``
    event when it completes; its time is the span from one to the other (so it includes any
    wait for a free core while other thunks run)."""
    pending: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    spans: list[tuple[str, float]] = []
    for e in sorted((e for e in events if e.get("ph") == "X" and "dur" in e), key=lambda e: e["ts"]):
        name = e.get("name", "")
        if name.startswith("end: "):
            if pending[name[5:]]:
                start = pending[name[5:]].pop(0)
                spans[start["_index"]] = (name[5:], (e["ts"] + e["dur"] - start["ts"]) / 1e3)
        elif not name.startswith(("ThunkExecutor", "$", "Slinky")):
            pending[name].append({**e, "_index": len(spans)})
            spans.append((name, e["dur"] / 1e3))
    return spans


def _train_step(trainer: Any, data: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    """``(step, HLO op names)``: ``step()`` runs one train step of ``trainer`` on ``data`` from a
    state it keeps, and waits for it."""
    import jax

    box = [trainer.init_state(jax.random.key(0))]
    names = _hlo_op_names(trainer.train_step.lower(box[0], trainer.frozen, data).compile().as_text())

    def step() -> None:
        box[0], metrics = trainer.train_step(box[0], trainer.frozen, data)
        jax.block_until_ready(metrics["loss"])
    return step, names


QV = r"self_attn/(q_proj|v_proj)$"


def decoder_trainer(layers: int | None, vocab: int | None, batch: int, length: int, targets: str = QV,
                    dropout: float = 0.0) -> tuple[Any, dict[str, Any]]:
    """``(trainer, batch)`` of a LoRA (r=8 on ``targets``, q and v by default, LoRA dropout
    ``dropout``) step of a decoder with SmolLM2-135M's shapes (random weights, float32), ``layers``
    of its 30 and a tied LM head of ``vocab`` rows (its own 49,152 when ``None``), on a fixed
    ``(batch, length)`` batch of random tokens."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.quant_memory import MODELS
    from jpeft.methods.lora import LoraConfig, lora
    from jpeft.models import llama
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer, causal_lm_loss

    config = MODELS["smollm2"]
    config = dataclasses.replace(config, num_hidden_layers=layers or config.num_hidden_layers,
                                 vocab_size=vocab or config.vocab_size)
    model = llama.LlamaForCausalLM(config)
    base = llama.init_params(model, jax.random.key(0))
    trainer = Trainer(model, lora(LoraConfig(r=8, alpha=16.0, dropout=dropout, targets=targets)), base,
                      optim=OptimConfig(lr=1e-4, warmup_ratio=0.0, clip_norm=0.0), total_steps=10_000,
                      loss=causal_lm_loss, model_inputs=("input_ids", "attention_mask"))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, length))
    data = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.ones((batch, length), jnp.int32),
            "loss_mask": jnp.ones((batch, length), jnp.int32), "weights": jnp.ones((batch,), jnp.float32)}
    return trainer, data


def minilm_trainer(config: str, matmul_dtype: str, batch: int, length: int) -> tuple[Any, dict[str, Any]]:
    """``(trainer, batch)`` of MiniLM's train step of the ``benchmarks.train_step`` configuration
    ``config`` (2-class head, AdamW) on that benchmark's fixed ``(batch, length)`` batch."""
    import jax.numpy as jnp

    from experiments.common import model_matmul_dtype
    from jpeft.models.bert import from_pretrained
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, base = from_pretrained(num_labels=2, matmul_dtype=model_matmul_dtype(matmul_dtype))
    ids, mask, types, labels = (jnp.asarray(x) for x in _batch_arrays(batch, length))
    data = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
            "weights": jnp.ones((batch,), jnp.float32)}
    trainer = Trainer(model, _jpeft_method(config), base,
                      optim=OptimConfig(lr=1e-4, warmup_ratio=0.0, clip_norm=0.0), total_steps=10_000)
    return trainer, data


def _minilm_step(config: str, matmul_dtype: str, batch: int, length: int) -> tuple[Any, dict[str, str]]:
    """MiniLM's train step of ``config`` (``"inference"``: its forward pass) on the fixed batch of
    ``benchmarks.train_step``: ``(step, HLO op names)``."""
    if config != "inference":
        return _train_step(*minilm_trainer(config, matmul_dtype, batch, length))
    import jax
    import jax.numpy as jnp

    from experiments.common import model_matmul_dtype
    from jpeft.core.compile import jit
    from jpeft.models.bert import from_pretrained

    model, base = from_pretrained(num_labels=2, matmul_dtype=model_matmul_dtype(matmul_dtype))
    ids, mask, types, _ = (jnp.asarray(x) for x in _batch_arrays(batch, length))
    # the base model's forward pass, as in benchmarks.train_step
    fwd = jit(lambda p, i, m, t: model.apply({"params": p}, i, m, t, deterministic=True),
              matmul_dtype=model.info().matmul_dtype)
    names = _hlo_op_names(fwd.lower(base, ids, mask, types).compile().as_text())

    def forward() -> None:
        jax.block_until_ready(fwd(base, ids, mask, types))
    return forward, names


def profile(config: str, matmul_dtype: str, steps: int, batch: int, length: int, model_name: str = "minilm",
            layers: int | None = None, vocab: int | None = None) -> dict[str, Any]:
    """Trace ``steps`` steps and sum the executed XLA operations per step and per group (see the
    module docstring); ``model_name="smollm2"`` profiles the decoder's LoRA step instead of
    MiniLM's ``config`` (then ``config`` and ``matmul_dtype`` stay ``"lora"`` and ``"float32"``)."""
    import jax

    if model_name == "smollm2":
        if (config, matmul_dtype) != ("lora", "float32"):
            raise ValueError("the smollm2 profile is a float32 LoRA step: leave --config and --matmul-dtype "
                             f"at their defaults (got {config!r}, {matmul_dtype!r})")
        step, names = _train_step(*decoder_trainer(layers, vocab, batch, length))
    elif model_name == "minilm":
        if layers is not None or vocab is not None:
            raise ValueError("--layers and --vocab apply to --model=smollm2 only")
        step, names = _minilm_step(config, matmul_dtype, batch, length)
    else:
        raise ValueError(f"model must be 'minilm' or 'smollm2', got {model_name!r}")
    step()
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                step()
        wall = (time.perf_counter() - t0) / steps
        trace = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
        with gzip.open(trace) as fh:
            events = json.load(fh)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: collections.Counter[str] = collections.Counter()
    for name, ms in _op_spans(events):
        if name in names or re.match(r"^[a-z_]+(\.\d+)?$", name):
            per_op[name] += ms / steps  # ms per step
    groups: collections.Counter[str] = collections.Counter()
    for name, ms in per_op.items():
        key = f"{name} {names.get(name, '')}"
        group = next((g for g, pattern in GROUPS if re.search(pattern, key)), "other")
        groups[group] += ms
    return {"model": model_name, "layers": layers, "vocab": vocab, "batch": batch, "length": length,
            "config": config, "matmul_dtype": matmul_dtype, "wall_ms_per_step": wall * 1e3,
            "groups_ms": dict(groups.most_common()),
            "top_ops": [{"op": n, "ms": round(ms, 3), "hlo": names.get(n, "")}
                        for n, ms in per_op.most_common(TOP_OPS)]}


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="lora",
                        help="a benchmarks.train_step configuration; 'inference': the base model's forward pass")
    parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=positive_int, default=2)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--length", type=positive_int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm",
                        help="smollm2: a LoRA step of a decoder with SmolLM2-135M's shapes, random weights")
    parser.add_argument("--layers", type=int, default=None, help="smollm2: decoder layers (default 30)")
    parser.add_argument("--vocab", type=int, default=None, help="smollm2: rows of the tied LM head (default 49152)")
    args = parser.parse_args(argv)
    try:
        result = profile(args.config, args.matmul_dtype, args.steps, args.batch, args.length,
                         args.model, args.layers, args.vocab)
    except ValueError as err:
        parser.error(str(err))
    total = sum(result["groups_ms"].values())
    print(f"{args.config}, {args.matmul_dtype} matmuls: {result['wall_ms_per_step']:.0f} ms per step (wall), "
          f"{total:.0f} ms of operations")
    print("| group | ms per step | share |\n|---|---|---|")
    for group, ms in result["groups_ms"].items():
        print(f"| {group} | {ms:.0f} | {100 * ms / total:.0f}% |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(command_line("benchmarks.profile_step", argv))
    name = (f"profile_{args.config}_{args.matmul_dtype}" if args.model == "minilm" else
            f"profile_smollm2_l{args.layers or 30}_v{args.vocab or 49152}_b{args.batch}x{args.length}")
    atomic_write_text(out / f"{name}.json", 
        json.dumps({**meta, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
