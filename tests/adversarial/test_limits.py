"""Sizes and numbers a user can type are bounded, and failures are one ``Error:`` line.

Each test names the case it guards; ``docs/reliability.md`` ("Limits and failed writes")
lists them with the command and the expected result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from forensics import defaults
from forensics.cli.app import app
from forensics.data.images import MAX_BYTES_ENV

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
EMBED = ["--encoder", "vit-tiny-demo", "--weights", "random:0", "-q"]


def fp(*args: object, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_error(result) -> str:
    """Exit 1 and exactly one ``Error:`` line (or one JSON error object), no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.stderr.startswith('{"error"'):
        import json

        return json.loads(result.stderr)["error"]["message"]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and result.stderr.startswith("Error: "), result.stderr
    return result.stderr


@pytest.mark.parametrize("command", [
    ["attribute", "IMGS"], ["curve", "IMGS"], ["memorization", "IMGS"],
    ["enroll", "IMGS", "--model", "m", "--family", "f"],
])
def test_tau_beyond_one_is_refused_before_any_work(tmp_path, command):
    """Case: --tau 1e308 on the image commands (an OverflowError after embedding)."""
    args = [a if a != "IMGS" else tmp_path / "no-such-images" for a in command]
    msg = one_error(fp(*args, "--tau", "1e308", "--bank", tmp_path / "no-bank"))
    assert "tau must be a share" in msg and "1e+308" in msg
    assert "no-such-images" not in msg and "no-bank" not in msg


def _ct_file(path: Path, **extra) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"T": rng.normal(size=(60, 3)), "P": rng.normal(size=(40, 3)),
              "Q": rng.normal(size=(40, 3)), **extra}
    np.savez(path, **arrays)
    return path


def test_fp_ct_tau_and_cell_labels_are_bounded(tmp_path):
    """Case: fp ct --tau 1e308, a tau of 1e308 in the file, a T_cells label of 1e12."""
    plain = _ct_file(tmp_path / "plain.npz")
    assert "tau must be a share" in one_error(fp("ct", plain, "--tau", "1e308"))
    in_file = _ct_file(tmp_path / "tau.npz", tau=np.float64(1e308))
    assert "tau must be a share" in one_error(fp("ct", in_file))
    cells = {"T_cells": np.zeros(60, np.int64), "P_cells": np.zeros(40, np.int64),
             "Q_cells": np.zeros(40, np.int64)}
    cells["T_cells"][0] = 10**12
    big = _ct_file(tmp_path / "cells.npz", **cells)
    msg = one_error(fp("ct", big))
    assert "T_cells" in msg and str(defaults.MAX_CELL_LABEL) in msg
    assert fp("ct", plain, "--tau", "0.05").exit_code == 0


def test_n_boot_and_max_size_are_bounded(tmp_path):
    """Case: fp evaluate / attribute --n-boot 100000000000; fp bank import --max-size inf."""
    for command in (["evaluate"], ["attribute", tmp_path / "none"]):
        msg = one_error(fp(*command, "--n-boot", "100000000000", "--bank", tmp_path / "b"))
        assert "--n-boot" in msg and str(defaults.MAX_N_BOOT) in msg
    for size in ("inf", "1e308"):
        msg = one_error(fp("bank", "import", tmp_path / "x.tar", "--max-size", size,
                           "--bank", tmp_path / "b"))
        assert "--max-size" in msg


