"""Run-directory logging: per-step JSON lines and a PNG plot of the curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON object per line to ``<run_dir>/metrics.jsonl``; flushed every write."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_curves(records: list[dict[str, Any]], out_png: str | os.PathLike[str], title: str = "") -> Path:
    """Training loss (raw and smoothed) and dev metrics against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train" and r.get("loss") is not None]
    dev = [r for r in records if r.get("split") == "dev"]
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax_loss.plot(steps, losses, alpha=0.3, label="loss")
        window = max(1, len(losses) // 25)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax_loss.plot(steps, smooth, label=f"loss (mean of {window})")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if dev:
        names = [k for k in dev[-1] if k not in ("step", "split", "wall_s", "epoch", "finalized")]
        for name in names:
            ax_dev.plot([r["step"] for r in dev], [r.get(name) for r in dev], marker="o", label=name)
    ax_dev.set_xlabel("step")
    ax_dev.set_ylabel("dev metric")
    ax_dev.legend()
    ax_dev.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------
# Run-directory ownership

LOCK_NAME = ".jpeft.lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux ``/proc``), else ``None``: with
    the pid it identifies a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    recorded = holder.get("start")
    return recorded is None or _process_start(pid) in (None, recorded)


class RunDirLock:
    """``<directory>/.jpeft.lock`` (pid, host, start time, command) for the lifetime of a run.

    ``acquire`` creates it atomically; a lock held by a live process on this host, or by any
    process on another host (whose liveness cannot be checked here), raises
    :class:`RunDirLocked` naming the holder. A lock whose process is gone (killed, crashed) is
    taken over with a note through ``report``. Use as a context manager.
    """

    def __init__(self, directory: str | os.PathLike[str], report: Any = print) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.report = report
        self.held = False

    def _record(self) -> dict[str, Any]:
        import datetime
        import socket
        import sys

        return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": sys.argv}

    def acquire(self) -> RunDirLock:
        import socket

        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    json.dump(self._record(), fh)
                self.held = True
                return self
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (OSError, ValueError):
                holder = {}
            if not isinstance(holder, dict):
                holder = {}
            who = (f"process {holder.get('pid')} on host {holder.get('host')!r} (since "
                   f"{holder.get('since')}, command: {' '.join(map(str, holder.get('command') or []))[:200]})"
                   if holder else "an unreadable lock file")
            if holder.get("host") not in (None, socket.gethostname()):
                raise RunDirLocked(
                    f"{self.path.parent} is in use by {who}. Two runs in one folder would overwrite "
                    "each other's checkpoints, metrics and adapter: choose another --output-dir, or, "
                    f"if that run is gone, delete {self.path}.")
            if holder and _alive(holder):
                raise RunDirLocked(
                    f"{self.path.parent} is in use by {who}. Two runs in one folder would overwrite "
                    "each other's checkpoints, metrics and adapter: wait for it to finish or choose "
                    "another --output-dir.")
            stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.replace(self.path, stale)  # one process wins the take-over
            except FileNotFoundError:
                continue
            stale.unlink(missing_ok=True)
            self.report(f"note: took over the lock of {self.path.parent} from {who}, which is no "
                        "longer running")
        raise RunDirLocked(f"could not take the lock {self.path}: other processes keep taking it")

    def release(self) -> None:
        if not self.held:
            return
        try:
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
