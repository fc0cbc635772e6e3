"""The reference bank: enrolled curves and the baselines they were measured against.

>>> bank = Bank("/tmp/my-bank")                                 # doctest: +SKIP
>>> bank_id = bank.add_baseline(row, save=baseline.save)        # doctest: +SKIP
>>> ids = bank.add_curves([curve_row, ...])                     # doctest: +SKIP
>>> bank.curves(family="sd")                                    # doctest: +SKIP

Every change holds the bank's inter-process lock and replaces whole files atomically
(see :mod:`refbank.store`); reads take no lock and see a complete snapshot of each file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from forensics.errors import BankError, InputError
from forensics.jsonable import jsonable
from refbank import log, store
from refbank.hashing import (
    canonical_json,
    file_hashes,
    file_sha256,
    listing_sha256,
    row_hash,
    tree_sha256,
)
from refbank.schema import (
    BASELINES_SCHEMA,
    CURVES_SCHEMA,
    HASH_COLUMN,
    PARAM_COLUMNS,
    SCHEMA_VERSION,
)

ENV_VAR = "FP_BANK"
CURVES_FILE = "curves.parquet"
BASELINES_FILE = "baselines.parquet"
INFO_FILE = "bank.json"
LOG_NAME = log.LOG_FILE
BASELINES_DIR = "baselines"
FORMAT = "fp reference bank"
#: Prefix of a fingerprint value that is packed per-image rows (float16 bytes in base64;
#: written by ``forensics.stats.belonging.pack_rows``), not a vector of numbers. The bank
#: stores such rows in a file of its own (:data:`ROWS_DIR`) and keeps a reference
#: (:data:`ROWS_REF_PREFIX`) in the row.
PACKED_PREFIX = "float16le-base64:"
#: Folder of the curves' per-image rows: one file per curve, its float16 little-endian bytes,
#: named by their SHA-256 (``rows/<sha256>.f16``).
ROWS_DIR = "rows"
ROWS_EXT = ".f16"
#: Prefix of a fingerprint value that names such a file by its SHA-256; the row's hash
#: covers the reference, the reference fixes the file's content.
ROWS_REF_PREFIX = "float16le-sha256:"
_ROWS_REF_RE = re.compile(r"^float16le-sha256:[0-9a-f]{64}$")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Longest label (model, family, checkpoint, split) and free text (source, notes) accepted.
MAX_LABEL = 128
MAX_TEXT = 4096
LABEL_FIELDS = ("model", "family", "checkpoint", "split")
TEXT_FIELDS = ("source", "notes")

_CURVE_REQUIRED = ("model", "family", "encoder", "weights_sha256", "baseline_id", "layers",
                   "values", "n_images", "manifest_sha256")
_BASELINE_REQUIRED = ("name", "encoder", "weights_sha256", "layers", "train_manifest_sha256",
                      "heldout_manifest_sha256")


def _check_bank_path(path: Path) -> None:
    """Refuse a bank path that is a file, or lies under one (``FILE/sub``)."""
    if path.exists() and not path.is_dir():
        raise BankError(f"the bank path {path} is a file; give a folder (--bank DIR)")
    parent = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if parent is not None and not parent.is_dir():
        raise BankError(f"the bank path {path} lies under {parent}, which is a file, not a "
                        f"folder; give a folder (--bank DIR)")


def default_bank_path() -> Path:
    """``$FP_BANK`` if set, else ``<user data dir>/fp/bank`` (from platformdirs)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("fp")) / "bank"


def _now() -> datetime:
    return datetime.now(UTC)


def _tool_version() -> str:
    from forensics._version import __version__

    return __version__


@dataclass
class Problem:
    """One integrity problem found by :meth:`Bank.verify`."""

    table: str
    id: str
    problem: str


