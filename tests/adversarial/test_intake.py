"""Image intake, the embedding cache and error messages under hostile and clumsy input.

Every case here once hung, crashed with a traceback, wasted work before a refusal, or said
something misleading. ``docs/reliability.md`` lists them (case, command, expected result).
The fuzz test at the end throws random bytes, mutated PNG/JPEG/GIF headers and truncations
at ``fp embed``: it must answer with a result or one ``Error:`` line, never a traceback, and
never hang.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from forensics.cli.app import INTERRUPTED, app
from forensics.data.embed import embed_folder
from forensics.data.images import MAX_BYTES_ENV, scan_folder
from forensics.errors import FpWarning, InputError
from forensics.paper.demo import _write_pngs, digit_images
from forensics.steps.attribute import attribute
from forensics.steps.build_baseline import build_baseline
from forensics.steps.curve import compute_curve
from forensics.steps.enroll import enroll

runner = CliRunner()
EMBED = ["--encoder", "vit-tiny-demo", "--weights", "random:0", "-q"]


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return digit_images()


@pytest.fixture
def folder(tmp_path, digits) -> Path:
    d = tmp_path / "imgs"
    _write_pngs(digits, np.arange(6), d)
    return d


def _one_error_line(result) -> str:
    """The run ended with exit 1 and exactly one ``Error:`` line on stderr, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.stderr.startswith('{"error"'):  # with --json: one JSON error object instead
        import json

        return "Error: " + json.loads(result.stderr)["error"]["message"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.stderr.startswith("Error: "), result.stderr
    return result.stderr


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocked read."""
    def fire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- only regular files


def test_fifo_device_and_symlink_to_dev_zero_are_refused_without_blocking(folder):
    os.mkfifo(folder / "fifo.png")
    os.symlink("/dev/zero", folder / "zero.png")
    (folder / "sub.png").mkdir()  # a folder named like an image is not a file to read
    with _deadline(20), pytest.raises(InputError) as err:
        scan_folder(folder)
    msg = str(err.value)
    assert "fifo.png: a FIFO, not a regular file" in msg
    assert "zero.png: a character device, not a regular file" in msg
    with _deadline(20):
        manifest = scan_folder(folder, skip_bad=True)
    assert len(manifest) == 6
    assert {s.relpath for s in manifest.skipped} == {"fifo.png", "zero.png"}


def test_fp_embed_on_a_fifo_answers_in_a_subprocess(tmp_path, folder):
    """The installed command, not just the library: one Error line, promptly."""
    os.mkfifo(folder / "x.png")
    fp = Path(sys.executable).with_name("fp")
    cmd = [str(fp)] if fp.exists() else [sys.executable, "-m", "forensics"]
    env = {**os.environ, "FP_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([*cmd, "embed", str(folder), *EMBED, "--out", str(tmp_path / "o.npz")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Error: 1 of 7 image files") and "x.png: a FIFO" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.npz").exists()


def test_size_cap_says_how_to_raise_it(folder, monkeypatch):
    size = (folder / "digit-0000.png").stat().st_size
    monkeypatch.setenv(MAX_BYTES_ENV, str(size - 1))
    with pytest.raises(InputError, match=f"more than the limit .* {MAX_BYTES_ENV}=") as err:
        scan_folder(folder)
    assert "digit-0000.png" in str(err.value)
    monkeypatch.setenv(MAX_BYTES_ENV, str(10 * size))
    assert len(scan_folder(folder)) == 6
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    with pytest.raises(InputError, match=f"{MAX_BYTES_ENV}='lots': give .* whole number"):
        scan_folder(folder)


def test_gif_is_read_and_an_animated_one_is_reported(folder, digits):
    (folder / "still.gif").write_bytes(_png(digits[7], "GIF"))
    frames = [Image.fromarray(digits[i]) for i in (8, 9)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    (folder / "moving.gif").write_bytes(buf.getvalue())
    with pytest.raises(InputError, match="moving.gif: an animation of 2 frames"):
        scan_folder(folder)
    buf = io.BytesIO()  # a multi-page TIFF is refused as well: which page is the image?
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    (folder / "pages.tif").write_bytes(buf.getvalue())
    manifest = scan_folder(folder, skip_bad=True)
    assert "still.gif" in {e.relpath for e in manifest.entries}
    assert len(manifest) == 7
    assert [s.relpath for s in manifest.skipped] == ["moving.gif", "pages.tif"]


# ---------------------------------------------------------------- damaged cache chunks


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rewrite(path: Path, change) -> None:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _nan(arrays):
    arrays["layer_003"][1, 2] = np.nan


def _wrong_rows(arrays):
    arrays["layer_000"] = arrays["layer_000"][:-1]


def _wrong_width(arrays):
    arrays["layer_005"] = arrays["layer_005"][:, :-3]


@pytest.mark.parametrize("damage", [_truncate, lambda p: _rewrite(p, _nan),
                                    lambda p: _rewrite(p, _wrong_rows),
                                    lambda p: _rewrite(p, _wrong_width)],
                         ids=["truncated", "nan", "wrong-rows", "wrong-width"])
def test_damaged_cache_chunk_is_reported_once_and_its_images_embedded_again(
        tmp_path, folder, damage):
    kw = dict(weights="random:0", cache_dir=tmp_path / "cache", progress=False, num_workers=0,
              device="cpu")
    first = embed_folder(folder, "vit-tiny-demo", **kw)
    (chunk,) = (tmp_path / "cache").rglob("chunk-*.npz")
    damage(chunk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = embed_folder(folder, "vit-tiny-demo", **kw)
    damaged = [w for w in caught if issubclass(w.category, FpWarning)]
    assert len(damaged) == 1 and chunk.name in str(damaged[0].message)
    assert "embedded again" in str(damaged[0].message)
    assert again.encoder_info["cache"] == {"hits": 0, "computed": 6, "damaged": [chunk.name]}
    for a, b in zip(first.arrays, again.arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not chunk.exists() and chunk.with_name(f"damaged-{chunk.name}").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FpWarning)  # reported once: not on the next run
        third = embed_folder(folder, "vit-tiny-demo", **kw)
    assert third.encoder_info["cache"] == {"hits": 6, "computed": 0}


def test_cli_reports_a_damaged_chunk_as_one_warning_line(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("FP_CACHE_DIR", str(tmp_path / "c"))
    args = ["embed", str(folder), *EMBED, "--out", str(tmp_path / "o.npz")]
    assert runner.invoke(app, args).exit_code == 0
    (chunk,) = (tmp_path / "c").rglob("chunk-*.npz")
    _truncate(chunk)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning: the embedding cache file")
    assert "BadZipFile" in lines[0] and "Traceback" not in result.output


# ---------------------------------------------------------------- a small bank


@pytest.fixture(scope="module")
def world(tmp_path_factory, digits):
    """A bank with one baseline (one cell per layer) and two families of two curves."""
    root = tmp_path_factory.mktemp("intake-world")
    order = np.random.default_rng(3).permutation(len(digits))
    folders = {}
    for name, ids in (("T", order[:60]), ("P", order[60:100]), ("a", order[100:150]),
                      ("b", order[150:200]), ("q", order[200:225])):
        _write_pngs(digits, ids, root / name)
        folders[name] = root / name
    from forensics.paper.synth import synth_folder

    synth_folder("shuffle", folders["b"], root / "b2", seed=1, grid=4)
    cache = root / "cache" / "embeddings"
    kw = dict(device="cpu", progress=False, cache_dir=cache, bank=root / "bank")
    build_baseline("digits", folders["T"], folders["P"], encoder="vit-tiny-demo",
                            weights="random:0", n_cells=1, **kw)
    enroll(folders["a"], baseline="digits", model="plain", family="real",
                    per_curve=25, **kw)
    enroll(root / "b2", baseline="digits", model="shuf", family="shuffle",
                    per_curve=25, **kw)
    return {"root": root, "bank": root / "bank", "cache": root / "cache", **folders}


@pytest.fixture
def in_world(world, monkeypatch):
    monkeypatch.setenv("FP_CACHE_DIR", str(world["cache"]))
    monkeypatch.setenv("FP_BANK", str(world["bank"]))
    return world


@pytest.fixture
def suspect(tmp_path, world):
    """The query images plus one file that is not an image."""
    d = tmp_path / "suspect"
    d.mkdir()
    for p in world["q"].iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return d


def test_skip_bad_on_attribute_records_what_was_left_out(in_world, suspect):
    args = ["attribute", str(suspect), "--n-boot", "0", "--json", "-q"]
    refused = runner.invoke(app, args)
    assert "broken.png: truncated or corrupt" in _one_error_line(refused)
    assert "--skip-bad" in refused.stderr
    result = runner.invoke(app, [*args, "--skip-bad"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    skipped = answer["provenance"]["skipped"]
    assert [s[0] for s in skipped] == ["broken.png"] and "corrupt" in skipped[0][1]
    assert answer["provenance"]["inputs"]["n_images"] == 25
    assert "skipped broken.png" in result.stderr


def test_skip_bad_on_curve_and_enroll(in_world, suspect, tmp_path):
    bank = tmp_path / "bank2"
    shutil.copytree(in_world["bank"], bank)
    curve = runner.invoke(app, ["curve", str(suspect), "--json", "-q", "--skip-bad"])
    assert curve.exit_code == 0, curve.output
    assert json.loads(curve.stdout)["provenance"]["skipped"][0][0] == "broken.png"
    enroll = runner.invoke(app, ["enroll", str(suspect), "--model", "q", "--family", "fam",
                                 "--per-curve", "25", "-q", "--skip-bad", "--json",
                                 "--bank", str(bank)])
    assert enroll.exit_code == 0, enroll.output
    (row,) = json.loads(enroll.stdout)
    assert json.loads(row["params_json"])["skipped"][0][0] == "broken.png"


def test_skip_bad_on_baseline_build(in_world, tmp_path, digits):
    train = tmp_path / "T"
    shutil.copytree(in_world["T"], train)
    (train / "zero.png").write_bytes(b"")
    args = ["baseline", "build", "other", "--train", str(train), "--heldout",
            str(in_world["P"]), "--encoder", "vit-tiny-demo", "--weights", "random:0",
            "--n-cells", "1", "-q", "--json", "--bank", str(tmp_path / "bank")]
    assert "zero.png: empty file" in _one_error_line(runner.invoke(app, args))
    result = runner.invoke(app, [*args, "--skip-bad"])
    assert result.exit_code == 0, result.output
    params = json.loads(json.loads(result.stdout)["params_json"])
    assert params["skipped"] == {"train": [["zero.png", "empty file (0 bytes)"]],
                                 "heldout": []}
    assert "skipped train zero.png" in result.stderr


# ---------------------------------------------------------------- no tracebacks


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_out_of_range_seeds_are_one_error_line(in_world, tmp_path, seed):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "e.npz", T=rng.normal(size=(60, 4)), P=rng.normal(size=(30, 4)),
             Q=rng.normal(size=(30, 4)))
    for args in (["ct", str(tmp_path / "e.npz")],
                 ["attribute", str(in_world["q"]), "-q"],
                 ["baseline", "build", "x", "--train", str(in_world["T"]), "--heldout",
                  str(in_world["P"]), "--encoder", "vit-tiny-demo", "-q"],
                 ["synth", "noise", str(in_world["q"]), str(tmp_path / "synth")],
                 ["evaluate"],
                 ["demo", "--quick", "--out", str(tmp_path / "demo")],
                 ["invmm", str(in_world["q"]), "--model", str(tmp_path / "no-model")]):
        result = runner.invoke(app, [*args, "--seed", seed])
        assert f"--seed {seed}: give a whole number from 0 to 4294967295" in \
            _one_error_line(result), args


def _ct_file(path: Path, scale: float = 1.0, **extra) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, T=rng.normal(size=(60, 4)) * scale, P=rng.normal(size=(30, 4)) * scale,
             Q=rng.normal(size=(30, 4)) * scale, **extra)
    return path


def test_fp_ct_bad_tau_huge_values_and_text_files(tmp_path):
    cases = {
        "array tau must be a number": _ct_file(tmp_path / "s.npz", tau=np.array("0.1")),
        "values as large as 3.": _ct_file(tmp_path / "h.npz", scale=1e300),
        "is not an .npz file": tmp_path / "t.npz",
    }
    (tmp_path / "t.npz").write_text("T,P,Q\n1,2,3\n")
    for expected, path in cases.items():
        msg = _one_error_line(runner.invoke(app, ["ct", str(path)]))
        assert expected in msg and "pickled" not in msg, msg
    ok = runner.invoke(app, ["ct", str(_ct_file(tmp_path / "ok.npz", scale=1e90)), "--json"])
    assert ok.exit_code == 0, ok.output  # large but representable values still work


def test_embed_out_folder_and_bank_under_a_file(tmp_path, folder):
    (tmp_path / "dir.npz").mkdir()
    msg = _one_error_line(runner.invoke(app, ["embed", str(folder), *EMBED, "--out",
                                              str(tmp_path / "dir.npz")]))
    assert "is a folder; give the name of a file" in msg
    (tmp_path / "plain").write_text("x")
    for args in (["bank", "list"], ["baseline", "list"]):
        msg = _one_error_line(runner.invoke(app, [*args, "--bank", str(tmp_path / "plain/sub")]))
        assert "lies under" in msg and "which is a file" in msg


# ---------------------------------------------------------------- cheap checks come first


@pytest.fixture
def no_embedding(monkeypatch):
    """Any embedding fails the test: the refusal must come before it."""
    import forensics.data.embed

    def boom(*args, **kwargs):
        raise AssertionError("images were embedded before a cheap check failed")

    monkeypatch.setattr(forensics.data.embed, "embed_folder", boom)


def test_bad_baseline_name_and_newer_bank_are_refused_before_embedding(
        in_world, tmp_path, no_embedding):
    base = ["baseline", "build", "--train", str(in_world["T"]), "--heldout", str(in_world["P"]),
            "--encoder", "vit-tiny-demo", "-q", "--bank", str(tmp_path / "b")]
    msg = _one_error_line(runner.invoke(app, [*base[:2], "bad name!", *base[2:]]))
    assert "baseline name 'bad name!' is not allowed" in msg
    msg = _one_error_line(runner.invoke(app, [*base[:2], "ok", *base[2:], "--distance", "nope"]))
    assert "nope" in msg
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bank.json").write_text(json.dumps({"schema_version": 999}))
    msg = _one_error_line(runner.invoke(app, [*base[:2], "ok", *base[2:]]))
    assert "999" in msg


def test_attribute_checks_its_options_before_embedding(in_world, no_embedding):
    for args, expected in (
            (["--drop-layers", "-1"], "cannot drop layer -1: curves have 8 layers (indices 0..7)"),
            (["--drop-layers", "8"], "cannot drop layer 8: curves have 8 layers (indices 0..7)"),
            (["--drop-layers", "x"], "--drop-layers 'x': give layer indices"),
            (["--matcher", "nope"], "nope")):
        msg = _one_error_line(runner.invoke(app, ["attribute", str(in_world["q"]), "-q", *args]))
        assert expected in msg, msg


def test_fp_embed_checks_the_encoder_name_before_scanning(folder, tmp_path, monkeypatch):
    import forensics.data.embed

    def no_scan(*args, **kwargs):
        raise AssertionError("the folder was scanned before the encoder name was checked")

    monkeypatch.setattr(forensics.data.embed, "scan_folder", no_scan)
    msg = _one_error_line(runner.invoke(app, ["embed", str(folder), "--encoder", "vit-nope",
                                              "--out", str(tmp_path / "o.npz")]))
    assert "vit-nope" in msg and "vit-tiny-demo" in msg  # the valid names are listed


def test_python_api_checks_tau_and_seed_before_embedding(in_world, no_embedding):
    q = in_world["q"]
    for call in (lambda: compute_curve(q, tau=-1.0),
                 lambda: enroll(q, baseline=None, model="m", family="f", tau=-1.0),
                 lambda: attribute(q, tau=float("nan")),
                 lambda: attribute(q, seed=-5)):
        with pytest.raises(InputError, match="tau must be|--seed -5"):
            call()


# ---------------------------------------------------------------- messages that mislead


def test_damaged_baseline_file_does_not_promise_a_rebuild(in_world, tmp_path):
    bank = tmp_path / "bank"
    shutil.copytree(in_world["bank"], bank)
    (arrays,) = bank.rglob("arrays.npz")
    arrays.write_bytes(b"garbage")
    msg = _one_error_line(runner.invoke(app, ["curve", str(in_world["q"]), "-q", "--bank",
                                              str(bank)]))
    assert "rebuilt" not in msg and "fp bank verify" in msg


def test_deleted_fingerprint_file_is_called_missing(in_world, tmp_path):
    bank = tmp_path / "bank"
    shutil.copytree(in_world["bank"], bank)
    (extras,) = bank.rglob("fingerprint-arrays.npz")  # every fingerprint's arrays
    extras.unlink()
    msg = _one_error_line(runner.invoke(app, ["attribute", str(in_world["q"]), "-q",
                                              "--bank", str(bank)]))
    # the baseline's files are checked by hash before use: the deletion is a change
    assert "files under" in msg and "were changed" in msg and "built without" not in msg


def test_raw_library_warnings_are_hidden_and_ctrl_c_is_one_line(monkeypatch, folder, tmp_path):
    import forensics.data.embed

    def noisy(*args, **kwargs):
        warnings.warn("Palette images with Transparency expressed in bytes", UserWarning,
                      stacklevel=2)
        raise InputError("the real problem")

    monkeypatch.setattr(forensics.data.embed, "embed_folder", noisy)
    args = ["embed", str(folder), *EMBED, "--out", str(tmp_path / "o.npz")]
    result = runner.invoke(app, args)
    assert result.stderr == "Error: the real problem\n"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(forensics.data.embed, "embed_folder", interrupted)
    result = runner.invoke(app, args)
    assert result.exit_code == 130
    assert result.stderr == INTERRUPTED + "\n"
    assert "already reported (e.g. Enrolled ...) is committed" in INTERRUPTED
    result = runner.invoke(app, [*args, "--json"])  # under --json: a JSON error object
    assert result.exit_code == 130
    error = json.loads(result.stderr)["error"]
    assert error["exit_code"] == 130 and error["message"] == INTERRUPTED


def test_a_real_sigint_gives_one_line_and_status_130(tmp_path, folder):
    """SIGINT in a subprocess while a command works (its step sleeps until interrupted)."""
    script = (
        "import sys, time\n"
        "import forensics.data.embed\n"
        "def slow(*a, **k):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "forensics.data.embed.embed_folder = slow\n"
        "from forensics.cli.app import main\n"
        "sys.argv = ['fp', 'embed', sys.argv[1], '--encoder', 'vit-tiny-demo', '--out', "
        "sys.argv[2]]\n"
        "main()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder), str(tmp_path / "o.npz")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == INTERRUPTED + "\n"


# ---------------------------------------------------------------- fuzz


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SEEDS = {fmt: _png(np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8),
                    fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


@st.composite
def _image_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", *_SEEDS]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    data = bytearray(_SEEDS[kind])
    for _ in range(draw(st.integers(0, 6))):
        near_header = draw(st.booleans())
        pos = draw(st.integers(0, min(len(data), 64 if near_header else len(data)) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=_image_bytes(), suffix=st.sampled_from([".png", ".jpg", ".gif", ".tif", ".webp"]))
def test_fuzz_image_intake_gives_a_result_or_one_error_line(tmp_path, data, suffix):
    case = Path(tempfile.mkdtemp(dir=tmp_path))
    (case / f"x{suffix}").write_bytes(data)
    out = case / "o.npz"
    with _deadline(60):
        result = runner.invoke(app, ["embed", str(case), *EMBED, "--no-cache", "--out",
                                     str(out)])
    assert "Traceback" not in result.output
    event("embedded" if result.exit_code == 0 else "refused")
    if result.exit_code == 0:
        assert result.exception is None and out.is_file() and result.stderr == ""
        assert result.stdout.startswith("1 images, 8 layers of vit-tiny-demo")
    else:
        _one_error_line(result)
        assert not out.exists()


# ---------------------------------------------------------------- consistent intake


def test_multi_page_tiff_symlinked_folder_and_control_characters(tmp_path, folder, digits):
    """Case: a 2-page TIFF (refused like an animation), a symlinked sub-folder (recorded
    in skipped), a file name with an escape sequence and a newline (shown escaped)."""
    pages = [Image.fromarray(digits[i]) for i in (0, 1)]
    pages[0].save(folder / "two.tif", save_all=True, append_images=pages[1:])
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(next(folder.glob("*.png")), other / "x.png")
    os.symlink(other, folder / "linked")
    (folder / "evil\x1b[2J\nname.png").write_bytes(b"not an image")
    with pytest.raises(InputError) as err:
        scan_folder(folder)
    msg = str(err.value)
    assert "two.tif: a TIFF of 2 pages, not one image" in msg
    assert "\x1b" not in msg and "evil\\x1b[2J\\nname.png" in msg
    manifest = scan_folder(folder, skip_bad=True)
    skipped = {s.relpath: s.reason for s in manifest.skipped}
    assert "symbolic link to a folder" in skipped["linked"]
    assert "linked/x.png" not in {e.relpath for e in manifest.entries}
    result = runner.invoke(app, ["embed", str(folder), *EMBED, "--skip-bad", "--out",
                                 str(tmp_path / "o.npz")])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stderr and "skipped linked: a symbolic link" in result.stderr


def test_cache_info_counts_each_image_once(tmp_path, folder):
    """Case: two fp embed runs at once on one folder both store its images: fp cache info
    counts 6 images, not 12."""
    from forensics.data.embed import cache_info

    cache = tmp_path / "cache"
    runner.invoke(app, ["embed", str(folder), *EMBED, "--cache-dir", str(cache), "--out",
                        str(tmp_path / "a.npz")])
    [entry] = [d for d in cache.iterdir() if d.is_dir()]
    for chunk in list(entry.glob("chunk-*.npz")):  # what the second run would have written
        shutil.copy(chunk, entry / f"chunk-copy{chunk.name[6:]}")
    [info] = cache_info(cache)["entries"]
    assert info["n_chunks"] >= 2 and info["n_images"] == 6
