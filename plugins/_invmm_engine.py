"""The InvMM optimisation on a diffusers model (imported only when InvMM runs).

Per image x0 (as the official ``ddpm/inverion.py``):

    mu, logvar = 0, 0                                   # Gaussian over x_T, shape of x_T
    Adam([mu, logvar], lr); w = kl_weight; prev = inf
    for step in range(steps):
        x_T = mu + exp(logvar / 2) * z,  z ~ N(0, I)    # `noises` of them
        t ~ U{0, ..., T-1}                              # one per noise
        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) x_T
        x0_hat = x0 predicted from the model output at (x_t, t)
        loss = mean((x0_hat - x0)^2) + w * KL,  KL = 0.5 mean(mu^2 + e^logvar - logvar - 1)
        Adam step
        now = mean of the last `window` reconstruction losses
        if (step + 1) % C == 0:
            w = w / 2 if prev - now < xi else w + delta; prev = now
            sample `samples` images by DDIM (eta 0) from x_T = mu + sigma z
            if min similarity(sample, x0) >= beta: score = KL; stop
        else:
            w = w + delta
    score = inf if it never stopped

Text-to-image pipelines (the official ``stable-diffusion-v1/-v2`` scripts) also learn the
prompt (``fp_plugins._invmm_text``): each of the `noises` gets its own Gumbel-softmax draw
of the soft tokens, and a check samples at every guidance scale 1..7 (classifier-free
guidance against the empty prompt), succeeding when any scale's least similar sample
reaches beta.

By default each image runs its own model calls (its ``noises`` samples per step, as the
official scripts, which score one image per run): an image's score is then bit-identical
whatever the other images and the batch. ``batch_size`` > 1 (or ``"auto"``: from free CUDA
memory) optimises several images together: their noised inputs share one model call per
step (and per DDIM step), while each keeps its own parameters, Adam state, KL weight, loss
window and random stream, so its score equals its own run up to float round-off (kernels
differ with the call's width). When CUDA runs out of memory, the images of a step are split
into smaller model calls (the random streams are rewound first), so a run never fails for
its batch size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fp_plugins._invmm_checkpoint import SUFFIXES as SINGLE_FILE_SUFFIXES
from fp_plugins._invmm_params import GUIDANCE_SCALES, SSCD_SIZE, InvMMReport, params_dict, rank
from fp_plugins._invmm_params import resolve_params as _resolve_params
from fp_plugins._invmm_similarity import (
    SSCD_BETA,
    calibrate_beta,
    check_sscd_present,
    is_sscd,
    make_similarity,
)

from forensics.errors import InputError, OfflineError

_UNETS = ("UNet2DModel", "UNet2DConditionModel")
_AUTOENCODERS = ("VQModel", "AutoencoderKL")
#: Precisions by name. ``fp32`` is the default, as in the official DDPM, LDM and Stable
#: Diffusion v1/v2 code; ``bf16`` and ``fp16`` run the UNet under autocast (losses and the
#: learned parameters stay float32), ``fp16`` with dynamic loss scaling (a ``GradScaler``
#: per image, as the official SD3 script).
PRECISIONS = ("fp32", "bf16", "fp16")
#: Most images optimised together when the batch is picked from free memory.
MAX_AUTO_BATCH = 64
#: Share of the free GPU memory a picked batch may use.
MEMORY_SHARE = 0.8


# --------------------------------------------------------------------------- the model


@dataclass
class DiffusionModel:
    """A diffusers denoiser, its noise schedule, autoencoder and text conditioning if any."""

    unet: Any
    alphas_cumprod: torch.Tensor  # float64, on the device
    prediction_type: str
    device: torch.device
    autoencoder: Any = None
    autoencoder_kind: str | None = None  # "vq" | "kl"
    scaling_factor: float = 1.0
    encoder_hidden_states: torch.Tensor | None = None  # fixed conditioning, (1, L, D)
    text: Any = None  # a TextConditioner for text-to-image pipelines
    autocast_dtype: torch.dtype | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def latent(self) -> bool:
        return self.autoencoder is not None

    @property
    def conditional(self) -> bool:
        return self.encoder_hidden_states is not None or self.text is not None

    @property
    def family(self) -> str:
        """``pixel``, ``latent`` or ``text-to-image`` (any cross-attention UNet)."""
        if self.conditional:
            return "text-to-image"
        return "latent" if self.latent else "pixel"

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def image_channels(self) -> int:
        if self.latent:
            return int(self.autoencoder.config.in_channels)
        return int(self.unet.config.in_channels)

    @property
    def image_size(self) -> int:
        size = _square(self.unet.config.sample_size)
        if self.latent:
            size *= 2 ** (len(self.autoencoder.config.block_out_channels) - 1)
        return size

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def output(self, x_t: torch.Tensor, t: torch.Tensor,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's output at (x_t, t), learned-variance channels dropped, in float32.

        ``cond``: per-sample ``encoder_hidden_states`` (default: the fixed conditioning).
        """
        if cond is None and self.encoder_hidden_states is not None:
            cond = self.encoder_hidden_states.expand(x_t.shape[0], -1, -1)
        with self._autocast():
            if cond is not None:
                out = self.unet(x_t, t, encoder_hidden_states=cond).sample
            else:
                out = self.unet(x_t, t).sample
        return out[:, : x_t.shape[1]].float()

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
               uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Classifier-free guided output ``u + scale (c - u)``; the conditional one at 1."""
        if uncond is None or scale == 1.0:
            return self.output(x_t, t, cond)
        out = self.output(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
        u, c = out.chunk(2)
        return u + scale * (c - u)

    def x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor):
        """(x0_hat, eps_hat) from a model output, by the scheduler's prediction type."""
        a = self.alphas_cumprod[t].float().view(-1, *([1] * (x_t.dim() - 1)))
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        if self.prediction_type == "epsilon":
            return (x_t - s1a * out) / sa, out
        if self.prediction_type == "v_prediction":
            return sa * x_t - s1a * out, sa * out + s1a * x_t
        return out, (x_t - sa * out) / s1a  # "sample"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> x0 in the space the UNet denoises."""
        if not self.latent:
            return images
        with torch.no_grad():
            if self.autoencoder_kind == "vq":
                z = self.autoencoder.encode(images).latents
            else:
                z = self.autoencoder.encode(images).latent_dist.mode()
        return z * self.scaling_factor

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 in the UNet's space -> images in [0, 1]."""
        if self.latent:
            x0 = self.autoencoder.decode(x0 / self.scaling_factor).sample
        return ((x0 + 1) / 2).clamp(0, 1)


