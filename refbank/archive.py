"""Single-file bank exports: a tar archive with a ``SHA256SUMS`` of its contents."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from forensics.errors import BankError
from refbank import store
from refbank.hashing import file_sha256

SUMS = "SHA256SUMS"
_MEMBERS = ("bank.json", "curves.parquet", "baselines.parquet")


def _mode(target: Path, write: bool) -> str:
    gz = target.name.endswith((".tar.gz", ".tgz"))
    if write:
        return "w:gz" if gz else "w"
    return "r:*"


def _bank_files(folder: Path) -> list[str]:
    names = [n for n in _MEMBERS if (folder / n).is_file()]
    base = folder / "baselines"
    if base.is_dir():
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(folder)
            if p.is_file() and not rel.parts[1].startswith(store.TMP_PREFIX):
                names.append(rel.as_posix())
    return names


def write_archive(folder: Path, target: Path) -> None:
    """Write the bank in ``folder`` to the archive ``target`` (which must not exist)."""
    names = _bank_files(folder)
    sums = "".join(f"{file_sha256(folder / n)}  {n}\n" for n in names).encode()
    target.parent.mkdir(parents=True, exist_ok=True)
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


@contextmanager
def unpacked_archive(source: Path) -> Iterator[Path]:
    """Unpack an export into a temporary folder, checking every file's SHA-256.

    Raises:
        BankError: the file is not an export, holds unsafe or unlisted files, or a file's
            hash differs from ``SHA256SUMS``.
    """
    if not source.is_file():
        raise BankError(f"no export file at {source}; give the path of a file from fp bank export")
    with tempfile.TemporaryDirectory(prefix="fp-bank-import-") as tmp:
        folder = Path(tmp)
        try:
            with tarfile.open(source, _mode(source, write=False)) as tar:
                members = tar.getmembers()
                bad = [m.name for m in members
                       if not (m.isfile() or m.isdir()) or not _safe_name(m.name)]
                if bad:
                    raise BankError(
                        f"{source} holds entries an fp export never has ({', '.join(bad[:3])}); "
                        f"refusing to import it"
                    )
                tar.extractall(folder, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BankError(
                f"cannot read {source} as an fp bank export ({exc}); "
                f"make one with: fp bank export FILE"
            ) from None
        _check_sums(folder, source)
        yield folder


def _check_sums(folder: Path, source: Path) -> None:
    sums_file = folder / SUMS
    if not sums_file.is_file():
        raise BankError(f"{source} has no {SUMS}; it is not an fp bank export")
    listed: dict[str, str] = {}
    for line in sums_file.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    present.discard(SUMS)
    unlisted = sorted(present - set(listed))
    absent = sorted(set(listed) - present)
    changed = sorted(n for n in set(listed) & present if file_sha256(folder / n) != listed[n])
    if unlisted or absent or changed:
        what = "; ".join(
            f"{label}: {', '.join(names[:3])}"
            for label, names in (("changed", changed), ("missing", absent), ("unlisted", unlisted))
            if names
        )
        raise BankError(f"{source} does not match its {SUMS} ({what}); nothing imported")
    if "bank.json" not in present:
        raise BankError(f"{source} has no bank.json; it is not an fp bank export")

