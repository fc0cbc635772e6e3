"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

The content goes to a temporary file beside the target, is flushed to disk, then renamed
over the target with :func:`os.replace` (atomic on POSIX and Windows). The temporary file
is removed whatever happens.

Only a regular file, or a path where nothing is, is ever written: a rename over a device
node, a FIFO, a socket or a folder would replace it (as root, ``/dev/null`` itself), so
:func:`check_output_file` refuses those, and every write here runs it first. Commands call
it again before their first expensive step, so that a bad path costs nothing.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from forensics.errors import InputError

_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _blocking_parent(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` if it is not a folder (``FILE/sub``)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
        if parent.is_symlink():  # a dangling link: nothing can be created under it
            return parent
    return None


def check_output_file(path: str | os.PathLike, what: str = "the output") -> Path:
    """Refuse to write ``path`` unless it is a regular file or nothing is there yet.

    Args:
        path: the file that will be written.
        what: how the message names it (e.g. ``"--plot"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InputError: ``path`` is a device, FIFO, socket or folder, or lies under a file.
    """
    p = Path(path).expanduser()
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        mode = None
    except OSError as exc:
        raise InputError(f"{what} {p}: cannot use it ({exc.strerror or exc})") from None
    if mode is not None and not stat.S_ISREG(mode):
        hint = "give the name of a file to write" if stat.S_ISDIR(mode) else \
            "fp writes only regular files, never over a device, FIFO or socket; give a file name"
        raise InputError(f"{what} {p} is {_kind(mode)}; {hint}")
    blocker = _blocking_parent(p)
    if blocker is not None:
        raise InputError(f"{what} {p} lies under {blocker}, which is a file, not a folder; "
                         f"give a path in a folder")
    return p


def check_output_folder(path: str | os.PathLike, what: str = "the output folder") -> Path:
    """Refuse an output folder that is something else, or lies under a file.

    Raises:
        InputError: ``path`` exists and is not a folder, or lies under a file.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {p} is {_kind(os.stat(p).st_mode)}, not a folder; give a "
                         f"folder")
    blocker = _blocking_parent(p)
    if blocker is not None:
        raise InputError(f"{what} {p} lies under {blocker}, which is a file, not a folder; "
                         f"give a path in a folder")
    return p


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *,
                 fsync: bool = True) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file, then it replaces it.

    Args:
        path: the file to write.
        write: called with the temporary path; must write the whole content there.
        fsync: flush the content to disk before the rename (off for bulk, re-creatable
            outputs such as generated images).

    Raises:
        InputError: ``path`` is not a regular file (a device, FIFO, socket or folder), or
            lies under a file (see :func:`check_output_file`).
    """
    path = check_output_file(path)
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


def check_report_folder(path: str | os.PathLike, names: tuple[str, ...], *, force: bool,
                        what: str = "--report", inside: str | os.PathLike | None = None
                        ) -> Path:
    """Refuse a report folder that would replace a report already there, unless ``force``.

    A report is evidence: writing a new one over it would lose the old one, so a folder
    holding any of ``names`` is refused; with ``force`` it is accepted, and
    :func:`set_aside` moves the old one out of the way when the new one is written.

    Args:
        path: the report folder.
        names: the files a report consists of.
        force: accept a folder that holds a report.
        what: how the message names the folder.
        inside: the input folder; a report inside it would become part of the evidence
            of the next run on that folder, and is refused.

    Raises:
        InputError: ``path`` is a file (or device...), lies under a file, lies inside
            ``inside``, or holds a report and ``force`` is not given.
    """
    p = check_output_folder(path, what)
    if inside is not None:
        root = Path(inside).expanduser().resolve()
        if root.is_dir() and (p.resolve() == root or root in p.resolve().parents):
            raise InputError(f"{what} {p} lies inside the input folder {root}: the report "
                             f"would be read as evidence on the next run; write it elsewhere")
    found = [n for n in names if (p / n).exists() or (p / n).is_symlink()]
    if found and not force:
        raise InputError(f"{what} {p} holds a report already ({', '.join(found)}); a report "
                         f"is kept, never overwritten: give a new folder, or pass --force "
                         f"to write there (the old report is moved aside, not deleted)")
    return p


def set_aside(path: str | os.PathLike, names: tuple[str, ...]) -> Path | None:
    """Move the report files ``names`` in folder ``path`` into a fresh sibling folder.

    Returns:
        The folder they were moved to (``<path>.replaced-<UTC time>``), or None when
        ``path`` held none of them.
    """
    import time

    p = Path(path)
    found = [n for n in names if (p / n).exists() or (p / n).is_symlink()]
    if not found:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = p.with_name(f"{p.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = p.with_name(f"{p.name}.replaced-{stamp}-{n}")
    aside.mkdir()
    for name in found:
        os.replace(p / name, aside / name)
    return aside
