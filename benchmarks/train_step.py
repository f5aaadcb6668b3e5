"""Train-step speed and memory of jpeft and Hugging Face PEFT, side by side on this machine.

    python -m benchmarks.train_step [--configs=full,lora,...] [--sides=jpeft,peft] [--steps=8]
                                    [--rounds=3] [--batch=32] [--length=128] [--out=benchmarks/results]
                                    [--matmul-dtype=float32|bfloat16]

MiniLM (all-MiniLM-L6-v2) with a 2-class head, batch ``B`` × length ``T`` of fixed random token
ids, AdamW. Every (configuration, side) runs in its own process (so its peak resident memory is
its own) for ``--steps`` timed steps after warm-up; the processes are interleaved round by round
(``--rounds``) so that both sides see the same machine load. Per configuration and side the
script reports: compile/warm-up time, the median step time over all rounds (steps slower than
median + 3·MAD are counted as disturbed by other load and dropped), the spread, tokens/s, peak
RSS, trainable parameters, the step's FLOPs (XLA's cost analysis of the jpeft step; the same
arithmetic for PEFT) and the fraction of the machine's float32 matmul peak, measured with a large
GEMM in the same run. Configurations:

* ``full``, ``lora`` (query, value; r=8, α=16), ``lora_all`` (every linear layer), ``ia3`` (PEFT's
  BERT defaults), ``prefix`` (20 tokens, no projection), ``prompt`` (20 tokens), ``houlsby``
  (m=64; PEFT has no bottleneck adapters, jpeft side only), ``bitfit`` (biases and head; in
  PyTorch by ``requires_grad`` on the biases), ``inference`` (the base model's forward pass).
* ``loha`` (r=8, α=8), ``lokr`` (r=8, α=8), ``vera`` (r=256), ``oft`` (blocks of 32), ``hra``
  (r=8): query and value, each method's defaults on both sides (PEFT's ``LoHaConfig``,
  ``LoKrConfig``, ``VeraConfig``, ``OFTConfig``, ``HRAConfig``). jpeft builds LoHa's and LoKr's
  ``ΔW`` beside the layer as PEFT does, and rewrites the kernel (``W' = R W``, ``Hᵀ W``) for OFT
  and HRA where PEFT rotates the activations.

``--matmul-dtype=bfloat16`` compares mixed precision on both sides: jpeft with the model's
``matmul_dtype="bfloat16"`` (bf16 operands, float32 accumulation, forward and backward; weights,
activations and optimizer state float32), PyTorch under ``torch.autocast("cpu", torch.bfloat16)``
(the same contract: bf16 matmuls, float32 master weights).

Writes ``train_step.json`` and ``train_step.md`` (``train_step_bf16.*`` for bfloat16; ``--name``
chooses another stem).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, positive_int, run_meta, run_worker

CONFIGS = ["full", "lora", "lora_all", "ia3", "prefix", "prompt", "houlsby", "bitfit", "inference",
           "loha", "lokr", "vera", "oft", "hra"]
NO_PEFT = {"houlsby"}  # Hugging Face PEFT has no bottleneck adapters
LR = 1e-4


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _batch_arrays(batch: int, length: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    types = np.zeros((batch, length), np.int32)
    labels = rng.integers(0, 2, batch).astype(np.int32)
    return ids, mask, types, labels


# ----------------------------------------------------------------------------------------------
# workers (one process each)

def _jpeft_method(config: str):
    from jpeft.methods import (
        AdapterConfig,
        HraConfig,
        IA3Config,
        LohaConfig,
        LokrConfig,
        LoraConfig,
        OftConfig,
        PrefixConfig,
        PromptConfig,
        VeraConfig,
        build,
    )

    specs = {
        "full": ("full", {}),
        "lora": ("lora", {"lora": LoraConfig(r=8, alpha=16, targets=r"attention/self/(query|value)$")}),
        "lora_all": ("lora", {"lora": LoraConfig(r=8, alpha=16, targets=r"(query|key|value|dense)$")}),
        "ia3": ("ia3", {"ia3": IA3Config()}),
        "prefix": ("prefix", {"prefix": PrefixConfig(num_virtual_tokens=20, projection=False)}),
        "prompt": ("prompt", {"prompt": PromptConfig(num_virtual_tokens=20)}),
        "houlsby": ("houlsby", {"houlsby": AdapterConfig(size=64)}),
        "bitfit": ("bitfit", {}),
        "inference": ("lora", {}),
        "loha": ("loha", {"loha": LohaConfig(r=8, alpha=8)}),
        "lokr": ("lokr", {"lokr": LokrConfig(r=8, alpha=8)}),
        "vera": ("vera", {"vera": VeraConfig(r=256)}),
        "oft": ("oft", {"oft": OftConfig(block_size=32)}),
        "hra": ("hra", {"hra": HraConfig(r=8)}),
    }
    spec, configs = specs[config]
    return build(spec, configs)


def worker_jpeft(config: str, steps: int, batch: int, length: int, matmul_dtype: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from experiments.common import model_matmul_dtype
    from jpeft.core import paths as P
    from jpeft.core.compile import jit
    from jpeft.models.bert import from_pretrained
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, base = from_pretrained(num_labels=2, matmul_dtype=model_matmul_dtype(matmul_dtype))
    ids, mask, types, labels = (jnp.asarray(x) for x in _batch_arrays(batch, length))
    t0 = time.perf_counter()
    if config == "inference":
        fwd = jit(lambda p, i, m, t: model.apply({"params": p}, i, m, t, deterministic=True),
                  matmul_dtype=model.info().matmul_dtype)
        jax.block_until_ready(fwd(base, ids, mask, types))
        compile_s = time.perf_counter() - t0
        flops = fwd.lower(base, ids, mask, types).compile().cost_analysis().get("flops", 0.0)
        times = []
        for _ in range(steps):
            t1 = time.perf_counter()
            jax.block_until_ready(fwd(base, ids, mask, types))
            times.append(time.perf_counter() - t1)
        return {"compile_s": compile_s, "times": times, "flops": flops, "trainable": 0,
                "peak_rss_mb": _peak_rss_mb()}
    trainer = Trainer(model, _jpeft_method(config), base, optim=OptimConfig(lr=LR, warmup_ratio=0.0, clip_norm=0.0),
                      total_steps=10_000)
    state = trainer.init_state(jax.random.key(0))
    data = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
            "weights": jnp.ones((batch,), jnp.float32)}
    flops = trainer.train_step.lower(state, trainer.frozen, data).compile().cost_analysis().get("flops", 0.0)
    state, metrics = trainer.train_step(state, trainer.frozen, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t1 = time.perf_counter()
        state, metrics = trainer.train_step(state, trainer.frozen, data)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t1)
    return {"compile_s": compile_s, "times": times, "flops": flops,
            "trainable": P.count_params(state.trainable), "peak_rss_mb": _peak_rss_mb()}


def worker_peft(config: str, steps: int, batch: int, length: int, matmul_dtype: str,
                model_dir: str | None = None) -> dict[str, Any]:
    """``model_dir``: MiniLM's folder (``None``: resolved through jpeft, which imports JAX into
    this process and so adds JAX's memory to its peak RSS)."""
    import contextlib

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    if model_dir is None:
        from jpeft.models.hub import resolve_model_dir

        model_dir = str(resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2"))
    path = model_dir
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    ids, mask, types, labels = (torch.as_tensor(x).long() for x in _batch_arrays(batch, length))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if matmul_dtype == "bfloat16"
                else contextlib.nullcontext())
    if config == "inference":
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            model(input_ids=ids, attention_mask=mask, token_type_ids=types)
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(steps):
                t1 = time.perf_counter()
                model(input_ids=ids, attention_mask=mask, token_type_ids=types)
                times.append(time.perf_counter() - t1)
        return {"compile_s": compile_s, "times": times, "trainable": 0, "peak_rss_mb": _peak_rss_mb()}
    import peft

    cfgs = {
        "lora": lambda: peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                        target_modules=["query", "value"]),
        "lora_all": lambda: peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["query", "key", "value", "dense"]),
        "ia3": lambda: peft.IA3Config(task_type="SEQ_CLS"),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20),
        "prompt": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20),
        "loha": lambda: peft.LoHaConfig(task_type="SEQ_CLS", r=8, alpha=8, target_modules=["query", "value"]),
        "lokr": lambda: peft.LoKrConfig(task_type="SEQ_CLS", r=8, alpha=8, target_modules=["query", "value"]),
        "vera": lambda: peft.VeraConfig(task_type="SEQ_CLS", r=256, target_modules=["query", "value"]),
        "oft": lambda: peft.OFTConfig(task_type="SEQ_CLS", oft_block_size=32, r=0,
                                      target_modules=["query", "value"]),
        "hra": lambda: peft.HRAConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"]),
    }
    if config in cfgs:
        model = peft.get_peft_model(model, cfgs[config]())
    elif config == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias") or name.startswith("classifier"))
    elif config != "full":
        raise ValueError(f"no PEFT configuration {config!r}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)

    def step():
        with autocast:
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t1 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t1)
    return {"compile_s": compile_s, "times": times, "trainable": sum(p.numel() for p in params),
            "peak_rss_mb": _peak_rss_mb()}


