"""InvMM as the official code runs it: SSCD by default, calibrated thresholds, Stable
Diffusion's constants and learned prompt, evidence per image, GPU safety, and the other
measures (Wen et al., Carlini et al.) behind ``fp memorize``.

Models are tiny and random (built from diffusers/transformers configs); the members vs
held-out separation is shown on the trained pixel model in ``test_invmm.py``.
"""

from __future__ import annotations

import ast
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close32
from test_invmm import FAST, _digits, _scheduler, _tiny_unet, _write_images
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.errors import InputError
from forensics.plugin import manager as plugins

runner = CliRunner()
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pixel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pixel")
    diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=_scheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imgs(tmp_path_factory) -> Path:
    return _write_images(tmp_path_factory.mktemp("imgs"), _digits([0, 1, 2], 8))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    return _write_images(tmp_path_factory.mktemp("held"), _digits([3, 4, 5, 6], 8))


def _json(args) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- import cycle


def test_measure_and_engine_do_not_import_each_other():
    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    engine = imported(ROOT / "plugins" / "_invmm_engine.py")
    assert not {"fp_plugins.invmm"} & engine
    assert not {n for n in engine if n.startswith("fp_plugins.invmm.")}


# --------------------------------------------------------------------------- SSCD default


class _FakeSSCD(torch.nn.Module):
    """SSCD's interface: (N, 3, S, S) ImageNet-normalised RGB -> (N, D) descriptors."""

    def __init__(self, size: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.size = size

    def forward(self, x):
        if x.shape[-1] != self.size or x.shape[-2] != self.size or x.shape[1] != 3:
            raise RuntimeError("wrong SSCD input size")
        return torch.nn.functional.normalize(self.conv(x).mean(dim=(2, 3)), dim=1)


def test_default_similarity_refuses_without_sscd_and_says_how_to_get_it(
        pixel, imgs, tmp_path, monkeypatch):
    monkeypatch.setenv("FP_SSCD", str(tmp_path / "sscd_disc_large.torchscript.pt"))
    result = runner.invoke(app, ["invmm", str(imgs), "--model", str(tmp_path / "no-model"),
                                 "--steps", "4", "--check-every", "2", "--no-progress"])
    assert result.exit_code == 1, result.output
    out = result.output
    assert "Traceback" not in out and "does not exist" in out and "sscd_disc_large" in out
    assert "dl.fbaipublicfiles.com" in out and "--calibrate" in out  # before the model
    plain = runner.invoke(app, ["invmm", str(imgs), "--model", str(pixel),
                                "--similarity", "ncc", "--steps", "4", "--check-every", "2"])
    assert plain.exit_code == 1 and "no known copy threshold" in plain.output


def test_sscd_is_the_default_when_present_at_the_family_input_size(
        pixel, imgs, tmp_path, monkeypatch):
    path = tmp_path / "sscd_disc_large.torchscript.pt"
    torch.jit.script(_FakeSSCD(32)).save(str(path))  # pixel DDPMs: SSCD input 32 x 32
    monkeypatch.setenv("FP_SSCD", str(path))
    fast = [a for a in FAST if a not in ("--similarity", "ncc", "--beta", "0.5")]
    out = _json(["invmm", str(imgs), "--model", str(pixel), "--json", *fast])
    prov = out["provenance"]
    assert prov["similarity"]["kind"] == "sscd" and prov["similarity"]["resize"] == 32
    assert prov["params"]["beta"] == 0.5 and prov["similarity_deviation"] is None
    assert all(r["success"] == (r["similarity"] >= 0.5) for r in out["results"])
    torch.jit.script(_FakeSSCD(256)).save(str(path))  # a wrong size fails in the model
    with pytest.raises(Exception, match="wrong SSCD input size"):
        plugins.get("memorization_measures", "invmm").run(
            [imgs / "img00.png"], pixel, steps=2, check_every=2, noises=1, samples=1,
            ddim_steps=1)


def test_calibrated_beta_is_the_closest_pair_of_held_out_images(pixel, imgs, held_out):
    from fp_plugins._invmm_similarity import calibrate_beta, make_similarity

    out = _json(["invmm", str(imgs), "--model", str(pixel), "--json", "--similarity", "ncc",
                 "--calibrate", str(held_out), *[a for a in FAST if a not in (
                     "--similarity", "ncc", "--beta", "0.5")]])
    cal = out["provenance"]["calibration"]
    arrays = [a.astype(float).ravel() for a in _digits([3, 4, 5, 6], 8)]
    expected = max(np.corrcoef(a, b)[0, 1] for i, a in enumerate(arrays)
                   for j, b in enumerate(arrays) if i != j)
    assert_close32(cal["beta"], expected, terms=256, scale=1.0)  # a correlation, float32
    assert out["provenance"]["params"]["beta"] == cal["beta"] and cal["images"] == 4
    with pytest.raises(InputError, match="at least 2"):
        calibrate_beta(make_similarity("ncc", torch.device("cpu")), torch.rand(1, 1, 8, 8))
    both = runner.invoke(app, ["invmm", str(imgs), "--model", str(pixel), *FAST,
                               "--calibrate", str(held_out)])
    assert both.exit_code == 1 and "pass one of them" in both.output


# --------------------------------------------------------------------------- autoencoders


def _kl_autoencoder():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4,
        scaling_factor=0.5)


