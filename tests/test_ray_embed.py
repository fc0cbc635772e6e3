"""Embedding on a Ray cluster (``--ray``): one local cluster of 2 CPUs for the module.

The same images, encoder and batch size through Ray give the local run's manifest,
provenance and cache, and its embeddings as far as float32 can promise (``assert_close32``; on one
torch thread per process, as here, they are identical); a killed encoder worker is
restarted and its batch retried, nothing lost or doubled; without Ray, ``--ray`` says how
to install it.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from conftest import assert_close32
from PIL import Image
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.data import ray_embed
from forensics.data.embed import Embeddings, cache_info, embed_folder
from forensics.data.images import Manifest, scan_folder

ENCODER = "vit-tiny-demo"
KW = {"weights": "random:0", "device": "cpu", "batch_size": 4, "progress": False}
#: Ray's results against the local run's: batches may be cut elsewhere, and a batch's
#: composition may change the last bits of a multi-threaded matrix product.
runner = CliRunner()


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster (2 CPUs, no dashboard) for every test of the module."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="error")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Eighteen real handwritten digits (sklearn) as PNGs, in two folders."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("ray") / "imgs"
    (root / "sub").mkdir(parents=True)
    images = np.clip(load_digits().images[:18] * 16, 0, 255).astype(np.uint8)
    for i, im in enumerate(images):
        Image.fromarray(im).save(root / ("sub" if i % 3 else ".") / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def local(folder):
    return embed_folder(folder, ENCODER, cache_dir=None, **KW)


def _same_as_local(emb: Embeddings, local: Embeddings, rtol: float | None = None,
                   atol: float | None = None) -> None:
    """Equal to the local run as far as float32 can promise (other batches, other
    kernels), or within ``rtol`` / ``atol`` where given (reduced precision)."""
    assert emb.layers == local.layers
    assert emb.manifest.to_dict() == local.manifest.to_dict()
    strip = ("cache",)
    assert ({k: v for k, v in emb.encoder_info.items() if k not in strip}
            == {k: v for k, v in local.encoder_info.items() if k not in strip})
    for a, b in zip(emb.arrays, local.arrays, strict=True):
        assert a.dtype == np.float32 and a.shape == b.shape
        if rtol is None and atol is None:
            assert_close32(a, b, terms=4096)
        else:
            np.testing.assert_allclose(a, b, rtol=rtol or 0.0, atol=atol or 0.0)


def test_fp_embed_on_ray_matches_the_local_run_and_embeds_only_uncached_images(
        cluster, folder, local, tmp_path):
    cache = tmp_path / "cache"
    first = Manifest(scan_folder(folder).root, scan_folder(folder).entries[:7])
    embed_folder(first, ENCODER, cache_dir=cache, **KW)  # 7 of 18 cached by a local run
    out = tmp_path / "emb.npz"
    result = runner.invoke(app, ["embed", str(folder), "-e", ENCODER, "--weights", "random:0",
                                 "--device", "cpu", "--batch-size", "4", "--cache-dir",
                                 str(cache), "--ray", "auto", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["n_images"] == 18
    assert answer["encoder_info"]["cache"] == {"hits": 7, "computed": 11}
    _same_as_local(Embeddings.load(out), local)
    entry, = cache_info(cache)["entries"]
    assert entry["n_images"] == 18  # every image once
    again = embed_folder(folder, ENCODER, cache_dir=cache, ray="auto", **KW)
    assert again.encoder_info["cache"] == {"hits": 18, "computed": 0}
    _same_as_local(again, local)


class _DiesOnce(ray_embed._EncoderActor):
    """An encoder actor whose process exits on its first batch (once, across restarts)."""

    marker = ""

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(batch)


def test_a_killed_encoder_worker_is_retried_nothing_lost_or_doubled(
        cluster, folder, local, tmp_path, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    _DiesOnce.marker = str(tmp_path / "died")
    monkeypatch.setattr(ray_embed, "_EncoderActor", _DiesOnce)
    cache = tmp_path / "cache"
    sizes: list[int] = []
    emb = embed_folder(folder, ENCODER, cache_dir=cache, ray="auto", on_batch=sizes.append,
                       **{**KW, "progress": True})
    assert os.path.exists(_DiesOnce.marker)  # the worker did die
    assert sum(sizes) == 18  # the retried batch is counted once
    assert emb.encoder_info["cache"] == {"hits": 0, "computed": 18}
    _same_as_local(emb, local)
    entry, = cache_info(cache)["entries"]
    assert entry["n_images"] == 18


@pytest.mark.gpu
def test_gpu_actors_match_a_local_gpu_run(cluster, folder):
    kw = {**KW, "device": "auto", "cache_dir": None}
    local = embed_folder(folder, ENCODER, **{**kw, "device": "cuda"})
    emb = embed_folder(folder, ENCODER, ray="auto", **kw)
    assert emb.encoder_info["precision"] == local.encoder_info["precision"] == "bf16-autocast"
    _same_as_local(emb, local, rtol=2e-2, atol=2e-2)  # bf16: batches cut elsewhere


@pytest.mark.parametrize("command", [
    ["embed", "{folder}", "-e", ENCODER, "-o", "{tmp}/e.npz"],
    ["baseline", "build", "b", "--train", "{folder}", "--heldout", "{folder}", "-e", ENCODER,
     "--bank", "{tmp}/bank"],
    ["enroll", "{folder}", "-m", "g", "-f", "gan", "--bank", "{tmp}/bank"],
])
def test_without_ray_the_option_says_how_to_install_it(command, folder, tmp_path,
                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    args = [a.format(folder=folder, tmp=tmp_path) for a in command]
    result = runner.invoke(app, [*args, "--ray", "auto"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == ["Error: --ray needs Ray Data, which is not installed; install it with: "
                     "pip install 'fp-forensics[scale]'"]
    assert not (tmp_path / "bank").exists()


def test_baseline_build_and_enroll_pass_ray_to_the_steps(folder, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from forensics.steps import build_baseline, enroll

    calls = []
    monkeypatch.setattr(build_baseline, "build_baseline",
                        lambda *a, **kw: calls.append(kw) or {})
    monkeypatch.setattr(enroll, "enroll", lambda *a, **kw: calls.append(kw) or [])
    for args in (["baseline", "build", "b", "--train", str(folder), "--heldout", str(folder),
                  "-e", ENCODER, "--json"],
                 ["enroll", str(folder), "-m", "g", "-f", "gan", "--json"]):
        runner.invoke(app, [*args, "--ray", "10.0.0.1:6379", "--bank", str(tmp_path / "b")])
    assert [kw["ray"] for kw in calls] == ["10.0.0.1:6379"] * 2


def test_the_steps_pass_ray_and_the_requested_device_to_the_embedding(folder, tmp_path,
                                                                      monkeypatch):
    import forensics.data.embed
    from forensics.steps.bank_access import LoadedBaseline
    from forensics.steps.build_baseline import build_baseline
    from forensics.steps.curve import _embed_suspect

    class Stop(Exception):
        pass

    seen = []

    def embed_folder(*_args, **kw):
        seen.append((kw["ray"], kw["device"]))
        raise Stop

    monkeypatch.setattr(forensics.data.embed, "embed_folder", embed_folder)
    with pytest.raises(Stop):
        build_baseline("b", folder, folder, encoder=ENCODER, bank=tmp_path / "bank",
                       ray="auto")
    loaded = LoadedBaseline({"encoder": ENCODER, "pooling": "cls", "name": "b"},
                            None, None, {"weights": "random:0"}, {}, [])
    with pytest.raises(Stop):
        _embed_suspect(loaded, folder, weights=None, device="auto", batch_size=4,
                       cache_dir=None, progress=False, skip_bad=False, ray="auto")
    assert seen == [("auto", "auto")] * 2  # the cluster, not this machine, picks the device


def test_an_fp_error_on_a_worker_reaches_the_user_as_itself():
    from forensics.errors import FpError, InputError

    class WorkerFailure(Exception):  # what Ray raises here: the worker's traceback as text
        pass

    text = ("\x1b[36mray::MapWorker(MapBatches(_EncoderActor)).submit()\x1b[39m\n"
            '  File "embed.py", line 1, in load\n'
            "forensics.errors.InputError: --weights /w.pt is neither 'hub', 'random:SEED' "
            "nor an existing file\n\nThe above exception was the direct cause of the "
            "following exception:\n\nray.exceptions.UserCodeException: UDF failed")
    err = ray_embed._cluster_error(WorkerFailure(text))
    assert type(err) is InputError and str(err).startswith("--weights /w.pt is neither")
    other = ray_embed._cluster_error(WorkerFailure("Traceback:\nValueError: bad shape\n"))
    assert type(other) is FpError and "ValueError: bad shape" in str(other)
