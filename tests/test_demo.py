"""``fp demo``: the main job end to end on bundled digits, offline, on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.paper.demo import GENERATORS, digit_images


def test_digits_are_real_upscaled_images():
    images = digit_images()
    assert images.shape == (1797, 32, 32) and images.dtype == np.uint8
    assert images[:, 0, 0].max() < 32 and images.max() > 200  # dark background, bright ink
    assert sum(not g.enrolled for g in GENERATORS) == 1
    assert len({g.family for g in GENERATORS if g.enrolled}) == 4


def test_quick_demo_json(tmp_path, monkeypatch):
    monkeypatch.setenv("FP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FP_BANK", str(tmp_path / "must-not-be-used"))
    result = CliRunner().invoke(app, ["demo", "--quick", "--json", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["rows"]
    assert [r["enrolled"] for r in rows] == [True, True, False]
    for r in rows[:2]:  # fresh samples of enrolled generators: right family and model
        assert r["correct"] and r["decided_family"] == r["true_family"], r
        assert r["decided_model"] == r["model"]
        # the two-level answer's confidence, simulated from the demo's bank at this size
        assert 0.0 < r["confidence"] < 1.0
        assert 0 <= r["stability"] <= 1
    assert data["accuracy"] == 1.0 and data["bank"] == str(tmp_path / "d" / "bank")
    assert not (tmp_path / "must-not-be-used").exists()
    assert (tmp_path / "d" / "bank" / "curves.parquet").exists()
    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "d")])
    assert again.exit_code == 1 and "is not empty" in again.stderr


@pytest.mark.slow
def test_full_demo_table(tmp_path, monkeypatch):
    monkeypatch.setenv("FP_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "true family" in result.stdout and "never enrolled" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("enrolled generators"))
    correct, total = (int(v) for v in line.split(": ")[1].split(" ")[0].split("/"))
    assert total == 8 and correct >= 6