def test_autoencoder_class_comes_from_its_config_not_the_folder_name(tmp_path, imgs):
    from fp_plugins import _invmm_engine as eng

    folder = tmp_path / "ldm-text2im-like"
    _kl_autoencoder().save_pretrained(folder / "vqvae")  # as LDMTextToImagePipeline stores it
    _tiny_unet(sample_size=4, channels=2).save_pretrained(folder / "unet")
    _scheduler().save_pretrained(folder / "scheduler")
    dm = eng.load_model(folder, torch.device("cpu"))
    assert type(dm.autoencoder).__name__ == "AutoencoderKL" and dm.autoencoder_kind == "kl"
    assert dm.scaling_factor == 0.5 and dm.family == "latent"
    # weights that do not match the config: one Error line, not a raw size mismatch
    cfg = json.loads((folder / "vqvae" / "config.json").read_text())
    cfg["block_out_channels"] = [16, 16]
    (folder / "vqvae" / "config.json").write_text(json.dumps(cfg))
    result = runner.invoke(app, ["invmm", str(imgs), "--model", str(folder), *FAST])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot load AutoencoderKL" in result.output


# --------------------------------------------------------------------------- text-to-image


def _tiny_text_pipeline(folder: Path) -> Path:
    """A Stable-Diffusion-shaped folder: CLIP tokenizer + text encoder, KL VAE, cond UNet."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_memorization", ROOT / "benchmarks" / "bench_memorization.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.tiny_clip_pipeline_parts(folder, max_length=12, hidden=6)
    _kl_autoencoder().save_pretrained(folder / "vae")
    _tiny_unet(sample_size=4, channels=2, cond_dim=6).save_pretrained(folder / "unet")
    _scheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"]}))
    return folder


@pytest.fixture(scope="module")
def text_pipe(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return _tiny_text_pipeline(tmp_path_factory.mktemp("sd"))


TEXT_FAST = [*FAST, "--tokens", "3"]


def test_text_to_image_learns_prompt_tokens_and_checks_every_guidance_scale(
        text_pipe, imgs, tmp_path):
    out = _json(["invmm", str(imgs), "--model", str(text_pipe), "--json", "--out",
                 str(tmp_path / "ev"), "--seed", "1", *TEXT_FAST])
    prov = out["provenance"]
    assert prov["family"] == "text-to-image" and prov["learned_tokens"] == 3
    assert prov["guidance_scales"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert prov["model"]["text"]["text_encoder"] == "CLIPTextModel"
    assert prov["params"]["delta"] == 1e-3 and prov["params"]["tau"] == 2.0
    from safetensors.torch import load_file

    folder = tmp_path / "ev" / "evidence" / "000_img00"
    learned = load_file(str(folder / "params.safetensors"))
    assert learned["log_coeffs"].shape == (3, 514) and learned["log_coeffs"].abs().max() > 0
    rows = list(csv.DictReader((folder / "checks.csv").open()))
    assert len(rows) == 2 and "similarity_scale_7" in rows[0]
    per_scale = [float(rows[-1][f"similarity_scale_{i}"]) for i in range(1, 8)]
    np.testing.assert_allclose(float(rows[-1]["similarity"]), max(per_scale), rtol=1e-6)
    again = _json(["invmm", str(imgs), "--model", str(text_pipe), "--json", "--seed", "1",
                   *TEXT_FAST])
    assert again["results"] == out["results"]


def test_fixed_prompt_uses_the_pipelines_text_encoder(text_pipe, imgs):
    from fp_plugins import _invmm_engine as eng

    out = _json(["invmm", str(imgs), "--model", str(text_pipe), "--json",
                 "--prompt", "a digit", *TEXT_FAST])
    assert out["provenance"]["learned_tokens"] == 0
    assert out["provenance"]["model"]["prompt"] == "a digit"
    dm = eng.load_model(text_pipe, torch.device("cpu"), prompt="a digit")
    assert not torch.allclose(dm.encoder_hidden_states, dm.text.encode(""))
    bad = runner.invoke(app, ["invmm", str(imgs), "--model", str(text_pipe), *FAST,
                              "--prompt", "x", "--conditioning", "nope.safetensors"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    empty = _json(["invmm", str(imgs), "--model", str(text_pipe), "--json", *FAST,
                   "--tokens", "0"])  # no tokens learned: the empty prompt
    assert empty["provenance"]["learned_tokens"] == 0 and len(empty["results"]) == 3
    long = runner.invoke(app, ["invmm", str(imgs), "--model", str(text_pipe), *FAST,
                               "--tokens", "11"])  # 12 positions: at most 10 tokens
    assert long.exit_code == 1 and "at most 10" in long.output


# --------------------------------------------------------------------------- evidence


def test_evidence_per_image_scores_and_members_auroc(pixel, imgs, tmp_path):
    members = tmp_path / "members.txt"
    members.write_text("# training images\nimg00.png\nimg01\n")
    out = _json(["invmm", str(imgs), "--model", str(pixel), "--json", "--out",
                 str(tmp_path / "o"), "--members", str(members), *FAST])
    m = out["members"]
    assert (m["members"], m["non_members"]) == (2, 1)
    rank = [Path(p).name for p in out["ranking"]]
    expected = np.mean([rank.index("img02.png") > rank.index(x) for x in ("img00.png",
                                                                         "img01.png")])
    assert m["auroc_ranking"] == expected
    o = tmp_path / "o"
    rows = list(csv.DictReader((o / "scores.csv").open()))
    assert [r["member"] for r in rows] == ["1", "1", "0"] and len(rows) == 3
    assert (o / "members.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((o / "report.json").read_text())["members"]["auroc"] == m["auroc"]
    from PIL import Image
    from safetensors.torch import load_file

    for i in range(3):
        folder = o / "evidence" / f"{i:03d}_img{i:02d}"
        params = load_file(str(folder / "params.safetensors"))
        assert params["mu"].shape == (1, 1, 8, 8) and params["logvar"].shape == (1, 1, 8, 8)
        checks = list(csv.DictReader((folder / "checks.csv").open()))
        assert [int(c["step"]) for c in checks] == [2, 4][: len(checks)]
        grid = Image.open(folder / "samples.png")
        assert grid.width > 2 * grid.height  # the image, then its 2 samples
    bad = tmp_path / "bad.txt"
    bad.write_text("img09.png\n")
    result = runner.invoke(app, ["invmm", str(imgs), "--model", str(pixel), *FAST,
                                 "--members", str(bad)])
    assert result.exit_code == 1 and "not being scored: img09.png" in result.output


def test_auroc_counts_ties_half_and_inf_as_least_memorized():
    from forensics.steps.memorize import auroc

    assert auroc([0.1, math.inf], [0.2, math.inf]) == 0.625
    assert auroc([3.0], [1.0, 2.0], more_memorized="higher") == 1.0


# --------------------------------------------------------------------------- GPU safety


def test_out_of_memory_backs_off_and_keeps_every_result(pixel, imgs, monkeypatch):
    from fp_plugins import _invmm_engine as eng

    measure = plugins.get("memorization_measures", "invmm")
    kw = dict(similarity="ncc", beta=0.5, steps=4, check_every=2, noises=2, samples=2,
              ddim_steps=2, seed=5, device="cpu", batch_size=3)
    files = sorted(imgs.glob("*.png"))
    plain = measure.run(files, pixel, **kw)
    real = eng.DiffusionModel.output
    calls = []

    def small_gpu(self, x_t, t, cond=None):
        calls.append(x_t.shape[0])
        if x_t.shape[0] > 2:  # "memory" for one image's two noises only
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x_t, t, cond)

    monkeypatch.setattr(eng.DiffusionModel, "output", small_gpu)
    backed = measure.run(files, pixel, **kw)
    assert backed.provenance["oom_backoffs"] == [1]
    for a, b in zip(plain.results, backed.results, strict=True):
        assert a["success"] == b["success"] and a["steps_run"] == b["steps_run"]
        np.testing.assert_allclose(a["kl"], b["kl"], rtol=1e-5)
    assert max(calls[-5:]) <= 2


def test_batch_from_free_memory():
    from fp_plugins._invmm_engine import MAX_AUTO_BATCH, pick_batch_size

    gib = 2**30
    assert pick_batch_size(40 * gib, 2 * gib) == 16  # 0.8 x 40 / 2
    assert pick_batch_size(gib, 8 * gib) == 1
    assert pick_batch_size(1000 * gib, gib) == MAX_AUTO_BATCH


def test_probe_fills_the_free_memory_with_measured_steps(pixel, monkeypatch):
    """The CUDA probe's arithmetic, on CPU with the memory counters faked."""
    from fp_plugins import _invmm_engine as eng
    from fp_plugins._invmm_params import resolve_params

    gib = 2**30
    fake = {"synchronize": lambda d=None: None, "reset_peak_memory_stats": lambda d=None: None,
            "empty_cache": lambda: None, "memory_allocated": lambda d=None: 1 * gib,
            "max_memory_allocated": lambda d=None: 3 * gib,
            "mem_get_info": lambda d=None: (40 * gib, 80 * gib)}
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    dm = eng.load_model(pixel, torch.device("cpu"))
    p = resolve_params(overrides={"noises": 2})
    assert eng._probe_batch_size(dm, p, (1, 1, 8, 8)) == 16  # 0.8 x 40 GiB / 2 GiB

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(eng.DiffusionModel, "output", oom)
    with pytest.raises(InputError, match="does not fit in the memory"):
        eng._probe_batch_size(dm, p, (1, 1, 8, 8))


