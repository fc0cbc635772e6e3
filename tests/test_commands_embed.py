"""``fp encoders list|show`` and ``fp embed`` through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.data.embed import Embeddings

runner = CliRunner()


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "imgs"
    out.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(out / f"{i}.png")
    return out


def test_encoders_list_shows_every_family():
    result = runner.invoke(app, ["encoders", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    families = {r["family"] for r in rows.values()}
    assert {"vit", "dino", "deit", "swin", "resnet", "inception", "clip", "timm"} <= families
    assert rows["vit-tiny-demo"]["default_weights"] == "random:0"
    assert rows["fid-inception"]["family"] == "inception"
    assert {"timm:*", "open_clip:*"} <= set(rows)
    table = runner.invoke(app, ["encoders", "list"])
    assert table.exit_code == 0 and "swin-large" in table.output


def test_encoders_show_lists_layers_and_dims():
    result = runner.invoke(app, ["encoders", "show", "vit-tiny-demo", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert [layer["name"] for layer in info["layers"]] == [f"blocks.{i}" for i in range(8)]
    assert {layer["dim"] for layer in info["layers"]} == {96}
    text = runner.invoke(app, ["encoders", "show", "fid-inception@96"])
    assert text.exit_code == 0 and "18 layers" in text.output and "mixed_10" in text.output
    unknown = runner.invoke(app, ["encoders", "show", "nope"])
    assert unknown.exit_code == 1 and "valid names:" in unknown.output


def test_embed_writes_output_and_second_run_hits_the_cache(tmp_path, folder):
    out = tmp_path / "emb.npz"
    args = ["embed", str(folder), "--encoder", "vit-tiny-demo", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0", "--device", "cpu"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "5 images, 8 layers of vit-tiny-demo" in first.output and "0 from cache" in first.output
    emb = Embeddings.load(out)
    assert len(emb) == 5 and emb.manifest is not None and len(emb.manifest) == 5
    assert emb.encoder_info["weights"] == "random:0"
    second = runner.invoke(app, args + ["--quiet"])
    assert second.exit_code == 0 and "5 from cache" in second.output
    again = Embeddings.load(out)
    for a, b in zip(emb.arrays, again.arrays, strict=True):
        np.testing.assert_array_equal(a, b)


def test_embed_parquet_with_mean_pool_and_no_cache(tmp_path, folder):
    out = tmp_path / "emb.parquet"
    result = runner.invoke(app, ["embed", str(folder), "-e", "vit-tiny-demo", "-o", str(out),
                                 "--pool", "mean", "--no-cache", "--num-workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert Embeddings.load(out).encoder_info["pool"] == "mean"
    assert not (tmp_path / "cache").exists()


def test_embed_bad_inputs_exit_1_with_every_file_listed(tmp_path, folder):
    (folder / "empty.png").write_bytes(b"")
    (folder / "fake.jpg").write_text("hello")
    out = tmp_path / "emb.npz"
    result = runner.invoke(app, ["embed", str(folder), "-e", "vit-tiny-demo", "-o", str(out),
                                 "--no-cache", "-q"])
    assert result.exit_code == 1
    assert "Error: 2 of 7 image files" in result.output
    assert "empty.png: empty file" in result.output and "fake.jpg: not an image" in result.output
    assert not out.exists()
    skipped = runner.invoke(app, ["embed", str(folder), "-e", "vit-tiny-demo", "-o", str(out),
                                  "--no-cache", "-q", "--skip-bad", "--num-workers", "0"])
    assert skipped.exit_code == 0, skipped.output
    assert "skipped empty.png" in skipped.output
    assert [s.relpath for s in Embeddings.load(out).manifest.skipped] == ["empty.png", "fake.jpg"]


def test_embed_usage_errors(tmp_path, folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["embed", str(empty), "-e", "vit-tiny-demo", "-o", "x.npz"])
    assert result.exit_code == 1 and "no images found" in result.output
    result = runner.invoke(app, ["embed", str(folder), "-e", "vit-tiny-demo", "-o", "x.csv"])
    assert result.exit_code == 1 and ".npz or .parquet" in result.output
    result = runner.invoke(app, ["embed", str(folder), "-e", "vit-tiny-demo", "-o", "x.npz",
                                 "--pool", "max"])
    assert result.exit_code == 2
