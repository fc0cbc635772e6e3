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

Several images are optimised together: their noised inputs share one model call per step
(and per DDIM step), while each keeps its own parameters, Adam state, KL weight, loss
window and random stream, so its score is what it would be alone.
"""

from __future__ import annotations

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
from fp_plugins._invmm_similarity import make_similarity
from fp_plugins.invmm import InvMMReport, params_dict, rank, resolve_params

from forensics.errors import InputError, OfflineError

_UNETS = ("UNet2DModel", "UNet2DConditionModel")
_VAES = {"vqvae": "VQModel", "vae": "AutoencoderKL"}


# --------------------------------------------------------------------------- the model


@dataclass
class DiffusionModel:
    """A diffusers denoiser, its noise schedule and (for latent models) its autoencoder."""

    unet: Any
    alphas_cumprod: torch.Tensor  # float64, on the device
    prediction_type: str
    device: torch.device
    autoencoder: Any = None
    autoencoder_kind: str | None = None  # "vq" | "kl"
    scaling_factor: float = 1.0
    encoder_hidden_states: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def latent(self) -> bool:
        return self.autoencoder is not None

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

    def output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's output at (x_t, t), learned-variance channels dropped."""
        if self.encoder_hidden_states is not None:
            cond = self.encoder_hidden_states.expand(x_t.shape[0], -1, -1)
            out = self.unet(x_t, t, encoder_hidden_states=cond).sample
        else:
            out = self.unet(x_t, t).sample
        return out[:, : x_t.shape[1]]

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
            f"--model {text}: not a diffusers folder nor a hub id (owner/name). Give a folder "
            f"saved with save_pretrained (holding unet/ and scheduler/)."
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
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load {cls.__name__} from {path} (weights must be "
                         f".safetensors): {exc}") from exc
    net.requires_grad_(False)
    return net.to(device).eval()


def load_model(model: str | Path, device: torch.device,
               conditioning: str | Path | None = None) -> DiffusionModel:
    """Load a diffusers model: UNet (pixel or latent), scheduler, autoencoder if any.

    Raises:
        InputError: the folder does not hold a supported model.
        OfflineError: a hub id could not be fetched.
    """
    import diffusers

    folder = _local_folder(model)
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

    unet = _weights(getattr(diffusers, unet_cls), unet_dir, device)
    try:
        scheduler = sched_cls.from_pretrained(sched_dir)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the scheduler in {sched_dir}: {exc}") from exc
    if getattr(unet.config, "num_class_embeds", None) or getattr(
        unet.config, "class_embed_type", None
    ) or getattr(unet.config, "addition_embed_type", None):
        raise InputError(f"{unet_dir}: class- or added-embedding conditioned UNets are not "
                         f"supported by InvMM")
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
    )
    for sub, cls_name in _VAES.items():
        if (folder / sub / "config.json").is_file():
            ae = _weights(getattr(diffusers, cls_name), folder / sub, device)
            dm.autoencoder, dm.autoencoder_kind = ae, ("vq" if sub == "vqvae" else "kl")
            # LDMPipeline decodes VQ latents unscaled; Stable Diffusion scales KL latents.
            dm.scaling_factor = 1.0 if sub == "vqvae" else float(ae.config.scaling_factor)
            break
    if unet_cls == "UNet2DConditionModel":
        dm.encoder_hidden_states = _conditioning(conditioning, unet, device, folder)
    elif conditioning is not None:
        raise InputError("--conditioning applies to UNet2DConditionModel models only")
    dm.info = {
        "source": str(model),
        "folder": str(folder),
        "unet": unet_cls,
        "unet_parameters": int(sum(p.numel() for p in unet.parameters())),
        "scheduler": type(scheduler).__name__,
        "num_train_timesteps": dm.num_timesteps,
        "prediction_type": prediction_type,
        "space": "latent" if dm.latent else "pixel",
        "autoencoder": type(dm.autoencoder).__name__ if dm.latent else None,
        "image_size": dm.image_size,
        "image_channels": dm.image_channels,
    }
    return dm


