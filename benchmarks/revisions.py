"""jpeft's train step at two git revisions, interleaved on this machine: did a change move it?

    python -m benchmarks.revisions --before=4fb35e4 --after=HEAD [--configs=lora,inference]
                                   [--steps=5] [--rounds=3] [--out=benchmarks/results]

Each revision is checked out into a temporary ``git worktree``; every (configuration, revision)
runs ``benchmarks.train_step``'s jpeft worker (MiniLM, batch 32 × 128, AdamW) in its own process
with that revision's code first on ``PYTHONPATH``, and the revisions alternate round by round so
both see the same machine load. Reports the median step per revision (steps slower than median +
3·MAD dropped as disturbed), the after/before ratio and the CPU; writes ``revisions.json`` and
``revisions.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, positive_int, run_meta, run_worker
from benchmarks.train_step import _robust

ROOT = Path(__file__).resolve().parents[1]


def _worker(tree: Path, config: str, steps: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--worker", "jpeft", "--configs", config,
           "--steps", str(steps)]
    return run_worker(cmd, f"{tree.name}/{config}", cwd=tree, env=env)


def _rev(name: str) -> str:
    """``name``'s short commit id; ``ValueError`` naming it when git does not know it."""
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--short", f"{name}^{{commit}}"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ValueError(f"{name!r} is not a commit of {ROOT}; give a commit id, branch or tag "
                         "(git log --oneline lists them), e.g. HEAD~1")
    return proc.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    from jpeft.checkpoint.atomic import atomic_write_text  # here, not at the top: jpeft loads jax
    parser = argparse.ArgumentParser(prog="python -m benchmarks.revisions",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--configs", default="lora")
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    revs = {}
    for side in ("before", "after"):
        try:
            revs[side] = _rev(getattr(args, side))
        except ValueError as err:
            parser.error(f"--{side}: {err}")
    times: dict[str, dict[str, list[float]]] = {c: {"before": [], "after": []} for c in args.configs.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {side: Path(tmp) / side for side in revs}
        for side, rev in revs.items():
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[side]), rev], cwd=ROOT,
                           check=True, capture_output=True)
        try:
            for rnd in range(args.rounds):
                for config in times:
                    for side in (("before", "after") if rnd % 2 == 0 else ("after", "before")):
                        result = _worker(trees[side], config, args.steps)
                        times[config][side].extend(result["times"])
                        print(f"round {rnd} {config} {side} ({revs[side]}): median "
                              f"{statistics.median(result['times']):.3f} s", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                               capture_output=True)
    rows = []
    for config, sides in times.items():
        before, after = _robust(sides["before"])[0], _robust(sides["after"])[0]
        rows.append({"config": config, "before_s": before, "after_s": after, "ratio": after / before,
                     "steps": {k: len(v) for k, v in sides.items()}})
    meta = run_meta(command_line("benchmarks.revisions", argv))
    lines = [f"jpeft train step (MiniLM, batch 32 × 128) at {revs['before']} (before) and "
             f"{revs['after']} (after), interleaved, {args.rounds} rounds × {args.steps} steps; "
             f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
             f"load average at the end {meta['machine']['load_avg'][0]:.1f}.", "",
             "| config | before (s) | after (s) | after / before |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['before_s']:.3f} | {r['after_s']:.3f} | {r['ratio']:.3f} |" for r in rows]
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "revisions.json", json.dumps({**meta, "revisions": revs, "rows": rows,
                                                     "times": times}, indent=2) + "\n")
    atomic_write_text(out / "revisions.md", md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
