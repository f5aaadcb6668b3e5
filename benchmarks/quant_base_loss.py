"""What a quantized base costs before any training: SmolLM2's E2E dev loss with a fresh LoRA
(an identity delta) over each base format, and each format's relative kernel error next to that
of Gaussian weights of the same spread.

    python -m benchmarks.quant_base_loss --pairs=96

Rows: float32 and bf16 bases; int8 / nf4 / q4_1 with every matmul kernel quantized (the LM head
stays float), with only the attention kernels quantized and with only the MLP kernels quantized. The
error table takes the first ``--kernels`` 2-D kernels: ``‖dequant(quant(W)) − W‖ / ‖W‖``, and the
same for ``N(0, std(W)²)`` weights of W's shape — equal values say the quantizer does what the
format specifies and any extra loss comes from the weights themselves. Writes
``benchmarks/results/quant_base_loss.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, positive_int, run_meta

RESULTS = Path(__file__).resolve().parent / "results"
ATTENTION_ONLY = r"(^|/)lm_head/|mlp|ffn"  # skip the LM head and the MLP: attention kernels quantized
MLP_ONLY = r"(^|/)lm_head/|attn|attention"  # skip the LM head and attention: MLP kernels quantized
FORMATS = ("int8", "nf4", "q4_1")


def dev_loss(model: Any, transform: Any, base: Any, delta: Any, batches: list[dict[str, Any]]) -> float:
    """Token-weighted next-token NLL (nats) over the targets of ``batches`` (E2E's loss mask)."""
    import jax
    import jax.numpy as jnp

    import jpeft
    from jpeft.train.trainer import causal_lm_loss

    @jax.jit
    def summed(base_: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        logits = jpeft.apply(model, transform, base_, delta, batch["input_ids"], batch["attention_mask"])
        tokens = (batch["loss_mask"][:, 1:] * batch["weights"][:, None]).sum()
        return causal_lm_loss(logits, batch) * tokens, tokens

    total = count = 0.0
    for batch in batches:
        s, n = summed(base, {k: jnp.asarray(v) for k, v in batch.items()})
        total, count = total + float(s), count + float(n)
    return total / count


def kernel_errors(base: Any, fmt: str, limit: int) -> list[dict[str, Any]]:
    """Relative reconstruction error of the first ``limit`` quantizable 2-D kernels and of
    Gaussian weights of the same shape and standard deviation."""
    import jax
    import jax.numpy as jnp

    from jpeft import quant
    from jpeft.core import paths as P

    rows = []
    for path, w in P.flatten(base).items():
        if len(rows) >= limit:
            break
        if not (path.endswith("kernel") and w.ndim == 2 and w.shape[0] % 64 == 0):
            continue
        gauss = jax.random.normal(jax.random.key(len(rows)), w.shape) * jnp.std(w)

        def rel(x: jax.Array) -> float:
            return float(jnp.linalg.norm(quant.dequantize(quant.quantize(x, fmt)) - x) / jnp.linalg.norm(x))

        rows.append({"path": path, "shape": list(w.shape), "relative_error": rel(w), "gaussian": rel(gauss)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=positive_int, default=96, help="E2E dev pairs the loss is taken over")
    parser.add_argument("--kernels", type=positive_int, default=8, help="kernels in the error table")
    parser.add_argument("--model", default=None, help="as experiments.e2e --model (default: its own)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from experiments import e2e
    from experiments.common import cast_frozen_base
    from jpeft import quant
    from jpeft.data import e2e as e2e_data

    cfg = e2e.parse_args(["--method=lora"] + ([f"--model={args.model}"] if args.model else []))
    model, base, tokenizer = e2e.load_model(cfg)
    transform = e2e.build_method(cfg, tokenizer)
    dev = e2e_data.encode(e2e.load_split("validation", cfg.data.data_dir).select(range(args.pairs)),
                          tokenizer, cfg.data.max_length)
    batches = list(e2e_data.iterate_batches(dev, 32, buckets=e2e.e2e_buckets(cfg.data.max_length),
                                            shuffle=False))
    delta = transform.init(jax.random.key(0), base, model.info())
    bf16_model = type(model)(dataclasses.replace(model.config, dtype=jnp.bfloat16))

    rows = [{"base": "float32", "quantized": "–", "kernels": 0, "dev_loss": dev_loss(model, transform, base, delta, batches)},
            {"base": "bfloat16", "quantized": "–", "kernels": 0,
             "dev_loss": dev_loss(bf16_model, transform, cast_frozen_base(base, [], "bfloat16"), delta, batches)}]
    for fmt in FORMATS:
        for where, skip in (("all matmul kernels", quant.SKIP_DEFAULT), ("attention only", ATTENTION_ONLY),
                            ("MLP only", MLP_ONLY)):
            qbase = quant.quantize_base(base, fmt, transform=transform, info=model.info(), skip=skip)
            rows.append({"base": fmt, "quantized": where, "kernels": len(quant.quantized_paths(qbase)),
                         "dev_loss": dev_loss(model, transform, qbase, delta, batches)})
            print(rows[-1], flush=True)
    errors = {fmt: kernel_errors(base, fmt, args.kernels) for fmt in FORMATS}

    ref = rows[0]["dev_loss"]
    lines = [f"SmolLM2 E2E dev loss (nats, {args.pairs} dev pairs) with a fresh LoRA, before training; "
             f"{run_meta('')['machine']['cpu']}.", "",
             "| base | quantized | kernels | dev loss | Δ vs float32 |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['base']} | {r['quantized']} | {r['kernels']} | {r['dev_loss']:.4f} | "
              f"{r['dev_loss'] - ref:+.4f} |" for r in rows]
    lines += ["", "| format | kernel | shape | relative error | Gaussian, same std |", "|---|---|---|---:|---:|"]
    lines += [f"| {fmt} | `{e['path']}` | {tuple(e['shape'])} | {e['relative_error']:.4f} | {e['gaussian']:.4f} |"
              for fmt, errs in errors.items() for e in errs]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = run_meta(command_line("benchmarks.quant_base_loss", argv))
    atomic_write_text(RESULTS / "quant_base_loss.json", json.dumps({**meta, "rows": rows, "kernel_errors": errors},
                                                             indent=2) + "\n")
    atomic_write_text(RESULTS / "quant_base_loss.md", "# Quantized base: loss before training\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