def test_image_size_cap_is_bounded(tmp_path):
    """Case: FP_MAX_IMAGE_BYTES=99999999999999999999999999."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    msg = one_error(fp("embed", tmp_path / "imgs", *EMBED, "--out", tmp_path / "e.npz",
                       env={MAX_BYTES_ENV: "9" * 26}))
    assert MAX_BYTES_ENV in msg and str(defaults.MAX_IMAGE_BYTES_LIMIT) in msg


@pytest.fixture
def images(tmp_path) -> Path:
    from forensics.paper.demo import _write_pngs, digit_images

    folder = tmp_path / "imgs"
    _write_pngs(digit_images(), np.arange(4), folder)
    return folder


def _writable(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("")
        (folder / "probe").unlink()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("where", ["file", "under-file", "read-only", "home"])
def test_an_unusable_cache_folder_is_a_warning_not_a_traceback(tmp_path, images, where):
    """Case: FP_CACHE_DIR a file, under a file, or read-only; a read-only home without
    FP_CACHE_DIR: embed without (writing) the cache."""
    cache = tmp_path / "cache"
    env: dict | None = None
    if where == "home":
        home = tmp_path / "home"
        home.mkdir()
        env = {"FP_CACHE_DIR": None, "XDG_CACHE_HOME": None, "HOME": str(home)}
        cache = home / "x"  # only what the finally below undoes
        (cache / "embeddings").mkdir(parents=True)
        os.chmod(home, 0o555)
        subprocess.run(["chattr", "+i", str(home)], capture_output=True, check=False)
        if _writable(home):
            pytest.skip("cannot make a folder read-only here")
        where = "read-only-home"
    elif where == "file":
        cache.write_text("x")
    elif where == "under-file":
        (tmp_path / "afile").write_text("x")
        cache = tmp_path / "afile" / "cache"
    else:
        (cache / "embeddings").mkdir(parents=True)
        os.chmod(cache / "embeddings", 0o555)
        if _writable(cache / "embeddings"):  # root ignores permission bits: immutable
            subprocess.run(["chattr", "+i", str(cache / "embeddings")], capture_output=True,
                           check=False)
        if _writable(cache / "embeddings"):
            pytest.skip("cannot make a folder read-only here")
    env = env or {"FP_CACHE_DIR": str(cache)}
    try:
        result = fp("embed", images, *EMBED, "--out", tmp_path / "e.npz", env=env)
    finally:
        if where == "read-only-home":
            subprocess.run(["chattr", "-i", str(tmp_path / "home")], capture_output=True,
                           check=False)
            os.chmod(tmp_path / "home", 0o755)
        if where == "read-only":
            subprocess.run(["chattr", "-i", str(cache / "embeddings")], capture_output=True,
                           check=False)
            os.chmod(cache / "embeddings", 0o755)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "Warning: the embedding cache folder" in result.stderr
    assert "4 images" in result.stdout and (tmp_path / "e.npz").is_file()


FILLER = textwrap.dedent("""
    import resource, sys
    from refbank import Bank
    from forensics.errors import BankError
    bank = Bank(sys.argv[1])
    bid = bank.baselines()[0]["baseline_id"]
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    rows = [{"model": f"m{i}", "family": "f", "encoder": "timm:tiny", "weights_sha256": "ab" * 32,
             "baseline_id": bid, "layers": ["l0"], "values": [0.1], "n_images": 9,
             "manifest_sha256": f"{i:064d}", "notes": "n" * 4000} for i in range(40)]
    try:
        bank.add_curves(rows)
    except BankError as exc:
        print("Error:", exc)
        sys.exit(1)
""")


def test_a_write_over_the_file_size_limit_is_one_line_and_the_bank_stays(tmp_path):
    """Case: ulimit -f during fp enroll (OSError: File too large in the table write)."""
    from refbank import Bank

    bank = Bank(tmp_path / "bank")
    bank.add_baseline({"name": "b", "encoder": "timm:tiny", "weights_sha256": "ab" * 32,
                       "layers": ["l0"], "train_manifest_sha256": "t" * 64,
                       "heldout_manifest_sha256": "p" * 64})
    limit = max(p.stat().st_size for p in bank.path.iterdir() if p.is_file()) + 20_000
    out = subprocess.run([sys.executable, "-c", FILLER, str(bank.path), str(limit)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert "File too large" in out.stdout and "nothing was changed" in out.stdout
    assert bank.curves() == [] and bank.verify().ok


@pytest.mark.parametrize("args", [["noise", "--sigma", "nan"], ["rotate", "--angle", "nan"],
                                  ["noise", "--sigma", "inf"]])
def test_synth_refuses_non_finite_parameters(tmp_path, images, args):
    """Case: fp synth noise --sigma nan / rotate --angle nan (they wrote black images)."""
    kind, *rest = args
    msg = one_error(fp("synth", kind, images, tmp_path / "out", *rest))
    assert "give a finite number" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