def test_bf16_autocast_runs_the_unet_in_bf16_on_cpu(pixel, imgs):
    from fp_plugins import _invmm_engine as eng

    dm = eng.load_model(pixel, torch.device("cpu"), precision="bf16")
    seen = []
    dm.unet.register_forward_hook(lambda m, a, o: seen.append(o.sample.dtype))
    x = torch.randn(2, 1, 8, 8)
    out = dm.output(x, torch.tensor([3, 5]))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    ref = eng.load_model(pixel, torch.device("cpu")).output(x, torch.tensor([3, 5]))
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=0.1)
    res = plugins.get("memorization_measures", "invmm").run(
        [imgs / "img00.png"], pixel, similarity="ncc", beta=0.5, steps=2, check_every=2,
        noises=2, samples=2, ddim_steps=2, device="cpu", precision="bf16")
    assert res.provenance["precision"] == "bf16" and res.provenance["autocast"] == "bfloat16"
    assert math.isfinite(res.results[0]["kl"])
    with pytest.raises(InputError, match="choose one of fp32, bf16, fp16"):
        eng.load_model(pixel, torch.device("cpu"), precision="auto")


def test_fp32_is_the_default_as_in_the_official_code(pixel, imgs):
    out = _json(["invmm", str(imgs), "--model", str(pixel), "--json", *FAST])
    prov = out["provenance"]
    assert prov["precision"] == "fp32" and prov["autocast"] is None
    assert prov["loss_scaling"] is None
    assert all(r["skipped_steps"] == 0 for r in out["results"])