# ----------------------------------------------------------------------------------------------
# driver

def matmul_peak_gflops(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """GEMM throughput of this machine in ``dtype`` (float32 accumulation; jitted, best of ``reps``)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(dot(a, b))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _run_worker(side: str, config: str, steps: int, batch: int, length: int, matmul_dtype: str
                ) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--worker", side, "--configs", config,
           "--steps", str(steps), "--batch", str(batch), "--length", str(length),
           "--matmul-dtype", matmul_dtype]
    return run_worker(cmd, f"{side}/{config}")


def _robust(times: list[float]) -> tuple[float, list[float], int]:
    """(median, kept times, number dropped as disturbed: > median + 3·MAD)."""
    med = statistics.median(times)
    mad = statistics.median([abs(t - med) for t in times]) or 1e-9
    kept = [t for t in times if t <= med + 3 * mad]
    return statistics.median(kept), kept, len(times) - len(kept)




def summarize(raw: dict[str, dict[str, list[dict]]], peak: float, batch: int, length: int) -> list[dict]:
    rows = []
    for config, sides in raw.items():
        flops = next((r["flops"] for r in sides.get("jpeft", []) if r.get("flops")), None)
        for side, runs in sides.items():
            med, kept, dropped = _robust([t for r in runs for t in r["times"]])
            rows.append({
                "config": config, "side": side, "median_s": med, "min_s": min(kept), "max_s": max(kept),
                "dropped_steps": dropped, "steps": sum(len(r["times"]) for r in runs),
                "compile_s": statistics.median(r["compile_s"] for r in runs),
                "tokens_per_s": batch * length / med,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "trainable": runs[0]["trainable"],
                "gflop": flops / 1e9 if flops else None,
                "peak_fraction": (flops / med / 1e9 / peak) if flops else None})
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["config"], r["side"]): r for r in rows}
    full = by.get(("full", "jpeft"))
    lines = [("| config | jpeft step (s) | PEFT step (s) | jpeft / PEFT | jpeft / jpeft full | jpeft tokens/s | "
              "jpeft % of matmul peak | PEFT % of peak | peak RSS jpeft / PEFT (MB) | trainable |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for config in dict.fromkeys(r["config"] for r in rows):
        j, p = by.get((config, "jpeft")), by.get((config, "peft"))
        if j is None:
            continue
        pj = p["median_s"] if p else None
        lines.append("| " + " | ".join([
            config, f"{j['median_s']:.3f} ({j['min_s']:.3f}–{j['max_s']:.3f})",
            f"{pj:.3f} ({p['min_s']:.3f}–{p['max_s']:.3f})" if p else "–",
            f"{j['median_s'] / pj:.2f}" if p else "–",
            f"{j['median_s'] / full['median_s']:.2f}" if full and config != "inference" else "–",
            f"{j['tokens_per_s']:,.0f}",
            f"{100 * j['peak_fraction']:.0f}%" if j["peak_fraction"] else "–",
            f"{100 * j['gflop'] / pj / PEAK[0]:.0f}%" if p and j["gflop"] else "–",
            f"{j['peak_rss_mb']:,.0f} / {p['peak_rss_mb']:,.0f}" if p else f"{j['peak_rss_mb']:,.0f} / –",
            f"{j['trainable']:,d}"]) + " |")
    return "\n".join(lines)


PEAK = [1.0]


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--sides", default="jpeft,peft")
    parser.add_argument("--steps", type=positive_int, default=8)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--length", type=positive_int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", help="output file stem (default train_step, train_step_bf16 for bfloat16)")
    parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: bf16 matmuls with float32 accumulation on both sides (autocast in PyTorch)")
    parser.add_argument("--worker", choices=["jpeft", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        fn = worker_jpeft if args.worker == "jpeft" else worker_peft
        result = fn(args.configs, args.steps, args.batch, args.length, args.matmul_dtype)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    configs = args.configs.split(",")
    sides = args.sides.split(",")
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        parser.error(f"unknown --configs {bad}; choose from {', '.join(CONFIGS)}")
    bad = [s for s in sides if s not in ("jpeft", "peft")]
    if bad:
        parser.error(f"unknown --sides {bad}; choose from jpeft, peft")
    PEAK[0] = peak = matmul_peak_gflops(dtype=args.matmul_dtype)
    print(f"{args.matmul_dtype} matmul peak (2048² GEMM): {peak:.1f} GFLOP/s", flush=True)
    raw: dict[str, dict[str, list[dict]]] = {c: {} for c in configs}
    for rnd in range(args.rounds):
        for config in configs:
            for side in (sides if rnd % 2 == 0 else sides[::-1]):  # alternate who goes first
                if side == "peft" and config in NO_PEFT:
                    continue
                result = _run_worker(side, config, args.steps, args.batch, args.length, args.matmul_dtype)
                raw[config].setdefault(side, []).append(result)
                print(f"round {rnd} {config:9s} {side:5s} median {statistics.median(result['times']):.3f} s "
                      f"(compile {result['compile_s']:.1f} s, rss {result['peak_rss_mb']:.0f} MB)", flush=True)
    peak_after = matmul_peak_gflops(dtype=args.matmul_dtype)
    rows = summarize(raw, max(peak, peak_after), args.batch, args.length)
    PEAK[0] = max(peak, peak_after)
    md = table(rows)
    print(md)
    import torch
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    meta = {**run_meta(command_line("benchmarks.train_step", argv), torch=torch.__version__,
                       transformers=transformers.__version__, peft=peft_version),
            "matmul_dtype": args.matmul_dtype, "batch": args.batch, "length": args.length,
            "matmul_peak_gflops": [peak, peak_after]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("train_step" if args.matmul_dtype == "float32" else "train_step_bf16")
    atomic_write_text(out / f"{stem}.json", json.dumps({**meta, "rows": rows, "raw": raw}, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
