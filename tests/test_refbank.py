"""The Parquet reference bank: schema, round trips, integrity, versions, locking, export."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forensics.errors import BankError, InputError
from refbank import SCHEMA_VERSION, Bank
from refbank.hashing import canonical_json, row_hash, tree_sha256
from refbank.schema import CURVE_COLUMNS, CURVES_SCHEMA, VERSION_KEY

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["block0", "block1", "block2", "block3"]
W = "ab" * 32


def baseline_row(name: str = "base", **kw) -> dict:
    row = {
        "name": name, "encoder": "timm:tiny", "weights_sha256": W, "layers": LAYERS,
        "train_manifest_sha256": "t" * 64, "heldout_manifest_sha256": "p" * 64,
        "n_train": 100, "n_heldout": 50,
        "params": {"partitioner": "kmeans", "distance": "l2", "tau": 0.1, "pooling": "cls",
                   "seed": 0, "n_cells": 8},
    }
    row.update(kw)
    return row


def curve_row(bid: str, model: str = "m1", family: str = "fam", values=None, **kw) -> dict:
    row = {
        "model": model, "family": family, "encoder": "timm:tiny", "weights_sha256": W,
        "baseline_id": bid, "layers": LAYERS,
        "values": [0.1, 0.2, 0.3, 0.4] if values is None else values,
        "n_images": 500, "manifest_sha256": "q" * 64,
        "params": {"partitioner": "kmeans", "distance": "l2", "tau": 0.1, "pooling": "cls",
                   "seed": 0, "n_cells": 8},
    }
    row.update(kw)
    return row


def save_arrays(folder: Path) -> None:
    np.save(folder / "centroids.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    (folder / "meta.json").write_text('{"k": 3}')


@pytest.fixture
def bank(tmp_path) -> Bank:
    return Bank(tmp_path / "bank")


@pytest.fixture
def bid(bank) -> str:
    return bank.add_baseline(baseline_row(baseline_id="b_engine1"), save=save_arrays)


# -- round trip and schema ------------------------------------------------------------------


def test_add_and_read_back_every_field(bank, bid):
    ids = bank.add_curves([curve_row(bid, checkpoint="v1.5", source="lab", notes="n",
                                     split="heldout")])
    [row] = bank.curves()
    assert row["curve_id"] == ids[0] and ids[0].startswith("c_")
    assert row["model"] == "m1" and row["family"] == "fam" and row["checkpoint"] == "v1.5"
    assert row["source"] == "lab" and row["notes"] == "n" and row["split"] == "heldout"
    assert row["layers"] == LAYERS and row["values"] == [0.1, 0.2, 0.3, 0.4]
    assert (row["partitioner"], row["distance"], row["tau"], row["pooling"], row["seed"]) == (
        "kmeans", "l2", 0.1, "cls", 0)
    assert json.loads(row["params_json"]) == {"n_cells": 8}
    assert row["tool_version"] and row["created"].tzinfo is not None
    assert row["row_sha256"] == row_hash(row)
    assert set(row) == {c[0] for c in CURVE_COLUMNS}


def _packed(values) -> str:
    import base64

    from refbank.bank import PACKED_PREFIX

    raw = np.asarray(values, dtype="<f2").tobytes()
    return PACKED_PREFIX + base64.b64encode(raw).decode("ascii")


def test_packed_rows_go_to_a_file_named_by_their_hash_and_the_row_keeps_the_reference(
        bank, bid):
    from refbank.bank import ROWS_REF_PREFIX, curve_fingerprints

    values = np.arange(12, dtype=np.float16) / 8
    bank.add_curves([curve_row(bid, fingerprints={"v": [1.0, 2.0], "v#rows": _packed(values)})])
    [row] = bank.curves()
    ref = curve_fingerprints(row)["v#rows"]
    digest = hashlib.sha256(values.astype("<f2").tobytes()).hexdigest()
    assert ref == ROWS_REF_PREFIX + digest and curve_fingerprints(row)["v"] == [1.0, 2.0]
    assert bank.rows_path(ref) == bank.path / "rows" / f"{digest}.f16"
    assert len(row["fingerprints_json"]) < 120  # the table holds the reference, not the bytes
    assert row["row_sha256"] == row_hash(row)  # the reference is hashed like every field
    np.testing.assert_array_equal(bank.read_rows(ref), values)
    assert bank.rows_size(ref) == 12
    assert bank.verify().ok
    # the same rows under another curve share the file; each removal keeps what is named
    [second] = bank.add_curves([curve_row(bid, model="m2", manifest_sha256="e" * 64,
                                          fingerprints={"v#rows": _packed(values)})])
    assert len(list((bank.path / "rows").iterdir())) == 1
    bank.remove_curves([row["curve_id"]])
    np.testing.assert_array_equal(bank.read_rows(ref), values)
    bank.remove_curves([second])
    assert not list((bank.path / "rows").iterdir())


def test_other_strings_and_references_to_absent_rows_are_refused(bank, bid):
    from refbank.bank import ROWS_REF_PREFIX

    with pytest.raises(InputError, match="packed rows"):
        bank.add_curves([curve_row(bid, fingerprints={"v": "1, 2"})])
    with pytest.raises(InputError, match="not valid base64"):
        bank.add_curves([curve_row(bid, fingerprints={"v#rows": "float16le-base64:@@"})])
    with pytest.raises(BankError, match="missing"):
        bank.add_curves([curve_row(bid, fingerprints={"v#rows": ROWS_REF_PREFIX + "0" * 64})])
    assert bank.curves() == [] and not (bank.path / "rows").exists()
    # a curve refused (its images are enrolled already) leaves no file behind
    bank.add_curves([curve_row(bid, manifest_sha256="a" * 64)])
    with pytest.raises(BankError, match="already"):
        bank.add_curves([curve_row(bid, model="m2", manifest_sha256="a" * 64,
                                   fingerprints={"v#rows": _packed([1.0])})])
    assert not (bank.path / "rows").exists()


def test_a_changed_or_missing_rows_file_is_found_and_never_read(bank, bid):
    from refbank.bank import curve_fingerprints

    bank.add_curves([curve_row(bid, fingerprints={"v#rows": _packed([1.0, 2.0, 3.0, 4.0])})])
    [row] = bank.curves()
    ref = curve_fingerprints(row)["v#rows"]
    path = bank.rows_path(ref)
    data = path.read_bytes()
    path.write_bytes(data[:-2] + np.float16(9).astype("<f2").tobytes())
    report = bank.verify()
    assert not report.ok and "was changed" in report.problems[0].problem
    assert report.problems[0].id == row["curve_id"]
    with pytest.raises(BankError, match="was changed"):
        bank.read_rows(ref)
    path.unlink()
    assert "is missing" in bank.verify().problems[0].problem
    with pytest.raises(BankError, match="missing"):
        bank.read_rows(ref)
    with pytest.raises(BankError, match="missing"):
        bank.rows_size(ref)
    path.write_bytes(data)
    assert bank.verify().ok
    (bank.path / "rows" / "stray.f16").write_bytes(b"\0\0")
    report = bank.verify()
    assert report.ok and any("stray.f16 belongs to no curve" in w for w in report.warnings)


def test_rows_files_travel_with_an_export(bank, bid, tmp_path):
    from refbank.bank import curve_fingerprints

    values = np.linspace(-2, 2, 10).astype(np.float16)
    bank.add_curves([curve_row(bid, fingerprints={"v#rows": _packed(values)})])
    archive = bank.export(tmp_path / "a.tar")
    with tarfile.open(archive) as tar:
        assert any(n.startswith("rows/") and n.endswith(".f16") for n in tar.getnames())
    other = Bank(tmp_path / "other")
    other.import_(archive)
    [row] = other.curves()
    assert other.verify().ok
    np.testing.assert_array_equal(other.read_rows(curve_fingerprints(row)["v#rows"]), values)


def test_defaults_and_numpy_inputs(bank, bid):
    bank.add_curves([curve_row(bid, values=np.array([1, 2, 3, 4], dtype=np.float32),
                               n_images=np.int64(7), params={"seed": np.int64(3)})])
    [row] = bank.curves()
    assert row["split"] == "enroll" and row["values"] == [1.0, 2.0, 3.0, 4.0]
    assert row["n_images"] == 7 and row["seed"] == 3 and row["params_json"] == "{}"


def test_bank_opens_with_pyarrow_pandas_and_duckdb(bank, bid):
    import duckdb
    import pandas as pd

    bank.add_curves([curve_row(bid, model=f"m{i}") for i in range(3)])
    path = bank.path / "curves.parquet"
    assert pq.read_table(path).num_rows == 3
    df = pd.read_parquet(path)
    assert sorted(df["model"]) == ["m0", "m1", "m2"]
    assert list(df["values"].iloc[0]) == [0.1, 0.2, 0.3, 0.4]
    n, = duckdb.sql(f"select count(*) from '{path}' where family = 'fam'").fetchall()[0]
    assert n == 3
    name, = duckdb.sql(f"select name from '{bank.path / 'baselines.parquet'}'").fetchall()[0]
    assert name == "base"
    meta = pq.read_schema(path).metadata
    assert meta[VERSION_KEY] == str(SCHEMA_VERSION).encode()
    assert json.loads((bank.path / "bank.json").read_text())["schema_version"] == SCHEMA_VERSION


def test_filters(bank, bid):
    bank.add_curves([curve_row(bid, model="a", family="x"), curve_row(bid, model="b", family="y"),
                     curve_row(bid, model="c", family="y")])
    assert [r["model"] for r in bank.curves(family="y")] == ["b", "c"]
    assert [r["model"] for r in bank.curves(model=["a", "c"])] == ["a", "c"]
    assert len(bank.curves(baseline_id=bid, family=None)) == 3
    assert bank.curves_table().num_rows == 3
    with pytest.raises(InputError, match="colour"):
        bank.curves(colour="red")


def test_new_bank_is_empty_and_not_created_by_reading(tmp_path):
    b = Bank(tmp_path / "nowhere")
    assert b.curves() == [] and b.baselines() == [] and not b.exists()
    assert b.curves_table().schema.equals(CURVES_SCHEMA, check_metadata=False)
    assert not (tmp_path / "nowhere").exists()


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.setenv("FP_BANK", str(tmp_path / "envbank"))
    assert Bank().path == tmp_path / "envbank"
    monkeypatch.delenv("FP_BANK")
    import platformdirs

    assert Bank().path == Path(platformdirs.user_data_dir("fp")) / "bank"


# -- refusals ---------------------------------------------------------------------------------


def test_invalid_rows_are_refused(bank, bid):
    with pytest.raises(InputError, match="family"):
        bank.add_curves([{k: v for k, v in curve_row(bid).items() if k != "family"}])
    with pytest.raises(InputError, match="colour"):
        bank.add_curves([curve_row(bid, colour="red")])
    with pytest.raises(InputError, match="3 values for 4 layers"):
        bank.add_curves([curve_row(bid, values=[1, 2, 3])])
    with pytest.raises(BankError, match="not in the bank"):
        bank.add_curves([curve_row("b_other")])
    with pytest.raises(BankError, match="encoder"):
        bank.add_curves([curve_row(bid, encoder="timm:other")])
    with pytest.raises(BankError, match="layers"):
        bank.add_curves([curve_row(bid, layers=list(reversed(LAYERS)))])
    with pytest.raises(InputError, match="not allowed"):
        bank.add_curves([curve_row(bid, curve_id="../evil")])
    [cid] = bank.add_curves([curve_row(bid)])
    with pytest.raises(BankError, match="already in the bank"):
        bank.add_curves([curve_row(bid, curve_id=cid)])
    assert len(bank.curves()) == 1  # a refused batch adds nothing


def test_remove_curves_all_or_nothing(bank, bid):
    ids = bank.add_curves([curve_row(bid, model=f"m{i}") for i in range(3)])
    with pytest.raises(BankError, match="nope"):
        bank.remove_curves([ids[0], "nope"])
    assert len(bank.curves()) == 3
    assert bank.remove_curves([ids[0], ids[2]]) == [ids[0], ids[2]]
    assert [r["curve_id"] for r in bank.curves()] == [ids[1]]


# -- baselines --------------------------------------------------------------------------------


def test_baseline_row_and_files(bank, bid):
    row = bank.get_baseline("base")
    assert row == bank.get_baseline(bid) and row["baseline_id"] == "b_engine1"
    folder = bank.baseline_dir(bid)
    assert folder == bank.path / "baselines" / bid and row["path"] == f"baselines/{bid}"
    np.testing.assert_array_equal(np.load(folder / "centroids.npy", allow_pickle=False),
                                  np.arange(12).reshape(3, 4))
    assert row["files_sha256"] == tree_sha256(folder)
    assert row["partitioner"] == "kmeans" and json.loads(row["params_json"]) == {"n_cells": 8}
    assert row["layers"] == LAYERS and row["n_train"] == 100


def test_baseline_refusals(bank, bid):
    with pytest.raises(BankError, match="already in the bank"):
        bank.add_baseline(baseline_row("base"))
    with pytest.raises(BankError, match="base") as info:
        bank.get_baseline("missing")
    assert "fp baseline build" in str(info.value)
    with pytest.raises(InputError, match="not allowed"):
        bank.add_baseline(baseline_row("has space"))
    assert len(bank.baselines()) == 1


def test_failed_save_leaves_nothing(bank):
    def broken(folder: Path) -> None:
        (folder / "half.npy").write_bytes(b"x")
        raise RuntimeError("engine failed")

    with pytest.raises(RuntimeError):
        bank.add_baseline(baseline_row("b2", baseline_id="b_two"), save=broken)
    assert bank.baselines() == []
    assert not (bank.path / "baselines" / "b_two").exists()
    assert [p.name for p in (bank.path / "baselines").iterdir()] == []


def test_baseline_from_files(bank, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_arrays(src)
    bid = bank.add_baseline(baseline_row("copied"), files_from=src)
    assert bid.startswith("b_")
    assert tree_sha256(bank.baseline_dir(bid)) == tree_sha256(src)


def test_remove_baseline(bank, bid):
    bank.add_curves([curve_row(bid), curve_row(bid)])
    other = bank.add_baseline(baseline_row("other"))
    keep = bank.add_curves([curve_row(other)])
    with pytest.raises(BankError, match="2 enrolled curve"):
        bank.remove_baseline("base")
    assert bank.remove_baseline("base", with_curves=True)["baseline_id"] == bid
    assert [b["name"] for b in bank.baselines()] == ["other"]
    assert [c["curve_id"] for c in bank.curves()] == keep
    assert not bank.baseline_dir(bid).exists()
    assert bank.verify().ok


# -- integrity --------------------------------------------------------------------------------


def _rewrite(path: Path, column: str, row_index: int, value) -> None:
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row_index] = value
    i = table.schema.get_field_index(column)
    table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
    pq.write_table(table, path)


def test_verify_reports_modified_rows(bank, bid):
    ids = bank.add_curves([curve_row(bid, model=f"m{i}") for i in range(3)])
    assert bank.verify().ok
    _rewrite(bank.path / "curves.parquet", "values", 1, [0.1, 0.2, 0.3, 0.41])
    _rewrite(bank.path / "baselines.parquet", "encoder", 0, "timm:forged")
    report = bank.verify()
    assert not report.ok
    bad = {(p.table, p.id) for p in report.problems}
    assert bad == {("curves", ids[1]), ("baselines", bid)}
    assert report.n_curves == 3


def test_verify_reports_changed_missing_and_orphaned(bank, bid):
    bank.add_curves([curve_row(bid)])
    np.save(bank.baseline_dir(bid) / "centroids.npy", np.zeros(3))
    problems = [p.problem for p in bank.verify().problems]
    assert problems == [f"files under baselines/{bid} were changed"]
    import shutil

    shutil.rmtree(bank.baseline_dir(bid))
    assert "missing" in bank.verify().problems[0].problem
    _rewrite(bank.path / "curves.parquet", "baseline_id", 0, "b_gone")
    problems = [p.problem for p in bank.verify().problems]
    assert any("b_gone" in p for p in problems)


def test_newer_schema_is_refused(bank, bid):
    info = json.loads((bank.path / "bank.json").read_text())
    (bank.path / "bank.json").write_text(json.dumps({**info, "schema_version": SCHEMA_VERSION + 1}))
    for call in (bank.curves, bank.baselines, lambda: bank.add_curves([curve_row(bid)])):
        with pytest.raises(BankError, match="upgrade fp"):
            call()


def test_newer_parquet_file_is_refused(tmp_path):
    folder = tmp_path / "copied"
    folder.mkdir()
    schema = CURVES_SCHEMA.with_metadata({VERSION_KEY: str(SCHEMA_VERSION + 1).encode()})
    pq.write_table(schema.empty_table(), folder / "curves.parquet")
    with pytest.raises(BankError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade fp"):
        Bank(folder).curves()


def test_damaged_file_is_a_bank_error(bank, bid):
    bank.add_curves([curve_row(bid)])
    (bank.path / "curves.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BankError, match="damaged"):
        bank.curves()


def test_row_hash_is_sha256_of_documented_canonical_json():
    row = {"b": [1.5, "x"], "a": 1, "row_sha256": "ignored", "t": float("nan")}
    text = '{"a":1,"b":[1.5,"x"],"t":"NaN"}'
    assert canonical_json({k: v for k, v in row.items() if k != "row_sha256"}) == text
    assert row_hash(row) == hashlib.sha256(text.encode()).hexdigest()


def test_tree_hash_is_sha256_of_sha256sum_listing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.bin").write_bytes(b"bbb")
    (tmp_path / "sub" / "a.txt").write_bytes(b"a")
    listing = (f"{hashlib.sha256(b'bbb').hexdigest()}  b.bin\n"
               f"{hashlib.sha256(b'a').hexdigest()}  sub/a.txt\n")
    assert tree_sha256(tmp_path) == hashlib.sha256(listing.encode()).hexdigest()


# -- export / import --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_export_import_round_trip(bank, bid, tmp_path, suffix):
    ids = bank.add_curves([curve_row(bid, model=f"m{i}") for i in range(3)])
    archive = bank.export(tmp_path / f"bank{suffix}")
    other = Bank(tmp_path / "other")
    report = other.import_(archive)
    assert sorted(report.added_curves) == sorted(ids) and report.added_baselines == [bid]
    assert other.curves() == bank.curves() and other.baselines() == bank.baselines()
    assert other.verify().ok
    assert tree_sha256(other.baseline_dir(bid)) == tree_sha256(bank.baseline_dir(bid))
    again = other.import_(archive)
    assert again.added_curves == [] and sorted(again.skipped_curves) == sorted(ids)
    with pytest.raises(BankError, match="exists already"):
        bank.export(archive)


def test_import_merges_into_a_bank_with_rows(bank, bid, tmp_path):
    bank.add_curves([curve_row(bid)])
    archive = bank.export(tmp_path / "a.tar")
    other = Bank(tmp_path / "other")
    own = other.add_baseline(baseline_row("mine"))
    other.add_curves([curve_row(own)])
    other.import_(archive)
    assert len(other.curves()) == 2 and len(other.baselines()) == 2 and other.verify().ok


def test_import_refuses_a_modified_archive(bank, bid, tmp_path):
    bank.add_curves([curve_row(bid)])
    archive = bank.export(tmp_path / "a.tar")
    forged = tmp_path / "forged.tar"
    with tarfile.open(archive) as src, tarfile.open(forged, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "baselines.parquet":
                data = data[:-20] + b"\0" * 20
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    target = Bank(tmp_path / "t")
    with pytest.raises(BankError, match="changed: baselines.parquet"):
        target.import_(forged)
    assert target.curves() == []


def test_import_refuses_rows_whose_hash_fails(bank, bid, tmp_path):
    bank.add_curves([curve_row(bid)])
    _rewrite(bank.path / "curves.parquet", "model", 0, "forged")
    archive = bank.export(tmp_path / "a.tar")  # the export's sums match; the row hash does not
    with pytest.raises(BankError, match="failed verification"):
        Bank(tmp_path / "t").import_(archive)


def test_import_refuses_unsafe_and_foreign_archives(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(BankError, match="refusing"):
        Bank(tmp_path / "t").import_(evil)
    (tmp_path / "junk.tar").write_bytes(b"junk")
    with pytest.raises(BankError, match="fp bank export"):
        Bank(tmp_path / "t").import_(tmp_path / "junk.tar")
    assert not (tmp_path / "escape.txt").exists()


def test_import_conflicts_are_refused(bank, bid, tmp_path):
    [cid] = bank.add_curves([curve_row(bid)])
    archive = bank.export(tmp_path / "a.tar")
    other = Bank(tmp_path / "other")
    other.add_baseline(baseline_row("base", baseline_id="b_different"))
    with pytest.raises(BankError, match="name of another baseline"):
        other.import_(archive)
    third = Bank(tmp_path / "third")
    third.import_(archive)
    third.remove_curves([cid])
    third.add_curves([curve_row(bid, curve_id=cid, model="changed")])
    with pytest.raises(BankError, match="different content"):
        third.import_(archive)


def test_export_of_an_empty_bank_is_refused(tmp_path):
    with pytest.raises(BankError, match="empty"):
        Bank(tmp_path / "none").export(tmp_path / "x.tar")


# -- processes --------------------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from refbank import Bank
    bank_dir, bid, tag, n, start = sys.argv[1:6]
    row = dict(model=tag, family="fam", encoder="timm:tiny", weights_sha256="ab" * 32,
               baseline_id=bid, layers=["block0", "block1", "block2", "block3"],
               values=[0.1, 0.2, 0.3, 0.4], n_images=10, manifest_sha256="q" * 64)
    bank = Bank(bank_dir)
    while not Path(start).exists():
        time.sleep(0.01)
    for i in range(int(n)):
        bank.add_curves([dict(row, notes=str(i))])
""")


