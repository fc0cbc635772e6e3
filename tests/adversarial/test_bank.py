"""Hostile and clumsy use of the bank and of attribution answers, kept from coming back.

Each test names the case it guards; ``docs/reliability.md`` ("Bank and chain of custody")
lists them with the command and the expected result.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from forensics.errors import BankError, InputError
from forensics.steps.attribute import attribute as run_attribute
from forensics.steps.build_baseline import build_baseline
from forensics.steps.curve import compute_curve
from forensics.steps.enroll import enroll
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
    n_writes, max_reads, limit_s = 200, 40_000, 20.0
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

    from forensics.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _set_immutable(path: Path, on: bool) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-R", "+i" if on else "-i", str(path)], capture_output=True,
                       check=False)


@contextlib.contextmanager
def made_read_only(folder: Path):
    """``folder`` read-only for this process while the block runs (even for root)."""
    from refbank import store

    paths = [folder, *folder.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        os.chmod(p, modes[p] & ~0o222)
    if store.probe_writable(folder) is None:  # root ignores permission bits
        _set_immutable(folder, True)
    try:
        if store.probe_writable(folder) is None:
            pytest.skip("cannot make a folder read-only here")
        yield folder
    finally:
        _set_immutable(folder, False)
        for p in reversed(paths):
            os.chmod(p, modes[p])


@pytest.fixture
def read_only(bank, bid):
    """The bank with two curves, made read-only."""
    bank.add_curves([curve_row(bid), curve_row(bid, model="m2")])
    with made_read_only(bank.path):
        yield bank


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
    ["bank", "import-curves", "no-such-folder/x.txt"],
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

    from forensics.data.embed import get_encoder
    from forensics.paper.demo import _write_pngs, digit_images
    from forensics.paper.synth import synth_folder

    root = tmp_path_factory.mktemp("adversarial")
    images = digit_images()
    order = np.random.default_rng(11).permutation(len(images))
    T, P, src, qsrc = order[:200], order[200:280], order[280:400], order[400:460]
    for name, ids in (("T", T), ("P", P), ("src", src), ("qsrc", qsrc)):
        _write_pngs(images, ids, root / name)
    f = {}
    for kind, params in (("noise", {"sigma": 24.0}), ("shuffle", {"grid": 4})):
        f[f"gen_{kind}"], f[f"query_{kind}"] = root / f"gen_{kind}", root / f"query_{kind}"
        synth_folder(kind, root / "src", f[f"gen_{kind}"], seed=1, **params)
        synth_folder(kind, root / "qsrc", f[f"query_{kind}"], seed=2, **params)
    module = get_encoder("vit-tiny-demo").load("random:0", "cpu", "cls").module
    save_file({k: v.contiguous() for k, v in module.state_dict().items()},
              str(root / "w.safetensors"))
    cache = root / "cache"
    bank = Bank(root / "bank")
    here = os.getcwd()
    os.chdir(root)
    try:
        build_baseline("digits", "T", "P", encoder="vit-tiny-demo",
                                weights="w.safetensors", n_cells=2, n_init=2, bank=bank,
                                cache_dir=cache, **KW)
    finally:
        os.chdir(here)
    ids = {kind: enroll(f[f"gen_{kind}"], baseline="digits", model=f"{kind}-m",
                                 family=kind, per_curve=N, bank=bank, cache_dir=cache, **KW)
           for kind in ("noise", "shuffle")}
    return {"root": root, "f": f, "bank": bank, "cache": cache, "ids": ids}


def copy_bank(world, tmp_path) -> Bank:
    shutil.copytree(world["bank"].path, tmp_path / "bank")
    return Bank(tmp_path / "bank")


def attribute(world, bank: Bank, folder: Path, **kw):
    return run_attribute(folder, bank=bank, cache_dir=world["cache"], n_boot=kw.pop(
        "n_boot", 0), **KW, **kw)


# -- 7. relative paths ---------------------------------------------------------------------


def test_relative_folders_and_weights_are_stored_absolute_and_work_elsewhere(world, tmp_path,
                                                                             monkeypatch):
    """Case: fp baseline build with relative --train/--heldout/--weights, then fp attribute
    from another folder."""
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
    bank = copy_bank(world, tmp_path)
    folder = bank.baseline_dir(bank.get_baseline("digits")["baseline_id"])
    target = sorted(p for p in folder.rglob("*.json") if p.is_file())[0]
    target.write_text(target.read_text() + " ")
    for call in (lambda: attribute(world, bank, world["f"]["query_noise"]),
                 lambda: compute_curve(world["f"]["query_noise"], bank=bank,
                                                cache_dir=world["cache"], **KW)):
        with pytest.raises(BankError, match="were changed"):
            call()


# -- 3. duplicate enrolment ------------------------------------------------------------------


def test_the_same_images_cannot_be_enrolled_twice_under_another_family(world, tmp_path,
                                                                       monkeypatch):
    """Case: fp enroll of a folder already enrolled, as --family rotate --model other (also with
    another --per-curve): refused before any embedding, naming the enrolled curve."""
    bank = copy_bank(world, tmp_path)

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before refusing")

    with monkeypatch.context() as m:
        m.setattr("forensics.steps.enroll._embed_suspect", no_embedding)
        for per in (N, 40):
            with pytest.raises(BankError, match="--allow-duplicate") as err:
                enroll(world["f"]["gen_noise"], baseline="digits", model="other",
                                family="rotate", per_curve=per, bank=bank,
                                cache_dir=world["cache"], **KW)
            assert any(cid in str(err.value) for cid in world["ids"]["noise"])
    result = fp("enroll", world["f"]["gen_noise"], "--model", "other", "--family", "rotate",
                "--per-curve", N, "--bank", bank.path, "--device", "cpu", "-q")
    assert result.exit_code == 1 and "already enrolled" in result.output
    assert len(bank.curves()) == 4
    new = enroll(world["f"]["gen_noise"], baseline="digits", model="other",
                          family="rotate", per_curve=N, bank=bank, allow_duplicate=True,
                          cache_dir=world["cache"], **KW)
    recorded = [json.loads(r["params_json"])["duplicate_of"] for r in bank.curves(curve_id=new)]
    assert sorted(c for ids in recorded for c in ids) == sorted(world["ids"]["noise"])
    assert bank.verify().ok


# -- chain of custody in every answer; fp case verify -----------------------------------------


@pytest.fixture
def case(world, tmp_path):
    """A copy of the bank and of the noise query (plus one unreadable file, skipped), and the
    report of fp attribute on it."""
    bank = copy_bank(world, tmp_path)
    images = tmp_path / "suspect"
    shutil.copytree(world["f"]["query_noise"], images)
    (images / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = tmp_path / "report"
    answer = attribute(world, bank, images, skip_bad=True, report=report, n_boot=2, seed=3)
    return {"bank": bank, "images": images, "report": report, "answer": answer}


def test_the_answer_records_every_file_row_and_parameter_it_rests_on(case):
    """Case: fp attribute --json / --report: the custody record."""
    from forensics import __version__
    from refbank.hashing import file_hashes

    answer = json.loads((case["report"] / "attribution.json").read_text())
    assert answer == json.loads(json.dumps(case["answer"].to_dict()))
    custody = answer["provenance"]["custody"]
    files = sorted(p for p in case["images"].glob("*.png") if p.name != "zz-broken.png")
    assert custody["inputs"]["files"] == [
        {"path": p.name, "size": p.stat().st_size,
         "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files]
    [skipped] = custody["inputs"]["skipped"]
    assert skipped["path"] == "zz-broken.png" and skipped["reason"]
    assert custody["inputs"]["folder"] == str(case["images"].resolve())
    bank = case["bank"]
    rows = bank.curves()
    assert custody["bank"]["curves"] == [
        {"curve_id": r["curve_id"], "row_sha256": r["row_sha256"], "model": r["model"],
         "family": r["family"]} for r in rows]
    base = bank.get_baseline("digits")
    assert custody["baseline"]["id"] == base["baseline_id"]
    assert custody["baseline"]["row_sha256"] == base["row_sha256"]
    assert custody["baseline"]["files"] == file_hashes(bank.baseline_dir(base["baseline_id"]))
    assert custody["fp_version"] == __version__ and custody["unverified"] == []
    params = answer["provenance"]["attribution"]
    for key, value in {"n_boot": 2, "seed": 3, "skip_bad": True, "allow_unverified": False,
                       "fingerprint": "resid-early", "matcher": "zscore", "top": 5,
                       "drop_layers": [0], "quantile": 0.05, "tau": None, "device": "cpu",
                       "batch_size": 64, "weights": None}.items():
        assert params[key] == value, key


def test_case_verify_passes_on_an_untouched_case(case):
    result = fp("case", "verify", case["report"])
    assert result.exit_code == 0, result.output
    assert "OK:" in result.output and "60 image(s)" in result.output


def _changes(case, *extra):
    result = fp("case", "verify", case["report"], "--json", *extra)
    assert result.exit_code == 1, result.output
    assert json.loads(result.stderr)["error"]["exit_code"] == 1  # --json: a JSON error object
    report = json.loads(result.stdout)
    assert report["ok"] is False
    return {(c["kind"], c["id"], c["change"]) for c in report["changes"]}


def test_case_verify_names_every_image_changed_added_or_removed(case):
    """Case: fp case verify after images of the case were edited, added and deleted."""
    names = sorted(p.name for p in case["images"].glob("*.png") if p.name != "zz-broken.png")
    with open(case["images"] / names[0], "ab") as f:
        f.write(b"\x00")
    (case["images"] / names[1]).unlink()
    shutil.copy(case["images"] / names[2], case["images"] / "new.png")
    assert _changes(case) == {("image", names[0], "changed"), ("image", names[1], "removed"),
                              ("image", "new.png", "added")}


def test_case_verify_names_bank_rows_and_files_changed_since(case, world):
    """Case: fp case verify after curves were forged, removed, enrolled, and a baseline file
    changed."""
    bank = case["bank"]
    noise, shuffle = world["ids"]["noise"], world["ids"]["shuffle"]
    rewrite_curves(bank, lambda r: r.update(family="rotate") if r["curve_id"] == noise[0]
                   else None)
    bank.remove_curves([shuffle[0]])
    new = enroll(world["f"]["query_shuffle"], baseline="digits", model="late",
                          family="shuffle", per_curve=N, bank=bank, cache_dir=world["cache"],
                          **KW)
    folder = bank.baseline_dir(bank.get_baseline("digits")["baseline_id"])
    (folder / "train_manifest.json").write_text("{}")
    assert _changes(case) == {("curve", noise[0], "unverified"),
                              ("curve", shuffle[0], "removed"), ("curve", new[0], "added"),
                              ("baseline_file", "train_manifest.json", "changed")}


def test_case_verify_with_moved_images_and_a_bad_report(case, tmp_path):
    moved = tmp_path / "moved"
    case["images"].rename(moved)
    result = fp("case", "verify", case["report"])
    assert result.exit_code == 1 and "--images" in result.output
    assert fp("case", "verify", case["report"], "--images", moved).exit_code == 0
    for bad in (tmp_path / "nowhere", moved):
        result = fp("case", "verify", bad)
        assert result.exit_code == 1 and "Error:" in result.output
        assert "Traceback" not in result.output
    (tmp_path / "old.json").write_text('{"decision": {}}')
    result = fp("case", "verify", tmp_path / "old.json")
    assert result.exit_code == 1 and "no custody record" in result.output


def test_an_existing_case_report_is_kept_and_force_moves_it_aside(case, world, monkeypatch):
    """Case: fp attribute --report DIR where DIR holds a case report (then with --force)."""
    from forensics.errors import FpWarning

    report = case["report"]
    before = {p.name: p.read_bytes() for p in report.iterdir()}

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before refusing")

    with monkeypatch.context() as m:
        m.setattr("forensics.steps.attribute._embed_suspect", no_embedding)
        with pytest.raises(InputError, match="holds a report already"):
            attribute(world, case["bank"], case["images"], skip_bad=True, report=report)
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before
    with pytest.warns(FpWarning, match="was moved to"):
        attribute(world, case["bank"], case["images"], skip_bad=True, report=report,
                  force=True, seed=4)
    [aside] = [p for p in report.parent.iterdir() if p.name.startswith("report.replaced-")]
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before  # the old, intact
    assert json.loads((report / "attribution.json").read_text())["provenance"][
        "attribution"]["seed"] == 4
    assert fp("case", "verify", report).exit_code == 0


# -- 6. fp bank import checks before it unpacks, and bounds what it unpacks --------------------


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, produced as read (a file that compresses 1000 to 1)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def _bomb(archive: Path, export: Path, listed: bool, size: int = 100 * 10**6) -> None:
    """A copy of ``export`` (gzip) plus a big file of zeros, listed in SHA256SUMS or not."""
    with tarfile.open(export) as src, tarfile.open(archive, "w:gz", compresslevel=1) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "SHA256SUMS" and listed:
                digest = hashlib.sha256()
                zeros = _Zeros(size)
                while block := zeros.read(1 << 20):
                    digest.update(block)
                data += f"{digest.hexdigest()}  baselines/zeros.npy\n".encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
        info = tarfile.TarInfo("baselines/zeros.npy")
        info.size = size
        dst.addfile(info, _Zeros(size))


@pytest.fixture
def no_unpacking(monkeypatch):
    """Fail the test if anything is unpacked."""
    from refbank import archive

    def boom(*args, **kwargs):
        raise AssertionError("the archive was unpacked before it was checked")

    monkeypatch.setattr(archive, "_extract", boom, raising=False)
    monkeypatch.setattr(tarfile.TarFile, "extractall", boom)


@pytest.mark.parametrize("listed", [False, True])
def test_import_checks_listing_and_size_before_unpacking(bank, bid, tmp_path, listed,
                                                         no_unpacking):
    """Case: fp bank import of a small .tar.gz that unpacks to 100 MB of zeros, unlisted in its
    SHA256SUMS, or listed but above --max-size."""
    bank.add_curves([curve_row(bid)])
    export = bank.export(tmp_path / "good.tar")
    archive = tmp_path / "bomb.tar.gz"
    _bomb(archive, export, listed)
    assert archive.stat().st_size < 10**6
    target = Bank(tmp_path / "target")
    with pytest.raises(BankError, match="more than the limit" if listed else "unlisted"):
        target.import_(archive, max_bytes=50 * 10**6)
    result = fp("bank", "import", archive, "--max-size", "0.05", "--bank", target.path)
    assert result.exit_code == 1 and "Error:" in result.output
    assert not target.exists()


def test_import_refuses_repeated_members_and_stops_at_the_first_changed_file(bank, bid,
                                                                             tmp_path):
    bank.add_curves([curve_row(bid)])
    export = bank.export(tmp_path / "good.tar")
    twice = tmp_path / "twice.tar"
    with tarfile.open(export) as src, tarfile.open(twice, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            dst.addfile(m, io.BytesIO(data))
            if m.name == "curves.parquet":
                dst.addfile(m, io.BytesIO(data))
    with pytest.raises(BankError, match="repeated: curves.parquet"):
        Bank(tmp_path / "t").import_(twice)
    limit = sum(m.size for m in tarfile.open(export).getmembers())
    report = Bank(tmp_path / "t").import_(export, max_bytes=limit)
    assert len(report.added_curves) == 1


def test_attribute_works_on_a_read_only_bank(world, tmp_path):
    """Case: fp attribute against a bank in a read-only folder."""
    bank = copy_bank(world, tmp_path)
    with made_read_only(bank.path):
        answer = attribute(world, bank, world["f"]["query_noise"], report=tmp_path / "r")
    assert answer.decision.nearest_family == "noise"
    assert (tmp_path / "r" / "attribution.json").is_file()


# -- columns another tool added ------------------------------------------------------------


def add_column(path: Path, name: str, values: list) -> None:
    """Add a column to a bank table with pyarrow, as a curator's tool would."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(table.append_column(name, pa.array(values, pa.string())), path)


