"""Atomic file and folder writes: a reader sees the old content or the new, never a part.

Every writer of a file a user or a resumed run reads (adapter folders, exported models, run
summaries, checksum lists) goes through here: the content is written next to its destination
under a hidden temporary name, then renamed over it in one ``os.replace``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_dir(path: str | os.PathLike[str], write: Callable[[Path], None], overwrite: bool) -> Path:
    """Call ``write(tmp)`` on a new temporary sibling folder of ``path``, then rename it to ``path``.

    An existing non-empty ``path`` is replaced only with ``overwrite`` (else ``FileExistsError``);
    if ``write`` raises, ``path`` is left as it was and the temporary folder is removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would stay on the renamed folder
    try:
        write(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write_text(file: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``file`` through a temporary sibling and one rename."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.tmp-", dir=file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file


__all__ = ["atomic_dir", "atomic_write_text"]