def _run_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_two_processes_enrolling_at_once_keep_every_row(bank, bid, tmp_path):
    n = 12
    start = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(bank.path), bid, tag, str(n),
                          str(start)], env=_run_env(), stderr=subprocess.PIPE, text=True)
        for tag in ("alpha", "beta")
    ]
    time.sleep(0.3)
    start.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    rows = bank.curves()
    assert len(rows) == 2 * n
    for tag in ("alpha", "beta"):
        assert sorted(int(r["notes"]) for r in rows if r["model"] == tag) == list(range(n))
    assert len({r["curve_id"] for r in rows}) == 2 * n and bank.verify().ok


_KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from refbank import Bank, store
    bank_dir, bid, signal_file = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    def stuck(tmp, target):
        signal_file.write_text(str(tmp))
        time.sleep(600)
    store._commit = stuck
    Bank(bank_dir).add_curves([dict(model="doomed", family="fam", encoder="timm:tiny",
        weights_sha256="ab" * 32, baseline_id=bid, layers=["block0", "block1", "block2", "block3"],
        values=[9.0, 9.0, 9.0, 9.0], n_images=10, manifest_sha256="q" * 64)])
""")


def test_writer_killed_mid_write_loses_nothing(bank, bid, tmp_path):
    before = bank.add_curves([curve_row(bid, model=f"m{i}") for i in range(3)])
    signal_file = tmp_path / "inside"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(bank.path), bid,
                             str(signal_file)], env=_run_env())
    try:
        deadline = time.monotonic() + 60
        while not (signal_file.exists() and signal_file.read_text()):  # written, not just created
            assert proc.poll() is None, "writer exited before reaching the critical section"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        tmp_file = Path(signal_file.read_text())
        assert tmp_file.exists()  # the new table was fully written, not yet renamed
        assert [r["curve_id"] for r in bank.curves()] == before  # readers see the old file
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert [r["curve_id"] for r in bank.curves()] == before and bank.verify().ok
    quick = Bank(bank.path, lock_timeout=10)  # the dead writer's lock is gone
    quick.add_curves([curve_row(bid, model="after")])
    assert [r["model"] for r in quick.curves()] == ["m0", "m1", "m2", "after"]
    assert not tmp_file.exists()  # swept by the next writer


def test_a_held_lock_times_out_with_a_clear_error(bank, bid):
    from filelock import FileLock

    with FileLock(str(bank.path / ".lock")):
        code = (
            "import sys\nfrom refbank import Bank\nfrom forensics.errors import BankError\n"
            "try:\n    Bank(sys.argv[1], lock_timeout=0.3).remove_curves([])\n"
            "except BankError as e:\n    print(e)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, str(bank.path)], env=_run_env(),
                             capture_output=True, text=True, timeout=60)
    assert "stayed locked by another fp process" in out.stdout, out.stderr


def test_refbank_never_imports_torch(bank, bid):
    bank.add_curves([curve_row(bid)])
    code = (
        "import sys\nfrom refbank import Bank\nb = Bank(sys.argv[1])\n"
        "assert b.verify().ok and len(b.curves()) == 1\n"
        "print(','.join(m for m in ('torch', 'timm', 'open_clip') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bank.path)], env=_run_env(),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_process_that_reads_the_bank_exits_cleanly(bank, bid):
    """pyarrow's threaded read of an in-memory buffer could abort the process at exit."""
    bank.add_curves([curve_row(bid)])
    code = "import sys\nfrom refbank import Bank\nBank(sys.argv[1]).curves()\n"
    runs = [subprocess.run([sys.executable, "-c", code, str(bank.path)], env=_run_env(),
                           capture_output=True, text=True) for _ in range(12)]
    failed = [(r.returncode, r.stderr[-2000:]) for r in runs if r.returncode]
    # A threaded read aborted 35 of 40 such processes (about 10 of these 12). What remains
    # is pyarrow's own exit race (apache/arrow#34314, open upstream), up to about 2 % of
    # runs on a loaded machine: two aborts in 12 then happen in about 2.6 % of test runs,
    # four in about 0.01 %. So up to three are tolerated; the regression still fails.
    # (`fp` itself ends without pyarrow's native teardown: forensics.cli.app._exit.)
    assert len(failed) <= 3, failed


