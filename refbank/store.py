"""Files of a bank: the inter-process lock, atomic writes, version-checked reads.

Every change follows one pattern: take the bank's lock (``<bank>/.lock``, an OS-level
``flock`` that the kernel releases when its holder dies), read the current table, write
the new table to a temporary file in the same folder, ``fsync`` it, then ``os.replace``
it over the old one and ``fsync`` the folder. A reader therefore sees either the old
file or the new one, never a partial one, and a writer killed at any point leaves every
earlier row in place. Temporary files left by a killed writer are removed by the next
writer, which can only be running once the dead one's lock is gone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from forensics.errors import BankError
from refbank.schema import SCHEMA_VERSION, VERSION_KEY

LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"


def _upgrade_message(where: Path, version: int) -> str:
    return (
        f"the bank at {where} has schema version {version}, but this fp reads versions up to "
        f"{SCHEMA_VERSION}: upgrade fp (pip install -U fp-forensics) to use it"
    )


def check_version(version: Any, where: Path) -> int:
    """Return ``version`` as an int, or raise BankError if it is unreadable or too new.

    Only a whole number (or its digits as text) is a version: ``1.5`` is refused, not read
    as 1.
    """
    try:
        if isinstance(version, bool) or not (
                isinstance(version, int) or (isinstance(version, str) and version.isdigit())):
            raise ValueError(version)
        value = int(version)
    except (TypeError, ValueError):
        raise BankError(
            f"{where} has an unreadable schema version {version!r}: it is not an fp bank, "
            f"or it is damaged; restore it from an export (fp bank import)"
        ) from None
    if value > SCHEMA_VERSION:
        raise BankError(_upgrade_message(where, value))
    return value


class BankLock:
    """The bank's inter-process lock; re-entrant within one :class:`BankLock`."""

    def __init__(self, folder: Path, timeout: float) -> None:
        self.folder = folder
        self.timeout = timeout
        self._lock: FileLock | None = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock; on first entry create the folder and sweep stale temp files."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = FileLock(str(self.folder / LOCK_NAME), timeout=self.timeout)
        first = not self._lock.is_locked
        try:
            self._lock.acquire()
        except Timeout:
            raise BankError(
                f"the bank at {self.folder} stayed locked by another fp process for "
                f"{self.timeout:g} s; wait for that process to finish and try again"
            ) from None
        try:
            if first:
                sweep_temp_files(self.folder)
            yield
        finally:
            self._lock.release()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Wait until no writer holds the lock, and keep writers out, without writing.

        For readers of a bank they cannot write (a read-only folder or mount): the lock
        file is opened read-only and locked shared. Without a lock file no fp writer has
        ever run, and there is nothing to wait for.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no shared locks
            yield
            return
        path = self.folder / LOCK_NAME
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                yield
                return
            except OSError as exc:
                raise BankError(f"cannot open the lock file {path} ({exc.strerror or exc}); "
                                f"check its permissions") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise BankError(
                        f"the bank at {self.folder} stayed locked by another fp process for "
                        f"{self.timeout:g} s; wait for that process to finish and try again"
                    ) from None
                time.sleep(0.05)
                continue
            break
        try:
            yield
        finally:
            os.close(fd)  # releases the shared lock


def probe_writable(folder: Path) -> str | None:
    """Why this process cannot write a bank in ``folder``, or None if it can.

    A real probe, not permission bits (which root ignores and read-only mounts do not
    show): a temporary file is created and removed in the folder, or in its nearest
    existing parent when the bank does not exist yet, and an existing lock file is opened
    for writing.
    """
    place = folder
    while not place.exists():
        if place.parent == place:
            return f"none of the folders above {folder} exists"
        place = place.parent
    if not place.is_dir():
        return f"{place} is a file, not a folder"
    for where in (place, folder / "baselines"):
        if not where.is_dir():
            continue
        probe = temp_path(where, "probe")
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            return f"cannot create files in {where} ({exc.strerror or exc})"
        os.close(fd)
        probe.unlink(missing_ok=True)
    lock = folder / LOCK_NAME
    if lock.exists():
        try:
            os.close(os.open(lock, os.O_RDWR))
        except OSError as exc:
            return f"cannot write its lock file {lock} ({exc.strerror or exc})"
    return None