def _square(size: Any) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise InputError(f"InvMM needs a square sample_size, the model has {size}")
        size = size[0]
    return int(size)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def _local_folder(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise InputError(
            f"--model {text}: not a diffusers folder, a checkpoint file "
            f"({', '.join(SINGLE_FILE_SUFFIXES)}) nor a hub id (owner/name). Give a folder "
            f"saved with save_pretrained (holding unet/ and scheduler/), or a single-file "
            f"checkpoint with --config."
        )
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(text))
    except Exception as exc:  # network, auth or missing repo: all mean "not here"
        raise OfflineError(
            f"could not fetch diffusers model {text!r} from the hub ({type(exc).__name__}: "
            f"{exc}). Without network access, pass a local folder saved with save_pretrained."
        ) from exc


def _unet_dir(folder: Path) -> Path | None:
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet"
    if (folder / "config.json").is_file():  # a bare UNet folder
        return folder
    return None


def _weights(cls: Any, path: Path, device: torch.device) -> Any:
    """A frozen diffusers model in eval mode; safetensors only, so nothing is unpickled."""
    try:
        net = cls.from_pretrained(path, low_cpu_mem_usage=False, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:  # RuntimeError: size mismatch
        raise InputError(f"cannot load {cls.__name__} from {path} (weights must be "
                         f".safetensors matching its config.json): {exc}") from exc
    net.requires_grad_(False)
    return net.to(device).eval()


def _autoencoder(folder: Path, device: torch.device) -> tuple[Any, str, float] | None:
    """(model, "vq" | "kl", latent scaling) from ``vqvae/`` or ``vae/``, by its config's class.

    LDMPipeline stores a ``VQModel`` in ``vqvae/`` and decodes its latents unscaled;
    LDMTextToImagePipeline stores an ``AutoencoderKL`` in the same folder, and Stable
    Diffusion one in ``vae/``: both scale KL latents by the config's ``scaling_factor``.
    """
    import diffusers

    for sub in ("vqvae", "vae"):
        config = folder / sub / "config.json"
        if not config.is_file():
            continue
        cls_name = _read_json(config).get("_class_name")
        if cls_name not in _AUTOENCODERS:
            raise InputError(f"{config}: InvMM supports the autoencoders "
                             f"{' and '.join(_AUTOENCODERS)}, not {cls_name}")
        ae = _weights(getattr(diffusers, cls_name), folder / sub, device)
        if cls_name == "VQModel":
            return ae, "vq", 1.0
        return ae, "kl", float(getattr(ae.config, "scaling_factor", 1.0) or 1.0)
    return None


def _precision(precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None: plain float32)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)} "
                         f"(fp32 is the official code's)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_model(model: str | Path, device: torch.device,
               conditioning: str | Path | None = None, *, prompt: str | None = None,
               precision: str = "fp32", config: str | Path | None = None) -> DiffusionModel:
    """Load a diffusers model: UNet, scheduler, autoencoder and text encoder if any.

    ``model`` is a diffusers folder, a hub id, or a single-file checkpoint with ``config``
    the folder of its diffusers configs (:mod:`fp_plugins._invmm_checkpoint`).

    Raises:
        InputError: the folder does not hold a supported model.
        OfflineError: a hub id could not be fetched.
    """
    import tempfile

    from fp_plugins import _invmm_checkpoint as ckpt

    path = Path(model).expanduser()
    if not ckpt.is_single_file(path):
        if config is not None:
            raise InputError(f"--config applies to single-file checkpoints "
                             f"({', '.join(SINGLE_FILE_SUFFIXES)}); {model} is not one")
        return _load_folder(model, _local_folder(model), device, conditioning, prompt,
                            precision)
    with tempfile.TemporaryDirectory(prefix="fp-invmm-") as work:
        folder, single = ckpt.to_folder(path, config, Path(work))
        dm = _load_folder(model, folder, device, conditioning, prompt, precision)
    dm.info["folder"] = str(path)
    dm.info["single_file"] = single
    return dm


