"""Checkpoints of the trainable state (Orbax), small adapter exports, merged Hugging Face
exports, and the Hugging Face PEFT adapter format both ways."""

from jpeft.checkpoint.export import base_fingerprint, export_merged_hf, load_adapter, save_adapter
from jpeft.checkpoint.hf_peft import load_peft_adapter, save_peft_adapter
from jpeft.checkpoint.orbax_ckpt import CheckpointError, CheckpointManager, checkpoint_bytes, fingerprint

__all__ = ["CheckpointError", "CheckpointManager", "base_fingerprint", "checkpoint_bytes",
           "export_merged_hf", "fingerprint", "load_adapter", "load_peft_adapter", "save_adapter",
           "save_peft_adapter"]
