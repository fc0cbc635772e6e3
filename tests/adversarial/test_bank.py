"""Hostile and clumsy use of the bank and of attribution answers, kept from coming back.

Each test names the case it guards; ``docs/reliability.md`` ("Bank and chain of custody")
lists them with the command and the expected result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from refbank import Bank

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["block0", "block1", "block2", "block3"]
W = "ab" * 32


def baseline_row(name: str = "base", **kw) -> dict:
    row = {"name": name, "encoder": "timm:tiny", "weights_sha256": W, "layers": LAYERS,
           "train_manifest_sha256": "t" * 64, "heldout_manifest_sha256": "p" * 64,
           "n_train": 100, "n_heldout": 50, "params": {"seed": 0}}
    row.update(kw)
    return row


def curve_row(bid: str, model: str = "m1", family: str = "fam", **kw) -> dict:
    row = {"model": model, "family": family, "encoder": "timm:tiny", "weights_sha256": W,
           "baseline_id": bid, "layers": LAYERS, "values": [0.1, 0.2, 0.3, 0.4],
           "n_images": 500, "manifest_sha256": "q" * 64}
    row.update(kw)
    return row


def save_arrays(folder: Path) -> None:
    np.save(folder / "centroids.npy", np.arange(12, dtype=np.float32).reshape(3, 4))


@pytest.fixture
def bank(tmp_path) -> Bank:
    return Bank(tmp_path / "bank")


@pytest.fixture
def bid(bank) -> str:
    return bank.add_baseline(baseline_row(), save=save_arrays)


# -- 1. concurrent readers ---------------------------------------------------------------------


WRITER = textwrap.dedent("""
    import sys
    from refbank import Bank
    bank = Bank(sys.argv[1])
    bid, n = sys.argv[2], int(sys.argv[3])
    for i in range(n):
        bank.add_curves([{"model": f"m{i}", "family": "fam", "encoder": "timm:tiny",
                          "weights_sha256": "ab" * 32, "baseline_id": bid,
                          "layers": ["block0", "block1", "block2", "block3"],
                          "values": [0.1, 0.2, 0.3, float(i)], "n_images": 500,
                          "manifest_sha256": f"{i:064d}"}])
