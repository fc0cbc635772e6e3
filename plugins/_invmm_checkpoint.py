"""Single-file checkpoints turned into a diffusers folder InvMM loads (torch at import).

Researchers hold models as one file more often than as a diffusers folder:

- a Stable Diffusion v1/v2 checkpoint (``sd-v1-4.ckpt``, ``v1-5-pruned-emaonly.safetensors``:
  ``ldm`` key layout, ``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.*``) is converted by diffusers' own
  ``StableDiffusionPipeline.from_single_file``, with the pipeline's diffusers configs from
  ``--config DIR`` (offline: nothing is fetched);
- a plain UNet state dict in diffusers' ``UNet2DModel`` / ``UNet2DConditionModel`` layout
  (``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt``, possibly nested under
  ``ema_model``, ``state_dict``, ``model`` or ``net_model``) is loaded into the UNet that
  ``--config DIR``'s ``unet/config.json`` (or ``config.json``) describes, next to the
  scheduler config (and any autoencoder or text encoder) of that folder.

Nothing but tensors is ever unpickled: ``.safetensors`` files are read by safetensors,
others by ``torch.load(weights_only=True)``; a file that needs more is refused.
Refused with a reason: Stable Diffusion 3.x (an MMDiT trained by flow matching, not a
UNet with a DDPM schedule), CompVis latent-diffusion single files (no diffusers converter)
and UNet state dicts in other layouts (e.g. pytorch-ddpm's ``downblocks.*``).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from forensics.errors import InputError

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: Where a training script nests the weights, in the order they are preferred (EMA first).
NESTED_KEYS = ("ema_model", "state_dict", "model", "net_model", "module")
SD3_REFUSAL = (
    "Stable Diffusion 3.x is not supported by InvMM in fp: it is an MMDiT transformer "
    "trained by flow matching (rectified flow, velocity prediction, no DDPM noise "
    "schedule), which the official code inverts with its own script "
    "(stable-diffusion-v3/inversion.py: SD3's sampler, a GradScaler and fp16); fp "
    "implements the DDPM, LDM and Stable Diffusion v1/v2 variants")


def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """(tensors, the key they were nested under) from a checkpoint file, unpickling nothing
    but tensors.

    Raises:
        InputError: unreadable, holds other pickled objects, or holds no tensors.
    """
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), None
        except Exception as exc:  # safetensors raises several types
            raise InputError(f"--model {path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"--model {path}: fp reads checkpoints with torch.load(weights_only=True) only and "
            f"never unpickles anything but tensors, and this file needs more ({first}). Use "
            f"the model's .safetensors release, or convert the file to .safetensors with a "
            f"tool you trust") from exc
    nested = None
    while isinstance(obj, dict):
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj, nested = obj[key], key if nested is None else f"{nested}.{key}"
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} \
        if isinstance(obj, dict) else {}
    if not tensors:
        raise InputError(f"--model {path}: holds no tensors (looked at the top level and "
                         f"under {', '.join(NESTED_KEYS)})")
    return tensors, nested


def _config_dir(config: str | Path | None, model: Path, what: str) -> Path:
    if config is None:
        raise InputError(
            f"--model {model} is a single {what} file: pass --config DIR, a folder with the "
            f"model's diffusers configs (no weights needed), e.g. the folder of a "
            f"save_pretrained pipeline of the same architecture")
    folder = Path(config).expanduser()
    if not folder.is_dir():
        raise InputError(f"--config {config}: no such folder of diffusers configs")
    return folder


def to_folder(model: Path, config: str | Path | None, work: Path) -> tuple[Path, dict[str, Any]]:
    """Write ``model`` (a single file) as a diffusers folder under ``work``; return it and
    what was done (for provenance)."""
    tensors, nested = read_state_dict(model)
    keys = list(tensors)
    if any(".joint_blocks." in f".{k}" for k in keys):
        raise InputError(f"--model {model}: {SD3_REFUSAL}")
    if any(k.startswith("model.diffusion_model.") for k in keys):
        if not any(k.startswith("cond_stage_model.") for k in keys):
            raise InputError(
                f"--model {model}: a CompVis latent-diffusion checkpoint without a text "
                f"encoder; diffusers converts Stable Diffusion single files only. Save the "
                f"model as a diffusers LDMPipeline folder (unet/, vqvae/, scheduler/)")
        del tensors
        folder = _stable_diffusion(model, _config_dir(config, model, "Stable Diffusion"), work)
        return folder, {"kind": "stable-diffusion single file (diffusers from_single_file)",
                        "file": str(model), "config": str(config)}
    folder = _unet_state_dict(tensors, model, _config_dir(config, model, "UNet state dict"), work)
    return folder, {"kind": "UNet state dict", "file": str(model), "config": str(config),
                    "nested_under": nested}


def _stable_diffusion(model: Path, config: Path, work: Path) -> Path:
    try:
        from diffusers import StableDiffusionPipeline
    except ImportError as exc:  # pragma: no cover - diffusers is InvMM's dependency
        raise InputError("single-file Stable Diffusion checkpoints need diffusers: "
                         "pip install 'fp-forensics[invmm]'") from exc
    if not (config / "model_index.json").is_file():
        raise InputError(f"--config {config}: no model_index.json; give the diffusers "
                         f"configs of a Stable Diffusion pipeline (model_index.json, unet/, "
                         f"vae/, text_encoder/, tokenizer/, scheduler/)")
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(model), config=str(config), local_files_only=True, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    except InputError:
        raise
    except Exception as exc:  # diffusers raises many types for a mismatched file/config
        raise InputError(f"--model {model}: diffusers' from_single_file could not build a "
                         f"Stable Diffusion pipeline from it with the configs in {config} "
                         f"({type(exc).__name__}: {exc})") from exc
    folder = work / "pipeline"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _unet_state_dict(tensors: dict[str, torch.Tensor], model: Path, config: Path,
                     work: Path) -> Path:
    import diffusers

    unet_config = next((p for p in (config / "unet" / "config.json", config / "config.json")
                        if p.is_file()), None)
    if unet_config is None:
        raise InputError(f"--config {config}: no unet/config.json (nor config.json) "
                         f"describing the UNet of {model}")
    cfg = json.loads(unet_config.read_text())
    cls_name = cfg.get("_class_name")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise InputError(f"{unet_config}: InvMM loads UNet2DModel and UNet2DConditionModel "
                         f"state dicts, not {cls_name}")
    unet = getattr(diffusers, cls_name).from_config(cfg)
    missing, unexpected = unet.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise InputError(
            f"--model {model}: its tensors are not the {cls_name} of {unet_config} "
            f"({len(missing)} missing, e.g. {', '.join(missing[:3]) or '-'}; "
            f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3]) or '-'}). fp "
            f"loads state dicts in diffusers' layout; convert other layouts (e.g. "
            f"pytorch-ddpm's) to a diffusers UNet first")
    folder = work / "model"
    folder.mkdir(parents=True)
    for item in config.iterdir():  # scheduler, autoencoder, text encoder... as given
        if item.name not in ("unet", "config.json"):
            (folder / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder
