"""What every benchmark records about where and how it ran."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(module: str, argv: list[str] | None) -> str:
    """``python -m MODULE ARGS`` as the run was invoked (``argv`` None: the process's own arguments)."""
    args = argv if argv is not None else sys.argv[1:]
    return " ".join(["python -m", module, *args])


def run_meta(command: str, **versions: str | None) -> dict[str, Any]:
    """Machine, versions (jax plus ``versions``), command, date, ``XLA_FLAGS`` and the compiler
    options jpeft's jitted steps and predictors compile with (``jpeft.core.compile``)."""
    import jax

    from jpeft.core.compile import default_compiler_options

    return {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg": os.getloadavg()},
            "versions": {"jax": jax.__version__, "python": platform.python_version(), **versions},
            "command": command, "date": time.strftime("%Y-%m-%d"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "train_step_compiler_options": default_compiler_options()}


def run_worker(cmd: list[str], what: str, **kwargs: Any) -> dict[str, Any]:
    """Run a benchmark worker process (``cmd``; ``kwargs`` to :func:`subprocess.run`, e.g. ``env``,
    ``cwd``) and return the JSON of its ``RESULT `` line; ``what`` names it in the error."""
    import json
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False, **kwargs)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def positive_int(text: str) -> int:
    """An ``argparse`` type for counts and sizes (steps, rounds, repeats, batch, length): an
    integer >= 1; anything else is a usage error naming the value."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; give an integer >= 1")
    return value
