"""Per-device memory of the LoRA train step of a BERT-large-sized model on 8 (forced CPU) devices,
by FSDP degree, rematerialisation and base dtype. Nothing is run and no weight is allocated: the
parameters are abstract (``jax.eval_shape``) and the step is only lowered and compiled.

    python benchmarks/memory_scale.py                       # BERT-large, every configuration
    python benchmarks/memory_scale.py --layers=4 --fsdp=1,8 # a quicker look

For every configuration it reports the compiled step's per-device ``argument`` / ``output`` /
``temp`` bytes (``memory_analysis()``) and the bytes of activations JAX saves for the backward
pass (the vjp's residuals with a leading batch dimension, whole batch, before XLA fusion). Writes a markdown table
to stdout and ``benchmarks/results/memory_scale.json``.

Note: XLA:CPU strips the optimization barriers behind ``jax.checkpoint`` and schedules the
recomputation early, so on CPU ``temp`` does not drop with remat; the residual column shows what
remat saves (and what GPU/TPU temp buffers follow).
"""

from __future__ import annotations

import os
import sys

DEVICES = 8
if "jax" not in sys.modules:  # must precede the first import of jax
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.checkpoint.atomic import atomic_write_text
from jpeft.core import paths as P
from jpeft.methods.lora import LoraConfig, lora
from jpeft.models.bert import BertConfig, BertModel
from jpeft.train import sharding as S
from jpeft.train.optim import OptimConfig
from jpeft.train.trainer import (
    Trainer,
    TrainState,
    classification_loss,
    head_paths,
    trainable_base_paths,
)

OUT = Path(__file__).resolve().parent / "results" / "memory_scale.json"


def _float32_loss(logits: jax.Array, batch: Any) -> jax.Array:
    return classification_loss(logits.astype(jnp.float32), batch)


def abstract_trainer(config: BertConfig, base_dtype: str) -> tuple[Trainer, Any, dict[str, Any]]:
    """A :class:`Trainer` over abstract parameters (``ShapeDtypeStruct``), with the same split
    into trainable and frozen leaves and the same optimizer as the real one; returns it, the
    abstract train state and the abstract frozen tree."""
    model = BertModel(dataclasses.replace(config, dtype=base_dtype))
    ids = jnp.ones((1, 4), jnp.int32)
    base = jax.eval_shape(lambda k: model.init(k, ids, ids, ids)["params"], jax.random.key(0))
    transform = lora(LoraConfig(r=8, alpha=16.0, targets=r"(query|value)$"))
    cast = lambda frozen: {k: jax.ShapeDtypeStruct(v.shape, jnp.dtype(base_dtype)) for k, v in frozen.items()}
    return trainer_over(model, transform, base, _float32_loss,
                        ("input_ids", "attention_mask", "token_type_ids"), cast)


def trainer_over(model: Any, transform: Any, base: Any, loss: Any, model_inputs: tuple[str, ...],
                 cast_frozen: Any) -> tuple[Trainer, Any, dict[str, Any]]:
    """:func:`abstract_trainer` for any model: ``base`` abstract (float32), ``cast_frozen`` maps
    the abstract frozen leaves (flat dict) to the frozen tree the step takes."""
    base = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), base)
    trainer = Trainer.__new__(Trainer)  # Trainer.__init__ places real arrays on devices
    trainer.model, trainer.transform, trainer.info = model, transform, model.info()
    trainer.loss, trainer.model_inputs = loss, model_inputs
    trainer.optim_config, trainer.total_steps = OptimConfig(), 1000
    trainer.base_trainable_paths = trainable_base_paths(transform, base, trainer.info)
    trainer.head_paths = frozenset(head_paths(base, trainer.info))
    trainable_flat, frozen = P.partition(base, trainer.base_trainable_paths)
    frozen = cast_frozen(frozen)
    info = trainer.info
    delta = jax.eval_shape(lambda k, b: transform.init(k, b, info), jax.random.key(0),
                           P.combine(trainable_flat, frozen))
    trainable = {"delta": delta, "base": P.unflatten(trainable_flat)}
    trainer._tx = trainer.optimizer(trainable)
    opt_state = jax.eval_shape(trainer._tx.init, trainable)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), trainable, opt_state,
                       jax.eval_shape(lambda: jax.random.key(0)))
    return trainer, state, frozen


