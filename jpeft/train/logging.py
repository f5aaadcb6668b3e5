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