def _load_folder(model: str | Path, folder: Path, device: torch.device,
                 conditioning: str | Path | None, prompt: str | None,
                 precision: str) -> DiffusionModel:
    import diffusers

    _refuse_unsupported(folder)
    unet_dir = _unet_dir(folder)
    if unet_dir is None:
        raise InputError(
            f"{folder} holds no unet/config.json: save the pipeline with save_pretrained")
    unet_cls = _read_json(unet_dir / "config.json").get("_class_name")
    if unet_cls not in _UNETS:
        raise InputError(f"{unet_dir}: InvMM supports {' and '.join(_UNETS)}, not {unet_cls}")
    sched_dir = next((d for d in (folder / "scheduler", unet_dir, folder)
                      if (d / "scheduler_config.json").is_file()), None)
    if sched_dir is None:
        raise InputError(f"{folder} holds no scheduler/scheduler_config.json: InvMM needs the "
                         f"model's noise schedule; save the whole pipeline with save_pretrained")
    sched_cls_name = _read_json(sched_dir / "scheduler_config.json").get("_class_name", "")
    sched_cls = getattr(diffusers, sched_cls_name, None) or diffusers.DDPMScheduler
    text_pipeline = unet_cls == "UNet2DConditionModel" and _has_text(folder)
    if prompt is not None and not text_pipeline:
        raise InputError(f"--prompt needs a text-to-image pipeline (tokenizer/ and "
                         f"text_encoder/ beside unet/); {folder} has none")
    if conditioning is not None and unet_cls != "UNet2DConditionModel":
        raise InputError("--conditioning applies to UNet2DConditionModel models only")

    unet = _weights(getattr(diffusers, unet_cls), unet_dir, device)
    try:
        scheduler = sched_cls.from_pretrained(sched_dir)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the scheduler in {sched_dir}: {exc}") from exc
    _refuse_class_conditional(unet.config, unet_dir)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise InputError(f"scheduler {sched_cls.__name__} of {folder} has no alphas_cumprod")
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise InputError(f"unsupported prediction_type {prediction_type!r} in {sched_dir}")

    dm = DiffusionModel(
        unet=unet,
        alphas_cumprod=torch.as_tensor(alphas).double().to(device),
        prediction_type=prediction_type,
        device=device,
        autocast_dtype=_precision(precision),
    )
    ae = _autoencoder(folder, device)
    if ae is not None:
        dm.autoencoder, dm.autoencoder_kind, dm.scaling_factor = ae
    if unet_cls == "UNet2DConditionModel":
        if conditioning is not None:
            dm.encoder_hidden_states = _conditioning(conditioning, unet, device, folder)
        elif text_pipeline:
            from fp_plugins._invmm_text import load_text

            dm.text = load_text(folder, device)
            if prompt is not None:
                dm.encoder_hidden_states = dm.text.encode(prompt)
        else:
            _conditioning(None, unet, device, folder)
    dm.info = {
        "source": str(model),
        "folder": str(folder),
        "unet": unet_cls,
        "unet_parameters": int(sum(p.numel() for p in unet.parameters())),
        "scheduler": type(scheduler).__name__,
        "num_train_timesteps": dm.num_timesteps,
        "prediction_type": prediction_type,
        "space": "latent" if dm.latent else "pixel",
        "family": dm.family,
        "autoencoder": type(dm.autoencoder).__name__ if dm.latent else None,
        "image_size": dm.image_size,
        "image_channels": dm.image_channels,
        "text": dm.text.info if dm.text is not None else None,
        "prompt": prompt,
    }
    return dm


def _refuse_unsupported(folder: Path) -> None:
    """Stable Diffusion 3.x folders (a ``transformer/``, no ``unet/``): one clear refusal."""
    from fp_plugins._invmm_checkpoint import SD3_REFUSAL

    index = folder / "model_index.json"
    cls_name = _read_json(index).get("_class_name", "") if index.is_file() else ""
    if str(cls_name).startswith("StableDiffusion3") or (
            (folder / "transformer" / "config.json").is_file()
            and not (folder / "unet").is_dir()):
        raise InputError(f"--model {folder}: {SD3_REFUSAL}")


def _refuse_class_conditional(config: Any, unet_dir: Path) -> None:
    """Class-conditional UNets are refused, naming the config entry that makes them so."""
    for key in ("num_class_embeds", "class_embed_type", "addition_embed_type"):
        value = getattr(config, key, None)
        if value:
            raise InputError(
                f"{unet_dir}: a class- or added-embedding conditioned UNet ({key} = "
                f"{value!r}) is not supported: the official InvMM code inverts unconditional "
                f"DDPMs and LDMs and text-conditioned Stable Diffusion, and defines no class "
                f"label to condition on while inverting; fp does not invent one")


def _has_text(folder: Path) -> bool:
    from fp_plugins._invmm_text import has_text_encoder

    return has_text_encoder(folder)