def test_bank_writes_keep_columns_fp_does_not_know(bank, bid):
    """Case: a curator adds an analyst_note column with pyarrow, then fp enroll / fp bank
    remove / fp baseline build / fp baseline remove rewrite the tables."""
    import pyarrow.parquet as pq

    ids = bank.add_curves([curve_row(bid), curve_row(bid, model="m2",
                                                     manifest_sha256="r" * 64)])
    curves, baselines = bank.path / "curves.parquet", bank.path / "baselines.parquet"
    add_column(curves, "analyst_note", ["seen twice", "checked"])
    add_column(baselines, "analyst_note", ["base note"])
    assert bank.verify().ok
    assert any("analyst_note" in w for w in bank.verify().warnings)
    assert "analyst_note" not in bank.curves()[0]  # rows keep their hashed columns only
    new = bank.add_curves([curve_row(bid, model="m3", manifest_sha256="s" * 64)])
    notes = dict(zip(*pq.read_table(curves).select(["curve_id", "analyst_note"])
                     .to_pydict().values(), strict=True))
    assert notes == {ids[0]: "seen twice", ids[1]: "checked", new[0]: None}
    bank.remove_curves([ids[1]])
    assert pq.read_table(curves).column("analyst_note").to_pylist() == ["seen twice", None]
    bank.add_baseline(baseline_row("second"), save=save_arrays)
    bank.remove_baseline("second")
    assert pq.read_table(baselines).column("analyst_note").to_pylist() == ["base note"]
    assert bank.verify().ok


