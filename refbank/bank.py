"""The reference bank: enrolled curves and the baselines they were measured against.

>>> bank = Bank("/tmp/my-bank")                                 # doctest: +SKIP
>>> bank_id = bank.add_baseline(row, save=baseline.save)        # doctest: +SKIP
>>> ids = bank.add_curves([curve_row, ...])                     # doctest: +SKIP
>>> bank.curves(family="sd")                                    # doctest: +SKIP

Every change holds the bank's inter-process lock and replaces whole files atomically
(see :mod:`refbank.store`); reads take no lock and see a complete snapshot of each file.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from forensics.errors import BankError, InputError
from refbank import store
from refbank.hashing import canonical_json, row_hash, tree_sha256
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
BASELINES_DIR = "baselines"
FORMAT = "fp reference bank"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_CURVE_REQUIRED = ("model", "family", "encoder", "weights_sha256", "baseline_id", "layers",
                   "values", "n_images", "manifest_sha256")
_BASELINE_REQUIRED = ("name", "encoder", "weights_sha256", "layers", "train_manifest_sha256",
                      "heldout_manifest_sha256")


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

    @property
    def ok(self) -> bool:
        """True when no row or file failed its check."""
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
        if self.path.exists() and not self.path.is_dir():
            raise BankError(f"the bank path {self.path} is a file; give a folder (--bank DIR)")
        self._lock = store.BankLock(self.path, lock_timeout)

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
        return store.read_table(self.path / CURVES_FILE, CURVES_SCHEMA)

    def baselines_table(self) -> pa.Table:
        """The ``baselines`` table (empty when the bank is new)."""
        self._check_version()
        return store.read_table(self.path / BASELINES_FILE, BASELINES_SCHEMA)

    def curves(self, **filters: Any) -> list[dict[str, Any]]:
        """Curve rows as dicts, optionally filtered by column equality.

        Args:
            **filters: column=value (or column=[values]), e.g. ``family="sd"``,
                ``baseline_id=bid``. ``None`` values are ignored.
        """
        return _filter(self.curves_table(), filters, "curves").to_pylist()

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
        return self.baselines_table().to_pylist()

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
        _check_name(baseline_id, "baseline id")
        return self.path / BASELINES_DIR / baseline_id

    # -- writes -----------------------------------------------------------------------

    def add_curves(self, rows: Iterable[dict[str, Any]]) -> list[str]:
        """Append curve rows; return their ids.

        Each row gives at least ``model, family, encoder, weights_sha256, baseline_id,
        layers, values, n_images, manifest_sha256``; optional: ``curve_id`` (assigned if
        absent), ``checkpoint, source, notes, split`` (default ``enroll``), the parameter
        columns ``partitioner, distance, tau, pooling, seed``, ``params`` (a dict of every
        other parameter, stored as ``params_json``), ``fingerprints`` (a dict of fingerprint
        name to vector, stored as ``fingerprints_json``), ``tool_version`` and ``created``.

        Raises:
            InputError: a row misses a field, has an unknown one, or is inconsistent.
            BankError: a curve id exists already, or the row's baseline is not in the bank
                or was built with another encoder, weights or layers.
        """
        prepared = [_prepare(row, CURVES_SCHEMA, _CURVE_REQUIRED, "curve") for row in rows]
        if not prepared:
            return []
        with self._lock.hold():
            self._ensure_info()
            current = self.curves_table()
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
                _check_name(row["curve_id"], "curve id")
                taken.add(row["curve_id"])
                self._check_against_baseline(row, baselines)
            new = _hashed_table(prepared, CURVES_SCHEMA)
            store.write_table(pa.concat_tables([current, new]), self.path / CURVES_FILE)
        return new.column("curve_id").to_pylist()

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
            BankError: an id is not in the bank (nothing is removed then).
        """
        wanted = list(dict.fromkeys(ids))
        with self._lock.hold():
            current = self.curves_table()
            present = set(current.column("curve_id").to_pylist())
            missing = [i for i in wanted if i not in present]
            if missing:
                raise BankError(
                    f"no curve {', '.join(map(repr, missing))} in the bank at {self.path}; "
                    f"nothing removed. List curves with: fp bank list"
                )
            keep = pc.invert(pc.is_in(current.column("curve_id"), pa.array(wanted, pa.string())))
            store.write_table(current.filter(keep), self.path / CURVES_FILE)
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
            BankError: the name or id is taken.
            InputError: the row is incomplete or a name is not allowed.
        """
        prepared = _prepare(row, BASELINES_SCHEMA, _BASELINE_REQUIRED, "baseline")
        _check_name(prepared["name"], "baseline name")
        with self._lock.hold():
            self._ensure_info()
            existing = self.baselines()
            ids = {b["baseline_id"] for b in existing}
            if prepared.get("baseline_id") is None:
                prepared["baseline_id"] = _fresh_id("b_", ids)
            bid = prepared["baseline_id"]
            _check_name(bid, "baseline id")
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
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            store.fsync_dir(target.parent)
            new = _hashed_table([prepared], BASELINES_SCHEMA)
            current = self.baselines_table()
            store.write_table(pa.concat_tables([current, new]), self.path / BASELINES_FILE)
        return bid

    def remove_baseline(self, name: str, *, with_curves: bool = False) -> dict[str, Any]:
        """Remove a baseline (by name or id) and its files; return its row.

        Args:
            name: baseline name or id.
            with_curves: also remove the curves enrolled against it; without it, a
                baseline that still has curves is refused.

        Raises:
            BankError: no such baseline, or it still has curves.
        """
        with self._lock.hold():
            row = self.get_baseline(name)
            bid = row["baseline_id"]
            curves = self.curves_table()
            mine = pc.equal(curves.column("baseline_id"), bid)
            n = pc.sum(mine).as_py() or 0
            if n and not with_curves:
                raise BankError(
                    f"baseline {row['name']!r} still has {n} enrolled curve(s); remove them "
                    f"first (fp bank remove ID...) or pass --with-curves to remove them too"
                )
            if n:
                store.write_table(curves.filter(pc.invert(mine)), self.path / CURVES_FILE)
            table = self.baselines_table()
            keep = pc.not_equal(table.column("baseline_id"), bid)
            store.write_table(table.filter(keep), self.path / BASELINES_FILE)
            folder = self.baseline_dir(bid)
            if folder.exists():
                trash = store.temp_path(folder.parent, bid)
                store._commit(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
        return row

    # -- integrity --------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Recompute every row hash and every baseline's file hash.

        Returns a report listing each row whose stored ``row_sha256`` no longer matches
        its content, duplicate ids, curves whose baseline is missing, and baselines whose
        files are missing or changed. It never raises for such problems.
        """
        curves = self.curves()
        baselines = self.baselines()
        report = VerifyReport(str(self.path), self.schema_version, len(curves), len(baselines))
        add = report.problems.append
        seen: set[str] = set()
        for row in curves:
            cid = row["curve_id"]
            if row_hash(row) != row[HASH_COLUMN]:
                add(Problem("curves", cid, "row hash does not match its content (modified)"))
            if cid in seen:
                add(Problem("curves", cid, "duplicate curve id"))
            seen.add(cid)
        known = {b["baseline_id"] for b in baselines}
        for row in curves:
            if row["baseline_id"] not in known:
                add(Problem("curves", row["curve_id"],
                            f"its baseline {row['baseline_id']!r} is not in the bank"))
        names: set[str] = set()
        for row in baselines:
            bid = row["baseline_id"]
            if row_hash(row) != row[HASH_COLUMN]:
                add(Problem("baselines", bid, "row hash does not match its content (modified)"))
            if row["name"] in names:
                add(Problem("baselines", bid, f"duplicate baseline name {row['name']!r}"))
            names.add(row["name"])
            folder = self.path / row["path"]
            if not folder.is_dir():
                add(Problem("baselines", bid, f"folder {row['path']} is missing"))
            elif tree_sha256(folder) != row["files_sha256"]:
                add(Problem("baselines", bid, f"files under {row['path']} were changed"))
        base_root = self.path / BASELINES_DIR
        if base_root.is_dir():
            for d in sorted(base_root.iterdir()):
                if d.is_dir() and not d.name.startswith(store.TMP_PREFIX) and d.name not in known:
                    report.warnings.append(f"folder {BASELINES_DIR}/{d.name} belongs to no "
                                           f"baseline row (safe to delete)")
        return report

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
        if target.exists():
            raise BankError(f"{target} exists already; export to a new file name")
        if not self.exists():
            raise BankError(f"the bank at {self.path} is empty; there is nothing to export")
        with self._lock.hold():
            self._check_version()
            write_archive(self.path, target)
        return target

    def import_(self, path: str | os.PathLike[str]) -> ImportReport:
        """Merge an archive written by :meth:`export` into this bank.

        Every file's SHA-256 and every row's hash is checked before anything is written.
        Rows already present with the same id and hash are skipped; the same id with
        other content, or a baseline name taken by another baseline, is refused.

        Raises:
            BankError: the archive is damaged, modified, of a newer schema, or conflicts.
        """
        from refbank.archive import unpacked_archive

        source = Path(path).expanduser()
        report = ImportReport(str(source))
        with unpacked_archive(source) as folder:
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
        for row in new_b:  # files first: a row never points at a missing folder
            target = self.baseline_dir(row["baseline_id"])
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.temp_path(target.parent, row["baseline_id"])
            shutil.copytree(incoming.path / row["path"], tmp)
            store._commit(tmp, target)
        if new_b:
            table = pa.Table.from_pylist(new_b, schema=BASELINES_SCHEMA)
            store.write_table(pa.concat_tables([self.baselines_table(), table]),
                              self.path / BASELINES_FILE)
        if new_c:
            table = pa.Table.from_pylist(new_c, schema=CURVES_SCHEMA)
            store.write_table(pa.concat_tables([self.curves_table(), table]),
                              self.path / CURVES_FILE)
        report.added_baselines = [r["baseline_id"] for r in new_b]
        report.added_curves = [r["curve_id"] for r in new_c]


