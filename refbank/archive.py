"""Single-file bank exports: a tar archive with a ``SHA256SUMS`` of its contents."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from forensics.errors import BankError
from refbank import store
from refbank.hashing import file_sha256

SUMS = "SHA256SUMS"
_MEMBERS = ("bank.json", "curves.parquet", "baselines.parquet", "log.jsonl")
#: Folders of the bank exported whole: the baselines' engine files, the curves' image rows.
_FOLDERS = ("baselines", "rows")


def _mode(target: Path, write: bool) -> str:
    gz = target.name.endswith((".tar.gz", ".tgz"))
    if write:
        return "w:gz" if gz else "w"
    return "r:*"


def _bank_files(folder: Path) -> list[str]:
    names = [n for n in _MEMBERS if (folder / n).is_file()]
    for sub in _FOLDERS:
        base = folder / sub
        if base.is_dir():
            for p in sorted(base.rglob("*")):
                rel = p.relative_to(folder)
                if p.is_file() and not rel.parts[1].startswith(store.TMP_PREFIX):
                    names.append(rel.as_posix())
    return names


def sweep_stale_exports(place: Path, name: str) -> None:
    """Remove the temporary files that exports to ``place/name`` killed earlier (SIGTERM,
    kill -9) left: ``.tmp-<name>-<pid>-<hex>`` whose process is gone."""
    for p in place.glob(f"{store.TMP_PREFIX}{name}-*"):
        pid = p.name[len(store.TMP_PREFIX) + len(name) + 1:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def write_archive(folder: Path, target: Path) -> None:
    """Write the bank in ``folder`` to the archive ``target`` (which must not exist)."""
    names = _bank_files(folder)
    sums = "".join(f"{file_sha256(folder / n)}  {n}\n" for n in names).encode()
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_exports(target.parent, target.name)
    tmp = store.temp_path(target.parent, target.name)
    try:
        with tarfile.open(tmp, _mode(target, write=True)) as tar:
            for n in names:
                tar.add(folder / n, arcname=n, recursive=False)
            info = tarfile.TarInfo(SUMS)
            info.size = len(sums)
            info.mtime = int(os.path.getmtime(folder / names[0])) if names else 0
            tar.addfile(info, io.BytesIO(sums))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)  # fails if target exists: never overwrite
        except FileExistsError:
            raise BankError(f"{target} exists already; export to a new file name") from None
        except OSError:  # file system without hard links
            if target.exists():
                raise BankError(f"{target} exists already; export to a new file name") from None
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    store.fsync_dir(target.parent)


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts


#: At most this many bytes are unpacked from one export unless told otherwise
#: (``fp bank import --max-size``); the free space of the temporary folder bounds it too.
MAX_IMPORT_BYTES = 64 * 10**9
#: At most this many entries are read from one export.
MAX_MEMBERS = 100_000
#: Largest ``SHA256SUMS`` read (about 100,000 lines).
MAX_SUMS_BYTES = 16 * 1024**2


@contextmanager
def unpacked_archive(source: Path, max_bytes: int = MAX_IMPORT_BYTES) -> Iterator[Path]:
    """Unpack an export into a temporary folder, having checked it first.

    Before anything is written, the archive's listing is checked against its
    ``SHA256SUMS``: only regular files with safe names, each listed once, every listed
    file present, ``bank.json`` among them, and their sizes adding up to no more than
    ``max_bytes`` and the free space of the temporary folder. Then each file is written
    and hashed as it is unpacked; the first whose SHA-256 differs stops the import.

    Raises:
        BankError: the file is not an export, holds unsafe, unlisted or missing files, is
            larger than allowed, or a file's hash differs from ``SHA256SUMS``.
    """
    if not source.is_file():
        raise BankError(f"no export file at {source}; give the path of a file from fp bank export")
    with tempfile.TemporaryDirectory(prefix="fp-bank-import-") as tmp:
        folder = Path(tmp)
        try:
            with tarfile.open(source, _mode(source, write=False)) as tar:
                members = _members(tar, source)
                sums = _read_sums(tar, members, source)
                _check_listing(members, sums, source, max_bytes, folder)
                _extract(tar, members, sums, source, folder)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise BankError(
                f"cannot read {source} as an fp bank export ({exc}); "
                f"make one with: fp bank export FILE"
            ) from None
        yield folder


def _members(tar: tarfile.TarFile, source: Path) -> list[tarfile.TarInfo]:
    """The archive's entries (headers only; nothing is written), at most MAX_MEMBERS."""
    members = []
    while (m := tar.next()) is not None:
        members.append(m)
        if len(members) > MAX_MEMBERS:
            raise BankError(f"{source} holds more than {MAX_MEMBERS} entries; an fp export "
                            f"never does; refusing to import it")
    bad = [m.name for m in members if not (m.isfile() or m.isdir()) or not _safe_name(m.name)]
    if bad:
        raise BankError(
            f"{source} holds entries an fp export never has ({', '.join(bad[:3])}); "
            f"refusing to import it"
        )
    return members


