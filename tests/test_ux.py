"""What users touch around the steps: JSON everywhere, JSON errors, the cache, the API."""

from __future__ import annotations

import hashlib
import inspect
import json
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import test_bank_cli
from typer.testing import CliRunner

import forensics
from forensics.cli.app import app
from refbank import Bank

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
LAYERS = test_bank_cli.LAYERS
filled = test_bank_cli.filled  # a bank of 3 curves against one baseline


def fp(*args: str, bank: Bank | None = None):
    extra = ["--bank", str(bank.path)] if bank is not None else []
    return runner.invoke(app, [*args, *extra])


# -- --json on every command that changes the bank ------------------------------------------


def test_bank_remove_export_and_baseline_remove_print_json(filled, tmp_path):
    ids = [r["curve_id"] for r in filled.curves()]
    out = fp("bank", "remove", ids[0], "--json", bank=filled)
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == {"bank": str(filled.path), "removed": [ids[0]]}
    archive = tmp_path / "bank.tar"
    out = fp("bank", "export", str(archive), "--json", bank=filled)
    data = json.loads(out.stdout)
    assert data["archive"] == str(archive) and data["bytes"] == archive.stat().st_size
    assert data["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (data["n_curves"], data["n_baselines"]) == (2, 1)
    out = fp("baseline", "remove", "base", "--with-curves", "--json", bank=filled)
    data = json.loads(out.stdout)
    assert data["removed"]["name"] == "base" and data["curves_removed"] == 2
    assert filled.baselines() == [] and filled.curves() == []


def test_embed_prints_json(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(load_digits().images[:3]):
        Image.fromarray(np.clip(im * 16, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    out = runner.invoke(app, ["embed", str(folder), "-e", "vit-tiny-demo", "-o",
                              str(tmp_path / "e.npz"), "--no-cache", "--device", "cpu",
                              "--skip-bad", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["n_images"] == 3 and len(data["layers"]) == 8 and data["dims"] == [96] * 8
    assert data["skipped"][0]["image"] == "bad.png"
    assert data["encoder_info"]["name"] == "vit-tiny-demo" and data["out"].endswith("e.npz")


# -- errors with --json ----------------------------------------------------------------------


def test_errors_with_json_are_one_json_object_on_stderr(filled):
    out = fp("bank", "show", "nope", "--json", bank=filled)
    assert out.exit_code == 1 and out.stdout == ""
    err = json.loads(out.stderr)["error"]
    assert err["type"] == "BankError" and err["exit_code"] == 1 and "nope" in err["message"]
    usage = runner.invoke(app, ["bank", "show", "--json", "--bogus"])
    assert usage.exit_code == 2 and usage.stdout == ""
    assert json.loads(usage.stderr)["error"]["exit_code"] == 2
    plain = fp("bank", "show", "nope", bank=filled)  # without --json: the usual line
    assert plain.exit_code == 1 and plain.stderr.startswith("Error: ")
    # a command that printed its JSON result keeps stdout a single JSON document
    (filled.path / "curves.parquet").write_bytes(b"garbage")
    verify = fp("bank", "verify", "--json", bank=filled)
    assert verify.exit_code == 1
    assert "error" in json.loads(verify.stderr)


# -- shell completion ------------------------------------------------------------------------


def test_shell_completion_is_offered():
    out = runner.invoke(app, ["--help"])
    assert "--install-completion" in out.output and "--show-completion" in out.output


# -- the cache -------------------------------------------------------------------------------


def test_cache_info_and_clear(tmp_path):
    from forensics.data.embed import embed_arrays

    cache = tmp_path / "cache"
    images = np.zeros((4, 8, 8), dtype=np.uint8) + np.arange(4, dtype=np.uint8)[:, None, None]
    embed_arrays(images, "vit-tiny-demo", weights="random:0", cache_dir=cache, device="cpu")
    (cache / "notes.txt").write_text("not a cache entry")
    info = json.loads(runner.invoke(app, ["cache", "info", "--cache-dir", str(cache),
                                          "--json"]).stdout)
    (entry,) = info["entries"]
    assert entry["encoder"] == "vit-tiny-demo" and entry["n_images"] == 4
    assert entry["n_layers"] == 8 and entry["bytes"] > 0 and info["bytes"] == entry["bytes"]
    text = runner.invoke(app, ["cache", "info", "--cache-dir", str(cache)]).output
    assert "vit-tiny-demo" in text
    other = json.loads(runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache),
                                           "--encoder", "resnet18", "--json"]).stdout)
    assert other["removed"] == [] and (cache / entry["key"]).is_dir()
    out = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache)])
    assert out.exit_code == 0 and "Removed 1 cached configuration(s)" in out.output
    assert not (cache / entry["key"]).exists() and (cache / "notes.txt").is_file()
    empty = runner.invoke(app, ["cache", "info", "--cache-dir", str(cache)])
    assert "is empty" in empty.output