def test_fp16_scales_each_images_loss_and_skips_overflowing_steps(pixel, imgs, monkeypatch):
    """fp16 runs under a GradScaler per image: an overflowing step is skipped (mu unchanged),
    the scale halves, and the other images' steps go on."""
    from fp_plugins import _invmm_engine as eng

    measure = plugins.get("memorization_measures", "invmm")
    kw = dict(similarity="ncc", beta=0.5, steps=4, check_every=2, noises=2, samples=2,
              ddim_steps=2, seed=5, device="cpu")
    files = sorted(imgs.glob("*.png"))
    fp16 = measure.run(files, pixel, precision="fp16", **kw)
    fp32 = measure.run(files, pixel, **kw)
    assert fp16.provenance["loss_scaling"].startswith("dynamic")
    assert fp16.provenance["autocast"] == "float16"
    # GradScaler starts at 2^16 (as the official SD3 script's): the first steps of a tiny
    # model overflow and are skipped while the scale halves; fp32 skips none
    for a, b in zip(fp16.results, fp32.results, strict=True):
        assert 0 <= a["skipped_steps"] < a["steps_run"] and math.isfinite(a["kl"])
        assert b["skipped_steps"] == 0
    # an overflow in the first image's gradients: its first step is skipped, not applied
    real = eng._train_step
    calls = {"n": 0}

    def overflow_once(dm, slots, noises, tau):
        calls["n"] += 1
        real(dm, slots, noises, tau) if calls["n"] > 1 else _poisoned(dm, slots, noises, tau)

    def _poisoned(dm, slots, noises, tau):
        s = slots[0]
        mu0 = s.mu.detach().clone()
        hook = s.mu.register_hook(lambda g: g * float("inf"))
        real(dm, slots, noises, tau)
        hook.remove()
        assert torch.equal(s.mu.detach(), mu0) and s.scaler.get_scale() == 2.0**15

    monkeypatch.setattr(eng, "_train_step", overflow_once)
    skipped = measure.run(files[:1], pixel, precision="fp16", **kw)
    assert calls["n"] > 1 and skipped.results[0]["skipped_steps"] >= 1


