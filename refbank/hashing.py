"""Row hashes and file hashes.

A row's hash is the SHA-256 of a canonical JSON text of its columns other than
``row_sha256``: keys sorted, no whitespace, UTF-8, floats in Python's shortest
round-trip form, timestamps as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``. Anyone can recompute it
from the Parquet file with a few lines of any language.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from refbank.schema import HASH_COLUMN


def canonical(value: Any) -> Any:
    """``value`` as plain JSON types: datetimes as UTC ISO text, numpy scalars as Python."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy
        return canonical(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        # json would write bare NaN/Infinity, which strict parsers reject
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (sorted keys, no spaces)."""
    return json.dumps(
        canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        allow_nan=False,
    )


def row_hash(row: dict[str, Any]) -> str:
    """SHA-256 (hex) of a row's canonical JSON, leaving out its ``row_sha256``."""
    body = {k: v for k, v in row.items() if k != HASH_COLUMN}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: str | Path) -> dict[str, str]:
    """``{relative posix path: SHA-256}`` of every file under ``folder``, sorted by path."""
    root = Path(folder)
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    return {name: file_sha256(files[name]) for name in sorted(files)}


def listing_sha256(hashes: dict[str, str]) -> str:
    """SHA-256 of a ``sha256sum`` listing of ``{relative path: SHA-256}`` (see
    :func:`tree_sha256`)."""
    lines = [f"{hashes[name]}  {name}\n" for name in sorted(hashes)]
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def tree_sha256(folder: str | Path) -> str:
    """SHA-256 over the relative paths and contents of every file under ``folder``.

    The text hashed is one line ``<sha256 of file>  <relative posix path>`` per file,
    sorted by path (the format of ``sha256sum``).
    """
    return listing_sha256(file_hashes(folder))