def measure(config: BertConfig, fsdp: int, remat: bool, base_dtype: str, batch: int, seq: int
            ) -> dict[str, Any]:
    config = dataclasses.replace(config, remat=remat)
    trainer, state, frozen = abstract_trainer(config, base_dtype)
    abstract_batch = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32)
                      for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    abstract_batch["labels"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    abstract_batch["weights"] = jax.ShapeDtypeStruct((batch,), jnp.float32)
    mem, compile_s = compiled_memory(trainer, state, frozen, abstract_batch, fsdp)

    def residuals(trainable, frozen, batch):
        loss = lambda t: trainer._loss(t, frozen, batch, jax.random.key(0))[0]
        return jax.vjp(loss, trainable)[1]

    saved = jax.eval_shape(residuals, state.trainable, frozen, abstract_batch)
    # Activations are the residuals with a leading batch dimension (the others are weights the
    # backward pass reads, already counted in the arguments). Whole batch, before XLA's fusion
    # and partitioning (how XLA splits them over the devices is in `temp`).
    activations = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(saved)
                      if len(x.shape) >= 2 and x.shape[0] == batch
                      and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
    return {
        "fsdp": fsdp, "data": DEVICES // fsdp, "remat": remat, "base_dtype": base_dtype,
        "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
        "saved_activation_bytes": int(activations), "compile_s": round(compile_s, 1),
    }


def compiled_memory(trainer: Trainer, state: Any, frozen: Any, abstract_batch: dict[str, Any],
                    fsdp: int) -> tuple[Any, float]:
    """The ``memory_analysis()`` of ``trainer``'s train step compiled (not run) on a
    ``data × fsdp`` mesh of the :data:`DEVICES` devices, and the compile time in seconds."""
    mesh = S.make_mesh(f"data={DEVICES // fsdp},fsdp={fsdp}")
    state_sh, frozen_sh = S.tree_shardings(state, mesh), S.tree_shardings(frozen, mesh)
    batch_sh = S.batch_sharding(mesh)
    step = jax.jit(trainer._train_step, donate_argnums=(0,),
                   in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, S.replicated(mesh)))
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, abstract_batch).compile()
    return compiled.memory_analysis(), time.perf_counter() - t0


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    """The rows as a markdown table (MiB; per device except the saved activations)."""
    mib = lambda b: f"{b / 2**20:,.1f}"
    header = ("| base | remat | mesh (data×fsdp) | arguments / device | outputs / device | "
              "temp / device | saved activations (whole batch) | compile s |")
    lines = [title, "", header,
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['base_dtype']} | {'yes' if r['remat'] else 'no'} | {r['data']}×{r['fsdp']} | "
                     f"{mib(r['argument_bytes'])} | {mib(r['output_bytes'])} | {mib(r['temp_bytes'])} | "
                     f"{mib(r['saved_activation_bytes'])} | {r['compile_s']} |")
    return "\n".join(lines) + "\n\nMiB. Saved activations: the vjp residuals with a batch dimension, " \
        "before XLA fusion."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--fsdp", default="1,2,4,8")
    parser.add_argument("--remat", default="false,true")
    parser.add_argument("--base-dtype", default="float32,bfloat16")
    parser.add_argument("--output", default=str(OUT))
    args = parser.parse_args(argv)
    if jax.device_count() != DEVICES:
        raise SystemExit(f"needs {DEVICES} devices, found {jax.device_count()}: run it as a script "
                         "(XLA_FLAGS is set before jax is imported)")
    config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=args.intermediate)
    _, state, frozen = abstract_trainer(config, "float32")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(frozen)) + \
        sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.trainable["base"]))
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.trainable))
    rows = []
    for dtype in args.base_dtype.split(","):
        for remat in [r.strip().lower() == "true" for r in args.remat.split(",")]:
            for fsdp in [int(x) for x in args.fsdp.split(",")]:
                row = measure(config, fsdp, remat, dtype, args.batch, args.seq)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    title = (f"BERT {args.layers}×{args.hidden} ({n_params / 1e6:.0f}M params, LoRA r=8 q/v: "
             f"{n_trainable:,d} trainable), batch {args.batch}×{args.seq}, {DEVICES} CPU devices")
    table = markdown_table(rows, title)
    print(table)
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "backend": jax.default_backend(), "devices": DEVICES},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": __import__("jaxlib").__version__, "flax": __import__("flax").__version__},
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "intermediate": args.intermediate, "vocab": args.vocab, "params": n_params,
                  "trainable": n_trainable},
        "batch": [args.batch, args.seq],
        "rows": rows,
        "table": table,
        "note": "XLA:CPU strips jax.checkpoint's optimization barriers, so temp does not drop "
                "with remat on CPU; saved_activation_bytes (vjp residuals with a leading batch "
                "dimension, whole batch, before XLA fusion) is what remat saves on any backend.",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.output), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
