"""Local checkpoints and encoder names: resampling, unwrapping, DINOv2, hf-hub, the paper's ViT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_close32

from forensics.data.embed import embed_arrays, get_encoder
from forensics.errors import OfflineError, UnknownNameError
from forensics.plugin.encoders import unwrap_state_dict


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.clip(load_digits().images[:3] * 16, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def demo_state():
    """The seeded random weights of vit-tiny-demo (32 px, patch 4: an 8x8 grid)."""
    module = get_encoder("vit-tiny-demo").load("random:0", "cpu", "cls").module
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def _embed(images, name, weights):
    return embed_arrays(images, name, weights=str(weights), cache_dir=None, device="cpu")


def test_a_checkpoint_at_another_size_is_resampled_as_timm_does(tmp_path, digits, demo_state):
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    path = tmp_path / "demo.safetensors"
    save_file(demo_state, str(path))
    loaded = get_encoder("vit-tiny-demo@16").load(str(path), "cpu", "cls")
    expected = resample_abs_pos_embed(demo_state["pos_embed"], new_size=(4, 4),
                                      old_size=(8, 8), num_prefix_tokens=1)
    np.testing.assert_allclose(loaded.module.pos_embed.detach().numpy(), expected.numpy(),
                               rtol=0, atol=0)
    assert loaded.module.pos_embed.shape[1] == 17  # 4x4 patches + the class token
    emb = _embed(digits, "vit-tiny-demo@16", path)
    assert len(emb.arrays) == 8 and emb.arrays[0].shape == (3, 96)
    (note,) = emb.encoder_info["weights_loading"]
    assert "pos_embed from [1, 65, 96] to [1, 17, 96]" in note
    same_size = _embed(digits, "vit-tiny-demo", path)
    assert same_size.encoder_info["weights_loading"] == []  # nothing to resample


def test_ddp_and_dino_checkpoints_are_unwrapped_and_recorded(tmp_path, digits, demo_state):
    import torch

    reference = embed_arrays(digits, "vit-tiny-demo", weights="random:0", cache_dir=None,
                             device="cpu")
    ddp = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in demo_state.items()}, "epoch": 9},
               ddp)
    dino = tmp_path / "dino.pth"
    teacher = {f"module.backbone.{k}": v for k, v in demo_state.items()}
    teacher["module.head.mlp.0.weight"] = torch.ones(4, 96)
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in demo_state.items()}
    torch.save({"teacher": teacher, "student": student, "epoch": 100}, dino)
    for path, expected in (
        (ddp, ["took the weights under 'state_dict' (ignored: epoch)",
               "stripped the prefix 'module.' from every key"]),
        (dino, ["took the weights under 'teacher' (ignored: epoch, student)",
                "stripped the prefix 'module.' from every key",
                "kept the 'backbone.' weights without the prefix (dropped: head.*)"]),
    ):
        emb = _embed(digits, "vit-tiny-demo", path)
        assert emb.encoder_info["weights_loading"] == expected
        for a, b in zip(emb.arrays, reference.arrays, strict=True):
            np.testing.assert_array_equal(a, b)  # the teacher's weights, not the student's


def test_unwrap_state_dict_leaves_plain_state_dicts_alone(demo_state):
    state, steps = unwrap_state_dict(dict(demo_state))
    assert steps == [] and list(state) == list(demo_state)
    assert unwrap_state_dict({"epoch": 3}) == ({}, [])
    # a key that merely starts like a wrapper is kept when not every key has it
    one = np.ones(1)
    mixed, steps = unwrap_state_dict({"module.a": one, "b": one})
    assert list(mixed) == ["module.a", "b"] and steps == []


def test_the_papers_encoder_and_dinov2_names():
    vit = get_encoder("vit-b16")
    # google/vit-base-patch16-224-in21k, the paper's encoder, is timm's orig_in21k port.
    assert vit.model_name == "vit_base_patch16_224.orig_in21k"
    assert "the paper's encoder" in vit.description
    assert get_encoder("vit-b16-augreg").model_name == "vit_base_patch16_224.augreg_in21k"
    assert "paper" not in get_encoder("vit-b16-augreg").description
    for name, blocks, width in (("dinov2-vits14", 12, 384), ("dinov2-vitb14", 12, 768),
                                ("dinov2-vitl14", 24, 1024)):
        enc = get_encoder(name)
        assert enc.family == "dinov2" and "dinov2" in enc.model_name
        assert len(enc.layer_names()) == blocks and enc.layer_dims()[-1] == width
    assert get_encoder("dinov2-vits14@224").layer_dims()[-1] == 384


def _fake_hub_repo(cache, repo, demo_state):
    """A Hugging Face cache holding a timm model repo, as a download would leave it."""
    from safetensors.torch import save_file

    rev = "0" * 40
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 0,
        "model_args": {"patch_size": 4, "embed_dim": 96, "depth": 8, "num_heads": 3,
                       "img_size": 32},
        "pretrained_cfg": {"input_size": [3, 32, 32], "crop_pct": 1.0,
                           "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                           "std": [0.5, 0.5, 0.5], "num_classes": 0},
    }
    (snap / "config.json").write_text(json.dumps(config))
    save_file(demo_state, str(snap / "model.safetensors"))


def test_hf_hub_names_load_from_the_hub_cache(tmp_path, monkeypatch, digits, demo_state):
    import huggingface_hub.constants as hf_constants

    import forensics.plugin.encoders as encoders

    monkeypatch.setattr(encoders, "hub_reachable", lambda timeout=3.0: False)  # no network
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    _fake_hub_repo(tmp_path / "hf", "someone/tiny-vit", demo_state)
    enc = get_encoder("hf-hub:someone/tiny-vit")
    assert enc.name == "hf-hub:someone/tiny-vit" and len(enc.layer_names()) == 8
    emb = embed_arrays(digits, "hf-hub:someone/tiny-vit", weights="hub", cache_dir=None,
                       device="cpu")
    reference = embed_arrays(digits, "vit-tiny-demo", weights="random:0", cache_dir=None,
                             device="cpu")
    for a, b in zip(emb.arrays, reference.arrays, strict=True):
        assert_close32(a, b, terms=4096)
    with pytest.raises(OfflineError, match="someone/absent"):
        get_encoder("hf-hub:someone/absent").layer_names()
    with pytest.raises(UnknownNameError, match="hf-hub:<owner>/<repo>"):
        get_encoder("hf-hub:no-owner")
