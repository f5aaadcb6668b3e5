"""Greedy decoding speed of a decoder LM with and without the KV cache.

    python -m benchmarks.decode                                   # SmolLM2-135M, batch 1 and 8
    python -m benchmarks.decode --batches=1,8,32 --new-tokens=64 --method=lora

* **cached**: :func:`jpeft.generate.generate` (one jitted prefill + ``lax.while_loop`` of one-token
  steps that read and extend the cache).
* **uncached**: the same greedy decoding by recomputing the whole sequence at every step: one
  jitted forward pass over a fixed ``prompt + new_tokens`` buffer (so it compiles once) whose
  logits at the last real position give the next token.

Both decode ``new_tokens`` tokens after random prompts (no EOS, so every row runs to the end);
the compile/warm-up call is timed separately and the median of ``--repeats`` timed calls is
reported as tokens/s (rows × new tokens / seconds). The two token sequences are compared (they
agree unless float rounding flips a near-tie). Results: ``benchmarks/results/decode.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import command_line, positive_int, run_meta
from jpeft.core.transform import apply
from jpeft.generate import generate
from jpeft.methods import build
from jpeft.models import auto_from_pretrained
from jpeft.checkpoint.atomic import atomic_write_text

OUT = Path(__file__).resolve().parent / "results"


def uncached_greedy(model, transform, params, delta, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy tokens by a full forward pass per step over a fixed-width, right-grown buffer."""
    b, t = ids.shape
    width = t + new_tokens
    buf = np.zeros((b, width), np.int32)
    buf[:, :t] = ids

    @jax.jit
    def next_token(params, delta, buf, length):
        mask = (jnp.arange(width)[None, :] < length).astype(jnp.int32).repeat(b, 0)
        logits = apply(model, transform, params, delta, buf, mask)
        last = logits.shape[1] - width + length - 1  # prompt methods prepend tokens
        return jnp.argmax(logits[:, last], axis=-1).astype(jnp.int32)

    out = np.zeros((b, new_tokens), np.int32)
    for i in range(new_tokens):
        tok = np.asarray(next_token(params, delta, jnp.asarray(buf), jnp.int32(t + i)))
        buf[:, t + i] = tok
        out[:, i] = tok
    return out


def timed(fn, repeats: int) -> tuple[float, list[float], np.ndarray]:
    t0 = time.perf_counter()
    result = np.asarray(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = np.asarray(fn())
        times.append(time.perf_counter() - t0)
    return first, times, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--method", default="", help="decode through a fresh delta of this method ('' = base)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-length", type=positive_int, default=32)
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--out", default=str(OUT / "decode"))
    args = parser.parse_args(argv)

    model, params = auto_from_pretrained(args.model)
    if args.method:
        from experiments.common import method_layers
        from experiments.e2e import E2E_CONFIG_DIR
        from jpeft.methods import REGISTRY, parse_spec

        configs = {}
        for path, layer in method_layers(args.method, E2E_CONFIG_DIR):
            for name in parse_spec(args.method):
                if name in layer:
                    configs[name] = REGISTRY[name].config_cls(**layer[name])
        transform = build(args.method, configs)
    else:
        transform = build("full")
    delta = transform.init(jax.random.key(0), params, model.info())
    rng = np.random.default_rng(0)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        ids = rng.integers(100, model.config.vocab_size, (b, args.prompt_length)).astype(np.int32)
        mask = np.ones_like(ids)
        cached = functools.partial(generate, model, transform, params, delta, ids, mask,
                                   max_new_tokens=args.new_tokens)
        uncached = functools.partial(uncached_greedy, model, transform, params, delta, ids, args.new_tokens)
        row = {"batch": b, "prompt_length": args.prompt_length, "new_tokens": args.new_tokens}
        results = {}
        for name, fn in (("cached", cached), ("uncached", uncached)):
            first, times, tokens = timed(fn, args.repeats)
            med = statistics.median(times)
            row[name] = {"first_call_s": round(first, 3), "times_s": [round(x, 3) for x in times],
                         "median_s": round(med, 3), "tokens_per_s": round(b * args.new_tokens / med, 1)}
            results[name] = tokens
        row["speedup"] = round(row["cached"]["tokens_per_s"] / row["uncached"]["tokens_per_s"], 2)
        row["token_agreement"] = float((results["cached"] == results["uncached"]).mean())
        print(json.dumps(row), flush=True)
        rows.append(row)

    meta = run_meta(command_line("benchmarks.decode", argv))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(
        {"meta": meta, "model": args.model, "method": args.method or "base", "rows": rows}, indent=2))
    lines = [f"Greedy decoding of {args.new_tokens} tokens after {args.prompt_length}-token prompts, "
             f"{args.model} ({args.method or 'base model'}), float32, on {meta['machine']['cpu']} "
             f"({meta['machine']['cores']} cores); median of {args.repeats} calls after a warm-up call.",
             "", "| batch | cached tokens/s | uncached tokens/s | speed-up | first call cached / uncached (s) "
             "| same tokens |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['cached']['tokens_per_s']} | {r['uncached']['tokens_per_s']} | "
                     f"{r['speedup']}× | {r['cached']['first_call_s']} / {r['uncached']['first_call_s']} | "
                     f"{100 * r['token_agreement']:.0f}% |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