@dataclass
class VerifyReport:
    """What :meth:`Bank.verify` found; ``ok`` is True when ``problems`` is empty."""

    path: str
    schema_version: int
    n_curves: int
    n_baselines: int
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    log_records: int = 0
    log_head: dict[str, Any] | None = None
    signed_by: str | None = None

    @property
    def ok(self) -> bool:
        """True when no row, file or log record failed its check."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"ok": self.ok, **asdict(self)}


@dataclass
class ImportReport:
    """What :meth:`Bank.import_` did: ids added, and ids already present unchanged."""

    source: str
    added_curves: list[str] = field(default_factory=list)
    skipped_curves: list[str] = field(default_factory=list)
    added_baselines: list[str] = field(default_factory=list)
    skipped_baselines: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class Bank:
    """A reference bank in a folder: ``curves.parquet``, ``baselines.parquet``,
    ``bank.json`` and ``baselines/<baseline_id>/``.

    Args:
        path: the bank folder; default :func:`default_bank_path` (``$FP_BANK`` or the
            platform's user data folder). It is created on the first write.
        lock_timeout: seconds to wait for another process's write before giving up.

    Raises:
        BankError: (on use) the bank is of a newer schema version, or damaged.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 lock_timeout: float = 60.0) -> None:
        self.path = Path(path).expanduser() if path is not None else default_bank_path()
        _check_bank_path(self.path)
        self._lock = store.BankLock(self.path, lock_timeout)
        #: The tables read by this object, by file name: (the file's stamp, the table).
        self._tables: dict[str, tuple[tuple[int, int, int], pa.Table]] = {}

    def __repr__(self) -> str:
        return f"Bank({str(self.path)!r})"

    # -- metadata ---------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        """Schema version of the bank on disk (this release's version for a new bank)."""
        return self._check_version()

    def _check_version(self) -> int:
        """The bank's schema version; raises BankError if it is newer than this fp's."""
        info = store.read_json(self.path / INFO_FILE)
        if info is None:
            return SCHEMA_VERSION
        return store.check_version(info.get("schema_version"), self.path / INFO_FILE)

    def exists(self) -> bool:
        """True once something has been written to the bank."""
        return (self.path / INFO_FILE).exists() or (self.path / CURVES_FILE).exists()

    def require(self) -> None:
        """Refuse to read a bank that is not there (a mistyped ``--bank``) as an empty one.

        Raises:
            BankError: the path does not exist, or holds no fp bank; the message says how
                to create one.
        """
        if self.exists():
            return
        what = "does not exist" if not self.path.exists() else "holds no fp bank"
        raise BankError(
            f"the bank path {self.path} {what} (no {INFO_FILE} or {CURVES_FILE}); check "
            f"--bank / FP_BANK, or create a bank there with: fp baseline build NAME --train "
            f"DIR --heldout DIR --encoder E --bank {self.path}"
        )

    def writable(self) -> bool:
        """True when this process can write the bank (a real probe, see
        :func:`refbank.store.probe_writable`)."""
        return store.probe_writable(self.path) is None

    def check_writable(self) -> None:
        """Refuse at once, before any work, to change a bank this process cannot write.

        Raises:
            BankError: the bank folder (or, for a new bank, the folder it would be created
                in) is read-only; the message says how to work on a writable copy.
        """
        why = store.probe_writable(self.path)
        if why is not None:
            raise BankError(
                f"the bank at {self.path} is read-only ({why}); reading it works (fp attribute, "
                f"fp bank list|verify|export), but to change it, work on a writable copy: "
                f"fp bank export FILE.tar --bank {self.path}, then fp bank import FILE.tar "
                f"--bank NEW_FOLDER"
            )

    def info(self) -> dict[str, Any]:
        """Location, schema version and row counts."""
        return {
            "path": str(self.path),
            "schema_version": self.schema_version,
            "exists": self.exists(),
            "n_curves": self.curves_table().num_rows,
            "n_baselines": self.baselines_table().num_rows,
        }

    def _ensure_info(self) -> None:
        """Write ``bank.json`` if absent (under the lock); refuse a newer bank."""
        target = self.path / INFO_FILE
        if target.exists():
            self._check_version()
            return
        store.write_json(
            {"format": FORMAT, "schema_version": SCHEMA_VERSION,
             "created": _now().isoformat(), "created_by": f"fp {_tool_version()}"},
            target,
        )

    # -- tables -----------------------------------------------------------------------

    def curves_table(self) -> pa.Table:
        """The ``curves`` table (empty when the bank is new)."""
        self._check_version()
        return self._read(CURVES_FILE, CURVES_SCHEMA)

    def baselines_table(self) -> pa.Table:
        """The ``baselines`` table (empty when the bank is new)."""
        self._check_version()
        return self._read(BASELINES_FILE, BASELINES_SCHEMA)

    def _read(self, name: str, schema: pa.Schema) -> pa.Table:
        """A table, read again only when its file changed (by modification time, size and
        inode: every write replaces the file) since this object last read it."""
        path = self.path / name
        try:
            st = path.stat()
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        known = self._tables.get(name)
        if stamp is not None and known is not None and known[0] == stamp:
            return known[1]
        table = store.read_table(path, schema)
        if stamp is not None:
            self._tables[name] = (stamp, table)
        return table

    def _tables_for_write(self) -> tuple[pa.Table, pa.Table]:
        """Both tables with any columns fp does not know, which a rewrite must keep."""
        self._check_version()
        return (store.read_table(self.path / CURVES_FILE, CURVES_SCHEMA, keep_unknown=True),
                store.read_table(self.path / BASELINES_FILE, BASELINES_SCHEMA,
                                 keep_unknown=True))

    def _log(self, op: str, before: tuple[pa.Table, pa.Table], after: tuple[pa.Table, pa.Table],
             details: dict[str, Any] | None = None) -> None:
        """Append the record of a change to the bank's log (under the lock, before the
        tables are replaced); a bank without a log first gets a ``start`` record."""
        old, new = _log_rows(*before), _log_rows(*after)
        if not (self.path / log.LOG_FILE).exists() and any(old.values()):
            log.append(self.path, "start", before={"curves": {}, "baselines": {}}, after=old,
                       details={"note": "the rows the bank held when its log was started"})
        log.append(self.path, op, before=old, after=new, details=details)

    def log_problems(self, ids: Iterable[str] | None = None) -> list[Problem]:
        """Rows (of ``ids``, default all) that do not match the bank's log, and breaks in its
        chain, as :class:`Problem` s (see :func:`refbank.log.check`)."""
        if not self.exists():
            return []
        wanted = None if ids is None else set(ids)
        found = log.check(log.read(self.path), log.rows_of(self.curves(), self.baselines()))
        out = []
        for ident, problem in found.problems:
            table, _, key = ident.partition(" ")
            if table in ("curves", "baselines"):
                if wanted is None or key in wanted:
                    out.append(Problem(table, key, f"{problem} (the bank's log)"))
            else:
                out.append(Problem("log", ident, problem))
        return out

    def log_head(self) -> dict[str, Any] | None:
        """``{"seq", "hash"}`` of the last record of the bank's log (None: no log yet)."""
        return log.head(self.path)

    def curves(self, **filters: Any) -> list[dict[str, Any]]:
        """Curve rows as dicts, optionally filtered by column equality.

        Args:
            **filters: column=value (or column=[values]), e.g. ``family="sd"``,
                ``baseline_id=bid``. ``None`` values are ignored.
        """
        return _to_rows(_filter(self.curves_table(), filters, "curves"))

    def get_curve(self, curve_id: str) -> dict[str, Any]:
        """One curve row by id.

        Raises:
            BankError: no such curve.
        """
        rows = self.curves(curve_id=curve_id)
        if not rows:
            raise BankError(
                f"no curve {curve_id!r} in the bank at {self.path}; list them with fp bank list"
            )
        return rows[0]

    def baselines(self) -> list[dict[str, Any]]:
        """Baseline rows as dicts."""
        return _to_rows(self.baselines_table())

    def get_baseline(self, name: str) -> dict[str, Any]:
        """One baseline row, by name or by id.

        Raises:
            BankError: no such baseline; the message lists the baselines there are.
        """
        rows = self.baselines()
        for row in rows:
            if row["name"] == name:
                return row
        for row in rows:
            if row["baseline_id"] == name:
                return row
        names = ", ".join(sorted(r["name"] for r in rows)) or "(none)"
        raise BankError(
            f"no baseline {name!r} in the bank at {self.path}; baselines there: {names}. "
            f"Build one with: fp baseline build NAME --train DIR --heldout DIR --encoder E"
        )

    def resolve_baseline(self, name: str | None = None) -> dict[str, Any]:
        """The baseline called ``name``; without a name, the bank's only baseline.

        Raises:
            BankError: no such baseline, none at all, or several and no name given.
        """
        if name:
            return self.get_baseline(name)
        rows = self.baselines()
        if len(rows) == 1:
            return rows[0]
        if not rows:
            raise BankError(
                f"the bank at {self.path} has no baselines; build one with: "
                f"fp baseline build NAME --train DIR --heldout DIR --encoder E"
            )
        names = ", ".join(sorted(r["name"] for r in rows))
        raise BankError(f"the bank at {self.path} has several baselines ({names}); "
                        f"choose one with --baseline NAME")

    def baseline_dir(self, baseline_id: str) -> Path:
        """Folder holding the engine's files of baseline ``baseline_id``."""
        check_name(baseline_id, "baseline id")
        return self.path / BASELINES_DIR / baseline_id

    # -- writes -----------------------------------------------------------------------

    def add_curves(self, rows: Iterable[dict[str, Any]], *,
                   allow_duplicate: bool = False) -> list[str]:
        """Append curve rows; return their ids.

        Each row gives at least ``model, family, encoder, weights_sha256, baseline_id,
        layers, values, n_images, manifest_sha256``; optional: ``curve_id`` (assigned if
        absent), ``checkpoint, source, notes, split`` (default ``enroll``), the parameter
        columns ``partitioner, distance, tau, pooling, seed``, ``params`` (a dict of every
        other parameter, stored as ``params_json``), ``fingerprints`` (a dict of fingerprint
        name to vector, stored as ``fingerprints_json``), ``tool_version`` and ``created``.

        A curve whose images are already enrolled against the same baseline (the same
        ``manifest_sha256``, or the same ``folder_manifest_sha256`` parameter: the folder it
        was cut from, or more than :data:`DUPLICATE_SHARE` of its images by content: the
        ``image_sha256`` parameter, whatever the files are called) is refused, under
        whatever model or family it comes: the same images twice would tip attribution
        towards the second name. Only SHA-256 digests are compared (curves imported
        without images have none).

        Args:
            rows: the curve rows.
            allow_duplicate: store such curves anyway; each then records the ids it
                repeats in its parameters (``duplicate_of``).

        Raises:
            InputError: a row misses a field, has an unknown one, or is inconsistent.
            BankError: a curve id exists already, the row's baseline is not in the bank
                or was built with another encoder, weights or layers, its images are
                enrolled already, or the bank is read-only.
        """
        prepared = [_prepare(row, CURVES_SCHEMA, _CURVE_REQUIRED, "curve") for row in rows]
        if not prepared:
            return []
        self.check_writable()
        with self._lock.hold():
            self._ensure_info()
            current = self._tables_for_write()[0]
            baselines = {b["baseline_id"]: b for b in self.baselines()}
            taken = set(current.column("curve_id").to_pylist())
            for row in prepared:
                if row.get("curve_id") is None:
                    row["curve_id"] = _fresh_id("c_", taken)
                elif row["curve_id"] in taken:
                    raise BankError(
                        f"curve id {row['curve_id']!r} is already in the bank at {self.path}; "
                        f"leave curve_id out to get a fresh one"
                    )
                check_name(row["curve_id"], "curve id")
                taken.add(row["curve_id"])
                self._check_against_baseline(row, baselines)
            known = current.select(["curve_id", "model", "family", "baseline_id",
                                    "manifest_sha256", "params_json"]).to_pylist()
            _warn_look_alikes(prepared, known)
            self._refuse_duplicates(prepared, known, baselines, allow_duplicate)
            for row in prepared:  # checked: now the rows' files, then the table naming them
                self._store_rows(row)
            new = _hashed_table(prepared, CURVES_SCHEMA)
            table = store.append_rows(current, new)
            base_table = self.baselines_table()
            self._log("add_curves", (current, base_table), (table, base_table))
            store.write_table(table, self.path / CURVES_FILE)
        return new.column("curve_id").to_pylist()

    def find_duplicates(self, rows: Iterable[dict[str, Any]],
                        existing: list[dict[str, Any]] | None = None
                        ) -> list[tuple[int, dict[str, Any]]]:
        """``(i, enrolled row)`` for each new row ``i`` whose images are enrolled already.

        When the match is by image content, the row returned is the enrolled curve that
        shares the most images with row ``i``, with ``shared_images``: ``{"n": images
        shared, "of": images of row i, "curve_ids": every curve sharing some}``.

        Args:
            rows: new curve rows (``baseline_id``, ``manifest_sha256``, and optionally
                ``params`` or ``params_json`` with ``folder_manifest_sha256`` and
                ``image_sha256``, the SHA-256 of each image).
            existing: the bank's curve rows (default: read now).
        """
        index: dict[tuple[str, str], dict[str, Any]] = {}
        by_image: dict[tuple[str, str], dict[str, Any]] = {}
        for row in self.curves() if existing is None else existing:
            for key in _image_keys(row):
                index.setdefault((row["baseline_id"], key), row)
            for sha in _image_hashes(row):
                by_image.setdefault((row["baseline_id"], sha), row)
        found = []
        for i, row in enumerate(rows):
            bid = row["baseline_id"]
            hit = next((index[(bid, k)] for k in _image_keys(row) if (bid, k) in index), None)
            if hit is None:
                hit = _shared_images(bid, _image_hashes(row), by_image)
            if hit is not None:
                found.append((i, hit))
        return found

    def _refuse_duplicates(self, rows: list[dict[str, Any]], existing: list[dict[str, Any]],
                           baselines: dict[str, dict], allow: bool) -> None:
        found = self.find_duplicates(rows, existing)
        if found and not allow:
            i, hit = found[0]
            base = baselines.get(hit["baseline_id"], {}).get("name", hit["baseline_id"])
            raise BankError(duplicate_message(f"curve {i + 1} of {len(rows)}", hit, base))
        for i, hit in found:
            params = json.loads(rows[i]["params_json"])
            repeats = (hit.get("shared_images") or {}).get("curve_ids", [hit["curve_id"]])
            params["duplicate_of"] = sorted({*params.get("duplicate_of", []), *repeats})
            rows[i]["params_json"] = canonical_json(params)

    def _check_against_baseline(self, row: dict[str, Any], baselines: dict[str, dict]) -> None:
        base = baselines.get(row["baseline_id"])
        if base is None:
            raise BankError(
                f"curve of model {row['model']!r} refers to baseline id {row['baseline_id']!r}, "
                f"which is not in the bank at {self.path}; add the baseline first "
                f"(fp baseline build), or enroll against one of: "
                f"{', '.join(sorted(b['name'] for b in baselines.values())) or '(none)'}"
            )
        for key in ("encoder", "weights_sha256", "layers"):
            mine, theirs = row[key], base[key]
            if key == "layers":
                mine, theirs = list(mine), list(theirs)
            if mine != theirs:
                raise BankError(
                    f"curve of model {row['model']!r} has {key} {row[key]!r} but its "
                    f"baseline {base['name']!r} has {theirs!r}; a curve must be measured "
                    f"with its baseline's encoder, weights and layers"
                )

    def remove_curves(self, ids: Iterable[str]) -> list[str]:
        """Remove curves by id; return the ids removed.

        Raises:
            BankError: an id is not in the bank (nothing is removed then), or the bank is
                read-only.
        """
        wanted = list(dict.fromkeys(ids))
        self.check_writable()
        with self._lock.hold():
            current = self._tables_for_write()[0]
            present = set(current.column("curve_id").to_pylist())
            missing = [i for i in wanted if i not in present]
            if missing:
                raise BankError(
                    f"no curve {', '.join(map(repr, missing))} in the bank at {self.path}; "
                    f"nothing removed. List curves with: fp bank list"
                )
            import pyarrow.compute as pc  # only where rows are filtered

            keep = pc.invert(pc.is_in(current.column("curve_id"), pa.array(wanted, pa.string())))
            table = current.filter(keep)
            base_table = self.baselines_table()
            self._log("remove_curves", (current, base_table), (table, base_table))
            store.write_table(table, self.path / CURVES_FILE)
            self._prune_rows(table)
        return wanted

    def add_baseline(self, row: dict[str, Any],
                     save: Callable[[Path], Any] | None = None,
                     files_from: str | os.PathLike[str] | None = None) -> str:
        """Add a baseline row and its engine files; return its id.

        Args:
            row: at least ``name, encoder, weights_sha256, layers, train_manifest_sha256,
                heldout_manifest_sha256``; optional ``baseline_id`` (the engine's id;
                assigned if absent), ``n_train, n_heldout``, the parameter columns,
                ``params`` (dict), ``notes``.
            save: called once as ``save(folder)`` with an existing empty folder, in which
                it writes the engine's files (e.g. ``baseline.save``).
            files_from: alternatively, a folder whose files are copied in.

        The files land in ``baselines/<baseline_id>/`` only once complete, and their
        hash is stored in ``files_sha256`` so that :meth:`verify` can check them.

        Raises:
            BankError: the name or id is taken, or the bank is read-only.
            InputError: the row is incomplete or a name is not allowed.
        """
        prepared = _prepare(row, BASELINES_SCHEMA, _BASELINE_REQUIRED, "baseline")
        check_name(prepared["name"], "baseline name")
        self.check_writable()
        with self._lock.hold():
            self._ensure_info()
            existing = self.baselines()
            ids = {b["baseline_id"] for b in existing}
            if prepared.get("baseline_id") is None:
                prepared["baseline_id"] = _fresh_id("b_", ids)
            bid = prepared["baseline_id"]
            check_name(bid, "baseline id")
            for b in existing:
                if b["name"] == prepared["name"]:
                    raise BankError(
                        f"a baseline named {b['name']!r} is already in the bank at {self.path}; "
                        f"choose another name, or remove it first: fp baseline remove {b['name']}"
                    )
            if bid in ids:
                raise BankError(f"baseline id {bid!r} is already in the bank at {self.path}")
            target = self.baseline_dir(bid)
            if target.exists():  # left over from a removal that was interrupted
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.temp_path(target.parent, bid)
            try:
                if files_from is not None:
                    shutil.copytree(files_from, tmp)
                else:
                    tmp.mkdir()
                    if save is not None:
                        save(tmp)
                prepared["files_sha256"] = tree_sha256(tmp)
                prepared["path"] = f"{BASELINES_DIR}/{bid}"
                store._commit(tmp, target)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise store.write_failed(target, exc) from None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            store.fsync_dir(target.parent)
            new = _hashed_table([prepared], BASELINES_SCHEMA)
            curves, current = self._tables_for_write()
            table = store.append_rows(current, new)
            self._log("add_baseline", (curves, current), (curves, table))
            store.write_table(table, self.path / BASELINES_FILE)
        return bid

    def remove_baseline(self, name: str, *, with_curves: bool = False) -> dict[str, Any]:
        """Remove a baseline (by name or id) and its files; return its row.

        Args:
            name: baseline name or id.
            with_curves: also remove the curves enrolled against it; without it, a
                baseline that still has curves is refused.

        Raises:
            BankError: no such baseline, or it still has curves, or the bank is read-only.
        """
        self.check_writable()
        with self._lock.hold():
            row = self.get_baseline(name)
            bid = row["baseline_id"]
            curves, table = self._tables_for_write()
            import pyarrow.compute as pc  # only where rows are filtered

            mine = pc.equal(curves.column("baseline_id"), bid)
            n = pc.sum(mine).as_py() or 0
            if n and not with_curves:
                raise BankError(
                    f"baseline {row['name']!r} still has {n} enrolled curve(s); remove them "
                    f"first (fp bank remove ID...) or pass --with-curves to remove them too"
                )
            kept_curves = curves.filter(pc.invert(mine))
            kept = table.filter(pc.not_equal(table.column("baseline_id"), bid))
            self._log("remove_baseline", (curves, table), (kept_curves, kept))
            if n:
                store.write_table(kept_curves, self.path / CURVES_FILE)
            store.write_table(kept, self.path / BASELINES_FILE)
            self._prune_rows(kept_curves)
            folder = self.baseline_dir(bid)
            if folder.exists():
                trash = store.temp_path(folder.parent, bid)
                store._commit(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
        return row

    # -- integrity --------------------------------------------------------------------

    def verify(self, key: str | os.PathLike[str] | None = None) -> VerifyReport:
        """Recompute every row hash and every baseline's file hash; check the log.

        Returns a report listing each row whose stored ``row_sha256`` no longer matches
        its content, duplicate ids, curves whose baseline is missing, baselines whose
        files are missing or changed, a break in the log's chain, and each row the log
        does not have, or has with another hash (:func:`refbank.log.check`). It never
        raises for such problems.

        Args:
            key: an Ed25519 public key (PEM file): every log record must then be signed
                by it (see :mod:`refbank.log`).

        Raises:
            BankError: there is no bank at this path (nothing to verify is not "OK"), or
                ``key`` is unreadable.
        """
        self.require()
        curves = self.curves()
        baselines = self.baselines()
        report = VerifyReport(str(self.path), self.schema_version, len(curves), len(baselines))
        add = report.problems.append
        report.problems.extend(modified_rows("curves", curves))
        seen: set[str] = set()
        for row in curves:
            cid = row["curve_id"]
            if cid in seen:
                add(Problem("curves", cid, "duplicate curve id"))
            seen.add(cid)
        known = {b["baseline_id"] for b in baselines}
        for row in curves:
            if row["baseline_id"] not in known:
                add(Problem("curves", row["curve_id"],
                            f"its baseline {row['baseline_id']!r} is not in the bank"))
        referenced: set[str] = set()
        for row in curves:
            for name, ref in _rows_refs(row):
                path = self.rows_path(ref)
                referenced.add(path.name)
                problem = _rows_file_problem(path, ref)
                if problem is not None:
                    add(Problem("curves", row["curve_id"], f"fingerprint {name!r}: {problem}"))
        names: set[str] = set()
        report.problems.extend(modified_rows("baselines", baselines))
        for row in baselines:
            bid = row["baseline_id"]
            if row["name"] in names:
                add(Problem("baselines", bid, f"duplicate baseline name {row['name']!r}"))
            names.add(row["name"])
            problem = self.baseline_files(row)[1]
            if problem is not None:
                add(problem)
        for file, schema in ((CURVES_FILE, CURVES_SCHEMA), (BASELINES_FILE, BASELINES_SCHEMA)):
            full = store.read_table(self.path / file, schema, keep_unknown=True)
            extra = full.column_names[len(schema.names):]
            if extra:
                report.warnings.append(
                    f"{file} holds column(s) fp does not know: {', '.join(extra)}; fp keeps "
                    f"them when it rewrites the table, but no row hash covers them")
        public = log.load_public_key(key) if key is not None else None
        found = log.check(log.read(self.path), log.rows_of(curves, baselines),
                          public_key=public)
        report.log_records, report.log_head = found.n_records, found.head
        report.problems.extend(Problem("log", ident, problem)
                               for ident, problem in found.problems)
        report.warnings.extend(found.notes)
        if public is not None:
            report.signed_by = log.key_id(public)
            if not found.n_records:
                add(Problem("log", LOG_NAME, "there is no log to check signatures of"))
        base_root = self.path / BASELINES_DIR
        if base_root.is_dir():
            for d in sorted(base_root.iterdir()):
                if d.is_dir() and not d.name.startswith(store.TMP_PREFIX) and d.name not in known:
                    report.warnings.append(f"folder {BASELINES_DIR}/{d.name} belongs to no "
                                           f"baseline row (safe to delete)")
        rows_root = self.path / ROWS_DIR
        if rows_root.is_dir():
            for p in sorted(rows_root.iterdir()):
                if p.name not in referenced and not p.name.startswith(store.TMP_PREFIX):
                    report.warnings.append(f"file {ROWS_DIR}/{p.name} belongs to no curve "
                                           f"(safe to delete)")
        return report

    # -- per-image rows ---------------------------------------------------------------

    def rows_path(self, ref: str) -> Path:
        """The file a rows reference (:data:`ROWS_REF_PREFIX`) names.

        Raises:
            InputError: ``ref`` is not such a reference.
        """
        if not isinstance(ref, str) or not _ROWS_REF_RE.match(ref):
            raise InputError(f"{str(ref)[:40]!r} is not a reference to stored rows "
                             f"({ROWS_REF_PREFIX}<sha256>)")
        return self.path / ROWS_DIR / f"{ref[len(ROWS_REF_PREFIX):]}{ROWS_EXT}"

    def rows_size(self, value: str) -> int:
        """How many float16 values a curve's stored rows hold (a reference: from its
        file's size, without reading it; packed rows in the row itself: decoded).

        Raises:
            BankError: the file is missing.
        """
        if value.startswith(PACKED_PREFIX):
            return len(decode_packed(value)) // 2
        path = self.rows_path(value)
        try:
            return path.stat().st_size // 2
        except OSError:
            raise BankError(_rows_missing(path)) from None

    def read_rows(self, value: str) -> np.ndarray:
        """A curve's stored per-image rows, their flat float16 values, from its file (whose
        SHA-256 is checked on every read) or from packed rows in the row itself.

        Raises:
            BankError: the file is missing, or is not the one the row names (changed).
        """
        if value.startswith(PACKED_PREFIX):
            return np.frombuffer(decode_packed(value), dtype="<f2").astype(np.float16)
        path = self.rows_path(value)
        try:
            data = path.read_bytes()
        except OSError:
            raise BankError(_rows_missing(path)) from None
        if hashlib.sha256(data).hexdigest() != value[len(ROWS_REF_PREFIX):] or len(data) % 2:
            raise BankError(f"the per-image rows file {path} was changed: its SHA-256 is not "
                            f"the one its curve names; nothing read from it. Run fp bank "
                            f"verify, then restore the bank from an export or enroll the "
                            f"curve again")
        return np.frombuffer(data, dtype="<f2").astype(np.float16)

    def _store_rows(self, row: dict[str, Any]) -> None:
        """Move the packed rows of a prepared curve row into files of their own (under the
        lock), leaving references in its fingerprints; a reference given must name a file
        the bank holds."""
        fps = json.loads(row["fingerprints_json"])
        changed = False
        for name, value in fps.items():
            if not isinstance(value, str):
                continue
            if value.startswith(PACKED_PREFIX):
                fps[name] = self._write_rows(decode_packed(value, f"fingerprint {name!r}"))
                changed = True
            else:
                problem = _rows_file_problem(self.rows_path(value), value)
                if problem is not None:
                    raise BankError(f"curve of model {row['model']!r}, fingerprint {name!r}: "
                                    f"{problem}; give the rows themselves (packed)")
        if changed:
            row["fingerprints_json"] = canonical_json(fps)

    def _write_rows(self, data: bytes) -> str:
        """Store rows' bytes as ``rows/<sha256>.f16`` (kept if already there, whole) and
        return their reference."""
        ref = ROWS_REF_PREFIX + hashlib.sha256(data).hexdigest()
        path = self.rows_path(ref)
        if _rows_file_problem(path, ref) is not None:
            store.write_bytes(data, path)
        return ref

    def _prune_rows(self, curves: pa.Table) -> None:
        """Delete the rows files no curve of ``curves`` names any more (under the lock)."""
        root = self.path / ROWS_DIR
        if not root.is_dir():
            return
        named = {self.rows_path(ref).name
                 for row in curves.select(["fingerprints_json"]).to_pylist()
                 for _name, ref in _rows_refs(row)}
        for p in root.iterdir():
            if p.name not in named and not p.name.startswith(store.TMP_PREFIX):
                p.unlink(missing_ok=True)

    def baseline_files(self, row: dict[str, Any]) -> tuple[dict[str, str], Problem | None]:
        """The SHA-256 of each file of a baseline, and the problem if they do not add up
        to its ``files_sha256`` (or its folder is missing)."""
        folder = self.path / row["path"]
        if not folder.is_dir():
            return {}, Problem("baselines", row["baseline_id"], f"folder {row['path']} is missing")
        hashes = file_hashes(folder)
        if listing_sha256(hashes) != row["files_sha256"]:
            return hashes, Problem("baselines", row["baseline_id"],
                                   f"files under {row['path']} were changed")
        return hashes, None

    # -- export / import --------------------------------------------------------------

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write the whole bank to one archive (``.tar``, or ``.tar.gz``/``.tgz``).

        The archive holds ``bank.json``, both tables, every baseline folder and
        ``SHA256SUMS`` (``sha256sum`` format) over all of them. Never overwrites.

        Raises:
            BankError: ``path`` exists, or the bank is empty.
        """
        from refbank.archive import write_archive

        target = Path(path).expanduser()
        if target.exists() or target.is_symlink():
            raise BankError(f"{target} exists already; export to a new file name")
        blocker = next((p for p in target.parents if p.exists() or p.is_symlink()), None)
        if blocker is not None and not blocker.is_dir():
            raise BankError(f"{target} lies under {blocker}, which is a file, not a folder; "
                            f"export to a file in a folder")
        if not self.exists():
            raise BankError(f"the bank at {self.path} is empty; there is nothing to export")
        # A bank this process cannot write is read under a shared lock: writers elsewhere
        # wait, and nothing is created in the bank.
        hold = self._lock.hold if self.writable() else self._lock.shared
        with hold():
            self._check_version()
            write_archive(self.path, target)
        return target

    def import_(self, path: str | os.PathLike[str], *,
                max_bytes: int | None = None) -> ImportReport:
        """Merge an archive written by :meth:`export` into this bank.

        The archive's listing and sizes are checked against its ``SHA256SUMS`` before
        anything is unpacked, at most ``max_bytes`` are unpacked (default
        :data:`refbank.archive.MAX_IMPORT_BYTES`, 64 GB) and each file's SHA-256 is
        checked as it is; every row's hash is checked before anything is written to the bank.
        Rows already present with the same id and hash are skipped; the same id with
        other content, or a baseline name taken by another baseline, is refused.

        Raises:
            BankError: the archive is damaged, modified, larger than ``max_bytes``, of a
                newer schema, or conflicts; or the bank is read-only.
        """
        from refbank.archive import MAX_IMPORT_BYTES, unpacked_archive

        source = Path(path).expanduser()
        report = ImportReport(str(source))
        self.check_writable()
        limit = MAX_IMPORT_BYTES if max_bytes is None else int(max_bytes)
        with unpacked_archive(source, limit) as folder:
            info = store.read_json(folder / INFO_FILE) or {}
            store.check_version(info.get("schema_version"), source)
            incoming = Bank(folder)
            check = incoming.verify()
            if not check.ok:
                details = "; ".join(f"{p.table} {p.id}: {p.problem}" for p in check.problems[:5])
                raise BankError(f"{source} failed verification ({details}); nothing imported")
            with self._lock.hold():
                self._ensure_info()
                self._merge(incoming, report)
        return report

    def _merge(self, incoming: Bank, report: ImportReport) -> None:
        mine_b = {b["baseline_id"]: b for b in self.baselines()}
        names = {b["name"]: b["baseline_id"] for b in mine_b.values()}
        new_b = []
        for row in incoming.baselines():
            bid = row["baseline_id"]
            if bid in mine_b:
                _same_or_conflict(mine_b[bid], row, "baseline", bid, self.path)
                report.skipped_baselines.append(bid)
            elif names.get(row["name"], bid) != bid:
                raise BankError(
                    f"the imported baseline {row['name']!r} ({bid}) has the name of another "
                    f"baseline in {self.path} ({names[row['name']]}); rename or remove that "
                    f"one first (fp baseline remove {row['name']}); nothing imported"
                )
            else:
                new_b.append(row)
        mine_c = {c["curve_id"]: c for c in self.curves()}
        new_c = []
        for row in incoming.curves():
            cid = row["curve_id"]
            if cid in mine_c:
                _same_or_conflict(mine_c[cid], row, "curve", cid, self.path)
                report.skipped_curves.append(cid)
            else:
                new_c.append(row)
        for row in new_c:  # files first: a row never points at a missing file
            for _name, ref in _rows_refs(row):
                if _rows_file_problem(self.rows_path(ref), ref) is not None:
                    store.write_bytes(incoming.rows_path(ref).read_bytes(), self.rows_path(ref))
        for row in new_b:
            target = self.baseline_dir(row["baseline_id"])
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.temp_path(target.parent, row["baseline_id"])
            shutil.copytree(incoming.path / row["path"], tmp)
            store._commit(tmp, target)
        mine_curves, mine_baselines = self._tables_for_write()
        all_b = store.append_rows(mine_baselines,
                                  pa.Table.from_pylist(new_b, schema=BASELINES_SCHEMA))
        all_c = store.append_rows(mine_curves, pa.Table.from_pylist(new_c, schema=CURVES_SCHEMA))
        if new_b or new_c:
            self._log("import", (mine_curves, mine_baselines), (all_c, all_b),
                      details={"source": report.source,
                               "source_log_head": incoming.log_head()})
        if new_b:
            store.write_table(all_b, self.path / BASELINES_FILE)
        if new_c:
            store.write_table(all_c, self.path / CURVES_FILE)
        report.added_baselines = [r["baseline_id"] for r in new_b]
        report.added_curves = [r["curve_id"] for r in new_c]


# -- helpers ----------------------------------------------------------------------------


def _log_rows(curves: pa.Table, baselines: pa.Table) -> log.Rows:
    """``{"curves": {id: row_sha256}, "baselines": {...}}`` of two tables."""
    def ids(table: pa.Table, key: str) -> dict[str, str]:
        return dict(zip(table.column(key).to_pylist(),
                        table.column(HASH_COLUMN).to_pylist(), strict=True))

    return {"curves": ids(curves, "curve_id"), "baselines": ids(baselines, "baseline_id")}


def _same_or_conflict(mine: dict, theirs: dict, what: str, ident: str, where: Path) -> None:
    if mine[HASH_COLUMN] != theirs[HASH_COLUMN]:
        raise BankError(
            f"{what} {ident!r} is in both banks with different content; remove it from "
            f"{where} first if the imported one should win; nothing imported"
        )


def modified_rows(table: str, rows: Iterable[dict[str, Any]]) -> list[Problem]:
    """A :class:`Problem` for each row whose ``row_sha256`` does not match its content."""
    key = "curve_id" if table == "curves" else "baseline_id"
    return [Problem(table, str(r.get(key)), "row hash does not match its content (modified)")
            for r in rows if row_hash(r) != r.get(HASH_COLUMN)]


def unverified_message(problems: list[Problem], where: Path) -> str:
    """The refusal to use rows or files that fail their hash, saying what to do."""
    shown = "; ".join(f"{p.table} {p.id}: {p.problem}" for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return (
        f"{len(problems)} bank row(s) or file(s) this answer needs fail their SHA-256 in "
        f"{where}: {shown}{more}. They were changed after fp wrote them: run fp bank verify, "
        f"restore the bank from an export (fp bank import), or pass --allow-unverified to "
        f"use them anyway (recorded in the answer)"
    )


_SHA_RE = re.compile(r"^(embeddings:)?[0-9a-f]{64}$")


def _image_keys(row: dict[str, Any]) -> list[str]:
    """What identifies a curve's images: its manifest, and the folder it was cut from."""
    keys = []
    if _SHA_RE.match(str(row.get("manifest_sha256") or "")):
        keys.append(row["manifest_sha256"])
    folder = str(curve_params(row, strict=False).get("folder_manifest_sha256") or "")
    if _SHA_RE.match(folder):
        keys.append("folder:" + folder)
    return keys


#: Largest share of a new curve's images (by content) that may be enrolled already
#: against the same baseline: an accident allows a few, a copy of a set many more.
DUPLICATE_SHARE = 0.05


def _image_hashes(row: dict[str, Any]) -> list[str]:
    """The SHA-256 of each image of a curve (its ``image_sha256`` parameter; [] if none)."""
    values = curve_params(row, strict=False).get("image_sha256")
    if not isinstance(values, list):
        return []
    return [v for v in values if isinstance(v, str) and _SHA_RE.match(v)]


def _shared_images(bid: str, hashes: list[str], by_image: dict[tuple[str, str], dict[str, Any]]
                   ) -> dict[str, Any] | None:
    """The enrolled curve sharing the most of ``hashes``, if more than the allowed share is
    enrolled already (see :data:`DUPLICATE_SHARE`)."""
    unique = set(hashes)
    if not unique:
        return None
    counts: dict[str, int] = {}
    rows: dict[str, dict[str, Any]] = {}
    for sha in unique:
        row = by_image.get((bid, sha))
        if row is not None:
            counts[row["curve_id"]] = counts.get(row["curve_id"], 0) + 1
            rows[row["curve_id"]] = row
    n = sum(counts.values())
    if n <= DUPLICATE_SHARE * len(unique):
        return None
    top = max(sorted(counts), key=lambda c: counts[c])
    return {**rows[top], "shared_images": {"n": n, "of": len(unique),
                                           "curve_ids": sorted(counts)}}


def duplicate_message(what: str, hit: dict[str, Any], baseline: str) -> str:
    """The refusal of images enrolled already as curve ``hit``, saying what to do."""
    shared = hit.get("shared_images")
    if shared:
        others = [c for c in shared["curve_ids"] if c != hit["curve_id"]]
        also = f" (and curve(s) {', '.join(others)})" if others else ""
        head = (f"{shared['n']} of the {shared['of']} images of {what} (more than "
                f"{DUPLICATE_SHARE:.0%}) are, by content, images enrolled against baseline "
                f"{baseline!r} as curve {hit['curve_id']} (model {hit['model']!r}, family "
                f"{hit['family']!r}){also}, whatever the files are called now")
    else:
        head = (f"the images of {what} are already enrolled against baseline {baseline!r} "
                f"as curve {hit['curve_id']} (model {hit['model']!r}, family "
                f"{hit['family']!r})")
    return (
        f"{head}: the same images under a second name would tip attribution towards it. "
        f"Remove that curve first (fp bank remove {hit['curve_id']}), or pass "
        f"--allow-duplicate if this is deliberate (the new curves record which ones they "
        f"repeat)"
    )


def check_name(value: Any, what: str) -> None:
    """Refuse a baseline name or id that is not 1-128 letters, digits, ``.``, ``_``, ``-``.

    Raises:
        InputError: it is not allowed (the message says what is).
    """
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InputError(
            f"{what} {value!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit"
        )


def check_labels(values: dict[str, Any]) -> None:
    """Refuse labels and free text a terminal could misread, before they are stored.

    Labels (``model, family, checkpoint, split``) are 1-128 characters without control or
    format characters (escape sequences, newlines, BEL, bidirectional overrides); free
    text (``source, notes``) is up to 4096 characters and may hold newlines and tabs.
    ``None`` values are skipped.

    Raises:
        InputError: a value is not a string, too long, or holds such characters.
    """
    for key, value in values.items():
        if value is None:
            continue
        text = key in TEXT_FIELDS
        limit = MAX_TEXT if text else MAX_LABEL
        shown = repr(value if not isinstance(value, str) or len(value) <= 60
                     else value[:60] + "...")
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{key} {shown} is not allowed: give a non-empty text")
        if len(value) > limit:
            raise InputError(f"{key} {shown} is {len(value)} characters long; at most "
                             f"{limit} are allowed")
        bad = sorted({c for c in value if unicodedata.category(c)[0] == "C"
                      and not (text and c in "\n\t")})
        if bad:
            raise InputError(
                f"{key} {shown} holds control or format characters "
                f"({', '.join(repr(c) for c in bad[:5])}); use printable text"
            )


def look_alike_key(name: str) -> str:
    """What a name looks like: compatibility-decomposed, accents and case dropped
    (``ROTATE``, ``rotaté`` and ``ｒｏｔａｔｅ`` all give ``rotate``)."""
    decomposed = unicodedata.normalize("NFKD", name)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _warn_look_alikes(new: list[dict[str, Any]], known: list[dict[str, Any]]) -> None:
    """Warn when a new family or model differs from an enrolled one only in case, accents
    or look-alike characters: two names that print alike split one generator in two."""
    import warnings

    from forensics.errors import FpWarning

    for key in ("family", "model"):
        seen: dict[str, set[str]] = {}
        for row in known:
            seen.setdefault(look_alike_key(row[key]), set()).add(row[key])
        for name in sorted({r[key] for r in new}):
            alike = sorted(seen.get(look_alike_key(name), set()) - {name})
            if alike:
                warnings.warn(
                    f"{key} {name!r} looks like the enrolled {key} "
                    f"{', '.join(repr(a) for a in alike)} (they differ only in case, accents "
                    f"or look-alike characters) but is another name: if they are the same, "
                    f"enroll under one spelling", FpWarning, stacklevel=3)


def _fresh_id(prefix: str, taken: set[str]) -> str:
    while True:
        ident = prefix + secrets.token_hex(6)
        if ident not in taken:
            return ident


def _prepare(row: dict[str, Any], schema: pa.Schema, required: tuple[str, ...],
             what: str) -> dict[str, Any]:
    """Validate a user row and fill defaults; the hash is added later."""
    if not isinstance(row, dict):
        raise InputError(f"a {what} row must be a dict, got {type(row).__name__}")
    allowed = set(schema.names) - {HASH_COLUMN, "params_json", "fingerprints_json",
                                   "files_sha256", "path"}
    allowed |= {"params"} | ({"fingerprints"} if "fingerprints_json" in schema.names else set())
    unknown = sorted(set(row) - allowed)
    if unknown:
        raise InputError(
            f"unknown {what} field(s) {', '.join(unknown)}; valid fields: "
            f"{', '.join(sorted(allowed))}"
        )
    missing = [k for k in required if row.get(k) is None]
    if missing:
        raise InputError(f"{what} row misses required field(s): {', '.join(missing)}")
    out = {k: v for k, v in row.items() if k not in ("params", "fingerprints")}
    if "fingerprints_json" in schema.names:
        out["fingerprints_json"] = canonical_json(_fingerprints(row.get("fingerprints"), what))
    params = dict(row.get("params") or {})
    for key in PARAM_COLUMNS:  # a parameter given in params fills its column
        if out.get(key) is None and params.get(key) is not None:
            out[key] = params[key]
        params.pop(key, None)
    out["params_json"] = canonical_json(params)
    layers = [str(x) for x in out["layers"]]
    if not layers:
        raise InputError(f"{what} row has no layers")
    out["layers"] = layers
    for key in ("name", "model", "family"):
        if key in required and (not isinstance(out[key], str) or not out[key].strip()):
            raise InputError(f"{what} field {key!r} must be a non-empty string")
    for key in LABEL_FIELDS:  # one spelling per name: rotat\u00e9 and rotate\u0301 are one
        if isinstance(out.get(key), str):
            out[key] = unicodedata.normalize("NFC", out[key])
    check_labels({k: out.get(k) for k in (*LABEL_FIELDS, *TEXT_FIELDS) if k in schema.names})
    if "values" in out:
        values = [float(v) for v in _tolist(out["values"])]
        if len(values) != len(layers):
            raise InputError(
                f"{what} row has {len(values)} values for {len(layers)} layers; "
                f"give one value per layer"
            )
        out["values"] = values
    if "n_images" in out and int(out["n_images"]) < 1:
        raise InputError(f"{what} row has n_images={out['n_images']}; it must be at least 1")
    if what == "curve" and out.get("split") is None:
        out["split"] = "enroll"
    if not out.get("tool_version"):
        out["tool_version"] = _tool_version()
    if out.get("created") is None:
        out["created"] = _now()
    elif isinstance(out["created"], str):
        out["created"] = datetime.fromisoformat(out["created"].replace("Z", "+00:00"))
    return out


def _fingerprints(value: Any, what: str) -> dict[str, Any]:
    """``{name: [floats]}`` from a row's ``fingerprints`` (None: none); packed per-image rows
    stay the string they are."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{what} field 'fingerprints' must map names to vectors")
    out: dict[str, Any] = {}
    for name, vec in value.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"{what} fingerprint names must be non-empty strings")
        if isinstance(vec, str):  # packed per-image rows (forensics.stats.belonging)
            if not (vec.startswith(PACKED_PREFIX) or _ROWS_REF_RE.match(vec)):
                raise InputError(f"{what} fingerprint {name!r}: a string value must be packed "
                                 f"rows ({PACKED_PREFIX}...) or a reference to stored rows "
                                 f"({ROWS_REF_PREFIX}<sha256>)")
            out[name] = vec
            continue
        try:
            out[name] = [float(v) for v in _tolist(vec)]
        except (TypeError, ValueError):
            raise InputError(f"{what} fingerprint {name!r} must be a vector of numbers") from None
    return out


def decode_packed(value: str, what: str = "stored per-image rows") -> bytes:
    """The float16 bytes of packed rows (:data:`PACKED_PREFIX`).

    Raises:
        InputError: not packed rows, not base64, or an odd number of bytes.
    """
    if not value.startswith(PACKED_PREFIX):
        raise InputError(f"{what} must start with {PACKED_PREFIX!r}; run fp bank verify")
    import base64

    try:
        raw = base64.b64decode(value[len(PACKED_PREFIX):].encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise InputError(f"{what} are not valid base64; run fp bank verify") from None
    if len(raw) % 2:
        raise InputError(f"{what} have an odd number of bytes; run fp bank verify")
    return raw


def _rows_refs(row: dict[str, Any]) -> list[tuple[str, str]]:
    """``(fingerprint name, reference)`` of each rows file a curve row names (none where
    its ``fingerprints_json`` is unreadable: :meth:`Bank.verify` reports that row)."""
    try:
        data = json.loads(row.get("fingerprints_json") or "{}")
    except ValueError:
        return []
    return [(str(k), v) for k, v in data.items() if isinstance(v, str) and _ROWS_REF_RE.match(v)] \
        if isinstance(data, dict) else []


def _rows_missing(path: Path) -> str:
    return (f"the per-image rows file {path} is missing; run fp bank verify, then restore "
            f"the bank from an export (fp bank import) or enroll the curve again")


def _rows_file_problem(path: Path, ref: str) -> str | None:
    """Why the rows file at ``path`` is not the one ``ref`` names (None: it is)."""
    if not path.is_file():
        return f"its rows file {ROWS_DIR}/{path.name} is missing"
    if file_sha256(path) != ref[len(ROWS_REF_PREFIX):]:
        return f"its rows file {ROWS_DIR}/{path.name} was changed"
    return None


def curve_params(row: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """A curve row's parameters: ``params`` of a row about to be stored, or its stored
    ``params_json`` (``{}`` when none).

    Raises:
        BankError: unreadable ``params_json`` (with ``strict=False``: ``{}`` instead).
    """
    if isinstance(row.get("params"), dict):
        return row["params"]
    try:
        params = json.loads(row.get("params_json") or "{}")
    except ValueError:
        if not strict:
            return {}
        raise BankError(f"curve {row.get('curve_id')!r} has unreadable params_json; "
                        f"run fp bank verify") from None
    return params if isinstance(params, dict) or strict else {}


def curve_fingerprints(row: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint vectors stored with a curve row (``{}`` when none).

    Non-finite values, stored as ``"NaN"``/``"Infinity"`` in the canonical JSON, come back
    as floats; per-image rows (a string: a reference to their file, :data:`ROWS_REF_PREFIX`,
    or packed rows, :data:`PACKED_PREFIX`) come back as stored (read them with
    :meth:`Bank.read_rows`).
    """
    text = row.get("fingerprints_json") or "{}"
    try:
        data = json.loads(text)
    except ValueError:
        raise BankError(f"curve {row.get('curve_id')!r} has unreadable fingerprints_json; "
                        f"run fp bank verify") from None
    return {str(k): vec if isinstance(vec, str) else [float(v) for v in vec]
            for k, vec in data.items()}


def _tolist(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _hashed_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Arrow table of ``rows`` with ``row_sha256`` computed from what Parquet will hold."""
    body = schema.remove(schema.get_field_index(HASH_COLUMN))
    try:
        table = pa.Table.from_pylist(
            [{k: r.get(k) for k in body.names} for r in rows], schema=body
        )
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise InputError(f"a row does not fit the bank schema: {exc}") from None
    hashes = [row_hash(r) for r in table.to_pylist()]
    table = table.append_column(schema.field(HASH_COLUMN), pa.array(hashes, pa.string()))
    return table.replace_schema_metadata(schema.metadata)


def _to_rows(table: pa.Table) -> list[dict[str, Any]]:
    """``table.to_pylist()``, with time stamps converted here: pyarrow converts a zoned
    time stamp by importing pandas, half a second for every command that reads the bank.
    The values are the same (``datetime`` in the column's zone, ``ZoneInfo``)."""
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    columns = []
    for spec, column in zip(table.schema, table.columns, strict=True):
        t = spec.type
        if pa.types.is_timestamp(t) and t.tz is not None:
            per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[t.unit]
            epoch = datetime(1970, 1, 1, tzinfo=ZoneInfo(t.tz))
            ints = [v for chunk in column.chunks for v in chunk.view(pa.int64()).to_pylist()]
            # datetime holds microseconds (nanoseconds are floored, as pyarrow does)
            columns.append([None if v is None else
                            epoch + timedelta(microseconds=v * 10**6 // per_second)
                            for v in ints])
        else:
            columns.append(column.to_pylist())
    names = table.column_names
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)] \
        if columns else [{} for _ in range(table.num_rows)]


def _filter(table: pa.Table, filters: dict[str, Any], what: str) -> pa.Table:
    if all(v is None for v in filters.values()):
        return table
    import pyarrow.compute as pc  # a quarter of a second to import: only where filtered

    for key, value in filters.items():
        if value is None:
            continue
        if key not in table.column_names:
            raise InputError(
                f"cannot filter {what} by {key!r}; columns: {', '.join(table.column_names)}"
            )
        if isinstance(value, list | tuple | set):
            mask = pc.is_in(table.column(key), pa.array(list(value)))
        else:
            mask = pc.equal(table.column(key), value)
        table = table.filter(mask)
    return table


def rows_to_json(rows: Any) -> str:
    """Bank rows (or any structure of them) as strict JSON: datetimes in ISO 8601 and
    non-finite floats as ``null``."""
    return json.dumps(jsonable(rows), indent=2, allow_nan=False)