@pytest.mark.gpu
def test_cuda_picks_the_batch_from_free_memory_and_autocasts(pixel, imgs):
    res = plugins.get("memorization_measures", "invmm").run(
        sorted(imgs.glob("*.png")), pixel, similarity="ncc", beta=0.5, steps=4,
        check_every=2, noises=2, samples=2, ddim_steps=2, device="cuda", batch_size="auto")
    prov = res.provenance
    assert prov["batch_size_from"] == "free memory" and prov["batch_size"] >= 1
    assert prov["precision"] == "fp32" and prov["autocast"] is None


# --------------------------------------------------------------------------- fp memorize


def test_memorize_dispatches_to_every_measure(pixel, imgs, text_pipe, tmp_path):
    ext = _json(["memorize", str(imgs), "--model", str(pixel), "--measure", "extraction",
                 "-p", "samples=6", "-p", "ddim_steps=2", "-p", "threshold=0.3", "--json"])
    assert ext["more_memorized"] == "lower" and len(ext["results"]) == 3
    for r in ext["results"]:
        assert 0 <= r["score"] <= 1 and r["flagged"] == (r["score"] < 0.3)
    inv = _json(["memorize", str(imgs), "--model", str(pixel), "--json", "-p", "similarity=ncc",
                 "-p", "beta=0.5", "-p", "steps=2", "-p", "check_every=2", "-p", "noises=1",
                 "-p", "samples=1", "-p", "ddim_steps=1"])
    assert inv["measure"] == "invmm" and inv["provenance"]["params"]["steps"] == 2
    captioned = _write_images(tmp_path / "cap", _digits([0, 1], 8))
    (captioned / "img00.txt").write_text("a zero")
    (captioned / "img01.txt").write_text("a one")
    wen = _json(["memorize", str(captioned), "--model", str(text_pipe), "--measure", "wen",
                 "-p", "generations=1", "-p", "ddim_steps=2", "--json"])
    assert wen["more_memorized"] == "higher"
    assert [r["prompt"] for r in wen["results"]] == ["a zero", "a one"]
    assert all(r["score"] > 0 for r in wen["results"])
    no_text = runner.invoke(app, ["memorize", str(captioned), "--model", str(pixel),
                                  "--measure", "wen"])
    assert no_text.exit_code == 1 and "text-to-image pipeline" in no_text.output
    unknown = runner.invoke(app, ["memorize", str(imgs), "--model", str(pixel),
                                  "--measure", "nope"])
    assert unknown.exit_code == 1 and "invmm" in unknown.output
    bad = runner.invoke(app, ["memorize", str(imgs), "--model", str(pixel), "-p", "steps"])
    assert bad.exit_code == 1 and "KEY=VALUE" in bad.output


def test_a_third_party_measure_gets_the_cli(imgs, tmp_path):
    import types

    from forensics.plugin.hookspecs import hookimpl

    class Brightness:
        name = "brightness"
        description = "mean pixel value"
        more_memorized = "higher"

        def score(self, images, model, *, scale=1.0):
            from PIL import Image

            return [{"image": str(p), "score": scale * float(np.asarray(Image.open(p)).mean())}
                    for p in images]

    mod = types.ModuleType("brightness_measure")
    mod.register_memorization_measures = hookimpl(
        lambda register: register(Brightness()))
    plugins.get_plugin_manager().register(mod, name="brightness_measure")
    members = tmp_path / "m.txt"
    members.write_text("img01.png\n")
    out = _json(["memorize", str(imgs), "--model", "-", "--measure", "brightness",
                 "-p", "scale=2", "--members", str(members), "--json", "--out", str(tmp_path)])
    scores = {Path(r["image"]).name: r["score"] for r in out["results"]}
    assert out["ranking"][0].endswith(max(scores, key=scores.get))
    assert out["members"]["auroc"] == float(scores["img01.png"] > min(
        scores["img00.png"], scores["img02.png"])) or out["members"]["auroc"] in (0.0, 0.5, 1.0)
    assert (tmp_path / "scores.csv").is_file() and (tmp_path / "members.png").is_file()


