"""The bank's calibration of an answer: computed once per bank state, stored beside it.

An answer rests on three things fitted on the bank, not on the suspects: the confidence
model of the score/margin rule (:mod:`forensics.stats.confidence`, simulated leave-one-curve-out
suspects), each enrolled model's belonging null at the suspect's size
(:func:`forensics.stats.belonging.null`) and the calibration of the two-level answer at that
size (:mod:`forensics.stats.answer_confidence`). They are pure, seeded functions of the
enrolled rows, so each is computed once per *bank state* and stored as JSON in the bank's
``calibration/`` folder (or, where the bank cannot be written, in the user cache's
``calibration/``), under a key that hashes everything it depends on: every curve used
(its ``row_sha256``), the baseline row, the fingerprint, matcher and entries, the level,
the seed, the suspect size and this format. Enrolling, removing or editing a curve changes
the key; nothing stale is ever read.

Files are kept per baseline and bank state: ``calibration/<baseline id>/<state>/``, the
state a digest of that baseline's curve rows. The first time a process stores something
for a new state, the folders of the baseline's earlier states are deleted (they can never
be read again), so the folder holds what the bank's current curves need, not a file for
every state the bank ever had.

Each file records its own SHA-256 over its content; a file that fails it, or cannot be
read, is set aside (``damaged-<name>``) with a warning and computed again. No pickle:
floats are written as JSON's shortest round-trip decimals, so a stored calibration gives
bit-identical answers to a computed one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forensics.errors import FpWarning

if TYPE_CHECKING:
    import numpy as np

#: The stored files' format (part of every key: a new format never reads an old file).
FORMAT = 3
#: The folder, in the bank (or the user cache), calibrations are stored in.
FOLDER = "calibration"


def calibration_key(kind: str, parts: dict[str, Any]) -> str:
    """SHA-256 of what a calibration of ``kind`` depends on (``parts``: JSON-ready)."""
    from forensics._version import __version__

    text = json.dumps({"kind": kind, "format": FORMAT, "fp_version": __version__, **parts},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def rows_digest(rows: Sequence[dict[str, Any]]) -> str:
    """SHA-256 of the curves' ids and row hashes, in order (the bank state they give)."""
    text = "\n".join(f"{r['curve_id']} {r.get('row_sha256')}" for r in rows)
    return hashlib.sha256(text.encode()).hexdigest()


#: What a scope (a baseline id) or a state may be called: one plain path component.
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: A file of the earlier, flat layout (``<kind>-<key>``, format 2): never read again.
_FLAT = re.compile(r"^(damaged-)?[a-z-]+-[0-9a-f]{64}\.(json|npz)$")

#: The member of a stored ``.npz`` that holds the SHA-256 of the others.
_SHA = "__sha256__"


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\t{a.dtype.str}\t{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True,
                                     separators=(",", ":")).encode()).hexdigest()