""")


def test_a_reader_never_sees_an_error_while_another_process_appends(bank, bid):
    """Case: one process appends curves while another reads the table in a loop."""
    n_writes, max_reads, limit_s = 100, 20_000, 15.0
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(bank.path), bid, str(n_writes)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
    errors, reads, counts = [], 0, []
    start = time.monotonic()
    try:
        while reads < max_reads and time.monotonic() - start < limit_s:
            done = writer.poll() is not None
            try:
                table = bank.curves_table()
            except Exception as exc:  # noqa: BLE001 - any error is the failure counted
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                assert isinstance(table, pa.Table)
                assert table.column_names[-1] == "row_sha256"
                counts.append(table.num_rows)
            reads += 1
            if done:
                break
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0, writer.stderr.read()
    assert errors == [], f"{len(errors)} of {reads} reads failed: {errors[:3]}"
    assert counts == sorted(counts), "a reader saw rows disappear"
    assert bank.curves_table().num_rows == n_writes


# -- 4. read-only bank; 5. verify of a missing bank ------------------------------------------


def fp(*args: object):
    from typer.testing import CliRunner

    from forensics.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _set_immutable(path: Path, on: bool) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-R", "+i" if on else "-i", str(path)], capture_output=True,
                       check=False)


@pytest.fixture
def read_only(bank, bid):
    """The bank with two curves, made read-only for this process (even for root)."""
    from refbank import store

    bank.add_curves([curve_row(bid), curve_row(bid, model="m2")])
    paths = [bank.path, *bank.path.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        os.chmod(p, modes[p] & ~0o222)
    if store.probe_writable(bank.path) is None:  # root ignores permission bits
        _set_immutable(bank.path, True)
    try:
        if store.probe_writable(bank.path) is None:
            pytest.skip("cannot make a folder read-only here")
        yield bank
    finally:
        _set_immutable(bank.path, False)
        for p in reversed(paths):
            os.chmod(p, modes[p])


def test_readers_and_export_work_on_a_read_only_bank(read_only, tmp_path):
    """Case: list, show, verify, info and export of a bank in a read-only folder."""
    before = sorted(p.name for p in read_only.path.iterdir())
    for args in (["bank", "list"], ["bank", "verify"], ["bank", "info"], ["baseline", "list"]):
        result = fp(*args, "--bank", read_only.path)
        assert result.exit_code == 0, (args, result.output)
    archive = tmp_path / "copy.tar"
    result = fp("bank", "export", archive, "--bank", read_only.path)
    assert result.exit_code == 0, result.output
    copy = Bank(tmp_path / "copy")
    copy.import_(archive)
    assert len(copy.curves()) == 2 and copy.verify().ok
    assert sorted(p.name for p in read_only.path.iterdir()) == before


@pytest.mark.parametrize("args", [
    ["bank", "remove", "c_x"],
    ["baseline", "remove", "base"],
    ["bank", "import", "missing.tar"],
    ["enroll", "no-such-folder", "--model", "m", "--family", "f"],
    ["baseline", "build", "b2", "--train", "no-such-folder", "--heldout", "no-such-folder",
     "--encoder", "vit-tiny-demo"],
])
def test_writers_refuse_a_read_only_bank_at_once(read_only, args):
    """Case: every command that changes the bank, on a read-only bank: one Error line, before
    looking at its inputs (the folders here do not even exist)."""
    result = fp(*args, "--bank", read_only.path)
    assert result.exit_code == 1, result.output
    assert "read-only" in result.output and "fp bank export" in result.output
    assert "Traceback" not in result.output and "no-such-folder" not in result.output


def test_the_library_refuses_writes_to_a_read_only_bank(read_only, bid):
    from forensics.errors import BankError

    with pytest.raises(BankError, match="read-only"):
        read_only.add_curves([curve_row(bid, model="m3")])
    with pytest.raises(BankError, match="read-only"):
        read_only.add_baseline(baseline_row("other"))
    assert len(read_only.curves()) == 2


def test_verify_of_a_missing_or_empty_bank_fails(tmp_path):
    """Case: fp bank verify --bank PATH where there is no bank."""
    result = fp("bank", "verify", "--bank", tmp_path / "nowhere")
    assert result.exit_code == 1 and "Error:" in result.output
    assert "does not exist" in result.output and "OK" not in result.output
    (tmp_path / "empty").mkdir()
    result = fp("bank", "verify", "--bank", tmp_path / "empty")
    assert result.exit_code == 1 and "holds no fp bank" in result.output
    assert not (tmp_path / "nowhere").exists()


# -- 8. names with terminal escapes, newlines, BEL; no length limit ----------------------------

NASTY = "\x1b]0;owned\x07\x1b[31m[red]x[/]\nfamily\u202e"


def rewrite_curves(bank: Bank, change, rehash: bool = False) -> None:
    """Rewrite the curves table with pyarrow, as another tool would (``change(row)``)."""
    import pyarrow.parquet as pq

    from refbank.hashing import row_hash
    from refbank.schema import CURVES_SCHEMA

    path = bank.path / "curves.parquet"
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        change(row)
        if rehash:
            row["row_sha256"] = row_hash(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=CURVES_SCHEMA), path)


@pytest.mark.parametrize("field,value", [
    ("model", "evil\x1b[2J"), ("family", "two\nlines"), ("checkpoint", "bell\x07"),
    ("split", "rtl\u202eoverride"), ("model", "m" * 129), ("notes", "n" * 4097),
    ("source", "esc\x1b[0m"),
])
def test_labels_with_control_characters_or_too_long_are_refused(bank, bid, field, value):
    """Case: enrolling with a model/family/... holding escapes, newlines, BEL, or too long."""
    from forensics.errors import InputError

    with pytest.raises(InputError, match=field):
        bank.add_curves([curve_row(bid, **{field: value})])
    assert bank.curves() == []
    option = "--" + field
    args = ["enroll", "no-such-folder", "--model", "m", "--family", "f", option, value]
    result = fp(*args, "--bank", bank.path)
    assert result.exit_code == 1 and "Error:" in result.output, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "no-such-folder" not in result.output  # refused before looking at the images


def test_free_text_may_hold_newlines(bank, bid):
    bank.add_curves([curve_row(bid, notes="line one\nline two\tand a tab")])
    assert bank.curves()[0]["notes"] == "line one\nline two\tand a tab"


def test_names_written_by_other_tools_are_shown_escaped_and_cut(bank, bid):
    """Case: fp bank list / show / baseline show on rows holding escapes and markup."""
    bank.add_curves([curve_row(bid)])
    rewrite_curves(bank, lambda r: r.update(model=NASTY, family="f" * 5000), rehash=True)
    cid = bank.curves()[0]["curve_id"]
    for args in (["bank", "list"], ["bank", "show", cid]):
        result = fp(*args, "--bank", bank.path)
        assert result.exit_code == 0, result.output
        out = result.output
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
        assert "\\x1b" in out and "[red]x[/]" in out.replace("\n", "")
        assert "f" * 300 not in out.replace("\n", "").replace(" ", "")


# -- a small real bank: digits, the seeded random-init vit-tiny-demo --------------------------

N = 60  # images per curve (2 cells of about 30 > 20, the default tau)
KW = {"device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A bank built from *relative* folders and a *relative* weights file (then used from
    another working folder), with two families of two curves each, and query folders."""
    from safetensors.torch import save_file

    from forensics import pipeline
    from forensics.demo import _write_pngs, digit_images
    from forensics.embed import get_encoder
    from forensics.synth import synth_folder

    root = tmp_path_factory.mktemp("adversarial")
    images = digit_images()
    order = np.random.default_rng(11).permutation(len(images))
    T, P, src, qsrc = order[:200], order[200:280], order[280:400], order[400:460]
    for name, ids in (("T", T), ("P", P), ("src", src), ("qsrc", qsrc)):
        _write_pngs(images, ids, root / name)
    f = {}
    for kind, params in (("noise", {"sigma": 24.0}), ("shuffle", {"grid": 4})):
        f[f"gen_{kind}"] = synth_folder(kind, root / "src", root / f"gen_{kind}", seed=1,
                                        **params) and root / f"gen_{kind}"
        f[f"query_{kind}"] = root / f"query_{kind}"
        synth_folder(kind, root / "qsrc", f[f"query_{kind}"], seed=2, **params)
    module = get_encoder("vit-tiny-demo").load("random:0", "cpu", "cls").module
    save_file({k: v.contiguous() for k, v in module.state_dict().items()},
              str(root / "w.safetensors"))
    cache = root / "cache"
    bank = Bank(root / "bank")
    here = os.getcwd()
    os.chdir(root)
    try:
        pipeline.build_baseline("digits", "T", "P", encoder="vit-tiny-demo",
                                weights="w.safetensors", n_cells=2, n_init=2, bank=bank,
                                cache_dir=cache, **KW)
    finally:
        os.chdir(here)
    ids = {kind: pipeline.enroll(f[f"gen_{kind}"], baseline="digits", model=f"{kind}-m",
                                 family=kind, per_curve=N, bank=bank, cache_dir=cache, **KW)
           for kind in ("noise", "shuffle")}
    return {"root": root, "f": f, "bank": bank, "cache": cache, "ids": ids}