# -- the Python API --------------------------------------------------------------------------


def test_lazy_public_functions_show_their_real_signatures():
    from forensics.steps import (
        attribute,
        bank_access,
        build_baseline,
        curve,
        enroll,
        evaluate,
        memorization,
    )

    assert inspect.signature(forensics.attribute) == inspect.signature(attribute.attribute)
    assert "fingerprint" in inspect.signature(forensics.attribute).parameters
    for module, name in ((build_baseline, "build_baseline"), (curve, "compute_curve"),
                         (enroll, "enroll"), (bank_access, "load_baseline"),
                         (memorization, "memorize")):
        assert inspect.signature(getattr(forensics, name)) == \
            inspect.signature(getattr(module, name))
    assert inspect.signature(forensics.evaluate_bank) == inspect.signature(evaluate.evaluate_bank)
    assert {"memorize", "evaluate_bank"} <= set(forensics.__all__)


def test_memorize_and_evaluate_bank_from_python(filled):
    out = forensics.evaluate_bank(filled.path, fingerprint="paper", protocol="loo", n_boot=0)
    assert out["fingerprint"] == "paper" and out["n_queries"] == 3
    with pytest.raises(forensics.errors.FpError, match="no curve|no baseline|baseline"):
        forensics.memorize(filled.path / "nowhere", bank=Bank(filled.path.parent / "empty"))


def test_packages_are_typed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]
    dirs = {"forensics": "forensics", "fp_plugins": "plugins", "refbank": "refbank"}
    for package, folder in dirs.items():
        assert "py.typed" in data[package] and (ROOT / folder / "py.typed").is_file()


# -- the bank's Parquet columns describe themselves ------------------------------------------


def test_parquet_columns_carry_their_description(filled):
    from refbank.schema import BASELINE_COLUMNS, CURVE_COLUMNS, DESCRIPTION_KEY

    for file, columns in (("curves.parquet", CURVE_COLUMNS),
                          ("baselines.parquet", BASELINE_COLUMNS)):
        schema = pq.read_schema(filled.path / file)
        for name, _, _, meaning in columns:
            assert schema.field(name).metadata[DESCRIPTION_KEY].decode() == meaning


def test_a_table_written_without_descriptions_still_reads_and_grows(filled):
    import pyarrow as pa

    path = filled.path / "curves.parquet"
    table = pq.read_table(path)
    plain = pa.schema([pa.field(f.name, f.type, f.nullable) for f in table.schema],
                      metadata=table.schema.metadata)
    pq.write_table(table.cast(plain), path)  # as fp 0.1 wrote it
    assert pq.read_schema(path).field("model").metadata is None
    bid = filled.baselines()[0]["baseline_id"]
    filled.add_curves([{"model": "new", "family": "gan", "encoder": "timm:tiny",
                        "weights_sha256": "w" * 64, "baseline_id": bid, "layers": LAYERS,
                        "values": [0.0, 0.0, 0.0], "n_images": 5, "manifest_sha256": "m"}])
    assert len(filled.curves()) == 4 and filled.verify().ok
    assert pq.read_schema(path).field("model").metadata is not None


# -- docs ------------------------------------------------------------------------------------


def test_docs_no_longer_call_combined_the_default():
    from forensics.steps.attribute import attribute

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Attribution: confidence and unknown")[1].split("\n## ")[0]
    assert "`combined` by default" not in section and "resid-early" in section
    assert "``combined`` for the built-ins" not in attribute.__doc__
    assert "zscore" in attribute.__doc__