def test_resolve_baseline(bank):
    with pytest.raises(BankError, match="no baselines.*fp baseline build"):
        bank.resolve_baseline()
    bank.add_baseline(baseline_row("one"))
    assert bank.resolve_baseline()["name"] == "one"
    bank.add_baseline(baseline_row("two"))
    with pytest.raises(BankError, match=r"several baselines \(one, two\).*--baseline"):
        bank.resolve_baseline()
    assert bank.resolve_baseline("two")["name"] == "two"


def test_import_of_a_newer_export_is_refused(bank, bid, tmp_path):
    bank.add_curves([curve_row(bid)])
    info = json.loads((bank.path / "bank.json").read_text())
    (bank.path / "bank.json").write_text(json.dumps({**info, "schema_version": 99}))
    from refbank.archive import write_archive

    write_archive(bank.path, tmp_path / "new.tar")
    with pytest.raises(BankError, match=r"new\.tar has schema version 99.*upgrade fp"):
        Bank(tmp_path / "t").import_(tmp_path / "new.tar")


def test_readme_documents_every_column():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Reference bank"):]
    from refbank.schema import BASELINE_COLUMNS

    for name, *_ in CURVE_COLUMNS + BASELINE_COLUMNS:
        assert f"`{name}`" in section, f"README's 'Reference bank' section must list {name}"


def test_tables_are_read_on_one_thread(bank, bid, monkeypatch):
    """The read that aborted processes at exit (see above) is never threaded."""
    import pyarrow.parquet as pq

    bank.add_curves([curve_row(bid)])
    seen = []
    real = pq.ParquetFile

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, source, **kwargs):
            seen.append(("pre_buffer", kwargs.get("pre_buffer", True)))
            super().__init__(source, **kwargs)

        def read(self, *args, **kwargs):
            seen.append(("use_threads", kwargs.get("use_threads", True)))
            return super().read(*args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", Spy)
    assert len(bank.curves()) == 1
    assert {k for k, _ in seen} == {"pre_buffer", "use_threads"} and not any(v for _, v in seen)