def copy_bank(world, tmp_path) -> Bank:
    shutil.copytree(world["bank"].path, tmp_path / "bank")
    return Bank(tmp_path / "bank")


def attribute(world, bank: Bank, folder: Path, **kw):
    from forensics import pipeline

    return pipeline.attribute(folder, bank=bank, cache_dir=world["cache"], n_boot=kw.pop(
        "n_boot", 0), **KW, **kw)


# -- 7. relative paths ---------------------------------------------------------------------


def test_relative_folders_and_weights_are_stored_absolute_and_work_elsewhere(world, tmp_path,
                                                                             monkeypatch):
    """Case: fp baseline build with relative --train/--heldout/--weights, then fp attribute
    from another folder."""
    import json

    row = world["bank"].get_baseline("digits")
    params = json.loads(row["params_json"])
    root = world["root"].resolve()
    assert params["train_folder"] == str(root / "T")
    assert params["heldout_folder"] == str(root / "P")
    assert params["weights"] == str(root / "w.safetensors")
    monkeypatch.chdir(tmp_path)
    answer = attribute(world, world["bank"], world["f"]["query_noise"])
    assert answer.decision.nearest_family == "noise"


# -- 2. rows that fail their hash ----------------------------------------------------------------


def test_attribute_refuses_forged_rows_and_records_an_explicit_override(world, tmp_path):
    """Case: another tool rewrites the family of enrolled rows (hashes left as they were)."""
    from forensics.errors import BankError

    bank = copy_bank(world, tmp_path)
    forged = set(world["ids"]["noise"])
    rewrite_curves(bank, lambda r: r.update(family="rotate", model="other")
                   if r["curve_id"] in forged else None)
    with pytest.raises(BankError, match="--allow-unverified") as err:
        attribute(world, bank, world["f"]["query_noise"])
    assert all(cid in str(err.value) for cid in forged)
    result = fp("attribute", world["f"]["query_noise"], "--bank", bank.path, "--n-boot", "0",
                "--device", "cpu", "-q")
    assert result.exit_code == 1 and "Error:" in result.output and "fail their SHA-256" in \
        result.output
    answer = attribute(world, bank, world["f"]["query_noise"], allow_unverified=True)
    custody = answer.to_dict()["provenance"]["custody"]
    assert {p["id"] for p in custody["unverified"]} == forged
    assert answer.parameters["allow_unverified"] is True


