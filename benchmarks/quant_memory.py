"""Argument bytes per device of the LoRA train step over a float32, bfloat16, int8, nf4, nf4-dq
(nf4 with double-quantized scales) or q4_1 (GGUF's Q4_1) frozen base (``--base-dtype``), for SmolLM2-135M and a
~1B-parameter Llama (Llama-3.2-1B's shapes), random weights, FSDP 1, 2, 4, 8 on 8 forced CPU
devices. Nothing is run and no weight is allocated: the parameters are abstract
(``jax.eval_shape``, the quantized base too). The argument bytes are the shard sizes of every
argument under the step's input shardings, which is what XLA reports as
``argument_size_in_bytes``; ``--compile`` names configurations whose step is also lowered and
compiled (compile-only ``memory_analysis()``: argument and temp bytes) to check it (several
minutes each on a 2-core machine, hence not all 40).

    python -m benchmarks.quant_memory                          # both models, every configuration
    python -m benchmarks.quant_memory --models=smollm2 --fsdp=1,8
    python -m benchmarks.quant_memory --base-dtype=nf4-dq --compile=smollm2:nf4-dq:8 --update

Arguments are the train state (LoRA delta, AdamW moments: float32), the frozen base and the
batch; the frozen base's share is reported too. Writes ``benchmarks/results/quant_memory.{json,md}``;
``--update`` keeps the rows of the existing JSON that this run does not measure again.
"""

from __future__ import annotations

import benchmarks.memory_scale as MS  # noqa: I001  (sets XLA_FLAGS before jax is imported)

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import quant as Q
from jpeft.core import paths as P
from jpeft.methods.lora import LoraConfig, lora
from jpeft.models import llama
from jpeft.train import sharding as S
from jpeft.train.trainer import causal_lm_loss
from jpeft.checkpoint.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    # SmolLM2-135M's config.json
    "smollm2": llama.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                 num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                 tie_word_embeddings=True, rope_theta=100000.0),
    # Llama-3.2-1B's shapes (1.24B parameters, tied embeddings)
    "llama1b": llama.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                 num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                 tie_word_embeddings=True, rope_theta=500000.0),
}
DTYPES = ("float32", "bfloat16", "int8", "nf4", "nf4-dq", "q4_1")


def abstract_llama_trainer(config: llama.LlamaConfig, base_dtype: str) -> tuple[Any, Any, Any]:
    """:func:`benchmarks.memory_scale.trainer_over` for a Llama with LoRA r=8 on q/v (the E2E
    recipe), the frozen base cast or quantized as ``--base-dtype`` does."""
    model = llama.LlamaForCausalLM(config.__class__(**{**config.__dict__,
                                                       "dtype": Q.base_compute_dtype(base_dtype)}))
    base = jax.eval_shape(lambda k: llama.init_params(model, k), jax.random.key(0))
    transform = lora(LoraConfig(r=8, alpha=16.0, targets=r"self_attn/(q_proj|v_proj)$"))

    def cast(frozen: dict[str, Any]) -> dict[str, Any]:
        if base_dtype in Q.FORMATS:
            quantized = jax.eval_shape(lambda f: P.flatten(Q.quantize_base(
                P.unflatten(f), base_dtype, transform=transform, info=model.info())), frozen)
            return dict(quantized)
        return {k: jax.ShapeDtypeStruct(v.shape, jnp.dtype(base_dtype)) for k, v in frozen.items()}

    return MS.trainer_over(model, transform, base, causal_lm_loss, ("input_ids", "attention_mask"), cast)


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes of ``tree``'s (abstract) leaves on one device under ``shardings``."""
    def itemsize(dtype: Any) -> int:  # a threefry key is two uint32
        return 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else jnp.dtype(dtype).itemsize

    return int(sum(int(np.prod(s.shard_shape(x.shape))) * itemsize(x.dtype)
                   for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings))))