class CalibrationStore:
    """Calibrations of one bank, read and written as ``<folder>/<kind>-<key>.json``.

    Args:
        bank_path: the bank's folder; its ``calibration/`` folder is used when it can be
            written, else the user cache's (``$FP_CACHE_DIR/calibration`` or the platform's).
        enabled: False: nothing is read or written (each calibration is computed).
    """

    def __init__(self, bank_path: str | os.PathLike | None, enabled: bool = True, *,
                 scope: str | None = None, state: str | None = None):
        self.enabled = enabled and bank_path is not None
        self.folder: Path | None = None
        self._memo: dict[str, tuple[Any, dict[str, Any]]] = {}
        #: The store's root, when this store is one state of a scope (its folder's
        #: grandparent); None: nothing is pruned.
        self._root: Path | None = None
        self._pruned = False
        if self.enabled:
            base = _writable_folder(Path(str(bank_path)))
            if base is not None and scope is not None and state is not None:
                if not _SAFE.match(scope) or not _SAFE.match(state):
                    raise ValueError(f"calibration scope and state must be plain names, got "
                                     f"{scope!r}, {state!r}")
                self._root, base = base, base / scope / state
            self.folder = base

    def _prune(self) -> None:
        """Before the first write of this process: delete the folders of the scope's other
        states, and files of earlier formats left flat in the store (never read again)."""
        if self._pruned or self.folder is None or self._root is None:
            return
        self._pruned = True
        import shutil

        scope = self.folder.parent  # <root>/<scope>/<state>
        if scope.is_dir():
            for d in scope.iterdir():
                if d.is_dir() and d.name != self.folder.name:
                    shutil.rmtree(d, ignore_errors=True)
        if self._root.is_dir():
            for p in self._root.iterdir():
                if p.is_file() and _FLAT.match(p.name):
                    p.unlink(missing_ok=True)

    def get(self, kind: str, parts: dict[str, Any], compute: Callable[[], Any],
            to_json: Callable[[Any], Any], from_json: Callable[[Any], Any]
            ) -> tuple[Any, dict[str, Any]]:
        """The calibration of ``kind`` for ``parts``: from this process's memory, the
        store, or ``compute()`` (then stored).

        Returns:
            The calibration and its record for the chain of custody: ``kind``, ``key`` and
            the SHA-256 of its JSON content (the same whether computed or read).
        """
        key = calibration_key(kind, parts)
        if key in self._memo:
            return self._memo[key]
        path = None if self.folder is None else self.folder / f"{kind}-{key}.json"
        loaded = self._read(path, key) if path is not None else None
        if loaded is not None:
            value, sha = from_json(loaded["value"]), loaded["sha256"]
        else:
            value = compute()
            body = {"format": FORMAT, "key": key, "kind": kind, "value": to_json(value)}
            sha = _digest(body)
            if path is not None:
                self._write(path, body, sha)
        # the same record whether computed or read: an answer does not depend on the store
        record = {"kind": kind, "key": key, "sha256": sha}
        self._memo[key] = (value, record)
        return value, record

    def get_arrays(self, kind: str, parts: dict[str, Any],
                   compute: Callable[[], dict[str, np.ndarray]], *,
                   with_record: bool = False) -> Any:
        """Arrays derived from the bank (e.g. its curves' vectors, parsed once), stored as
        ``<kind>-<key>.npz`` with their SHA-256 inside (no pickle); as :meth:`get`.
        ``with_record``: also their record for the chain of custody (``kind``, ``key`` and
        the SHA-256 of the arrays), as ``(arrays, record)``."""
        import numpy as np

        key = calibration_key(kind, parts)
        if key in self._memo:
            arrays = self._memo[key][0]
            return (arrays, self._arrays_record(kind, key)) if with_record else arrays
        path = None if self.folder is None else self.folder / f"{kind}-{key}.npz"
        arrays = self._read_arrays(path) if path is not None and path.is_file() else None
        if arrays is None:
            arrays = compute()
            if path is not None:
                from forensics.data.atomic import atomic_savez

                sha = np.frombuffer(_arrays_digest(arrays).encode(), dtype=np.uint8)
                try:
                    self._prune()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_savez(path, {**arrays, _SHA: sha}, fsync=False)
                except OSError:
                    pass  # computed again next time
        self._memo[key] = (arrays, None)
        return (arrays, self._arrays_record(kind, key)) if with_record else arrays

    def _arrays_record(self, kind: str, key: str) -> dict[str, Any]:
        """The chain-of-custody record of stored arrays (their SHA-256 computed once)."""
        arrays, record = self._memo[key]
        if record is None:
            record = {"kind": kind, "key": key, "sha256": _arrays_digest(arrays)}
            self._memo[key] = (arrays, record)
        return record

    def _read_arrays(self, path: Path) -> dict[str, np.ndarray] | None:
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            sha = arrays.pop(_SHA).tobytes().decode()
            ok, why = sha == _arrays_digest(arrays), "its SHA-256 does not match its content"
        except Exception as exc:  # noqa: BLE001 - a damaged zip raises many types
            ok, why = False, f"it cannot be read ({type(exc).__name__})"
        if ok:
            return arrays
        self._set_aside(path, why)
        return None

    def _set_aside(self, path: Path, why: str) -> None:
        target = path.with_name(f"damaged-{path.name}")
        try:
            os.replace(path, target)
            where = f"set aside as {target.name}"
        except OSError:
            where = "left in place"
        warnings.warn(f"the stored calibration {path} is not used: {why}; it is {where} and "
                      f"the calibration is computed again", FpWarning, stacklevel=4)

    def _read(self, path: Path, key: str) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            body = {k: doc[k] for k in ("format", "key", "kind", "value")}
            ok = (doc["format"] == FORMAT and doc["key"] == key
                  and doc["sha256"] == _digest(body))
            why = "its SHA-256 does not match its content"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ok, why = False, f"it cannot be read ({type(exc).__name__})"
        if ok:
            return {"value": doc["value"], "sha256": doc["sha256"]}
        self._set_aside(path, why)
        return None

    def _write(self, path: Path, body: dict[str, Any], sha: str) -> None:
        from forensics.data.atomic import atomic_write_text

        try:
            self._prune()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({**body, "sha256": sha}, sort_keys=True))
        except OSError as exc:
            warnings.warn(f"the calibration could not be stored in {path.parent} "
                          f"({type(exc).__name__}: {exc.strerror or exc}); it is computed "
                          f"again at the next call", FpWarning, stacklevel=3)


def _writable_folder(bank: Path) -> Path | None:
    """``<bank>/calibration`` if the bank can be written, else the user cache's."""
    if os.access(bank, os.W_OK | os.X_OK):
        return bank / FOLDER
    from forensics import defaults

    root = os.environ.get(defaults.CACHE_ENV)
    if root:
        return Path(root).expanduser() / FOLDER
    import platformdirs

    return Path(platformdirs.user_cache_dir(defaults.APP_NAME)) / FOLDER