def test_changed_baseline_files_are_refused_when_used(world, tmp_path):
    """Case: a baseline's stored arrays are replaced by other bytes."""
    from forensics import pipeline
    from forensics.errors import BankError

    bank = copy_bank(world, tmp_path)
    folder = bank.baseline_dir(bank.get_baseline("digits")["baseline_id"])
    target = sorted(p for p in folder.rglob("*.json") if p.is_file())[0]
    target.write_text(target.read_text() + " ")
    for call in (lambda: attribute(world, bank, world["f"]["query_noise"]),
                 lambda: pipeline.compute_curve(world["f"]["query_noise"], bank=bank,
                                                cache_dir=world["cache"], **KW)):
        with pytest.raises(BankError, match="were changed"):
            call()


# -- 3. duplicate enrolment ------------------------------------------------------------------


def test_the_same_images_cannot_be_enrolled_twice_under_another_family(world, tmp_path,
                                                                       monkeypatch):
    """Case: fp enroll of a folder already enrolled, as --family rotate --model other (also with
    another --per-curve): refused before any embedding, naming the enrolled curve."""
    from forensics import pipeline
    from forensics.errors import BankError

    bank = copy_bank(world, tmp_path)

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before refusing")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "_embed_suspect", no_embedding)
        for per in (N, 40):
            with pytest.raises(BankError, match="--allow-duplicate") as err:
                pipeline.enroll(world["f"]["gen_noise"], baseline="digits", model="other",
                                family="rotate", per_curve=per, bank=bank,
                                cache_dir=world["cache"], **KW)
            assert any(cid in str(err.value) for cid in world["ids"]["noise"])
    result = fp("enroll", world["f"]["gen_noise"], "--model", "other", "--family", "rotate",
                "--per-curve", N, "--bank", bank.path, "--device", "cpu", "-q")
    assert result.exit_code == 1 and "already enrolled" in result.output
    assert len(bank.curves()) == 4
    new = pipeline.enroll(world["f"]["gen_noise"], baseline="digits", model="other",
                          family="rotate", per_curve=N, bank=bank, allow_duplicate=True,
                          cache_dir=world["cache"], **KW)
    import json

    recorded = [json.loads(r["params_json"])["duplicate_of"] for r in bank.curves(curve_id=new)]
    assert sorted(c for ids in recorded for c in ids) == sorted(world["ids"]["noise"])
    assert bank.verify().ok
