"""Checkpoints of the trainable state (Orbax) and their metadata."""

from jpeft.checkpoint.orbax_ckpt import CheckpointError, CheckpointManager, checkpoint_bytes, fingerprint

__all__ = ["CheckpointError", "CheckpointManager", "checkpoint_bytes", "fingerprint"]
