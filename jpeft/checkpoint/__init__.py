"""Checkpoints of the trainable state (Orbax), small adapter exports, merged Hugging Face
exports, and the Hugging Face PEFT adapter format both ways.

The names below are imported on first use, so that a method's file can import the PEFT helpers
(:mod:`jpeft.checkpoint.peft_convert`) without loading Orbax.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "base_fingerprint": "export", "export_merged_hf": "export", "load_adapter": "export",
    "save_adapter": "export", "load_peft_adapter": "hf_peft", "save_peft_adapter": "hf_peft",
    "CheckpointError": "orbax_ckpt", "CheckpointManager": "orbax_ckpt",
    "checkpoint_bytes": "orbax_ckpt", "fingerprint": "orbax_ckpt",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'jpeft.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(f"jpeft.checkpoint.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(_HOMES)


__all__ = sorted(_HOMES)
