"""fp baseline build with --store: embeddings go to on-disk stores, the baseline is the same."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.data.embed import embed_folder
from forensics.data.store import LayerStore
from forensics.paper.demo import _write_pngs, digit_images
from forensics.steps.bank_access import load_baseline
from forensics.steps.build_baseline import build_baseline
from refbank import Bank

COMMON = {"device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    images = digit_images()
    order = np.random.default_rng(3).permutation(len(images))
    for name, ids in (("T", order[:200]), ("P", order[200:280])):
        _write_pngs(images, ids, root / name)
    return root


def test_store_build_equals_the_in_memory_build(folders, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(COMMON, encoder="vit-tiny-demo", weights="random:0", n_cells=2, cache_dir=cache)
    memory = build_baseline("mem", folders / "T", folders / "P",
                                     bank=Bank(tmp_path / "b1"), **kw)
    streamed = build_baseline("disk", folders / "T", folders / "P",
                                       bank=Bank(tmp_path / "b2"), store=tmp_path / "store",
                                       **kw)
    assert streamed["baseline_id"] == memory["baseline_id"]
    T = embed_folder(folders / "T", "vit-tiny-demo", weights="random:0", cache_dir=cache,
                     **COMMON)
    store = LayerStore.open(tmp_path / "store" / "train")
    assert store.layers == T.layers and len(store) == 200
    for i, a in enumerate(T.arrays):
        np.testing.assert_array_equal(store.layer(i)[:], a)
    a = load_baseline("mem", bank=Bank(tmp_path / "b1"))
    b = load_baseline("disk", bank=Bank(tmp_path / "b2"))
    for la, lb in zip(a.engine.layers, b.engine.layers, strict=True):
        for key, value in la.arrays().items():
            np.testing.assert_array_equal(lb.arrays()[key], value)


def test_embedding_into_a_store_without_a_cache(folders, tmp_path):
    emb = embed_folder(folders / "P", "vit-tiny-demo", weights="random:0", cache_dir=None,
                       store=tmp_path / "s", **COMMON)
    ref = embed_folder(folders / "P", "vit-tiny-demo", weights="random:0", cache_dir=None,
                       **COMMON)
    assert len(emb) == 80 and LayerStore.open(tmp_path / "s").meta["n"] == 80
    for x, y in zip(emb.arrays, ref.arrays, strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_cli_store_option(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("FP_CACHE_DIR", str(tmp_path / "fpcache"))
    result = CliRunner().invoke(app, [
        "baseline", "build", "d", "--train", str(folders / "T"), "--heldout",
        str(folders / "P"), "--encoder", "vit-tiny-demo", "--weights", "random:0",
        "--n-cells", "2", "--device", "cpu", "--quiet", "--json", "--bank",
        str(tmp_path / "bank"), "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_train"] == 200
    assert LayerStore.open(tmp_path / "store" / "heldout").meta["n"] == 80


def test_cli_approximate_search_is_recorded_and_a_bad_one_refused_first(folders, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("FP_CACHE_DIR", str(tmp_path / "fpcache"))
    base = ["baseline", "build", "d", "--train", str(folders / "T"), "--heldout",
            str(folders / "P"), "--encoder", "vit-tiny-demo", "--weights", "random:0",
            "--n-cells", "2", "--device", "cpu", "--quiet", "--bank", str(tmp_path / "bank")]
    bad = CliRunner().invoke(app, [*base, "--search", "ivf:nprobe=zero"])
    assert bad.exit_code != 0 and "nprobe must be a whole number" in bad.output
    assert "Traceback" not in bad.output
    assert not (tmp_path / "fpcache").exists()  # refused before anything was embedded
    ok = CliRunner().invoke(app, [*base, "--json", "--search", "ivf:nlist=4,nprobe=1,min_rows=0"])
    assert ok.exit_code == 0, ok.output
    row = json.loads(ok.stdout)
    assert json.loads(row["params_json"])["search"] == "ivf:nlist=4,nprobe=1,min_rows=0"
    loaded = load_baseline("d", bank=Bank(tmp_path / "bank"))
    assert loaded.engine.search == "ivf:nlist=4,nprobe=1,min_rows=0"
    exact = build_baseline("e", folders / "T", folders / "P", bank=Bank(tmp_path / "bank2"),
                           encoder="vit-tiny-demo", weights="random:0", n_cells=2,
                           cache_dir=tmp_path / "fpcache", **COMMON)
    assert exact["baseline_id"] != row["baseline_id"]