def _read_sums(tar: tarfile.TarFile, members: list[tarfile.TarInfo],
               source: Path) -> dict[str, str]:
    found = [m for m in members if m.isfile() and m.name == SUMS]
    if not found:
        raise BankError(f"{source} has no {SUMS}; it is not an fp bank export")
    if len(found) > 1 or found[0].size > MAX_SUMS_BYTES:
        raise BankError(f"{source} has {'several' if len(found) > 1 else 'an oversized'} "
                        f"{SUMS}; it is not an fp bank export; refusing to import it")
    f = tar.extractfile(found[0])
    text = f.read().decode("utf-8", errors="replace") if f is not None else ""
    listed: dict[str, str] = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not _safe_name(name) or name in listed:
            raise BankError(f"{source}: {SUMS} has a malformed or repeated line "
                            f"{line[:80]!r}; refusing to import it")
        listed[name] = digest
    return listed


def _check_listing(members: list[tarfile.TarInfo], sums: dict[str, str], source: Path,
                   max_bytes: int, folder: Path) -> None:
    files = [m for m in members if m.isfile() and m.name != SUMS]
    names = [m.name for m in files]
    repeated = sorted(n for n, k in Counter(names).items() if k > 1)
    unlisted = sorted(set(names) - set(sums))
    absent = sorted(set(sums) - set(names))
    if repeated or unlisted or absent:
        what = "; ".join(
            f"{label}: {', '.join(found[:3])}"
            for label, found in (("repeated", repeated), ("missing", absent),
                                 ("unlisted", unlisted)) if found
        )
        raise BankError(f"{source} does not match its {SUMS} ({what}); nothing imported")
    if "bank.json" not in sums:
        raise BankError(f"{source} has no bank.json; it is not an fp bank export")
    total = sum(m.size for m in files)
    if total > max_bytes:
        raise BankError(
            f"{source} would unpack to {total / 1e9:.3g} GB, more than the limit of "
            f"{max_bytes / 1e9:.3g} GB; nothing was unpacked. If the bank really is that "
            f"large, raise the limit: fp bank import FILE --max-size GB"
        )
    free = shutil.disk_usage(folder).free
    if total > free:
        raise BankError(
            f"{source} would unpack to {total / 1e9:.3g} GB but the temporary folder "
            f"{folder.parent} has {free / 1e9:.3g} GB free; nothing was unpacked. Point TMPDIR "
            f"to a larger disk"
        )


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], sums: dict[str, str],
             source: Path, folder: Path) -> None:
    """Write each listed file, hashing it on the way; stop at the first mismatch."""
    for m in members:
        if not m.isfile() or m.name == SUMS:
            continue
        target = folder / m.name
        target.parent.mkdir(parents=True, exist_ok=True)
        stream = tar.extractfile(m)
        h = hashlib.sha256()
        with open(target, "wb") as out:
            while stream is not None and (block := stream.read(1 << 20)):
                h.update(block)
                out.write(block)
        if h.hexdigest() != sums[m.name]:
            raise BankError(
                f"{source} does not match its {SUMS} (changed: {m.name}); nothing imported"
            )
