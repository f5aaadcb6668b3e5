"""Orbax checkpoints of the trainable state only, with metadata that ties them to their base.

A checkpoint step holds two items, written atomically by ``orbax.checkpoint.CheckpointManager``
(into a temporary directory renamed on completion, so a kill during a save leaves the previous
step intact; a step beyond ``max_to_keep`` is renamed into ``_deleted/`` before it is deleted, so a
kill during that deletion leaves no half-deleted step either):

* ``state``: the :class:`~jpeft.train.trainer.TrainState` — the delta, the trained base leaves
  (the task head ...), their optimizer state, the step and the PRNG key. Never a frozen weight.
* ``meta``: JSON — jpeft version, method spec and configs, base model name, a fingerprint of the
  pretrained weights, the data position (epoch, batch) and anything the caller adds.

Restoring checks the fingerprint: a checkpoint made on another base is refused unless
``allow_base_mismatch=True``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import paths as P


TRASH = "_deleted"  # subdirectory that old steps are renamed into before they are deleted


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or made for another base model."""


def fingerprint(params: P.Params, exclude: Iterable[str] = ()) -> str:
    """A short SHA-256 of the leaves' paths, shapes, dtypes and bytes (``exclude``d paths aside)."""
    skip = set(exclude)
    digest = hashlib.sha256()
    for path, leaf in sorted(P.flatten(params).items()):
        if path in skip:
            continue
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{path}|{array.shape}|{array.dtype}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:20]


def _to_saveable(state: Any) -> dict[str, Any]:
    step, trainable, opt_state, rng = state
    return {"step": step, "trainable": trainable, "opt_state": opt_state,
            "rng": jax.random.key_data(rng)}


def _from_saveable(tree: dict[str, Any], like: Any) -> Any:
    rng = jax.random.wrap_key_data(jnp.asarray(tree["rng"]), impl=jax.random.key_impl(like.rng))
    return type(like)(jnp.asarray(tree["step"]), tree["trainable"], tree["opt_state"], rng)


class CheckpointManager:
    """Save and restore training states under ``directory/<step>/``.

    Args:
      directory: the checkpoint root (created if needed).
      max_to_keep: how many recent steps to keep.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int = 2) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).resolve()
        # A step beyond max_to_keep is first renamed into TRASH (one atomic rename), then the
        # trash is emptied: a kill while deleting cannot leave a half-deleted step in place.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 todelete_subdir=TRASH),
            item_names=("state", "meta"),
        )
        self._empty_trash()

    def _empty_trash(self) -> None:
        shutil.rmtree(self.directory / TRASH, ignore_errors=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write ``state`` and ``meta`` as step ``step`` and wait until it is complete on disk.

        A step that is already saved is left as it is (a resumed run reaching it again).
        """
        ocp = self._ocp
        if int(step) in self.all_steps():
            return
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(state)),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()
        self._empty_trash()

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        try:
            restored = self._manager.restore(step, args=self._ocp.args.Composite(
                meta=self._ocp.args.JsonRestore()))
        except Exception as err:
            raise CheckpointError(f"cannot read the metadata of {self.directory}/{step}: {err}") from err
        return dict(restored["meta"])

    def restore(self, like: Any, *, fingerprint: str | None = None, step: int | None = None,
                allow_base_mismatch: bool = False) -> tuple[Any, dict[str, Any]]:
        """Restore the state saved at ``step`` (default: latest) into the structure of ``like``.

        ``fingerprint`` is the current base's :func:`fingerprint`; a different one in the
        checkpoint raises :class:`CheckpointError` unless ``allow_base_mismatch``.
        """
        step = self._step(step)
        meta = self.read_meta(step)
        saved = meta.get("base_fingerprint")
        if fingerprint is not None and saved != fingerprint and not allow_base_mismatch:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} was made on another base model "
                f"({meta.get('base_model')!r}): expected base fingerprint {saved}, found {fingerprint}. "
                "Load the base it was trained on, or pass allow_base_mismatch=True "
                "(--allow-base-mismatch) to restore anyway."
            )
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _to_saveable(like))
        try:
            restored = self._manager.restore(step, args=self._ocp.args.Composite(
                state=self._ocp.args.StandardRestore(abstract)))
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} is incomplete or corrupted and was not "
                f"loaded ({type(err).__name__}: {err}). Delete that step directory to fall back "
                "to an earlier one."
            ) from err
        tree = restored["state"]
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(tree),
                                     jax.tree_util.tree_leaves(abstract)):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CheckpointError(f"checkpoint leaf {jax.tree_util.keystr(path)} has "
                                      f"{got.shape}/{got.dtype}, expected {want.shape}/{want.dtype}")
        return _from_saveable(tree, like), meta

    def read_state(self, step: int | None = None) -> dict[str, Any]:
        """The saved state tree as it is on disk (numpy leaves), without a template."""
        step = self._step(step)
        try:
            restored = self._manager.restore(step, args=self._ocp.args.Composite(
                state=self._ocp.args.StandardRestore()))
        except Exception as err:
            raise CheckpointError(f"cannot read {self.directory}/{step}: {err}") from err
        return jax.device_get(restored["state"])

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint step {step} under {self.directory}; "
                                  f"available: {self.all_steps()}")
        return step

    def close(self) -> None:
        self._manager.close()


def checkpoint_bytes(directory: str | os.PathLike[str], step: int) -> dict[str, int]:
    """Bytes on disk of each item of one step (for reporting)."""
    root = Path(directory) / str(step)
    return {item.name: sum(f.stat().st_size for f in item.rglob("*") if f.is_file())
            for item in sorted(root.iterdir()) if item.is_dir()}
