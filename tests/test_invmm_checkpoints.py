"""InvMM on the checkpoints researchers hold: single-file Stable Diffusion (converted by
diffusers' ``from_single_file``), plain UNet state dicts with a config, and the precise
refusals (pickled objects, other layouts, SD 3.x, class-conditional UNets).

Every checkpoint is tiny and made here from a seeded diffusers model; nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_invmm import FAST, _digits, _scheduler, _tiny_unet, _write_images
from test_invmm_fidelity import TEXT_FAST, _tiny_text_pipeline
from typer.testing import CliRunner

from forensics.cli.app import app

runner = CliRunner()
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def imgs(tmp_path_factory) -> Path:
    return _write_images(tmp_path_factory.mktemp("imgs"), _digits([0, 1], 8))


@pytest.fixture(scope="module")
def pixel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pixel")
    diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=_scheduler()).save_pretrained(folder)
    return folder


def _configs_only(folder: Path, dest: Path) -> Path:
    """The diffusers configs of ``folder`` without any weights (as --config takes them)."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def _results(args) -> list[dict]:
    result = runner.invoke(app, ["invmm", *args, "--json"])
    assert result.exit_code == 0, result.output
    return [{k: v for k, v in r.items() if k != "image"}
            for r in json.loads(result.stdout)["results"]]


def _error(args) -> str:
    result = runner.invoke(app, ["invmm", *args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


# --------------------------------------------------------------------------- UNet state dict


def test_a_unet_state_dict_with_a_config_scores_as_its_folder(pixel, imgs, tmp_path):
    sd = diffusers.UNet2DModel.from_pretrained(pixel / "unet").state_dict()
    ckpt = tmp_path / "ckpt.pt"  # pytorch-ddpm's habit: EMA weights nested, beside other state
    torch.save({"ema_model": sd, "net_model": sd, "step": 800, "x_T": torch.randn(2)}, ckpt)
    config = _configs_only(pixel, tmp_path / "config")
    ref = _results([str(imgs), "--model", str(pixel), *FAST, "--seed", "2"])
    ours = _results([str(imgs), "--model", str(ckpt), "--config", str(config), *FAST,
                     "--seed", "2"])
    assert ours == ref
    flat = tmp_path / "unet.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(flat))
    assert _results([str(imgs), "--model", str(flat), "--config", str(config), *FAST,
                     "--seed", "2"]) == ref
    from fp_plugins import _invmm_engine as eng

    dm = eng.load_model(ckpt, torch.device("cpu"), config=config)
    assert dm.info["single_file"]["nested_under"] == "ema_model"
    assert dm.info["folder"] == str(ckpt)


def test_single_files_need_a_config_and_the_diffusers_layout(pixel, imgs, tmp_path):
    sd = diffusers.UNet2DModel.from_pretrained(pixel / "unet").state_dict()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"ema_model": sd}, ckpt)
    assert "pass --config DIR" in _error([str(imgs), "--model", str(ckpt), *FAST])
    config = _configs_only(pixel, tmp_path / "config")
    other = {re.sub(r"^down_blocks", "downblocks", k): v for k, v in sd.items()}
    torch.save({"ema_model": other}, tmp_path / "other.pt")
    msg = _error([str(imgs), "--model", str(tmp_path / "other.pt"), "--config", str(config),
                  *FAST])
    assert "not the UNet2DModel of" in msg and "unexpected, e.g. downblocks" in msg
    assert "diffusers' layout" in msg
    assert "applies to single-file" in _error([str(imgs), "--model", str(pixel), "--config",
                                               str(config), *FAST])


