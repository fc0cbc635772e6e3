"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

The content goes to a temporary file beside the target, is flushed to disk, then renamed
over the target with :func:`os.replace` (atomic on POSIX and Windows). The temporary file
is removed whatever happens.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *,
                 fsync: bool = True) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file, then it replaces it.

    Args:
        path: the file to write.
        write: called with the temporary path; must write the whole content there.
        fsync: flush the content to disk before the rename (off for bulk, re-creatable
            outputs such as generated images).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_savez(path: str | os.PathLike, arrays: dict, *, fsync: bool = True) -> None:
    """Write ``arrays`` as a plain ``.npz`` to ``path`` atomically (no pickled objects)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a handle: np.savez would append ".npz" to a name
            np.savez(fh, **arrays)

    atomic_write(path, write, fsync=fsync)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
