"""``fp bank ...`` and ``fp baseline list|show|remove`` through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from forensics.cli.app import app
from refbank import Bank

runner = CliRunner()
LAYERS = ["l0", "l1", "l2"]


@pytest.fixture
def filled(tmp_path) -> Bank:
    bank = Bank(tmp_path / "bank")
    bid = bank.add_baseline(
        {"name": "base", "encoder": "timm:tiny", "weights_sha256": "w" * 64, "layers": LAYERS,
         "train_manifest_sha256": "t", "heldout_manifest_sha256": "p", "n_train": 20,
         "n_heldout": 10, "params": {"seed": 0}},
        save=lambda d: (d / "arrays.bin").write_bytes(b"\x00\x01"),
    )
    bank.add_curves([
        {"model": model, "family": fam, "encoder": "timm:tiny", "weights_sha256": "w" * 64,
         "baseline_id": bid, "layers": LAYERS, "values": [0.1, 0.2, float(i)], "n_images": 50,
         "manifest_sha256": "m"}
        for i, (model, fam) in enumerate([("sd15", "sd"), ("sd21", "sd"), ("stylegan2", "gan")])
    ])
    return bank


def fp(*args: str, bank: Bank | Path | None = None):
    extra = ["--bank", str(bank.path if isinstance(bank, Bank) else bank)] if bank else []
    return runner.invoke(app, [*args, *extra])


def test_list_empty_bank_says_what_to_do(tmp_path):
    empty = Bank(tmp_path / "empty")
    empty.add_baseline({"name": "b", "encoder": "timm:tiny", "weights_sha256": "ab" * 32,
                        "layers": ["l0"], "train_manifest_sha256": "t" * 64,
                        "heldout_manifest_sha256": "p" * 64})
    result = fp("bank", "list", bank=empty.path)
    assert result.exit_code == 0 and "fp enroll" in result.output
    assert json.loads(fp("bank", "list", "--json", bank=empty.path).output) == []
    # a path with no bank is not an empty bank (a mistyped --bank)
    result = fp("bank", "list", bank=tmp_path / "nowhere")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_list_show_and_filters(filled):
    result = fp("bank", "list", bank=filled)
    assert result.exit_code == 0, result.output
    assert "stylegan2" in result.output and "3 curve(s)" in result.output
    rows = json.loads(fp("bank", "list", "--json", "--family", "sd", bank=filled).output)
    assert [r["model"] for r in rows] == ["sd15", "sd21"]
    assert rows[0]["values"] == [0.1, 0.2, 0.0] and rows[0]["created"].endswith("+00:00")
    by_base = json.loads(fp("bank", "list", "--json", "--baseline", "base", bank=filled).output)
    assert len(by_base) == 3
    cid = rows[1]["curve_id"]
    shown = json.loads(fp("bank", "show", cid, "--json", bank=filled).output)
    assert shown == rows[1]
    text = fp("bank", "show", cid, bank=filled).output
    assert "sd21" in text and "l2" in text


def test_fp_bank_env_var(filled, monkeypatch):
    monkeypatch.setenv("FP_BANK", str(filled.path))
    info = json.loads(runner.invoke(app, ["bank", "info", "--json"]).output)
    assert info == {"path": str(filled.path), "schema_version": 1, "exists": True,
                    "n_curves": 3, "n_baselines": 1}


def test_show_and_remove_unknown_ids_fail_cleanly(filled):
    for args in (["bank", "show", "c_nope"], ["bank", "remove", "c_nope"]):
        result = fp(*args, bank=filled)
        assert result.exit_code == 1 and "Error:" in result.output and "c_nope" in result.output
    assert len(filled.curves()) == 3


def test_remove(filled):
    ids = [r["curve_id"] for r in filled.curves()]
    result = fp("bank", "remove", ids[0], ids[2], bank=filled)
    assert result.exit_code == 0 and "Removed 2 curve(s)" in result.output
    assert [r["curve_id"] for r in filled.curves()] == [ids[1]]


def test_verify_ok_then_tampered(filled):
    result = fp("bank", "verify", bank=filled)
    assert result.exit_code == 0 and "OK" in result.output
    path = filled.path / "curves.parquet"
    table = pq.read_table(path)
    models = table.column("model").to_pylist()
    models[2] = "biggan"
    table = table.set_column(1, "model", pa.array(models))
    pq.write_table(table, path)
    bad_id = table.column("curve_id")[2].as_py()
    result = fp("bank", "verify", bank=filled)
    assert result.exit_code == 1
    assert f"FAIL curves {bad_id}" in result.output and "Error: 1 problem(s)" in result.output
    report = json.loads(fp("bank", "verify", "--json", bank=filled).stdout)
    assert report["ok"] is False and report["problems"][0]["id"] == bad_id


def test_export_import(filled, tmp_path):
    archive = tmp_path / "bank.tar.gz"
    assert fp("bank", "export", str(archive), bank=filled).exit_code == 0
    again = fp("bank", "export", str(archive), bank=filled)
    assert again.exit_code == 1 and "exists already" in again.output
    other = tmp_path / "other"
    report = json.loads(fp("bank", "import", str(archive), "--json", bank=other).output)
    assert len(report["added_curves"]) == 3 and len(report["added_baselines"]) == 1
    text = fp("bank", "import", str(archive), bank=other).output
    assert "0 curve(s) and 0 baseline(s) added; 3 curve(s) and 1 baseline(s) already" in text
    assert Bank(other).curves() == filled.curves()


def test_baseline_list_show_remove(filled):
    result = fp("baseline", "list", bank=filled)
    assert result.exit_code == 0 and "base" in result.output
    [row] = json.loads(fp("baseline", "list", "--json", bank=filled).output)
    assert row["name"] == "base" and row["layers"] == LAYERS
    shown = json.loads(fp("baseline", "show", "base", "--json", bank=filled).output)
    assert Path(shown["folder"]) == filled.baseline_dir(row["baseline_id"])
    assert (Path(shown["folder"]) / "arrays.bin").read_bytes() == b"\x00\x01"
    assert "timm:tiny" in fp("baseline", "show", "base", bank=filled).output
    refused = fp("baseline", "remove", "base", bank=filled)
    assert refused.exit_code == 1 and "--with-curves" in refused.output
    done = fp("baseline", "remove", "base", "--with-curves", bank=filled)
    assert done.exit_code == 0 and filled.baselines() == [] and filled.curves() == []
    missing = fp("baseline", "show", "base", bank=filled)
    assert missing.exit_code == 1 and "fp baseline build" in missing.output


def test_installed_fp_bank_verify(filled):
    exe = Path(sys.executable).with_name("fp")
    env = {**os.environ, "FP_BANK": str(filled.path)}
    out = subprocess.run([str(exe), "bank", "verify", "--json"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["n_curves"] == 3