def test_renamed_copies_of_enrolled_images_are_duplicates(world, tmp_path, monkeypatch):
    """Case: the enrolled images copied to new names (x-*.png, *_copy.png) and enrolled
    under another family: refused before embedding, naming the curve and the files; a
    folder sharing only a few images (at most 5 %) is accepted."""
    bank = copy_bank(world, tmp_path)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, p in enumerate(sorted(world["f"]["gen_noise"].glob("*.png"))):
        shutil.copy(p, renamed / (f"x-{i:04d}.png" if i % 2 else f"{p.stem}_copy.png"))

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before refusing")

    with monkeypatch.context() as m:
        m.setattr("forensics.steps.enroll._embed_suspect", no_embedding)
        with pytest.raises(BankError, match="by content") as err:
            enroll(renamed, baseline="digits", model="forger", family="rotate", per_curve=N,
                   bank=bank, cache_dir=world["cache"], **KW)
    msg = str(err.value)
    assert any(cid in msg for cid in world["ids"]["noise"]) and "_copy.png" in msg
    assert f"{N} of the {N} images" in msg
    assert len(bank.curves()) == 4
    # a folder of new images holding 2 enrolled ones of 60 (3 %) is not a duplicate
    mixed = tmp_path / "mixed"
    shutil.copytree(world["f"]["query_shuffle"], mixed)
    for p in sorted(mixed.glob("*.png"))[:2]:
        p.unlink()
    for i, p in enumerate(sorted(world["f"]["gen_noise"].glob("*.png"))[:2]):
        shutil.copy(p, mixed / f"zz-{i}.png")
    assert len(enroll(mixed, baseline="digits", model="late", family="shuffle", per_curve=N,
                      bank=bank, cache_dir=world["cache"], **KW)) == 1
    stored = json.loads(bank.curves(model="late")[0]["params_json"])["image_sha256"]
    assert len(stored) == N and all(len(h) == 64 for h in stored)


