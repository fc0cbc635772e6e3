"""The third-party example encoder installs, shows up in ``fp plugins`` and embeds by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close32
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "fp-encoder-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example installed with pip into a fresh folder (built from a copy of it)."""
    tmp = tmp_path_factory.mktemp("example")
    source, target = tmp / "src", tmp / "site"
    shutil.copytree(EXAMPLE, source)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    return target


def _run(installed: Path, *args: str, load: str = "pixel_proj") -> subprocess.CompletedProcess:
    env = dict(os.environ, FP_LOAD_PLUGINS=load,
               PYTHONPATH=os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "forensics", *args], capture_output=True,
                          text=True, env=env)


def test_installed_example_is_listed_with_its_version(installed):
    out = _run(installed, "plugins", "--json")
    assert out.returncode == 0, out.stderr
    info = {p["name"]: p for p in json.loads(out.stdout)}
    plugin = info["pixel_proj"]
    assert not plugin["builtin"] and plugin["distribution"] == "fp-encoder-example"
    assert plugin["version"] == "0.2.0"
    assert plugin["registers"] == {"encoders": ["pixel-proj"]}
    hidden = _run(installed, "plugins", "--json", load="")
    assert "pixel_proj" not in {p["name"] for p in json.loads(hidden.stdout)}


def test_example_encoder_embeds_by_name(installed, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "emb.npz"
    result = _run(installed, "embed", str(folder), "--encoder", "pixel-proj", "--out", str(out),
                  "--no-cache", "--quiet", "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    from forensics.data.embed import Embeddings

    emb = Embeddings.load(out)
    assert emb.layers == ["pixels", "proj", "stats"]
    assert [a.shape for a in emb.arrays] == [(3, 64), (3, 32), (3, 6)]
    first = np.asarray(Image.open(folder / "0.png").resize((16, 16), Image.Resampling.BILINEAR),
                       dtype=np.float32) / 255.0
    assert_close32(emb.arrays[2][0, :3], first.mean(axis=(0, 1)), terms=256)