def test_tpr_at_1pct_fpr_is_the_roc_point_sklearn_draws():
    from sklearn.metrics import roc_curve

    from forensics.steps.memorize import tpr_at_fpr

    rng = np.random.default_rng(0)
    for n_other in (20, 300):
        m = np.round(rng.normal(0, 1, 50), 1)  # rounded: ties across the classes
        o = np.round(rng.normal(1.5, 1, n_other), 1)
        labels = np.r_[np.ones(50), np.zeros(n_other)]
        fpr, tpr, _ = roc_curve(labels, -np.r_[m, o])  # lower = member
        expected = tpr[fpr <= 0.01].max()
        assert tpr_at_fpr(m.tolist(), o.tolist()) == pytest.approx(expected, abs=1e-12)
        assert tpr_at_fpr((-m).tolist(), (-o).tolist(), "higher") == pytest.approx(expected)
    # inf is the least memorized; with 3 non-members only a threshold with none flagged
    assert tpr_at_fpr([0.1, 0.2, math.inf], [0.15, math.inf, math.inf]) == pytest.approx(1 / 3)


def test_cli_prints_auroc_and_auroc_ranking_under_their_names(imgs, tmp_path):
    import types

    from forensics.plugin.hookspecs import hookimpl

    class Tied:
        name = "tied"
        description = "two images tie"

        def score(self, images, model):
            return [{"image": str(p), "score": s} for p, s in zip(images, (1.0, 1.0, 2.0),
                                                                   strict=True)]

    mod = types.ModuleType("tied_measure")
    mod.register_memorization_measures = hookimpl(lambda register: register(Tied()))
    plugins.get_plugin_manager().register(mod, name="tied_measure")
    members = tmp_path / "m.txt"
    members.write_text("img01.png\n")
    result = runner.invoke(app, ["memorize", str(imgs), "--model", "-", "--measure", "tied",
                                 "--members", str(members)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    # the member ties img00 (half) and beats img02: 0.75; the ranking puts img00 first: 0.5
    assert "auroc 0.750 (scores; ties count half)" in out
    assert "auroc_ranking 0.500 (the ranking, ties broken)" in out
    assert "TPR at 1% FPR 0.000" in out and "fewer than 100 non-members" in out


# --------------------------------------------------------------------------- resuming


def _same_results(a: list[dict], b: list[dict]) -> None:
    assert [Path(r["image"]).name for r in a] == [Path(r["image"]).name for r in b]
    strip = lambda r: {k: v for k, v in r.items() if k != "image"}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]


def test_a_crashed_run_resumes_with_the_results_of_an_uninterrupted_one(
        pixel, imgs, tmp_path, monkeypatch):
    from fp_plugins import _invmm_evidence as evm
    from safetensors.torch import load_file

    args = ["invmm", str(imgs), "--model", str(pixel), "--json", *FAST, "--seed", "4"]
    whole = _json([*args, "--out", str(tmp_path / "whole")])
    real = evm.write_image
    written = []

    def crash_on_the_third(out, index, result, ev, run_key=None):
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        written.append(index)
        return real(out, index, result, ev, run_key)

    monkeypatch.setattr(evm, "write_image", crash_on_the_third)
    crashed = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert crashed.exit_code != 0 and len(written) == 2
    done = sorted(p.parent.name for p in (tmp_path / "o").rglob("result.json"))
    assert len(done) == 2 and not (tmp_path / "o" / "report.json").exists()
    monkeypatch.setattr(evm, "write_image", real)
    resumed = _json([*args, "--out", str(tmp_path / "o")])
    assert resumed["provenance"]["resumed"] == 2
    _same_results(resumed["results"], whole["results"])
    assert resumed["ranking"] == whole["ranking"] or [Path(p).name for p in resumed[
        "ranking"]] == [Path(p).name for p in whole["ranking"]]
    for name in done:
        a = load_file(str(tmp_path / "o" / "evidence" / name / "params.safetensors"))
        b = load_file(str(tmp_path / "whole" / "evidence" / name / "params.safetensors"))
        assert torch.equal(a["mu"], b["mu"]) and torch.equal(a["logvar"], b["logvar"])
    # other settings never mix with, nor overwrite, what the folder holds
    other = runner.invoke(app, [*args[:-1], "5", "--out", str(tmp_path / "o")])
    assert other.exit_code == 1 and "other settings" in other.output


@pytest.mark.slow
def test_a_killed_process_resumes(pixel, imgs, tmp_path):
    """The installed ``fp`` killed (SIGKILL) once the first image is done, then rerun."""
    import os
    import signal
    import subprocess
    import sys
    import time

    fp = os.path.join(os.path.dirname(sys.executable), "fp")
    args = [fp, "invmm", str(imgs), "--model", str(pixel), "--device", "cpu", "--json",
            "--steps", "150", "--check-every", "75", "--noises", "2", "--samples", "2",
            "--similarity", "ncc", "--beta", "0.999", "--ddim-steps", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while not list(out.rglob("result.json")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.rglob("result.json")))
    assert 1 <= done < 3, done  # killed midway
    again = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True,
                           env=env, check=True)
    resumed = json.loads(again.stdout)
    whole = json.loads(subprocess.run([*args, "--out", str(tmp_path / "whole")],
                                      capture_output=True, text=True, env=env,
                                      check=True).stdout)
    assert resumed["provenance"]["resumed"] == done
    _same_results(resumed["results"], whole["results"])