def _conditioning(path: str | Path | None, unet: Any, device: torch.device,
                  folder: Path) -> torch.Tensor:
    if path is None:
        raise InputError(
            f"{folder} has a UNet2DConditionModel but no tokenizer/ and text_encoder/: pass "
            f"--conditioning FILE.safetensors holding 'encoder_hidden_states' (shape (L, D) "
            f"or (1, L, D), D = {unet.config.cross_attention_dim}), e.g. the empty-prompt "
            f"text embedding"
        )
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types
        raise InputError(f"--conditioning {path}: not a readable safetensors file ({exc})") from exc
    if "encoder_hidden_states" not in tensors:
        raise InputError(f"--conditioning {path} has no tensor 'encoder_hidden_states'; it has: "
                         f"{', '.join(sorted(tensors)) or 'none'}")
    h = tensors["encoder_hidden_states"].float()
    if h.dim() == 2:
        h = h.unsqueeze(0)
    if h.dim() != 3 or h.shape[0] != 1 or h.shape[-1] != unet.config.cross_attention_dim:
        raise InputError(f"--conditioning {path}: encoder_hidden_states has shape "
                         f"{tuple(h.shape)}; need (L, {unet.config.cross_attention_dim})")
    return h.to(device)


# --------------------------------------------------------------------------- images


def _load_image(item: Any, size: int, channels: int) -> tuple[np.ndarray, str, str, bool]:
    """-> (HxWxC uint8 array at the model's size, name, content sha256, resized?)."""
    import io

    from PIL import Image, ImageOps

    from forensics.data.images import read_image_file

    if isinstance(item, Image.Image):
        img, name = item, f"<image {id(item)}>"
    else:
        name = str(item)
        try:
            img = Image.open(io.BytesIO(read_image_file(item)))  # a regular file: never blocks
            img.load()
        except (OSError, ValueError, InputError) as exc:
            raise InputError(f"cannot read image {name}: {exc}") from exc
    if channels not in (1, 3):
        raise InputError(f"InvMM handles 1- or 3-channel images, this model has {channels}")
    img = img.convert("L" if channels == 1 else "RGB")
    resized = img.size != (size, size)
    if resized:  # shorter side to `size`, then centre crop (the official loader for LDMs)
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    digest = hashlib.sha256(arr.tobytes() + f"{arr.shape}".encode()).hexdigest()
    return arr, name, digest, resized


def _generator(seed: int, digest: str, device: torch.device) -> torch.Generator:
    derived = int.from_bytes(hashlib.sha256(f"{seed}:{digest}".encode()).digest()[:8], "little")
    gen = torch.Generator(device=device)
    gen.manual_seed(derived & (2**63 - 1))
    return gen


# --------------------------------------------------------------------------- DDIM


#: The official code's commit whose samplers ``ddim_sample`` follows (``ddpm/diffusion.py``
#: ``GaussianDiffusionDDIMSampler``; ``latent-diffusion`` and ``stable-diffusion-v1/-v2``
#: ``ldm/modules/diffusionmodules/util.py``, whose ``make_ddim_timesteps`` and
#: ``make_ddim_sampling_parameters`` the authors patched).
OFFICIAL_COMMIT = "47c65ed12054afb33ebc46cfa09277c47da5f20c"


def ldm_timesteps(num_timesteps: int, steps: int) -> tuple[list[int], list[float | None]]:
    """The patched ``ldm`` DDIM schedule of the official code, ascending.

    Timesteps ``linspace(-1, T-1, S+1)[1:]`` (float64, truncated to integers as the
    sampler's ``long`` timesteps are); each step's previous alpha-bar is that of the next
    lower timestep, and the lowest step's is 1 (``None`` here), so sampling ends at the
    model's x0 prediction. With T = 1000 and S = 50: t = 19, 39, ..., 999.
    """
    steps = min(steps, num_timesteps)
    ts = np.linspace(-1, num_timesteps - 1, steps + 1)[1:].astype(np.int64).tolist()
    return ts, [None, *ts[:-1]]


