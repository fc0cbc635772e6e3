"""The bank's history: an append-only log in which each change is chained to the one before.

A row's ``row_sha256`` only shows that a row was changed by a tool that did not recompute
it; anyone can recompute it. The log makes a rewrite of history visible, as git and
transparency logs do: ``log.jsonl`` in the bank holds one JSON record per change (an
enrolment, a removal, a baseline added or removed, an import), and each record holds the
SHA-256 of the record before it (``prev``) and its own (``hash``, over its canonical JSON
without ``hash`` and ``signature``). A record lists the rows it added and removed (id and
row hash), and the digests of the whole bank before and after it (``before``, ``state``:
every table's ids and row hashes). A bank written before the log existed gets a first
record ``start`` listing the rows it held then.

What each level catches:

* the rows against the log (:func:`check`): a row rewritten and re-hashed, added or
  removed by another tool, unless the log was rewritten to match;
* the log against a head recorded elsewhere (``provenance.custody.bank.log_head`` of
  every answer and report; ``fp case verify``): any rewrite of the history before that
  head, whoever did it;
* signatures (Ed25519, with the curator's private key in ``$FP_BANK_KEY``; ``fp bank
  verify --key PUBLIC.pem``): a record that the key's holder did not write, even with the
  whole log rewritten. Needs the ``cryptography`` package (``pip install
  'fp-forensics[sign]'``).

A writer appends the record *before* it replaces the table: a writer killed in between
leaves a last record whose change is not in the tables; :func:`check` recognises it (the
tables are in the record's ``before`` state) and says so without failing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forensics.errors import BankError
from refbank.hashing import canonical_json

LOG_FILE = "log.jsonl"
#: ``prev`` of the first record.
GENESIS = "0" * 64
#: Environment variable naming the curator's Ed25519 private key (PEM) that signs records.
KEY_ENV = "FP_BANK_KEY"
#: Longest log line read (a record of a large import lists every row id and hash).
MAX_LINE = 256 * 1024 * 1024

Rows = dict[str, dict[str, str]]  # {"curves": {id: row_sha256}, "baselines": {...}}


def state_digest(rows: Rows) -> str:
    """SHA-256 of the bank's rows: each table's ``{id: row_sha256}``, as canonical JSON."""
    body = {t: dict(sorted(rows.get(t, {}).items())) for t in ("baselines", "curves")}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON without its ``hash`` and ``signature``."""
    body = {k: v for k, v in record.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def read(folder: Path) -> list[dict[str, Any]]:
    """The log's records, oldest first ([] when the bank has no log).

    Raises:
        BankError: a line is not a JSON object (the log is damaged).
    """
    path = folder / LOG_FILE
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(MAX_LINE + 1).splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise BankError(f"cannot read the bank log {path} ({exc}); restore the bank from an "
                        f"export") from None
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise BankError(f"line {i} of the bank log {path} is not a log record: the log "
                            f"is damaged; restore the bank from an export")
        records.append(record)
    return records


def head(folder: Path) -> dict[str, Any] | None:
    """``{"seq", "hash"}`` of the log's last record, or None without a log."""
    records = read(folder)
    if not records:
        return None
    last = records[-1]
    return {"seq": last.get("seq"), "hash": last.get("hash")}


def _signer() -> Any:
    """The private key named by ``$FP_BANK_KEY``, or None."""
    where = os.environ.get(KEY_ENV)
    if not where:
        return None
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(where).expanduser().read_bytes(),
                                                 password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BankError(f"{KEY_ENV}={where}: cannot read an unencrypted PEM private key "
                        f"({exc}); make one with: openssl genpkey -algorithm ed25519 "
                        f"-out key.pem") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BankError(f"{KEY_ENV}={where} is not an Ed25519 key; make one with: "
                        f"openssl genpkey -algorithm ed25519 -out key.pem")
    return key


def _crypto() -> tuple[Any, Any]:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BankError("signing or checking the bank log needs the cryptography package: "
                        "pip install 'fp-forensics[sign]'") from None
    return serialization, ed25519


def _raw_public(key: Any) -> bytes:
    serialization, _ = _crypto()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    """The id of a public key: SHA-256 (hex) of its 32 raw bytes."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()


def load_public_key(path: str | os.PathLike[str]) -> Any:
    """An Ed25519 public key from a PEM file (``openssl pkey -in key.pem -pubout``).

    Raises:
        BankError: unreadable, or not an Ed25519 public key.
    """
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).expanduser().read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise BankError(f"--key {path}: cannot read a PEM public key ({exc}); make it with: "
                        f"openssl pkey -in key.pem -pubout -out key.pub.pem") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BankError(f"--key {path} is not an Ed25519 public key")
    return key


def append(folder: Path, op: str, *, before: Rows, after: Rows,
           details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append the record of one change (call under the bank's lock, before the tables are
    replaced) and return it.

    Args:
        folder: the bank folder.
        op: what was done (``add_curves``, ``remove_curves``, ``add_baseline``,
            ``remove_baseline``, ``import``, ``start``).
        before: the bank's rows before the change.
        after: the bank's rows after it.
        details: anything else worth recording (e.g. the source of an import).
    """
    from forensics._version import __version__
    from refbank.store import fsync_dir

    records = read(folder)
    prev = records[-1] if records else None
    added = {t: {i: h for i, h in after.get(t, {}).items() if before.get(t, {}).get(i) != h}
             for t in ("baselines", "curves")}
    removed = {t: {i: h for i, h in before.get(t, {}).items() if i not in after.get(t, {})}
               for t in ("baselines", "curves")}
    record: dict[str, Any] = {
        "seq": 0 if prev is None else int(prev["seq"]) + 1,
        "prev": GENESIS if prev is None else prev["hash"],
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "tool": f"fp {__version__}",
        "op": op,
        "added": added,
        "removed": removed,
        "before": state_digest(before),
        "state": state_digest(after),
    }
    if details:
        record["details"] = details
    record["hash"] = record_hash(record)
    signer = _signer()
    if signer is not None:
        record["signature"] = {
            "key": key_id(signer.public_key()),
            "ed25519": base64.b64encode(signer.sign(record["hash"].encode())).decode(),
        }
    path = folder / LOG_FILE
    line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
    from refbank.store import write_failed

    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(28, "short write")
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # no half record: the log stays as it was
                raise
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_failed(path, exc) from None
    fsync_dir(folder)
    return record


@dataclass
class LogCheck:
    """What :func:`check` found: ``problems`` fail a verification, ``notes`` do not."""

    n_records: int = 0
    head: dict[str, Any] | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (id, problem)
    notes: list[str] = field(default_factory=list)


def check(records: list[dict[str, Any]], rows: Rows, *, public_key: Any = None) -> LogCheck:
    """Check the log's chain, and the bank's rows against the history it records.

    Args:
        records: the log (:func:`read`).
        rows: the bank's rows now, ``{"curves": {id: row_sha256}, "baselines": {...}}``.
        public_key: an Ed25519 public key; every record must then carry its valid
            signature.

    Returns:
        A :class:`LogCheck`: a broken chain, a record that does not match its hash, a
        missing or bad signature (with ``public_key``), a row the log does not have, has
        with another hash, or says was removed, are problems.
    """
    out = LogCheck(len(records))
    if not records:
        if any(rows.get(t) for t in ("curves", "baselines")):
            out.notes.append(f"the bank has no log ({LOG_FILE}): its history is not "
                             f"tamper-evident; the next change made by fp starts one")
        return out
    out.head = {"seq": records[-1].get("seq"), "hash": records[-1].get("hash")}
    expected: Rows = {"curves": {}, "baselines": {}}
    prev_hash, prev_state = GENESIS, state_digest(expected)
    for i, rec in enumerate(records):
        where = f"log record {i}"
        if rec.get("seq") != i or rec.get("prev") != prev_hash or \
                rec.get("hash") != record_hash(rec):
            out.problems.append((where, "the chain is broken here: the record was changed, "
                                        "removed or inserted after it was written"))
            return out  # nothing after a break can be trusted
        if public_key is not None:
            problem = _signature_problem(rec, public_key)
            if problem:
                out.problems.append((where, problem))
        if rec.get("before") != prev_state:
            # the previous change was logged but never reached the tables (a killed writer)
            if i > 0 and rec.get("before") == records[i - 1].get("before"):
                expected = _undo(expected, records[i - 1])
                out.notes.append(f"log record {i - 1} ({records[i - 1].get('op')}) was "
                                 f"logged but not completed: its writer was interrupted")
            else:
                out.problems.append((where, "its 'before' state is not the state the "
                                            "records before it leave"))
        expected = _apply(expected, rec)
        prev_hash, prev_state = rec["hash"], rec.get("state")
    if state_digest(rows) != prev_state and state_digest(rows) == records[-1].get("before"):
        expected = _undo(expected, records[-1])
        out.notes.append(f"the last log record ({records[-1].get('op')}) was logged but not "
                         f"completed: its writer was interrupted; the bank is as before it")
    for table in ("baselines", "curves"):
        want, have = expected[table], rows.get(table, {})
        for ident in sorted(set(want) | set(have)):
            if ident not in have:
                out.problems.append((f"{table} {ident}",
                                     "in the log but not in the table (removed by another "
                                     "tool)"))
            elif ident not in want:
                out.problems.append((f"{table} {ident}", "in the table but not in the log "
                                                         "(added by another tool)"))
            elif want[ident] != have[ident]:
                out.problems.append((f"{table} {ident}", "its row hash differs from the one "
                                                         "the log recorded (rewritten)"))
    return out


def _apply(rows: Rows, rec: dict[str, Any]) -> Rows:
    out = {t: dict(rows.get(t, {})) for t in ("curves", "baselines")}
    for t in out:
        for ident in (rec.get("removed") or {}).get(t, {}):
            out[t].pop(ident, None)
        out[t].update((rec.get("added") or {}).get(t, {}))
    return out


def _undo(rows: Rows, rec: dict[str, Any]) -> Rows:
    """``rows`` as they were before ``rec`` (it only ever adds and removes whole rows)."""
    out = {t: dict(rows.get(t, {})) for t in ("curves", "baselines")}
    for t in out:
        for ident in (rec.get("added") or {}).get(t, {}):
            out[t].pop(ident, None)
        out[t].update((rec.get("removed") or {}).get(t, {}))
    return out


def _signature_problem(rec: dict[str, Any], public_key: Any) -> str | None:
    sig = rec.get("signature")
    if not isinstance(sig, dict):
        return "not signed"
    if sig.get("key") != key_id(public_key):
        return f"signed by another key ({str(sig.get('key'))[:16]}...)"
    try:
        public_key.verify(base64.b64decode(str(sig.get("ed25519")), validate=True),
                          str(rec["hash"]).encode())
    except Exception:  # noqa: BLE001 - InvalidSignature, or a malformed signature
        return "its signature does not verify"
    return None


def rows_of(curves: Iterable[dict[str, Any]], baselines: Iterable[dict[str, Any]]) -> Rows:
    """``{"curves": {id: row_sha256}, "baselines": {...}}`` of bank rows."""
    return {"curves": {r["curve_id"]: r["row_sha256"] for r in curves},
            "baselines": {r["baseline_id"]: r["row_sha256"] for r in baselines}}