# -- the answer itself; the bank's log ---------------------------------------------------


def test_case_verify_checks_the_answer_itself(case):
    """Case: the decision (family, confidence) edited in attribution.json."""
    path = case["report"] / "attribution.json"
    data = json.loads(path.read_text())
    data["decision"]["family"], data["decision"]["confidence"] = "rotate", 0.99
    path.write_text(json.dumps(data, indent=2))
    assert ("report", "attribution.json", "changed") in _changes(case)
    (case["report"] / "SHA256SUMS").unlink()
    assert ("report", "SHA256SUMS", "removed") in _changes(case)


@pytest.mark.parametrize("edit", [
    lambda c: c["inputs"].update(folder=None),
    lambda c: c["inputs"]["files"][0].pop("sha256"),
    lambda c: c["inputs"].update(files="all.png"),
    lambda c: c["inputs"]["files"].__setitem__(0, 5),
    lambda c: c["bank"].update(curves=None),
    lambda c: c["bank"]["curves"][0].pop("curve_id"),
    lambda c: c["bank"].update(path=42),
    lambda c: c["baseline"].update(files=["a", "b"]),
    lambda c: c.pop("baseline"),
], ids=["folder-null", "no-sha256", "files-string", "entry-5", "curves-null",
        "no-curve-id", "path-42", "files-list", "no-baseline"])
