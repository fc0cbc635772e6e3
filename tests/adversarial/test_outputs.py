"""What fp writes never destroys what was at the path, and bad output paths cost nothing.

Each test names the case it guards; ``docs/reliability.md`` ("Outputs") lists them with the
command and the expected result.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.data.atomic import atomic_write_bytes, check_output_file
from forensics.errors import InputError

runner = CliRunner()


def fp(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result) -> str:
    """Exit 1 and exactly one ``Error:`` line, no traceback; the line."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and result.stderr.startswith("Error: "), result.stderr
    return result.stderr


@pytest.fixture
def fifo(tmp_path) -> Path:
    p = tmp_path / "out.png"
    os.mkfifo(p)
    return p


@pytest.fixture
def device(tmp_path) -> Path:
    """A character device like /dev/null, made where the test may (root only)."""
    p = tmp_path / "null.png"
    try:
        os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot make a device node here (not root)")
    return p


def test_the_atomic_write_never_replaces_a_fifo_or_a_device(fifo, device, tmp_path):
    """Case: an output path that is a FIFO or a character device (as root: /dev/full)."""
    for target in (fifo, device):
        before = os.stat(target).st_mode
        with pytest.raises(InputError, match="not a regular file|a FIFO|a character device"):
            atomic_write_bytes(target, b"png")
        assert os.stat(target).st_mode == before  # still the same kind of node
        assert not stat.S_ISREG(os.stat(target).st_mode)
    regular = tmp_path / "plain.png"
    regular.write_bytes(b"old")
    atomic_write_bytes(regular, b"new")  # a regular file is replaced, as before
    assert regular.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_output_paths_are_checked_before_any_work(tmp_path, fifo):
    """Case: --plot on a FIFO, a folder or FILE/sub.png; --out on a FIFO; before embedding."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    missing = tmp_path / "no-such-images"  # never reached: the path is checked first
    for plot, words in ((fifo, "a FIFO"), (tmp_path, "is a folder"),
                        (afile / "sub.png", "lies under")):
        msg = one_error(fp("curve", missing, "--plot", plot, "--bank", tmp_path / "bank"))
        assert "--plot" in msg and words in msg, msg
        assert "no-such-images" not in msg
    fifo_npz = tmp_path / "e.npz"
    os.mkfifo(fifo_npz)
    msg = one_error(fp("embed", missing, "--encoder", "vit-tiny-demo", "--out", fifo_npz))
    assert "--out" in msg and "a FIFO" in msg
    assert stat.S_ISFIFO(os.stat(fifo_npz).st_mode)


def test_check_output_file_accepts_a_new_or_regular_path(tmp_path):
    assert check_output_file(tmp_path / "new.png") == tmp_path / "new.png"
    (tmp_path / "old.png").write_bytes(b"x")
    assert check_output_file(tmp_path / "old.png") == tmp_path / "old.png"


@pytest.mark.parametrize("make,words", [("file", "lies under"), ("report", "holds a report")])
def test_attribute_report_path_is_refused_before_any_work(tmp_path, make, words):
    """Case: fp attribute --report FILE/sub, or a folder holding a case report."""
    if make == "file":
        (tmp_path / "afile").write_text("x")
        report = tmp_path / "afile" / "sub"
    else:
        report = tmp_path / "case"
        report.mkdir()
        (report / "attribution.json").write_text("{}")
    msg = one_error(fp("attribute", tmp_path / "no-such-images", "--report", report,
                       "--bank", tmp_path / "no-bank"))
    assert words in msg and "no-such-images" not in msg and "no-bank" not in msg
    if make == "report":
        assert "--force" in msg and (report / "attribution.json").read_text() == "{}"


def test_memorization_and_synth_and_demo_output_paths(tmp_path):
    """Case: fp memorization --report FILE/sub, fp synth SRC FILE/sub, fp demo --out FILE."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    msg = one_error(fp("memorization", tmp_path / "none", "--report", afile / "sub",
                       "--bank", tmp_path / "no-bank"))
    assert "lies under" in msg
    src = tmp_path / "src"
    src.mkdir()
    msg = one_error(fp("synth", "noise", src, afile / "sub"))
    assert "lies under" in msg
    for out in (afile, afile / "sub"):
        msg = one_error(fp("demo", "--out", out, "--quick"))
        assert "--out" in msg, msg


def test_report_inside_the_suspect_folder_is_refused(tmp_path):
    """Case: fp attribute DIR --report DIR/report (the report would become evidence)."""
    suspect = tmp_path / "suspect"
    suspect.mkdir()
    msg = one_error(fp("attribute", suspect, "--report", suspect / "report",
                       "--bank", tmp_path / "no-bank"))
    assert "inside the input folder" in msg


def test_bank_export_under_a_file_is_one_error(tmp_path):
    """Case: fp bank export FILE/sub.tar."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    from refbank import Bank

    bank = Bank(tmp_path / "bank")
    bank.add_baseline({"name": "b", "encoder": "timm:tiny", "weights_sha256": "ab" * 32,
                       "layers": ["l0"], "train_manifest_sha256": "t" * 64,
                       "heldout_manifest_sha256": "p" * 64})
    msg = one_error(fp("bank", "export", afile / "sub.tar", "--bank", bank.path))
    assert "lies under" in msg