def sweep_temp_files(folder: Path) -> None:
    """Remove temporary files and folders a killed writer left (call under the lock)."""
    for place in (folder, folder / "baselines", folder / "rows"):
        if not place.is_dir():
            continue
        for p in place.glob(TMP_PREFIX + "*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def temp_path(folder: Path, name: str) -> Path:
    """A fresh temporary path in ``folder`` (same file system as the target)."""
    return folder / f"{TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"


def _commit(tmp: Path, target: Path) -> None:
    """Move a fully written temporary file or folder into place (atomic on POSIX)."""
    os.replace(tmp, target)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_failed(target: Path, exc: OSError) -> BankError:
    """The error of a bank write that failed (disk full, file size limit, I/O error)."""
    return BankError(f"cannot write {target} ({exc.strerror or exc}); nothing was changed in "
                     f"the bank, which is as it was: free space or raise the limit, then try "
                     f"again")


def _write_atomic(target: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file atomically: ``write`` fills a temporary file in the same folder, which
    is fsynced and renamed over ``target``, then the folder is fsynced.

    Raises:
        BankError: the write failed; whatever was at ``target`` is left in place.
    """
    tmp = temp_path(target.parent, target.name)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(target, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_table(table: pa.Table, target: Path) -> None:
    """Write a Parquet table atomically (:func:`_write_atomic`).

    Raises:
        BankError: the write failed (e.g. ``OSError: File too large``); the old table is
            left in place.
    """
    _write_atomic(target, lambda f: pq.write_table(table, f))


def write_bytes(data: bytes, target: Path) -> None:
    """Write a file's bytes atomically (:func:`_write_atomic`), creating its folder.

    Raises:
        BankError: the write failed; nothing is left at ``target`` that was not there.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(target, lambda f: f.write(data))


def write_json(obj: Any, target: Path) -> None:
    """Write a JSON file atomically (:func:`_write_atomic`): UTF-8, indented, keys sorted,
    a final newline."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    _write_atomic(target, lambda f: f.write(text.encode("utf-8")))


def read_table(path: Path, schema: pa.Schema, *, keep_unknown: bool = False) -> pa.Table:
    """Read one bank table through one open handle; an absent file is an empty table.

    A reader therefore sees the old file or the new one while another process replaces
    it, never an error.

    Args:
        path: the Parquet file.
        schema: the table's schema (:mod:`refbank.schema`).
        keep_unknown: also return the columns the schema does not know (added by another
            tool, e.g. a curator's ``analyst_note``), after the known ones, as stored. A
            writer reads this way so that rewriting the table keeps them; readers of rows
            get the schema's columns only.

    Raises:
        BankError: the file is unreadable, of a newer schema version, or not a bank table.
    """
    # One open, one read: a writer's os.replace between two opens of the path (which
    # pq.read_table(path) does) would pair one file's footer with another's pages.
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return schema.empty_table()
    except OSError as exc:
        raise BankError(f"cannot read {path} ({exc.strerror or exc}); check its "
                        f"permissions") from None
    try:
        # One thread and no pre-buffering (which reads through pyarrow's I/O thread pool):
        # the tables are small, and a process that exits right after a threaded read of an
        # in-memory buffer can abort in a thread pool ("terminate called without an active
        # exception"): 35 of 40 bare runs did; 3 of 150 with one CPU thread, on a loaded
        # machine; 0 of 150 with pre-buffering off as well (pyarrow still has a rarer exit
        # race of its own, apache/arrow#34314: 0 of 300 and 1 of 150 runs since).
        # (ParquetFile, not read_table: the latter imports pyarrow.dataset, and with it
        # pandas, half a second for every command that reads the bank)
        table = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(use_threads=False)
    except (OSError, pa.ArrowException) as exc:
        raise BankError(
            f"cannot read {path}: {exc}. The file is damaged; restore the bank from an "
            f"export (fp bank import) or move the file away"
        ) from None
    version = (table.schema.metadata or {}).get(VERSION_KEY)
    if version is not None:  # files rewritten by other tools may have lost it
        check_version(version.decode(errors="replace"), path)
    extra = [n for n in table.column_names if n not in schema.names]
    known = table
    if not table.schema.equals(schema, check_metadata=False):
        try:
            known = table.select(schema.names).cast(schema)
        except (KeyError, pa.ArrowException) as exc:
            raise BankError(
                f"{path} does not have the columns of an fp bank table ({exc}); "
                f"see the README's 'Reference bank' section for the schema"
            ) from None
    # The schema exactly, field descriptions included (files of older versions lack them).
    out = pa.Table.from_arrays(known.columns, schema=schema)
    if keep_unknown:
        for name in extra:
            out = out.append_column(table.schema.field(name), table.column(name))
    return out


def append_rows(current: pa.Table, new: pa.Table) -> pa.Table:
    """``current`` with the rows of ``new`` after its own; columns ``new`` lacks (unknown
    columns another tool added) are null in the new rows."""
    if current.column_names == new.column_names:
        return pa.concat_tables([current, new])
    for name in current.column_names:
        if name not in new.column_names:
            new = new.append_column(current.schema.field(name).with_nullable(True),
                                    pa.nulls(new.num_rows, current.schema.field(name).type))
    out = pa.concat_tables([current, new.select(current.column_names)],
                           promote_options="permissive")
    return out.replace_schema_metadata(current.schema.metadata)


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a JSON file, or None if it is absent."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BankError(f"cannot read {path}: {exc}; restore the bank from an export") from None
