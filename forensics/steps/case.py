"""Chain of custody: what an attribution answer rests on, recorded and re-checked.

:func:`custody_record` lists, for the JSON answer of ``fp attribute``, every suspect file
(relative path, size, SHA-256), the files skipped and why, every bank row matched against
with its row hash, the baseline's row hash and the SHA-256 of each of its files, fp's
version, and the rows or files that ``--allow-unverified`` let through.

:func:`verify_case` (``fp case verify REPORT_DIR``) re-checks such a record against the
images and the bank as they are now, and lists every difference::

    check = verify_case("report/")                 # images and bank where the report says
    check.ok, [c.to_dict() for c in check.changes]

Nothing is recomputed: files and rows are compared by their SHA-256, so a check takes
the time of reading the images and the baseline's files once. The answer itself is checked
against the ``SHA256SUMS`` written with the report, its fields against the answer's schema
(a missing field is a failure), and the bank's log against the head the answer recorded
(see :mod:`refbank.log`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forensics.errors import InputError

#: Version of the ``custody`` record in an answer's provenance.
CUSTODY_VERSION = 1
#: File of a ``--report`` folder that holds the answer.
REPORT_JSON = "attribution.json"


def custody_record(*, bank: Any, loaded: Any, manifest: Any, folder: str | None,
                   rows: list[dict[str, Any]], unverified: list[dict[str, str]]
                   ) -> dict[str, Any]:
    """What an answer rests on, as a JSON-ready dict (``provenance.custody``).

    Args:
        bank: the :class:`refbank.Bank` answered from.
        loaded: the :class:`~forensics.steps.bank_access.LoadedBaseline` measured against.
        manifest: the suspect images' :class:`~forensics.data.images.Manifest` (None for
            embeddings given directly).
        folder: the suspect folder (absolute), if any.
        rows: the bank's curve rows the suspect was matched against.
        unverified: problems of rows or files used although they fail their hash.
    """
    from forensics._version import __version__

    files, skipped = [], []
    if manifest is not None:
        files = [{"path": e.relpath, "size": int(e.size), "sha256": e.sha256}
                 for e in manifest.entries]
        skipped = [{"path": s.relpath, "reason": s.reason} for s in manifest.skipped]
    row = loaded.row
    return {
        "version": CUSTODY_VERSION,
        "fp_version": __version__,
        "inputs": {"folder": folder, "manifest_sha256": None if manifest is None
                   else manifest.sha256, "files": files, "skipped": skipped},
        "bank": {"path": str(Path(bank.path).resolve()),
                 "log_head": bank.log_head(),
                 "curves": [{"curve_id": r["curve_id"], "row_sha256": r["row_sha256"],
                             "model": r["model"], "family": r["family"]} for r in rows]},
        "baseline": {"id": row["baseline_id"], "name": row["name"],
                     "row_sha256": row["row_sha256"], "files_sha256": row["files_sha256"],
                     "files": dict(loaded.files)},
        "unverified": list(unverified),
    }


@dataclass(frozen=True)
class Change:
    """One difference between a report and what is there now.

    ``kind`` is ``report`` (the report's own files against its ``SHA256SUMS``), ``image``,
    ``baseline``, ``baseline_file``, ``curve`` or ``bank_log``; ``change`` is ``removed``,
    ``changed``, ``added``, ``unverified`` (its content no longer matches its own hash, or
    the log) or ``rewritten`` (the bank's history before the answer was rewritten).
    """

    kind: str
    id: str
    change: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class CaseCheck:
    """What :func:`verify_case` found; ``ok`` when ``changes`` is empty."""

    report: str
    images: str | None
    bank: str
    n_images: int
    n_curves: int
    n_baseline_files: int
    changes: list[Change] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when images, baseline and curves are as the report recorded them."""
        return not self.changes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["changes"] = [c.to_dict() for c in self.changes]
        return {"ok": self.ok, **d}


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The answer in a ``--report`` folder (or an ``attribution.json`` file).

    Raises:
        InputError: no such report, unreadable JSON, or an answer without a custody
            record (written before fp 0.2).
    """
    p = Path(path).expanduser()
    file = p / REPORT_JSON if p.is_dir() else p
    if not file.is_file():
        raise InputError(f"no report at {path}: give the folder written by fp attribute "
                         f"--report DIR (it holds {REPORT_JSON})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {file} as an fp answer ({exc})") from None
    provenance = data.get("provenance") if isinstance(data, dict) else None
    custody = provenance.get("custody") if isinstance(provenance, dict) else None
    if not isinstance(custody, dict) or custody.get("version") != CUSTODY_VERSION:
        raise InputError(f"{file} has no custody record of version {CUSTODY_VERSION}; it was "
                         f"not written by fp attribute of this release: attribute again")
    problems = schema_problems(data)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InputError(f"{file} is not a valid fp answer: {'; '.join(problems[:5])}{more}. "
                         f"It was edited or damaged; nothing in it can be checked")
    return data


_HEX64 = r"^[0-9a-f]{64}$"
# The answer's fields a check reads, and their types: a missing or mistyped one is a failure.
# "str?" may be null; {"*": spec} is a mapping of any keys; [spec] a list.
_ENTRY = {"path": "str", "size": "int", "sha256": "sha"}
_CUSTODY_SPEC: dict[str, Any] = {
    "version": "int", "fp_version": "str",
    "inputs": {"folder": "str?", "manifest_sha256": "str?", "files": [_ENTRY],
               "skipped": [{"path": "str", "reason": "str"}]},
    "bank": {"path": "str", "log_head": "head?",
             "curves": [{"curve_id": "str", "row_sha256": "sha", "model": "str",
                         "family": "str"}]},
    "baseline": {"id": "str", "name": "str", "row_sha256": "sha", "files_sha256": "sha",
                 "files": {"*": "sha"}},
    "unverified": [{"*": "str"}],
}
_ANSWER_SPEC: dict[str, Any] = {
    "decision": {"family": "str?", "model": "str?", "unknown": "bool"},
    "ranking": [{"curve_id": "str", "family": "str", "model": "str"}],
    "provenance": {"custody": _CUSTODY_SPEC, "attribution": {"*": "any"}},
}


def schema_problems(data: Any) -> list[str]:
    """Every field of an answer (``attribution.json``) that is missing or of the wrong type.

    Only the fields :func:`verify_case` reads, and the decision, are checked; a report
    whose custody record lacks a field cannot be checked, and that is a failure.
    """
    import re

    out: list[str] = []

    def walk(value: Any, spec: Any, where: str) -> None:
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                out.append(f"{where or 'the answer'} must be an object, got "
                           f"{type(value).__name__}")
                return
            if "*" in spec:
                for k, v in value.items():
                    walk(v, spec["*"], f"{where}.{k}")
                return
            for k, sub in spec.items():
                if k not in value:
                    if not (isinstance(sub, str) and sub.endswith("?")):
                        out.append(f"{where}.{k} is missing".lstrip("."))
                    continue
                walk(value[k], sub, f"{where}.{k}".lstrip("."))
            return
        if isinstance(spec, list):
            if not isinstance(value, list):
                out.append(f"{where} must be a list, got {type(value).__name__}")
                return
            for i, v in enumerate(value):
                walk(v, spec[0], f"{where}[{i}]")
            return
        kind = spec.rstrip("?")
        if value is None:
            if not spec.endswith("?") and kind != "any":
                out.append(f"{where} is null")
            return
        ok = {"any": True, "str": isinstance(value, str), "bool": isinstance(value, bool),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "sha": isinstance(value, str) and re.match(_HEX64, value) is not None,
              "head": isinstance(value, dict) and isinstance(value.get("seq"), int)
              and isinstance(value.get("hash"), str)}[kind]
        if not ok:
            out.append(f"{where} must be {_KIND_WORDS[kind]}, got {value!r:.40}")

    walk(data, _ANSWER_SPEC, "")
    custody = ((data.get("provenance") or {}).get("custody") or {}) \
        if isinstance(data, dict) and isinstance(data.get("provenance"), dict) else {}
    inputs = custody.get("inputs") if isinstance(custody, dict) else None
    if isinstance(inputs, dict) and inputs.get("folder") is None and (
            inputs.get("files") or inputs.get("manifest_sha256") is not None):
        out.append("provenance.custody.inputs.folder is null although the answer rests on "
                   "image files")
    return out


_KIND_WORDS = {"str": "a text", "int": "a whole number", "bool": "true or false",
               "sha": "a SHA-256 (64 hex digits)", "head": "a log head {seq, hash}",
               "any": "anything"}


def verify_case(report: str | os.PathLike[str], *, bank: Any = None,
                images: str | os.PathLike[str] | None = None) -> CaseCheck:
    """Re-check a report against the suspect images and the bank as they are now.

    Args:
        report: a ``--report`` folder of ``fp attribute`` (or its ``attribution.json``).
        bank: the bank (a :class:`refbank.Bank` or a folder; default: the one the
            report names).
        images: where the suspect images are now (default: the folder the report names).

    Returns:
        A :class:`CaseCheck` listing every image removed, changed or added, every bank
        row the answer used that is gone, changed or fails its hash, every curve of the
        baseline enrolled since (it could change the ranking), and every baseline file
        changed.

    Raises:
        InputError: the report is missing or has no custody record, or its image folder
            is not there and ``images`` is not given.
    """
    from refbank import Bank

    custody = load_report(report)["provenance"]["custody"]
    b = bank if isinstance(bank, Bank) else Bank(bank if bank is not None
                                                   else custody["bank"]["path"])
    folder = images if images is not None else custody["inputs"]["folder"]
    check = CaseCheck(str(report), None if folder is None else str(folder), str(b.path),
                      len(custody["inputs"]["files"]), len(custody["bank"]["curves"]),
                      len(custody["baseline"]["files"]))
    check.changes.extend(_report_changes(Path(report).expanduser()))
    if folder is not None:
        check.changes.extend(_image_changes(Path(folder), custody["inputs"]))
    check.changes.extend(_bank_changes(b, custody))
    check.changes.extend(_log_changes(b, custody["bank"].get("log_head")))
    return check


def _report_changes(report: Path) -> list[Change]:
    """The report's own files against the ``SHA256SUMS`` written with them."""
    from forensics.steps.reports import HTML_NAME, JSON_NAME, PNG_NAME, SUMS_NAME

    folder = report if report.is_dir() else report.parent
    sums = folder / SUMS_NAME
    try:
        text = sums.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return [Change("report", SUMS_NAME, "removed",
                       "the report's digest is missing: its answer cannot be checked")]
    listed = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    out = []
    for name in (JSON_NAME, PNG_NAME, HTML_NAME):
        if name not in listed:
            out.append(Change("report", name, "added", f"not listed in {SUMS_NAME}"))
            continue
        size, sha = _size_and_sha(folder / name)
        if size < 0:
            out.append(Change("report", name, "removed"))
        elif sha != listed[name]:
            out.append(Change("report", name, "changed",
                              "the file differs from the one written with the answer"))
    return out


def _log_changes(b: Any, recorded: dict[str, Any] | None) -> list[Change]:
    """The bank's log against the head the answer recorded, and the rows against the log."""
    from refbank import log

    if not b.exists():
        return []
    records = log.read(b.path)
    out = []
    if recorded is not None:
        seq = recorded["seq"]
        have = records[seq] if 0 <= seq < len(records) else None
        if have is None or have.get("hash") != recorded["hash"]:
            out.append(Change("bank_log", f"record {seq}", "rewritten",
                              "the bank's history up to this answer is not the one it was "
                              "given from"))
    found = log.check(records, log.rows_of(b.curves(), b.baselines()))
    out.extend(Change("bank_log", ident, "unverified", problem)
               for ident, problem in found.problems)
    return out


def _image_changes(root: Path, inputs: dict[str, Any]) -> list[Change]:
    from forensics.data.images import list_image_files

    if not root.is_dir():
        raise InputError(f"the suspect folder {root} is not there; give where the images are "
                         f"now with --images DIR")
    recorded = {f["path"]: f for f in inputs["files"]}
    skipped = {s["path"] for s in inputs["skipped"]}
    now = list_image_files(root)
    out = [Change("image", rel, "removed") for rel in sorted(set(recorded) - set(now))]
    for rel in now:
        if rel in recorded:
            size, sha = _size_and_sha(root / rel)
            want = recorded[rel]
            if (size, sha) != (want["size"], want["sha256"]):
                out.append(Change("image", rel, "changed",
                                  f"size {want['size']} -> {size}, SHA-256 "
                                  f"{want['sha256'][:12]}... -> {sha[:12]}..."))
        elif rel not in skipped:
            out.append(Change("image", rel, "added"))
    return out


def _size_and_sha(path: Path) -> tuple[int, str]:
    from refbank.hashing import file_sha256

    try:
        return path.stat().st_size, file_sha256(path)
    except OSError as exc:
        return -1, f"unreadable ({exc.strerror or exc})"


def _bank_changes(b: Any, custody: dict[str, Any]) -> list[Change]:
    from refbank.bank import modified_rows

    out = []
    base = custody["baseline"]
    rows = {r["baseline_id"]: r for r in b.baselines()} if b.exists() else {}
    row = rows.get(base["id"])
    if row is None:
        out.append(Change("baseline", base["id"], "removed", f"baseline {base['name']!r}"))
    else:
        if row["row_sha256"] != base["row_sha256"]:
            out.append(Change("baseline", base["id"], "changed", "its row was rewritten"))
        if modified_rows("baselines", [row]):
            out.append(Change("baseline", base["id"], "unverified",
                              "its row does not match its own hash"))
        files = b.baseline_files(row)[0]
        for name in sorted(set(base["files"]) | set(files)):
            mine, theirs = base["files"].get(name), files.get(name)
            if mine != theirs:
                what = "removed" if theirs is None else "added" if mine is None else "changed"
                out.append(Change("baseline_file", name, what))
    curves = {r["curve_id"]: r for r in b.curves()} if b.exists() else {}
    recorded = {c["curve_id"]: c for c in custody["bank"]["curves"]}
    for cid, want in recorded.items():
        have = curves.get(cid)
        if have is None:
            out.append(Change("curve", cid, "removed", f"{want['model']} ({want['family']})"))
        elif have["row_sha256"] != want["row_sha256"]:
            out.append(Change("curve", cid, "changed", "its row was rewritten"))
        elif modified_rows("curves", [have]):
            out.append(Change("curve", cid, "unverified", "its row does not match its own hash"))
    for cid, have in curves.items():
        if have["baseline_id"] == base["id"] and cid not in recorded:
            out.append(Change("curve", cid, "added",
                              f"enrolled since: {have['model']!r} ({have['family']!r})"))
    return out