class Payload:
    """An object a pickle would construct: fp must never unpickle it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_checkpoint_with_pickled_objects_is_refused_unread(pixel, imgs, tmp_path, capsys):
    sd = diffusers.UNet2DModel.from_pretrained(pixel / "unet").state_dict()
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "callbacks": Payload()}, ckpt)
    config = _configs_only(pixel, tmp_path / "config")
    msg = _error([str(imgs), "--model", str(ckpt), "--config", str(config), *FAST])
    assert "weights_only=True" in msg and "never unpickles" in msg and ".safetensors" in msg
    assert "unpickled!" not in capsys.readouterr().out


# --------------------------------------------------------------------------- refusals


def test_class_conditional_unets_are_refused_naming_the_config_entry(imgs, tmp_path):
    folder = tmp_path / "cc"
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                          block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                          down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"),
                          num_class_embeds=10).save_pretrained(folder / "unet")
    _scheduler().save_pretrained(folder / "scheduler")
    msg = _error([str(imgs), "--model", str(folder), *FAST])
    assert "num_class_embeds = 10" in msg and "is not supported" in msg


def test_stable_diffusion_3_is_refused_as_flow_matching(imgs, tmp_path):
    folder = tmp_path / "sd3"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "SD3Transformer2DModel"}))
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline"}))
    msg = _error([str(imgs), "--model", str(folder), *FAST])
    assert "Stable Diffusion 3.x is not supported" in msg and "flow matching" in msg
    from safetensors.torch import save_file

    single = tmp_path / "sd3_medium.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight":
               torch.zeros(3, 1)}, str(single))
    msg = _error([str(imgs), "--model", str(single), "--config", str(folder), *FAST])
    assert "Stable Diffusion 3.x is not supported" in msg


# --------------------------------------------------------------------------- Stable Diffusion


def _unet_to_ldm(sd: dict, layers: int, up_attn: list[bool]) -> dict:
    """A diffusers UNet2DConditionModel state dict in CompVis ``ldm`` names."""
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    n = layers + 1
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "time_embedding":
            new = f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[parts[1]] }." + parts[2]
        elif parts[0] == "conv_in":
            new = "input_blocks.0.0." + parts[1]
        elif parts[0] == "conv_norm_out":
            new = "out.0." + parts[1]
        elif parts[0] == "conv_out":
            new = "out.2." + parts[1]
        elif parts[0] in ("down_blocks", "up_blocks", "mid_block"):
            if parts[0] == "mid_block":
                i, kind, j, rest = 0, parts[1], int(parts[2]), parts[3:]
                base = f"middle_block.{2 * j if kind == 'resnets' else 1}"
            else:
                i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
                if parts[0] == "down_blocks":
                    if kind == "downsamplers":
                        base = f"input_blocks.{n * (i + 1)}.0.op"
                        rest = rest[1:]  # ".conv"
                    else:
                        base = f"input_blocks.{n * i + j + 1}.{0 if kind == 'resnets' else 1}"
                else:
                    if kind == "upsamplers":
                        base = f"output_blocks.{n * i + layers}.{2 if up_attn[i] else 1}"
                    else:
                        base = f"output_blocks.{n * i + j}.{0 if kind == 'resnets' else 1}"
            if kind == "resnets":
                rest = [res.get(rest[0], rest[0]), *rest[1:]]
            new = ".".join([base, *rest])
        else:
            raise AssertionError(key)
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(sd: dict, blocks: int) -> dict:
    """A diffusers AutoencoderKL state dict in CompVis ``ldm`` names."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if p[0] in ("quant_conv", "post_quant_conv"):
            new = key
        elif p[1] in ("conv_in", "conv_out"):
            new = key
        elif p[1] == "conv_norm_out":
            new = f"{p[0]}.norm_out.{p[2]}"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{p[0]}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:])
            else:
                name = attn[p[4]]
                new = f"{p[0]}.mid.attn_1.{name}.{p[-1]}"
                if name != "norm" and value.dim() == 2:
                    value = value[:, :, None, None]
        else:  # down_blocks / up_blocks
            i = int(p[2]) if p[0] == "encoder" else blocks - 1 - int(p[2])
            group = "down" if p[0] == "encoder" else "up"
            if p[3] == "resnets":
                sub = {"conv_shortcut": "nin_shortcut"}.get(p[5], p[5])
                new = f"{p[0]}.{group}.{i}.block.{p[4]}.{sub}.{p[-1]}"
            else:
                new = f"{p[0]}.{group}.{i}.{'downsample' if group == 'down' else 'upsample'}" \
                      f".conv.{p[-1]}"
        out["first_stage_model." + new] = value
    return out


@pytest.fixture(scope="module")
def sd_single_file(tmp_path_factory):
    """(pipeline folder, its configs without weights, the same weights as one ldm file)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("sd1")
    folder = _tiny_text_pipeline(root / "pipe")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae")
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    state = {**_unet_to_ldm(unet.state_dict(), 1, [False, True]),
             **_vae_to_ldm(vae.state_dict(), 2),
             **{"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else
                                                   "text_model.") + k: v
                for k, v in text.state_dict().items()}}
    from safetensors.torch import save_file

    single = root / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    ckpt = root / "tiny-sd.ckpt"  # as the official sd-v1-4.ckpt: Lightning's nesting
    torch.save({"state_dict": state, "global_step": 470000}, ckpt)
    return folder, _configs_only(folder, root / "configs"), single, ckpt


def test_stable_diffusion_single_files_load_through_from_single_file(sd_single_file, imgs):
    folder, configs, single, ckpt = sd_single_file
    from fp_plugins import _invmm_engine as eng

    ref = eng.load_model(folder, torch.device("cpu"))
    for path in (single, ckpt):
        dm = eng.load_model(path, torch.device("cpu"), config=configs)
        assert dm.family == "text-to-image" and dm.info["single_file"]["kind"].startswith(
            "stable-diffusion")
        for a, b in ((dm.unet, ref.unet), (dm.autoencoder, ref.autoencoder),
                     (dm.text.encoder, ref.text.encoder)):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys()
            for k in sa:
                np.testing.assert_array_equal(sa[k].numpy(), sb[k].numpy(), err_msg=k)
    args = [str(imgs), *TEXT_FAST, "--seed", "1"]
    assert _results([*args, "--model", str(single), "--config", str(configs)]) == _results(
        [*args, "--model", str(folder)])
    msg = _error([str(imgs), "--model", str(single), *FAST])
    assert "pass --config DIR" in msg