def _conditioning(path: str | Path | None, unet: Any, device: torch.device,
                  folder: Path) -> torch.Tensor:
    if path is None:
        raise InputError(
            f"{folder} has a UNet2DConditionModel: pass --conditioning FILE.safetensors holding "
            f"'encoder_hidden_states' (shape (L, D) or (1, L, D), D = "
            f"{unet.config.cross_attention_dim}), e.g. the empty-prompt text embedding"
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

    from forensics.images import read_image_file

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


def ddim_sample(dm: DiffusionModel, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from x_T; returns images in [0, 1].

    Pixel models follow the official ``GaussianDiffusionDDIMSampler``: timesteps
    ``int(linspace(-1, T-1, steps+1))`` from the top, and the clipped x0 prediction at the
    last one. Latent models follow ``ldm``'s ``DDIMSampler`` (uniform spacing
    ``arange(0, T, T // steps) + 1``, final x_{prev} decoded), as the official LDM code.
    """
    T = dm.num_timesteps
    ac = dm.alphas_cumprod
    x = x_T
    with torch.inference_mode():
        if not dm.latent:
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
        stride = max(T // steps, 1)
        ts = [min(t + 1, T - 1) for t in range(0, T, stride)]
        prev = [0, *ts[:-1]]
        for t, tp in zip(reversed(ts), reversed(prev), strict=True):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x0, eps = dm.x0_eps(x, tt, dm.output(x, tt))
            a_prev = ac[tp].float()
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
    prev: float = math.inf
    step: int = 0
    kl: float = math.nan
    similarity: float = math.nan
    best_similarity: float = -math.inf
    success_step: int | None = None

    def kl_term(self) -> torch.Tensor:
        return 0.5 * torch.mean(self.mu**2 + self.logvar.exp() - self.logvar - 1)


def _train_step(dm: DiffusionModel, slots: list[_Slot], noises: int) -> None:
    T = dm.num_timesteps
    x_T, ts = [], []
    for s in slots:
        z = torch.randn((noises, *s.x0.shape[1:]), generator=s.gen, device=dm.device)
        ts.append(torch.randint(0, T, (noises,), generator=s.gen, device=dm.device))
        x_T.append(z * (s.logvar / 2).exp() + s.mu)
    x_T, t = torch.cat(x_T), torch.cat(ts)
    x0 = torch.cat([s.x0.expand(noises, *s.x0.shape[1:]) for s in slots])
    a = dm.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * x_T
    x0_hat, _ = dm.x0_eps(x_t, t, dm.output(x_t, t))
    rec = ((x0_hat - x0) ** 2).flatten(1).mean(1).view(len(slots), noises).mean(1)
    kls = torch.stack([s.kl_term() for s in slots])
    w = torch.tensor([s.kl_weight for s in slots], device=dm.device)
    (rec + w * kls).sum().backward()  # each image's gradient is that of its own loss
    for s, r in zip(slots, rec.detach().cpu().tolist(), strict=True):
        s.opt.step()
        s.opt.zero_grad(set_to_none=True)
        s.losses.append(r)


def _check(dm: DiffusionModel, slots: list[_Slot], similarity, n_samples: int,
           ddim_steps: int, beta: float) -> None:
    with torch.no_grad():
        x_T = torch.cat([
            torch.randn((n_samples, *s.x0.shape[1:]), generator=s.gen, device=dm.device)
            * (s.logvar / 2).exp() + s.mu
            for s in slots
        ])
        images = ddim_sample(dm, x_T, ddim_steps)
        images = images.view(len(slots), n_samples, *images.shape[1:])
        refs = torch.stack([s.ref for s in slots])
        sims = similarity(refs, images).min(dim=1).values.cpu().tolist()
    for s, sim in zip(slots, sims, strict=True):
        s.similarity = sim
        s.best_similarity = max(s.best_similarity, sim)
        if sim >= beta:
            s.success_step = s.step


def run(images: Sequence[Any], model: str | Path, *, similarity: str, device: str | None,
        seed: int, batch_size: int | None, conditioning: str | Path | None,
        encoder_weights: str | None, encoder_pool: str | None,
        progress: Callable[[int], None] | None, params: dict[str, Any]) -> InvMMReport:
    """Score ``images`` with InvMM; see :meth:`fp_plugins.invmm.InvMM.run`."""
    import diffusers

    from forensics import __version__

    if not images:
        raise InputError("InvMM got no images to score")
    dev = _device(device)
    dm = load_model(model, dev, conditioning)
    p = resolve_params(dm.latent, params)
    if batch_size is None:
        batch_size = 16 if dev.type == "cuda" else 4
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    sim = make_similarity(similarity, dev, encoder_weights=encoder_weights,
                          encoder_pool=encoder_pool)

    loaded = [_load_image(item, dm.image_size, dm.image_channels) for item in images]
    results: list[dict[str, Any]] = [{} for _ in loaded]
    queue = list(range(len(loaded)))
    active: list[_Slot] = []
    started = time.perf_counter()

    def admit(i: int) -> _Slot:
        arr = loaded[i][0]
        ref = torch.from_numpy(arr).permute(2, 0, 1).float().div(255).to(dev)
        x0 = dm.encode(ref.unsqueeze(0) * 2 - 1)
        mu = torch.zeros_like(x0, requires_grad=True)
        logvar = torch.zeros_like(x0, requires_grad=True)
        return _Slot(index=i, x0=x0, ref=ref, gen=_generator(seed, loaded[i][2], dev), mu=mu,
                     logvar=logvar, opt=torch.optim.Adam([mu, logvar], lr=p.lr),
                     kl_weight=p.kl_weight, losses=deque(maxlen=p.window))

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
            "steps_run": s.step,
            "kl": s.kl,
            "kl_weight": s.kl_weight,
            "similarity": s.similarity,
            "best_similarity": s.best_similarity,
            "sha256": digest,
            "resized": resized,
        }
        if progress is not None and s.step < p.steps:
            progress(p.steps - s.step)

    while queue or active:
        while queue and len(active) < batch_size:
            active.append(admit(queue.pop(0)))
        _train_step(dm, active, p.noises)
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
            _check(dm, checking, sim, p.samples, p.ddim_steps, p.beta)
        if progress is not None:
            progress(len(active))
        done = [s for s in active if s.success_step is not None or s.step >= p.steps]
        for s in done:
            finish(s)
        active = [s for s in active if s not in done]

    provenance = {
        "measure": "invmm",
        "reference": "An Inversion-based Measure of Memorization for Diffusion Models (2024), "
                     "official code Maryeon/InvMM",
        "model": dm.info,
        "params": params_dict(p),
        "similarity": sim.provenance(),
        "similarity_deviation": (
            None if sim.name.startswith("torchscript:")
            else "the official code uses SSCD (sscd_disc_large) cosine similarity"
        ),
        "seed": seed,
        "device": str(dev),
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - started, 3),
        "versions": {"fp": __version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
    }
    return InvMMReport(results=results, ranking=rank(results), provenance=provenance)


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


__all__ = ["DiffusionModel", "ddim_sample", "load_model", "run"]