def ddim_sample(dm: DiffusionModel, x_T: torch.Tensor, steps: int, *,
                cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from x_T; returns images in [0, 1].

    Pixel models follow the official ``GaussianDiffusionDDIMSampler``: timesteps
    ``int(linspace(-1, T-1, steps+1))`` from the top, and the clipped x0 prediction at the
    last one. Latent and text-to-image models follow the official code's patched ``ldm``
    ``DDIMSampler`` (:func:`ldm_timesteps`: the same timesteps, final alpha-bar 1, the
    last x_prev, unclipped, decoded), as the official LDM and Stable Diffusion scripts;
    with ``uncond``, the output is classifier-free guided at ``scale``.
    """
    T = dm.num_timesteps
    ac = dm.alphas_cumprod
    x = x_T
    with torch.inference_mode():
        if not dm.latent and not dm.conditional:
            times = torch.linspace(-1, T - 1, min(steps, T) + 1).int().tolist()[::-1]
            x0 = x
            for t, t_next in zip(times[:-1], times[1:], strict=True):
                tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
                x0, eps = dm.x0_eps(x, tt, dm.output(x, tt))
                if t_next < 0:
                    break
                a_next = ac[t_next].float()
                x = x0 * a_next.sqrt() + (1 - a_next).sqrt() * eps
            return dm.decode(x0.clamp(-1, 1))
        ts, prev = ldm_timesteps(T, steps)
        for t, tp in zip(reversed(ts), reversed(prev), strict=True):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x0, eps = dm.x0_eps(x, tt, dm.guided(x, tt, cond, uncond, scale))
            a_prev = ac.new_ones(()).float() if tp is None else ac[tp].float()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return dm.decode(x)


# --------------------------------------------------------------------------- optimisation


@dataclass
class _Slot:
    """One image being inverted."""

    index: int
    x0: torch.Tensor  # (1, C, h, w) in the UNet's space
    ref: torch.Tensor  # (C, H, W) in [0, 1], for the similarity
    gen: torch.Generator
    mu: torch.Tensor
    logvar: torch.Tensor
    opt: torch.optim.Optimizer
    kl_weight: float
    losses: deque
    log_coeffs: torch.Tensor | None = None  # (tokens, V): learned prompt logits
    prev: float = math.inf
    step: int = 0
    kl: float = math.nan
    similarity: float = math.nan
    best_similarity: float = -math.inf
    success_step: int | None = None
    success_scale: float | None = None
    checks: list = field(default_factory=list)
    samples: torch.Tensor | None = None  # the deciding check's samples, on the CPU
    samples_scale: float | None = None
    scaler: Any = None  # fp16: this image's GradScaler (dynamic loss scaling)
    skipped_steps: int = 0  # fp16: steps whose scaled gradients overflowed (not applied)

    def kl_term(self) -> torch.Tensor:
        return 0.5 * torch.mean(self.mu**2 + self.logvar.exp() - self.logvar - 1)


def _soft_prompts(dm: DiffusionModel, s: _Slot, n: int, tau: float) -> torch.Tensor | None:
    """``(n, L, D)`` encoder states of ``n`` Gumbel-softmax draws of the slot's tokens."""
    if s.log_coeffs is None:
        return None
    from fp_plugins._invmm_text import gumbel_softmax

    coeffs = gumbel_softmax(s.log_coeffs.expand(n, -1, -1), tau, s.gen)
    return dm.text.encode_soft(coeffs)


def _train_step(dm: DiffusionModel, slots: list[_Slot], noises: int, tau: float) -> None:
    T = dm.num_timesteps
    x_T, ts, conds = [], [], []
    for s in slots:
        z = torch.randn((noises, *s.x0.shape[1:]), generator=s.gen, device=dm.device)
        ts.append(torch.randint(0, T, (noises,), generator=s.gen, device=dm.device))
        x_T.append(z * (s.logvar / 2).exp() + s.mu)
        conds.append(_soft_prompts(dm, s, noises, tau))
    x_T, t = torch.cat(x_T), torch.cat(ts)
    cond = torch.cat(conds) if conds[0] is not None else None
    x0 = torch.cat([s.x0.expand(noises, *s.x0.shape[1:]) for s in slots])
    a = dm.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * x_T
    x0_hat, _ = dm.x0_eps(x_t, t, dm.output(x_t, t, cond))
    rec = ((x0_hat - x0) ** 2).flatten(1).mean(1).view(len(slots), noises).mean(1)
    kls = torch.stack([s.kl_term() for s in slots])
    w = torch.tensor([s.kl_weight for s in slots], device=dm.device)
    losses = rec + w * kls
    if slots[0].scaler is not None:  # fp16: each image's loss scaled by its own scaler
        losses = torch.stack([s.scaler.scale(v) for s, v in zip(slots, losses, strict=True)])
    losses.sum().backward()  # each image's gradient is that of its own loss
    for s, r in zip(slots, rec.detach().cpu().tolist(), strict=True):
        if s.scaler is not None:
            before = s.scaler.get_scale()
            s.scaler.step(s.opt)  # skipped when the scaled gradients overflowed
            s.scaler.update()
            s.skipped_steps += int(s.scaler.get_scale() < before)
        else:
            s.opt.step()
        s.opt.zero_grad(set_to_none=True)
        s.losses.append(r)


def _check(dm: DiffusionModel, slots: list[_Slot], similarity, p: Any,
           uncond: torch.Tensor | None) -> None:
    """Sample each slot's images and record the check; success when any scale reaches beta."""
    k = p.samples
    with torch.no_grad():
        x_T = torch.cat([
            torch.randn((k, *s.x0.shape[1:]), generator=s.gen, device=dm.device)
            * (s.logvar / 2).exp() + s.mu
            for s in slots
        ])
        conds = [_soft_prompts(dm, s, 1, p.tau) for s in slots]
        cond = None
        if dm.conditional:
            cond = torch.cat([
                (c if c is not None else dm.encoder_hidden_states).expand(k, -1, -1)
                for c in conds])
        scales = GUIDANCE_SCALES if uncond is not None else (1.0,)
        refs = torch.stack([s.ref for s in slots])
        per_scale, images = [], []
        for scale in scales:
            imgs = ddim_sample(dm, x_T, p.ddim_steps, cond=cond,
                               uncond=None if uncond is None else uncond.expand(len(x_T), -1, -1),
                               scale=scale)
            imgs = imgs.view(len(slots), k, *imgs.shape[1:])
            per_scale.append(similarity(refs, imgs).min(dim=1).values.float().cpu())
            images.append(imgs)
        sims = torch.stack(per_scale, dim=1)  # (slots, scales)
    for i, s in enumerate(slots):
        best = int(sims[i].argmax())
        sim = float(sims[i, best])
        improved = sim > s.best_similarity
        s.similarity = sim
        s.best_similarity = max(s.best_similarity, sim)
        success = sim >= p.beta
        if success:
            s.success_step, s.success_scale = s.step, scales[best]
        if success or improved:
            s.samples, s.samples_scale = images[best][i].float().cpu(), scales[best]
        with torch.no_grad():
            kl = float(s.kl_term())
        s.checks.append({
            "step": s.step, "kl": kl, "kl_weight": s.kl_weight,
            "loss": float(np.mean(s.losses)), "similarity": sim,
            "similarity_per_scale": [float(v) for v in sims[i]] if len(scales) > 1 else None,
            "success": success,
        })


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class _Chunked:
    """Runs a per-slot step over chunks of ``size`` slots; halves ``size`` on OOM.

    Before a retry the slots' random streams are rewound and their gradients dropped, so
    the retried step draws exactly what the failed one drew.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.backoffs: list[int] = []

    def __call__(self, fn: Callable[[list[_Slot]], None], slots: list[_Slot]) -> None:
        i = 0
        while i < len(slots):
            chunk = slots[i : i + self.size]
            states = [s.gen.get_state() for s in chunk]
            try:
                fn(chunk)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                if not _is_oom(exc) or self.size == 1:
                    raise
                for s, st in zip(chunk, states, strict=True):
                    s.gen.set_state(st)
                    s.opt.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.size = max(1, self.size // 2)
                self.backoffs.append(self.size)
                continue
            i += len(chunk)


def pick_batch_size(free_bytes: int, per_image_bytes: int,
                    limit: int = MAX_AUTO_BATCH) -> int:
    """Images that fit in ``MEMORY_SHARE`` of the free memory, between 1 and ``limit``."""
    if per_image_bytes <= 0:
        return limit
    return int(max(1, min(limit, (free_bytes * MEMORY_SHARE) // per_image_bytes)))


def _probe_batch_size(dm: DiffusionModel, p: Any, shape: tuple[int, ...]) -> int:
    """On CUDA: measure one image's training-step memory, then fill the free memory."""
    dev = dm.device
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    mu = torch.zeros(shape, device=dev, requires_grad=True)
    logvar = torch.zeros(shape, device=dev, requires_grad=True)
    probe = _Slot(index=-1, x0=torch.zeros(shape, device=dev), ref=torch.zeros(1), gen=gen,
                  mu=mu, logvar=logvar, opt=torch.optim.Adam([mu, logvar], lr=0.0),
                  kl_weight=0.0, losses=deque(maxlen=1),
                  log_coeffs=(torch.zeros(p.tokens, dm.text.vocab_size, device=dev,
                                          requires_grad=True)
                              if dm.text is not None and dm.encoder_hidden_states is None
                              and p.tokens else None))
    try:
        _train_step(dm, [probe], p.noises, p.tau)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        if not _is_oom(exc):
            raise
        raise InputError(
            f"one image's InvMM step ({p.noises} noises) does not fit in the memory of "
            f"{dev}: lower --noises, or use --precision bf16 (see README for its effect "
            f"on scores)") from exc
    per_image = torch.cuda.max_memory_allocated(dev) - base
    del probe
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    return pick_batch_size(free, per_image)


def _prepare_similarity(spec: str, calibrate: Sequence[Any] | None, params: dict[str, Any]):
    """Refuse, before any model is loaded, a similarity whose threshold is unknown."""
    if is_sscd(spec):
        check_sscd_present(spec)
    if not is_sscd(spec) and calibrate is None and params.get("beta") is None:
        raise InputError(
            f"similarity {spec!r} has no known copy threshold: pass --calibrate "
            f"HELD_OUT_DIR (images the model was not trained on; beta becomes the highest "
            f"similarity between two of them) or an explicit --beta. The official threshold "
            f"0.5 holds for SSCD only (--similarity sscd)")
    if calibrate is not None and params.get("beta") is not None:
        raise InputError("--calibrate and --beta both set the threshold: pass one of them")


def run(images: Sequence[Any], model: str | Path, *, similarity: str,
        calibrate: Sequence[Any] | None, device: str | None, seed: int,
        batch_size: int | str | None, precision: str, conditioning: str | Path | None,
        prompt: str | None, encoder_weights: str | None, encoder_pool: str | None,
        progress: Callable[[int], None] | None, params: dict[str, Any],
        out: str | Path | None = None, config: str | Path | None = None) -> InvMMReport:
    """Score ``images`` with InvMM; see :meth:`fp_plugins.invmm.InvMM.run`."""
    import diffusers

    from forensics._version import __version__

    if not images:
        raise InputError("InvMM got no images to score")
    if isinstance(calibrate, (str, Path)):
        calibrate = _folder_images(Path(calibrate))
    if batch_size is not None and batch_size != "auto" and (
            not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"--batch-size must be a whole number >= 1 or 'auto', got {batch_size!r}")
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    _prepare_similarity(similarity, calibrate, params)
    dev = _device(device)
    dm = load_model(model, dev, conditioning, prompt=prompt, precision=precision, config=config)
    p = _resolve_params(overrides=params, family=dm.family)
    learn_tokens = dm.text is not None and dm.encoder_hidden_states is None and p.tokens > 0
    if learn_tokens and p.tokens > dm.text.max_length - 2:
        raise InputError(f"--tokens {p.tokens} does not fit the text encoder's "
                         f"{dm.text.max_length} positions; use at most {dm.text.max_length - 2}")
    if dm.text is not None and dm.encoder_hidden_states is None and not learn_tokens:
        dm.encoder_hidden_states = dm.text.encode("")  # --tokens 0: the empty prompt
    sim = make_similarity(similarity, dev, size=SSCD_SIZE[dm.family] if is_sscd(similarity)
                          else None, encoder_weights=encoder_weights, encoder_pool=encoder_pool)

    loaded = [_load_image(item, dm.image_size, dm.image_channels) for item in images]
    calibration = None
    if calibrate is not None:
        held = [_load_image(item, dm.image_size, dm.image_channels)[0] for item in calibrate]
        stack = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float().div(255)
                             for a in held]).to(dev)
        calibration = calibrate_beta(sim, stack)
        p = _resolve_params(overrides={**params, "beta": calibration["beta"]}, family=dm.family)
    elif is_sscd(similarity) and params.get("beta") is None:
        p = _resolve_params(overrides={**params, "beta": SSCD_BETA}, family=dm.family)
    # guidance against the empty prompt; a bare conditioned UNet (a fixed embedding file)
    # has no unconditional branch, so it samples unguided
    uncond = dm.text.encode("") if dm.text is not None else None
    picked = "given"
    if batch_size is None:
        batch_size, picked = 1, "default (one image per model call: bit-identical scores)"
    elif batch_size == "auto":
        if dev.type == "cuda":
            x0_shape = tuple(dm.encode(torch.zeros(1, dm.image_channels, dm.image_size,
                                                   dm.image_size, device=dev)).shape)
            batch_size, picked = _probe_batch_size(dm, p, x0_shape), "free memory"
        else:
            batch_size, picked = 4, "auto on cpu"
    chunked = _Chunked(batch_size)
    results: list[dict[str, Any]] = [{} for _ in loaded]
    evidence: list[dict[str, Any] | None] = [{} for _ in loaded]
    queue = list(range(len(loaded)))
    key = _run_key(dm, p, sim, calibration, seed, precision, dev, learn_tokens, conditioning)
    resumed = 0
    if out is not None:
        from fp_plugins import _invmm_evidence

        for i, (_, name, digest, _) in enumerate(loaded):
            done_before = _invmm_evidence.read_done(Path(out), i, name, digest, key)
            if done_before is not None:
                results[i], evidence[i] = done_before, None
                resumed += 1
                if progress is not None:
                    progress(p.steps)
        queue = [i for i in queue if evidence[i] is not None]
    active: list[_Slot] = []
    started = time.perf_counter()

    def admit(i: int) -> _Slot:
        arr = loaded[i][0]
        ref = torch.from_numpy(arr).permute(2, 0, 1).float().div(255).to(dev)
        x0 = dm.encode(ref.unsqueeze(0) * 2 - 1)
        mu = torch.zeros_like(x0, requires_grad=True)
        logvar = torch.zeros_like(x0, requires_grad=True)
        learned = [mu, logvar]
        log_coeffs = None
        if learn_tokens:
            log_coeffs = torch.zeros(p.tokens, dm.text.vocab_size, device=dev,
                                     requires_grad=True)
            learned = [log_coeffs, mu, logvar]
        scaler = (torch.amp.GradScaler(dev.type)
                  if dm.autocast_dtype == torch.float16 else None)
        return _Slot(index=i, x0=x0, ref=ref, gen=_generator(seed, loaded[i][2], dev), mu=mu,
                     logvar=logvar, opt=torch.optim.Adam(learned, lr=p.lr),
                     kl_weight=p.kl_weight, losses=deque(maxlen=p.window),
                     log_coeffs=log_coeffs, scaler=scaler)

    def finish(s: _Slot) -> None:
        with torch.no_grad():
            s.kl = float(s.kl_term())
        ok = s.success_step is not None
        arr, name, digest, resized = loaded[s.index]
        results[s.index] = {
            "image": name,
            "score": s.kl if ok else math.inf,
            "success": ok,
            "success_step": s.success_step,
            "success_scale": s.success_scale,
            "steps_run": s.step,
            "skipped_steps": s.skipped_steps,
            "kl": s.kl,
            "kl_weight": s.kl_weight,
            "similarity": s.similarity,
            "best_similarity": s.best_similarity,
            "sha256": digest,
            "resized": resized,
        }
        evidence[s.index] = {
            "mu": s.mu.detach().float().cpu(), "logvar": s.logvar.detach().float().cpu(),
            "log_coeffs": None if s.log_coeffs is None else s.log_coeffs.detach().float().cpu(),
            "checks": s.checks, "samples": s.samples, "samples_scale": s.samples_scale,
            "reference": s.ref.float().cpu(),
        }
        if out is not None:  # this image's result survives a crash of the rest of the run
            from fp_plugins import _invmm_evidence

            _invmm_evidence.write_image(Path(out), s.index, results[s.index],
                                        evidence[s.index], key)
        if progress is not None and s.step < p.steps:
            progress(p.steps - s.step)

    while queue or active:
        while queue and len(active) < batch_size:
            active.append(admit(queue.pop(0)))
        chunked(lambda chunk: _train_step(dm, chunk, p.noises, p.tau), active)
        checking = []
        for s in active:
            s.step += 1
            now = float(np.mean(s.losses))
            if s.step > 1 and s.step % p.check_every == 0:  # official: step > 0, (step+1) % C == 0
                s.kl_weight = s.kl_weight / 2 if s.prev - now < p.xi else s.kl_weight + p.delta
                s.prev = now
                checking.append(s)
            else:
                s.kl_weight += p.delta
        if checking:
            chunked(lambda chunk: _check(dm, chunk, sim, p, uncond), checking)
        if progress is not None:
            progress(len(active))
        done = [s for s in active if s.success_step is not None or s.step >= p.steps]
        for s in done:
            finish(s)
        active = [s for s in active if s not in done]

    provenance = {
        "measure": "invmm",
        "reference": "Ma et al., An Inversion-based Measure of Memorization for Diffusion "
                     "Models, ICCV 2025 (arXiv 2405.05846); official code Maryeon/InvMM",
        "model": dm.info,
        "family": dm.family,
        "params": params_dict(p),
        "learned_tokens": p.tokens if learn_tokens else 0,
        "guidance_scales": list(GUIDANCE_SCALES) if uncond is not None else None,
        "similarity": sim.provenance(),
        "similarity_deviation": (
            None if is_sscd(similarity)
            else "the official code uses SSCD (sscd_disc_large) cosine similarity at beta 0.5"
        ),
        "calibration": calibration,
        "seed": seed,
        "device": str(dev),
        "precision": precision,
        "autocast": str(dm.autocast_dtype).replace("torch.", "") if dm.autocast_dtype
        else None,
        "loss_scaling": "dynamic, one GradScaler per image" if precision == "fp16" else None,
        "batch_size": batch_size,
        "batch_size_from": picked,
        "oom_backoffs": chunked.backoffs,
        "seconds": round(time.perf_counter() - started, 3),
        "run_key": key,
        "resumed": resumed,
        "versions": {"fp": __version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
    }
    return InvMMReport(results=results, ranking=rank(results), provenance=provenance,
                       evidence=evidence, written_to=None if out is None else str(out))


def _weights_stat(folder: Path) -> list[list[Any]]:
    """(relative path, size, mtime in ns) of the weight files under ``folder``."""
    rows = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth"):
            st = f.stat()
            rows.append([str(f.relative_to(folder)), st.st_size, st.st_mtime_ns])
    return rows


def _run_key(dm: DiffusionModel, p: Any, sim: Any, calibration: Any, seed: int,
             precision: str, dev: torch.device, learn_tokens: bool,
             conditioning: str | Path | None) -> str:
    """A digest of everything an image's result depends on except the image itself.

    The batch size is left out: at batch 1 a resumed run equals an uninterrupted one bit
    for bit, at larger batches up to float round-off, as batched scores always do.
    """
    from forensics._version import __version__
    from forensics.jsonable import jsonable

    folder = Path(dm.info.get("folder") or ".").resolve()
    model = {k: v for k, v in dm.info.items() if k != "source"}
    model["folder"] = str(folder)  # the same model whatever the working directory
    if folder.is_dir():
        model["weights"] = _weights_stat(folder)
    elif folder.is_file():
        st = folder.stat()
        model["weights"] = [[folder.name, st.st_size, st.st_mtime_ns]]
    if conditioning is not None:
        model["conditioning"] = hashlib.sha256(Path(conditioning).read_bytes()).hexdigest()
    body = {"params": params_dict(p), "similarity": sim.provenance(),
            "calibration": calibration, "seed": seed, "precision": precision,
            "device": dev.type, "learned_tokens": learn_tokens, "fp": __version__}
    body["model"] = model
    text = json.dumps(jsonable(body), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _folder_images(folder: Path) -> list[Path]:
    from forensics.data.images import list_image_files

    if folder.is_file():
        return [folder]
    files = [folder / rel for rel in list_image_files(folder)] if folder.is_dir() else []
    if not files:
        raise InputError(f"--calibrate {folder}: no such folder of held-out images")
    return files


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(
            f"--device {device!r} is not a torch device (cpu, cuda, cuda:1...)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


#: Image intake shared with the other built-in measures.
load_image = _load_image
seeded_generator = _generator
device_of = _device

__all__ = ["DiffusionModel", "ddim_sample", "device_of", "load_image", "load_model",
           "pick_batch_size", "run", "seeded_generator"]
