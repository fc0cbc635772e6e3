"""The CLI shell: version, help, errors, light start-up, the installed entry point."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from forensics import __version__
from forensics.cli.app import app

runner = CliRunner()

HEAVY = ("torch", "timm", "open_clip", "sklearn", "scipy", "pyarrow", "ray")


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"fp {__version__}"


def test_list_matchers_json():
    result = runner.invoke(app, ["list", "matchers", "--json"])
    assert result.exit_code == 0, result.output
    names = [row["name"] for row in json.loads(result.output)]
    assert names == ["combined", "cosine", "l2", "zscore"]


@pytest.mark.parametrize("kind", ["encoders", "distances", "partitioners", "matchers"])
def test_list_every_kind_json(kind):
    from forensics.plugin.manager import names

    result = runner.invoke(app, ["list", kind, "--json"])
    assert result.exit_code == 0, result.output
    assert [row["name"] for row in json.loads(result.output)] == names(kind)


def test_plugins_json():
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert any(p["name"] == "fp_plugins.matchers" and p["builtin"] for p in info)


def test_usage_error_exits_2():
    result = runner.invoke(app, ["list", "gizmos"])
    assert result.exit_code == 2


def test_import_is_light():
    code = (
        "import sys, forensics.cli.app; "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported at start-up: {out.stdout}"


def test_help_and_version_are_fast_and_light():
    code = (
        "import sys\n"
        "from forensics.cli.app import app\n"
        "for args in (['--help'], ['--version']):\n"
        "    try:\n"
        "        app(args, prog_name='fp')\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert "HEAVY=\n" in out.stdout + "\n", out.stdout
    # CPU time, not wall time: a loaded machine must not make this flaky. Well under 1 s.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.0, f"--help and --version took {cpu:.2f} s of CPU time"


def _installed_fp() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "fp")
    return exe if os.path.exists(exe) else (shutil.which("fp") or "fp")


def test_installed_entry_point_runs():
    out = subprocess.run([_installed_fp(), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"fp {__version__}"


def test_python_m_forensics_help():
    out = subprocess.run(
        [sys.executable, "-m", "forensics", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "Usage" in out.stdout


def test_fp_error_prints_error_and_exits_1(monkeypatch):
    from forensics.plugin import manager as plugins

    env = dict(os.environ, FP_LOAD_PLUGINS="")
    out = subprocess.run(
        [_installed_fp(), "list", "matchers"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0
    # An FpError raised inside a command becomes "Error: ..." and exit status 1.
    def boom(kind):
        raise plugins.UnknownNameError("unknown thing 'x'; valid names: a, b")

    monkeypatch.setattr(plugins, "registry", boom)
    result = runner.invoke(app, ["list", "matchers"])
    assert result.exit_code == 1
    assert "Error: unknown thing 'x'; valid names: a, b" in result.output
    assert "Traceback" not in result.output


def test_debug_shows_traceback(monkeypatch):
    from forensics.plugin import manager as plugins

    def boom(kind):
        raise plugins.UnknownNameError("bad")

    monkeypatch.setattr(plugins, "registry", boom)
    result = runner.invoke(app, ["--debug", "list", "matchers"])
    assert result.exit_code == 1
    assert isinstance(result.exception, plugins.UnknownNameError)