# --------------------------------------------------------------------------- evidence


def test_the_score_histogram_is_written_without_members(pixel, imgs, tmp_path):
    from PIL import Image

    _json(["invmm", str(imgs), "--model", str(pixel), "--json", *FAST, "--out",
           str(tmp_path / "o")])
    assert Image.open(tmp_path / "o" / "scores.png").width > 100
    assert not (tmp_path / "o" / "members.png").exists()


def test_the_official_codes_params_files_are_compared(pixel, imgs, tmp_path):
    official = tmp_path / "official"
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(1, 1, 8, 8, generator=g) * 0.1, torch.randn(1, 1, 8, 8) * 0.1
    kl = 0.5 * torch.mean(mu**2 + logvar.exp() - logvar - 1)
    (official / "img00").mkdir(parents=True)
    torch.save({"mu": mu, "logvar": logvar, "invmm": kl}, official / "img00" / "params.pt")
    (official / "img01").mkdir()
    torch.save({"mu": mu, "logvar": logvar, "invmm": torch.tensor(float("inf")),
                "log_coeffs": torch.zeros(2, 3), "sim_scores": torch.zeros(7, 8), "step": 1999},
               official / "img01" / "params.pt")
    result = runner.invoke(app, ["invmm", str(imgs), "--model", str(pixel), *FAST,
                                 "--official", str(official)])
    assert result.exit_code == 0, result.output
    assert "official results" in result.output and "2 matched" in result.output
    out = _json(["invmm", str(imgs), "--model", str(pixel), "--json", *FAST,
                 "--official", str(official)])
    summary = out["provenance"]["official"]
    assert summary["matched"] == 2 and summary["missing"] == ["img02"]
    assert summary["official_kl_vs_stored_score"] < 1e-6
    by_name = {Path(r["image"]).name: r for r in out["results"]}
    np.testing.assert_allclose(by_name["img00.png"]["official_score"], float(kl), rtol=1e-6)
    np.testing.assert_allclose(by_name["img00.png"]["official_kl"], float(kl), rtol=1e-6)
    assert by_name["img01.png"]["official_score"] is None  # inf: never reached
    assert by_name["img02.png"]["official_kl"] is None
    agree = np.mean([(by_name[n]["score"] is not None) == (n == "img00.png")
                     for n in ("img00.png", "img01.png")])
    assert summary["success_agreement"] == agree

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"mu": mu, "logvar": logvar, "extra": Evil()}, official / "img00" / "params.pt")
    bad = runner.invoke(app, ["invmm", str(imgs), "--model", str(pixel), *FAST,
                              "--official", str(official)])
    assert bad.exit_code == 1 and "weights_only=True" in bad.output
    assert "unpickled!" not in bad.output


# --------------------------------------------------------------------------- captions


