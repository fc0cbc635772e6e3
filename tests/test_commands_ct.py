"""``fp ct FILE.npz``: golden files, files without cells, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from forensics.cli.app import app

runner = CliRunner()
GOLDEN = Path(__file__).parent / "data" / "golden" / "ct"
CASES = json.loads((GOLDEN / "index.json").read_text())


def run_json(*args: str) -> dict:
    result = runner.invoke(app, ["ct", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("case", CASES[::3], ids=[c["file"] for c in CASES[::3]])
def test_golden_files_reproduce_both_references(case):
    path = str(GOLDEN / case["file"])
    l2 = run_json(path, "--distance", "euclidean")
    assert l2["partitioner"] == "given" and l2["tau"] == case["tau"]  # the file's tau
    np.testing.assert_allclose(l2["ct"], case["expected"]["l2_meehan"], rtol=1e-9)
    abscos = run_json(path)
    assert abscos["distance"] == "abscosine"
    np.testing.assert_allclose(abscos["ct"], case["expected"]["abscos_layerchoice"], rtol=1e-9)
    cell = abscos["cells"][0]
    assert set(cell) == {"cell", "n_T", "n_P", "n_Q", "z", "kept"}


@pytest.fixture
def plain_file(tmp_path):
    rng = np.random.default_rng(0)
    T = rng.normal(size=(300, 10))
    path = tmp_path / "emb.npz"
    Q = np.concatenate([T[:80] + 1e-3, rng.normal(size=(40, 10))])
    np.savez(path, T=T, P=rng.normal(size=(120, 10)), Q=Q)
    return path


def test_file_without_cells_uses_kmeans(plain_file):
    out = run_json(str(plain_file), "--seed", "3", "--tau", "0.05")
    assert out["partitioner"] == "kmeans" and out["seed"] == 3 and out["tau"] == 0.05
    assert out["status"] == "ok" and out["ct"] < 0 and len(out["cells"]) == 10
    again = run_json(str(plain_file), "--seed", "3", "--tau", "0.05")
    assert again == out


def test_human_output(plain_file):
    result = runner.invoke(app, ["ct", str(plain_file), "--distance", "euclidean"])
    assert result.exit_code == 0, result.output
    assert "C_T = " in result.output and "n_Q" in result.output and "kmeans" in result.output


def test_golden_file_with_kmeans_ignores_its_cells():
    out = run_json(str(GOLDEN / CASES[0]["file"]), "--partitioner", "kmeans")
    assert out["partitioner"] == "kmeans" and out["status"] == "ok"


def test_too_few_images_is_a_result_with_a_message(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "few.npz"
    np.savez(path, T=rng.normal(size=(100, 4)), P=rng.normal(size=(50, 4)),
             Q=rng.normal(size=(12, 4)))
    out = run_json(str(path))
    assert out["status"] == "no_cells" and out["ct"] is None and "21" in out["message"]
    human = runner.invoke(app, ["ct", str(path)])
    assert human.exit_code == 0 and "undefined" in human.output


def _write(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"T": np.zeros((5, 2)), "P": np.zeros((5, 2))}, "has no array Q"),
        ({"T": np.zeros((5, 2)), "P": np.zeros(5), "Q": np.zeros((5, 2))}, "array P must be 2-D"),
        ({"T": np.zeros((5, 2)), "P": np.zeros((5, 3)), "Q": np.zeros((5, 2))},
         "same number of features"),
        ({"T": np.zeros((5, 2)), "P": np.zeros((5, 2)), "Q": np.zeros((5, 2)),
          "T_cells": np.zeros(5, int)}, "but not P_cells, Q_cells"),
        ({"T": np.zeros((5, 2)), "P": np.zeros((5, 2)), "Q": np.zeros((5, 2)),
          "T_cells": np.zeros(4, int), "P_cells": np.zeros(5, int), "Q_cells": np.zeros(5, int)},
         "array T_cells must hold one integer label per row of T"),
        ({"T": np.array([["a", "b"]]), "P": np.zeros((5, 2)), "Q": np.zeros((5, 2))},
         "array T must hold real numbers"),
    ],
)
def test_bad_files_name_the_file_and_array(tmp_path, arrays, message):
    path = _write(tmp_path, **arrays)
    result = runner.invoke(app, ["ct", str(path)])
    assert result.exit_code == 1
    assert "Error: " in result.output and message in result.output and "bad.npz" in result.output
    assert "Traceback" not in result.output


def test_missing_and_pickled_files_are_clear_errors(tmp_path):
    result = runner.invoke(app, ["ct", str(tmp_path / "nope.npz")])
    assert result.exit_code == 1 and "no such file" in result.output
    path = tmp_path / "obj.npz"
    np.savez(path, T=np.array([{"a": 1}], dtype=object), P=np.zeros((2, 2)), Q=np.zeros((2, 2)))
    result = runner.invoke(app, ["ct", str(path)])
    assert result.exit_code == 1 and "cannot read it" in result.output


def test_given_without_cells_is_an_error(plain_file):
    result = runner.invoke(app, ["ct", str(plain_file), "--partitioner", "given"])
    assert result.exit_code == 1 and "no cell labels" in result.output


def test_unknown_distance_lists_valid_names(plain_file):
    result = runner.invoke(app, ["ct", str(plain_file), "--distance", "manhattan"])
    assert result.exit_code == 1 and "abscosine" in result.output and "euclidean" in result.output


def test_installed_fp_ct_runs_on_a_golden_file():
    exe = Path(sys.executable).with_name("fp")
    case = CASES[2]
    out = subprocess.run(
        [str(exe), "ct", str(GOLDEN / case["file"]), "--distance", "euclidean", "--json"],
        capture_output=True, text=True, env=dict(os.environ, FP_LOAD_PLUGINS=""))
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(json.loads(out.stdout)["ct"], case["expected"]["l2_meehan"],
                               rtol=1e-9)


def test_two_processes_give_bit_identical_output(plain_file):
    exe = Path(sys.executable).with_name("fp")
    env = dict(os.environ, FP_LOAD_PLUGINS="")
    outs = [subprocess.run([str(exe), "ct", str(plain_file), "--tau", "0.05", "--json"],
                           capture_output=True, text=True, env=env) for _ in range(2)]
    assert outs[0].returncode == 0, outs[0].stderr
    assert outs[0].stdout == outs[1].stdout
    assert json.loads(outs[0].stdout)["status"] == "ok"