def test_case_verify_refuses_a_malformed_custody_record(case, edit):
    """Case: fp case verify on a custody record with a field removed, nulled or mistyped."""
    path = case["report"] / "attribution.json"
    data = json.loads(path.read_text())
    edit(data["provenance"]["custody"])
    path.write_text(json.dumps(data))
    result = fp("case", "verify", case["report"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.startswith("Error: ") and "not a valid fp answer" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def rehash_log(bank: Bank, change) -> None:
    """Rewrite the bank's log as someone who knows the format would: ``change(record)``,
    then every record's states, hash and link recomputed (signatures dropped)."""
    from refbank import log

    records = log.read(bank.path)
    prev, rows = log.GENESIS, {"curves": {}, "baselines": {}}
    for rec in records:
        change(rec)
        rec["before"] = log.state_digest(rows)
        rows = log._apply(rows, rec)
        rec["state"] = log.state_digest(rows)
        rec["prev"] = prev
        rec.pop("signature", None)
        rec["hash"] = prev = log.record_hash(rec)
    (bank.path / "log.jsonl").write_text(
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def test_a_rehashed_row_fails_against_the_log(world, tmp_path):
    """Case: a family rewritten and row_sha256 recomputed with refbank.hashing.row_hash."""
    bank = copy_bank(world, tmp_path)
    target = world["ids"]["noise"][0]
    rewrite_curves(bank, lambda r: r.update(family="rotate") if r["curve_id"] == target
                   else None, rehash=True)
    report = bank.verify()
    assert not report.ok
    assert any(p.id == f"curves {target}" and "rewritten" in p.problem for p in report.problems)
    result = fp("bank", "verify", "--bank", bank.path)
    assert result.exit_code == 1 and "rewritten" in result.output
    with pytest.raises(BankError, match=target):
        attribute(world, bank, world["f"]["query_noise"])
    export = tmp_path / "x.tar"
    bank.export(export)
    with pytest.raises(BankError, match="failed verification"):
        Bank(tmp_path / "other").import_(export)


def test_a_rewritten_history_is_caught_by_the_answer_head_and_by_signatures(case, world,
                                                                            tmp_path):
    """Case: the row rewritten and re-hashed, and the whole log rewritten to match."""
    bank = case["bank"]
    target = world["ids"]["noise"][0]
    rewrite_curves(bank, lambda r: r.update(family="rotate") if r["curve_id"] == target
                   else None, rehash=True)
    new_hash = next(r["row_sha256"] for r in bank.curves() if r["curve_id"] == target)

    def forge(rec):
        for table in ("added", "removed"):
            if target in rec[table]["curves"]:
                rec[table]["curves"][target] = new_hash

    rehash_log(bank, forge)
    # without a key or a recorded head, a consistent rewrite of history cannot be seen ...
    assert bank.verify().ok
    # ... but the answer recorded the head, and fp case verify sees the history changed
    changes = _changes(case)
    assert any(kind == "bank_log" and change == "rewritten" for kind, _, change in changes)


def _keypair(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_signed_log_catches_a_rewritten_history(bank, tmp_path, monkeypatch):
    """Case: every change signed with the curator's key (FP_BANK_KEY); the history then
    rewritten consistently (rows and log re-hashed) by someone without the key."""
    private, public = _keypair(tmp_path, "curator")
    _, other = _keypair(tmp_path, "other")
    monkeypatch.setenv("FP_BANK_KEY", str(private))
    bid = bank.add_baseline(baseline_row(), save=save_arrays)
    [cid] = bank.add_curves([curve_row(bid)])
    bank.add_curves([curve_row(bid, model="m2", manifest_sha256="r" * 64)])
    result = fp("bank", "verify", "--key", public, "--bank", bank.path)
    assert result.exit_code == 0 and "signed by key" in result.output, result.output
    result = fp("bank", "verify", "--key", other, "--bank", bank.path)
    assert result.exit_code == 1 and "signed by another key" in result.output
    rewrite_curves(bank, lambda r: r.update(family="forged"), rehash=True)
    hashes = {r["curve_id"]: r["row_sha256"] for r in bank.curves()}

    def forge(rec):
        for cid_, h in list(rec["added"]["curves"].items()):
            rec["added"]["curves"][cid_] = hashes.get(cid_, h)

    rehash_log(bank, forge)
    assert bank.verify().ok  # consistent, unsigned: only the key can tell
    result = fp("bank", "verify", "--key", public, "--bank", bank.path)
    assert result.exit_code == 1 and "not signed" in result.output, result.output
    assert cid in bank.curves()[0]["curve_id"]


def test_bad_keys_are_one_error(bank, bid, tmp_path, monkeypatch):
    (tmp_path / "junk.pem").write_text("not a key")
    result = fp("bank", "verify", "--key", tmp_path / "junk.pem", "--bank", bank.path)
    assert result.exit_code == 1 and result.output.startswith("Error: --key")
    monkeypatch.setenv("FP_BANK_KEY", str(tmp_path / "junk.pem"))
    with pytest.raises(BankError, match="FP_BANK_KEY"):
        bank.add_curves([curve_row(bid)])
    assert bank.curves() == []


def test_a_writer_killed_between_log_and_table_leaves_a_bank_that_verifies(bank, bid,
                                                                           monkeypatch):
    """Case: the writer dies after logging a change and before replacing the table (as kill
    -9 would): the bank is as before, verify says so; the next change verifies too."""
    from refbank import store

    bank.add_curves([curve_row(bid)])
    with monkeypatch.context() as m:
        def die(*args, **kwargs):
            raise KeyboardInterrupt

        m.setattr(store, "write_table", die)
        with pytest.raises(KeyboardInterrupt):
            bank.add_curves([curve_row(bid, model="m2", manifest_sha256="r" * 64)])
    report = bank.verify()
    assert report.ok and any("interrupted" in w for w in report.warnings), report
    assert len(bank.curves()) == 1
    bank.add_curves([curve_row(bid, model="m3", manifest_sha256="s" * 64)])
    report = bank.verify()
    assert report.ok and report.log_records == 4, report
    [cid] = [r["curve_id"] for r in bank.curves() if r["model"] == "m3"]
    bank.remove_curves([cid])
    assert bank.verify().ok


def test_look_alike_family_names_are_normalized_or_warned(bank, bid):
    """Case: families 'rotat\\u00e9' and 'rotate\\u0301' (NFC, NFD), 'rotate' and 'ROTATE'."""
    from forensics.errors import FpWarning

    bank.add_curves([curve_row(bid, family="rotat\u00e9")])
    with warnings_as_list() as caught:
        bank.add_curves([curve_row(bid, family="rotate\u0301", manifest_sha256="r" * 64)])
    assert caught == []  # the same name once normalized: nothing to warn about
    assert {r["family"] for r in bank.curves()} == {"rotat\u00e9"}
    with pytest.warns(FpWarning, match="looks like the enrolled family 'rotat"):
        bank.add_curves([curve_row(bid, family="ROTATE", manifest_sha256="s" * 64)])
    with pytest.warns(FpWarning, match="'ROTATE'"):
        bank.add_curves([curve_row(bid, family="rotate", manifest_sha256="u" * 64)])


@contextlib.contextmanager
def warnings_as_list():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


# -- smaller: a mistyped bank, a fractional schema version, infinite curve values -------------


def test_a_mistyped_bank_path_is_named_not_read_as_empty(tmp_path):
    """Case: fp bank list / fp attribute --bank with a path that does not exist."""
    missing = tmp_path / "bnak"
    for args in (["bank", "list"], ["attribute", tmp_path]):
        result = fp(*args, "--bank", missing)
        assert result.exit_code == 1 and "does not exist" in result.output, result.output
        assert "fp baseline build" in result.output and not missing.exists()


def test_a_fractional_schema_version_is_refused(bank, bid):
    """Case: "schema_version": 1.5 in bank.json."""
    info = json.loads((bank.path / "bank.json").read_text())
    info["schema_version"] = 1.5
    (bank.path / "bank.json").write_text(json.dumps(info))
    with pytest.raises(BankError, match="unreadable schema version 1.5"):
        bank.curves()
    with pytest.raises(BankError, match="unreadable schema version"):
        bank.add_curves([curve_row(bid)])
    assert json.loads((bank.path / "bank.json").read_text())["schema_version"] == 1.5


def test_import_curves_refuses_values_beyond_a_float(bank, bid, tmp_path):
    """Case: fp bank import-curves of a file holding 1e999 (read as +inf)."""
    from forensics.data.curvefiles import read_layerchoice

    path = tmp_path / "F.txt"
    path.write_text("sd_1: [0.1, 1e999, 0.3]\n")
    with pytest.raises(InputError, match="1e999 is beyond the range"):
        read_layerchoice(path)


def test_an_export_killed_earlier_leaves_no_temporary_file_behind(bank, bid, tmp_path):
    """Case: SIGTERM or kill -9 during fp bank export left .tmp-<name>-<pid>-* beside it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".tmp-x.tar.gz-{dead}-abcd1234"
    stale.write_bytes(b"half an archive")
    live = out / f".tmp-x.tar.gz-{os.getpid()}-abcd1234"  # a running export's: kept
    live.write_bytes(b"in progress")
    bank.export(out / "x.tar.gz")
    assert not stale.exists() and live.exists() and (out / "x.tar.gz").is_file()