def test_extraction_generates_from_each_images_caption(text_pipe, tmp_path):
    from fp_plugins import _invmm_engine as eng

    folder = _write_images(tmp_path / "cap", _digits([0, 1, 2], 8))
    captions = tmp_path / "captions.tsv"
    captions.write_text("# image<TAB>caption\nimg00.png\ta zero\nimg01\ta one\n"
                        "img02.png\ta zero\n")
    out = _json(["memorize", str(folder), "--model", str(text_pipe), "--measure",
                 "extraction", "--captions", str(captions), "-p", "samples=3",
                 "-p", "ddim_steps=2", "--json"])
    res = out["results"]
    assert [r["caption"] for r in res] == ["a zero", "a one", "a zero"]
    # each image against its own caption's generations: recompute "a one" by hand
    dm = eng.load_model(text_pipe, torch.device("cpu"))
    gen = eng.seeded_generator(0, "a one", torch.device("cpu"))
    x_T = torch.randn((3, 2, 4, 4), generator=gen)
    imgs = eng.ddim_sample(dm, x_T, 2, cond=dm.text.encode("a one").expand(3, -1, -1),
                           uncond=dm.text.encode("").expand(3, -1, -1), scale=7.5)
    ref = torch.tensor(np.asarray(_digits([1], 8)[0])).float().div(255).flatten()
    d = ((imgs.flatten(1).double() - ref.double()) ** 2).mean(1).sqrt()
    np.testing.assert_allclose(res[1]["score"], float(d.min()), rtol=1e-6)
    assert res[1]["nearest_sample"] == int(d.argmin())
    # wen reads the same file instead of the .txt files
    wen = _json(["memorize", str(folder), "--model", str(text_pipe), "--measure", "wen",
                 "--captions", str(captions), "-p", "generations=1", "-p", "ddim_steps=2",
                 "--json"])
    assert [r["prompt"] for r in wen["results"]] == ["a zero", "a one", "a zero"]
    assert wen["results"][0]["score"] == wen["results"][2]["score"]
    captions.write_text("img00.png\ta zero\n")
    bad = runner.invoke(app, ["memorize", str(folder), "--model", str(text_pipe), "--measure",
                              "extraction", "--captions", str(captions)])
    assert bad.exit_code == 1 and "no caption for" in bad.output
    captions.write_text("img00.png a zero\n")
    bad = runner.invoke(app, ["memorize", str(folder), "--model", str(text_pipe), "--measure",
                              "extraction", "--captions", str(captions)])
    assert bad.exit_code == 1 and "IMAGE<TAB>caption" in bad.output


# --------------------------------------------------------------------------- captioned model


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A tiny text-to-image model (benchmarks/bench_memorization.py's) trained on four
    digits with their own captions ("a zero" ... "a three": memorized) and 24 other digits
    sharing one caption ("a digit": seen with many images, so not one image's copy).
    Returns (model, folder of a memorized and a held-out digit, captions file)."""
    import importlib.util

    from sklearn.datasets import load_digits

    spec = importlib.util.spec_from_file_location(
        "bench_memorization", ROOT / "benchmarks" / "bench_memorization.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    labels = load_digits().target
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(4)]
    shared = [int(i) for c in range(4, 10) for i in np.flatnonzero(labels == c)[1:5]]
    root = tmp_path_factory.mktemp("captioned")
    images = bench._digits(firsts) + bench._digits(shared)
    captions = [f"a {bench.WORDS[c]}" for c in range(4)] + ["a digit"] * len(shared)
    bench.train(root / "model", images, captions, iterations=800)
    held = int(np.flatnonzero(labels == 7)[0])  # a digit the model never saw
    pair = bench._write(root / "pair", bench._digits([firsts[1], held]))
    file = root / "captions.tsv"
    file.write_text("img00.png\ta one\nimg01.png\ta digit\n")
    return root / "model", pair, file


@pytest.mark.slow
def test_wen_at_shipped_defaults_separates_a_memorized_caption(captioned):
    model, pair, captions = captioned
    out = _json(["memorize", str(pair), "--model", str(model), "--measure", "wen",
                 "--captions", str(captions), "-p", "device=cpu", "--json"])
    memorized, shared = out["results"]
    print("wen defaults", memorized["score"], shared["score"])
    assert memorized["score"] > shared["score"]  # higher = more memorized


@pytest.mark.slow
def test_extraction_with_captions_at_shipped_defaults_separates(captioned):
    model, pair, captions = captioned
    out = _json(["memorize", str(pair), "--model", str(model), "--measure", "extraction",
                 "--captions", str(captions), "-p", "device=cpu", "--json"])
    memorized, held = out["results"]
    print("extraction captions defaults", memorized["score"], held["score"])
    # the score separates them; fp's threshold 0.1 does not flag this toy's copy, whose
    # guided generations (guidance 7.5) stay a little further (measured: 0.101 vs 0.123)
    assert memorized["score"] < held["score"] and not held["flagged"]
