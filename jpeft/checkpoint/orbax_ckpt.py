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

Integrity: every step records the SHA-256 of each saved array's bytes in its ``meta`` item (written
in the same atomic save) and, once the step is complete, the SHA-256 of every file of the step in
``<step>/jpeft_checksums.json``. :meth:`CheckpointManager.restore_verified` checks both and falls
back to the newest step that verifies: each failing step is reported in one short paragraph
(which step, which file or array) and moved into ``_corrupt/`` (never deleted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.checkpoint.atomic import atomic_write_text
from jpeft.core import paths as P


TRASH = "_deleted"  # subdirectory that old steps are renamed into before they are deleted
CORRUPT = "_corrupt"  # subdirectory that steps failing verification are moved into
CHECKSUMS = "jpeft_checksums.json"  # per step: SHA-256 of every file of the step


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


def _short(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters."""
    text = (str(err).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def array_checksums(tree: Any) -> dict[str, str]:
    """SHA-256 of every leaf's shape, dtype and bytes, keyed by its path in ``tree``."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree)):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest = hashlib.sha256(f"{array.shape}|{array.dtype}|".encode())
        digest.update(array.tobytes())
        out[jax.tree_util.keystr(path)] = digest.hexdigest()
    return out


def file_checksums(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (but the checksum file), keyed by relative path."""
    out = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        digest = hashlib.sha256()
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        out[file.relative_to(root).as_posix()] = digest.hexdigest()
    return out


class StepFailed(CheckpointError):
    """One step did not verify (``step``, and ``what``: the file or array that failed)."""

    def __init__(self, step: int, what: str, why: str) -> None:
        super().__init__(f"checkpoint step {step}: {what} {why}")
        self.step, self.what, self.why = step, what, why


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
        tree = _to_saveable(state)
        meta = {**meta, "array_sha256": array_checksums(tree)}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()
        self._empty_trash()
        if jax.process_index() == 0:
            root = self.directory / str(int(step))
            atomic_write_text(root / CHECKSUMS, json.dumps({"sha256": file_checksums(root)}, indent=1, sort_keys=True))

    def verify_files(self, step: int) -> bool:
        """Check every file of ``step`` against its recorded SHA-256. Returns ``False`` when the
        step has no checksum file (written before checksums, or killed right after the save);
        raises :class:`StepFailed` naming the first file that is missing, added or changed."""
        root = self.directory / str(step)
        record = root / CHECKSUMS
        if not record.is_file():
            return False
        try:
            want = json.loads(record.read_text())["sha256"]
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise StepFailed(step, CHECKSUMS, f"cannot be read ({_short(err)})") from None
        have = file_checksums(root)
        for name in sorted(set(want) | set(have)):
            if name not in have:
                raise StepFailed(step, name, "is missing")
            if name not in want:
                raise StepFailed(step, name, "was not written with the checkpoint")
            if have[name] != want[name]:
                raise StepFailed(step, name, f"has SHA-256 {have[name][:12]}..., recorded "
                                             f"{want[name][:12]}... (changed or damaged on disk)")
        return True

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        try:
            restored = self._manager.restore(step, args=self._ocp.args.Composite(
                meta=self._ocp.args.JsonRestore()))
        except Exception as err:
            raise StepFailed(step, "meta", f"cannot be read ({_short(err)})") from None
        return dict(restored["meta"])

    def restore(self, like: Any, *, fingerprint: str | None = None, step: int | None = None,
                allow_base_mismatch: bool = False, _meta: dict[str, Any] | None = None
                ) -> tuple[Any, dict[str, Any]]:
        """Restore the state saved at ``step`` (default: latest) into the structure of ``like``.

        ``fingerprint`` is the current base's :func:`fingerprint`; a different one in the
        checkpoint raises :class:`CheckpointError` unless ``allow_base_mismatch``. Arrays whose
        bytes differ from the checksums recorded at save time raise :class:`StepFailed`.
        """
        step = self._step(step)
        meta = self.read_meta(step) if _meta is None else _meta
        saved = meta.get("base_fingerprint")
        if fingerprint is not None and saved != fingerprint and not allow_base_mismatch:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} was made on another base model "
                f"({meta.get('base_model')!r}): expected base fingerprint {saved}, found {fingerprint}. "
                "Load the base it was trained on, start afresh (--resume=false), or pass "
                "allow_base_mismatch=True (--allow-base-mismatch) to restore anyway."
            )
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _to_saveable(like))
        try:
            restored = self._manager.restore(step, args=self._ocp.args.Composite(
                state=self._ocp.args.StandardRestore(abstract)))
        except Exception as err:
            raise StepFailed(step, "state", f"cannot be read ({_short(err)}): incomplete or "
                                            "corrupted") from None
        tree = restored["state"]
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(tree),
                                     jax.tree_util.tree_leaves(abstract)):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CheckpointError(f"checkpoint leaf {jax.tree_util.keystr(path)} has "
                                      f"{got.shape}/{got.dtype}, expected {want.shape}/{want.dtype}")
        recorded = meta.get("array_sha256")
        if isinstance(recorded, dict):
            found = array_checksums(tree)
            for name in sorted(set(recorded) | set(found)):
                if recorded.get(name) != found.get(name):
                    raise StepFailed(step, f"array {name}", "differs from the checksum recorded "
                                                            "when it was saved")
        return _from_saveable(tree, like), meta

    def restore_verified(self, like: Any, *, fingerprint: str | None = None,
                         allow_base_mismatch: bool = False,
                         check_meta: Callable[[int, dict[str, Any]], None] | None = None,
                         report: Callable[[str], None] = print) -> tuple[Any, dict[str, Any], int] | None:
        """Restore the newest step that verifies (files, then arrays): ``(state, meta, step)``,
        or ``None`` when there is no step at all.

        ``check_meta(step, meta)`` runs before the arrays are read and may raise (e.g. a
        checkpoint of another configuration): such errors, and a base mismatch, propagate. A step
        that fails verification is reported through ``report`` in one paragraph; when an older
        step verifies, the failing newer ones are moved into ``_corrupt/`` (so that the run can
        write those steps again), else :class:`CheckpointError` lists them all and nothing moves.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        failed: list[StepFailed] = []
        for step in steps:
            verified = False
            try:
                verified = self.verify_files(step)
                meta = self.read_meta(step)
                if check_meta is not None:
                    check_meta(step, meta)
                state, meta = self.restore(like, fingerprint=fingerprint, step=step,
                                           allow_base_mismatch=allow_base_mismatch, _meta=meta)
            except StepFailed as err:
                if verified and err.what == "state" and "mismatch" in err.why.lower():
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} is intact but holds a training "
                        "state of another structure (other optimizer settings, e.g. --clip-norm, "
                        "--group-lr, or another method version): resume with the settings it was "
                        "written with, or pass --resume=false to start afresh.") from None
                failed.append(err)
                continue
            if not verified:
                report(f"note: checkpoint step {step} in {self.directory} has no {CHECKSUMS} (written "
                       "by an older jpeft, or the run stopped right after the save); its arrays "
                       "were checked against the checksums in its metadata where present.")
            for err in failed:
                moved = self._move_aside(err.step)
                report(f"checkpoint step {err.step} in {self.directory} failed verification: "
                       f"{err.what} {err.why}. Moved it to {moved}; resuming from step {step}, the "
                       "newest step that verifies.")
            return state, meta, step
        lines = "; ".join(f"step {e.step}: {e.what} {e.why}" for e in failed)
        raise CheckpointError(
            f"no checkpoint in {self.directory} verifies ({lines}). Nothing was loaded or moved; "
            "start afresh with --resume=false (the checkpoints are moved aside, not deleted) or "
            "restore the files from a copy.")

    def _move_aside(self, step: int) -> Path:
        import datetime

        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = self.directory / CORRUPT / f"{step}-{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.directory / str(step), target)
        self._manager.reload()
        return target

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