def measure(name: str, base_dtype: str, fsdp: int, batch: int, seq: int, compile: bool) -> dict[str, Any]:
    """Argument bytes per device from the step's input shardings (every argument leaf's shard
    size: what XLA reports as ``argument_size_in_bytes``), and, with ``compile``, the compiled
    step's ``memory_analysis()`` to check it."""
    trainer, state, frozen = abstract_llama_trainer(MODELS[name], base_dtype)
    abstract_batch = {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
                      "attention_mask": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
                      "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
                      "weights": jax.ShapeDtypeStruct((batch,), jnp.float32)}
    mesh = S.make_mesh(f"data={MS.DEVICES // fsdp},fsdp={fsdp}")
    state_b = bytes_per_device(state, S.tree_shardings(state, mesh))
    frozen_b = bytes_per_device(frozen, S.tree_shardings(frozen, mesh))
    batch_b = bytes_per_device(abstract_batch, jax.tree_util.tree_map(lambda _: S.batch_sharding(mesh),
                                                                       abstract_batch))
    row = {"model": name, "base_dtype": base_dtype, "fsdp": fsdp, "data": MS.DEVICES // fsdp,
           "argument_bytes": state_b + frozen_b + batch_b, "frozen_bytes": frozen_b,
           "state_bytes": state_b, "quantized_kernels": sum(Q.is_quantized(v) for v in frozen.values())}
    if compile:
        mem, compile_s = MS.compiled_memory(trainer, state, frozen, abstract_batch, fsdp)
        row.update(compiled_argument_bytes=int(mem.argument_size_in_bytes),
                   temp_bytes=int(mem.temp_size_in_bytes), compile_s=round(compile_s, 1))
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    gib = lambda b: f"{b / 2**30:.3f}" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
    out = [f"LoRA r=8 on q/v, AdamW, batch {meta['batch'][0]}×{meta['batch'][1]}, {MS.DEVICES} CPU "
           f"devices (mesh data × fsdp); {meta['cpu']}. Argument bytes per device: the shard sizes of "
           "every argument of the train step under its input shardings (nothing allocated).", ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        fsdps = sorted({r["fsdp"] for r in mine})
        out += [f"**{name}** ({meta['params'][name] / 1e6:,.0f}M parameters): argument bytes per device "
                "(GiB unless marked), in parentheses the frozen base's share", "",
                "| base | " + " | ".join(f"fsdp {f}" for f in fsdps) + " |",
                "|---|" + "---:|" * len(fsdps)]
        for dtype in dict.fromkeys(r["base_dtype"] for r in mine):
            cells = []
            for f in fsdps:
                r = next((r for r in mine if r["base_dtype"] == dtype and r["fsdp"] == f), None)
                cells.append("–" if r is None else f"{gib(r['argument_bytes'])} ({gib(r['frozen_bytes'])})")
            out.append(f"| {dtype} | " + " | ".join(cells) + " |")
        out.append("")
    checked = [r for r in rows if "compiled_argument_bytes" in r]
    if checked:
        out += ["Checked against the compiled step (`jax.jit(...).lower(...).compile().memory_analysis()`):", "",
                "| model | base | fsdp | arguments (shardings) | arguments (compiled) | temp (compiled) | compile s |",
                "|---|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['model']} | {r['base_dtype']} | {r['fsdp']} | {r['argument_bytes']:,d} | "
                f"{r['compiled_argument_bytes']:,d} | {gib(r['temp_bytes'])} | {r['compile_s']} |" for r in checked]
        out.append("")
    return "\n".join(out)


def cpu_model() -> str:
    try:
        line = next(l for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                    if l.startswith("Model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,llama1b")
    parser.add_argument("--base-dtype", default=",".join(DTYPES))
    parser.add_argument("--fsdp", default="1,2,4,8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--compile", default="smollm2:float32:8,smollm2:nf4:8,smollm2:int8:2",
                        help="model:dtype:fsdp configurations also compiled (minutes each on 2 cores)")
    parser.add_argument("--output", default=str(RESULTS / "quant_memory.json"))
    parser.add_argument("--update", action="store_true",
                        help="merge into --output: keep its rows for the configurations not measured now")
    args = parser.parse_args(argv)
    if jax.device_count() != MS.DEVICES:
        raise SystemExit(f"needs {MS.DEVICES} devices, found {jax.device_count()}: run it as "
                         "`python -m benchmarks.quant_memory` (XLA_FLAGS is set before jax is imported)")
    rows = []
    params = {}
    for name in args.models.split(","):
        _, state, frozen = abstract_llama_trainer(MODELS[name], "float32")
        params[name] = P.count_params(frozen) + P.count_params(state.trainable["base"])
        for dtype in args.base_dtype.split(","):
            for fsdp in [int(x) for x in args.fsdp.split(",")]:
                row = measure(name, dtype, fsdp, args.batch, args.seq,
                              f"{name}:{dtype}:{fsdp}" in args.compile.split(","))
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    out = Path(args.output)
    command = "python -m benchmarks.quant_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    earlier = []
    if args.update and out.is_file():
        old = json.loads(out.read_text())
        if old["batch"] != [args.batch, args.seq]:
            raise SystemExit(f"--update: {out} was measured at batch {old['batch']}, this run at "
                             f"{[args.batch, args.seq]}; rerun every configuration without --update")
        params = {**old["params"], **params}
        earlier = [*old.get("earlier_commands", []), old["command"]]
        now = {(r["model"], r["base_dtype"], r["fsdp"]) for r in rows}
        rows = [r for r in old["rows"] if (r["model"], r["base_dtype"], r["fsdp"]) not in now] + rows
        order = {k: i for i, k in enumerate([*MODELS, *DTYPES])}
        rows.sort(key=lambda r: (order.get(r["model"], 99), order.get(r["base_dtype"], 99), r["fsdp"]))
    meta = {"batch": [args.batch, args.seq], "cpu": cpu_model(), "params": params}
    table = markdown(rows, meta)
    print(table)
    result = {
        "command": command,
        "machine": {"cpu": meta["cpu"], "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
                    "devices": MS.DEVICES},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": __import__("flax").__version__},
        "params": params, "batch": meta["batch"], "rows": rows, "table": table,
    }
    if earlier:  # the kept rows come from these runs
        result["earlier_commands"] = earlier
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), "# Quantized base: argument bytes per device\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