# -- helpers ----------------------------------------------------------------------------


def _same_or_conflict(mine: dict, theirs: dict, what: str, ident: str, where: Path) -> None:
    if mine[HASH_COLUMN] != theirs[HASH_COLUMN]:
        raise BankError(
            f"{what} {ident!r} is in both banks with different content; remove it from "
            f"{where} first if the imported one should win; nothing imported"
        )


def _check_name(value: Any, what: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InputError(
            f"{what} {value!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit"
        )


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


def _fingerprints(value: Any, what: str) -> dict[str, list[float]]:
    """``{name: [floats]}`` from a row's ``fingerprints`` (None: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{what} field 'fingerprints' must map names to vectors")
    out = {}
    for name, vec in value.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"{what} fingerprint names must be non-empty strings")
        try:
            out[name] = [float(v) for v in _tolist(vec)]
        except (TypeError, ValueError):
            raise InputError(f"{what} fingerprint {name!r} must be a vector of numbers") from None
    return out


def curve_fingerprints(row: dict[str, Any]) -> dict[str, list[float]]:
    """The fingerprint vectors stored with a curve row (``{}`` when none).

    Non-finite values, stored as ``"NaN"``/``"Infinity"`` in the canonical JSON, come back
    as floats.
    """
    text = row.get("fingerprints_json") or "{}"
    try:
        data = json.loads(text)
    except ValueError:
        raise BankError(f"curve {row.get('curve_id')!r} has unreadable fingerprints_json; "
                        f"run fp bank verify") from None
    return {str(k): [float(v) for v in vec] for k, vec in data.items()}


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


def _filter(table: pa.Table, filters: dict[str, Any], what: str) -> pa.Table:
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


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def rows_to_json(rows: Any) -> str:
    """Bank rows (or any structure of them) as strict JSON: datetimes in ISO 8601 and
    non-finite floats as ``null``."""
    return json.dumps(_plain(rows), indent=2, allow_nan=False)
