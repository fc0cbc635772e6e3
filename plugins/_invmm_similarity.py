"""Image similarities for InvMM's success test (imported only when InvMM runs).

The official code compares a training image with the sampled images by the cosine of
their SSCD copy-detection descriptors, at beta = 0.5. SSCD weights are not bundled:

- ``sscd`` (default): SSCD's ``sscd_disc_large.torchscript.pt``, found at ``$FP_SSCD`` or
  at :func:`sscd_location`; without it InvMM refuses to run and says how to get it.
  ``sscd:PATH`` names the file. Input: RGB resized to the family's official size
  (32 pixel DDPM, 256 latent diffusion, 320 Stable Diffusion), ImageNet-normalised.
- ``ncc``: normalised cross-correlation, i.e. the cosine of the mean-centred
  pixel vectors of the two images. Offline, defined at any size, 1 for a copy (up to
  brightness and contrast); not invariant to crops, flips or other geometric edits.
- ``ssim``: mean structural similarity (7x7 uniform window, K1 = 0.01, K2 = 0.03, data
  range 1, averaged over channels; as ``skimage.metrics.structural_similarity``).
- ``torchscript:PATH``: a TorchScript descriptor model such as SSCD's
  ``sscd_disc_large.torchscript.pt``: ImageNet-normalised input, cosine of the outputs.
  Loaded with ``torch.jit.load`` (no pickle).
- ``encoder:NAME``: the last layer of an ``fp`` encoder, cosine of the embeddings.

Any similarity but SSCD has no known copy threshold: its beta is calibrated on held-out
images (:func:`calibrate_beta`) or given explicitly.

Every similarity takes references ``(N, C, H, W)`` and samples ``(N, K, C, H, W)``, both in
[0, 1], and returns ``(N, K)`` similarities.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from forensics.errors import InputError, UnknownNameError

BUILTIN = ("sscd", "ncc", "ssim")
SCHEMES = ("sscd:PATH", "torchscript:PATH", "encoder:NAME")
SSCD_FILE = "sscd_disc_large.torchscript.pt"
SSCD_URL = f"https://dl.fbaipublicfiles.com/sscd-copy-detection/{SSCD_FILE}"
#: The official copy threshold on SSCD's cosine similarity.
SSCD_BETA = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _choices() -> str:
    return ", ".join(BUILTIN + SCHEMES)


def sscd_location() -> Path:
    """Where ``--similarity sscd`` looks for SSCD: ``$FP_SSCD``, else the user data folder.

    The default file is ``<user data dir>/fp/sscd/sscd_disc_large.torchscript.pt``
    (``~/.local/share/fp/sscd/...`` on Linux).
    """
    env = os.environ.get("FP_SSCD")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("fp")) / "sscd" / SSCD_FILE


def _missing_sscd(where: Path) -> InputError:
    return InputError(
        f"InvMM's default similarity is SSCD (the official one), and {where} does not exist. "
        f"Download {SSCD_URL} (facebookresearch/sscd-copy-detection) and save it there, or "
        f"set FP_SSCD=PATH, or pass --similarity sscd:PATH. Or pick another similarity "
        f"explicitly (--similarity ncc|ssim|torchscript:PATH|encoder:NAME) with "
        f"--calibrate HELD_OUT_DIR (images the model was not trained on) or --beta B"
    )


class NCC:
    """Cosine of mean-centred pixel vectors (normalised cross-correlation)."""

    name = "ncc"

    def __call__(self, refs: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        r = refs.flatten(1).double()
        s = samples.flatten(2).double()
        r = r - r.mean(dim=1, keepdim=True)
        s = s - s.mean(dim=2, keepdim=True)
        r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
        s = s / s.norm(dim=2, keepdim=True).clamp_min(1e-12)
        return torch.einsum("nd,nkd->nk", r, s).float()

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "pixel"}


class SSIM:
    """Mean SSIM with a uniform window, as scikit-image computes it by default."""

    name = "ssim"
    K1, K2, WIN = 0.01, 0.03, 7

    def __call__(self, refs: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        n, k = samples.shape[:2]
        x = refs.double().unsqueeze(1).expand_as(samples).flatten(0, 1)
        y = samples.double().flatten(0, 1)
        win = min(self.WIN, x.shape[-1], x.shape[-2])
        win -= 1 - win % 2  # odd
        if win < 3:
            raise InputError(f"ssim needs images of at least 3x3 pixels, got {tuple(x.shape[-2:])}")

        def mean(t: torch.Tensor) -> torch.Tensor:  # valid region == skimage's crop
            return F.avg_pool2d(t, win, stride=1)

        cov_norm = win * win / (win * win - 1.0)  # sample covariance, as skimage
        ux, uy = mean(x), mean(y)
        vx = cov_norm * (mean(x * x) - ux * ux)
        vy = cov_norm * (mean(y * y) - uy * uy)
        vxy = cov_norm * (mean(x * y) - ux * uy)
        c1, c2 = self.K1**2, self.K2**2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        return s.mean(dim=(1, 2, 3)).view(n, k).float()

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "pixel", "window": self.WIN, "K1": self.K1,
                "K2": self.K2}


class TorchScriptDescriptor:
    """Cosine of the outputs of a TorchScript descriptor model (e.g. SSCD)."""

    def __init__(self, path: str, device: torch.device, size: int | None = None,
                 sscd: bool = False) -> None:
        file = Path(path).expanduser()
        if sscd and not file.is_file():
            raise _missing_sscd(file)
        if not file.is_file():
            raise InputError(
                f"similarity torchscript:{path}: no such file. Give the path of a TorchScript "
                f"model, e.g. SSCD's sscd_disc_large.torchscript.pt"
            )
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, yet SSCD ships as one
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(str(file), map_location=device).eval()
        except RuntimeError as exc:
            raise InputError(
                f"similarity torchscript:{path} is not a TorchScript file: {exc}") from exc
        self.name = f"sscd:{path}" if sscd else f"torchscript:{path}"
        self.sscd = sscd
        self.device = device
        self.size = size
        self.sha256 = hashlib.sha256(file.read_bytes()).hexdigest()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            out = self.model(((x - mean) / std).float().to(self.device))
        return F.normalize(out.flatten(1).float(), dim=1)

    def __call__(self, refs: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        n, k = samples.shape[:2]
        r = self._embed(refs)
        s = self._embed(samples.flatten(0, 1)).view(n, k, -1)
        return torch.einsum("nd,nkd->nk", r, s)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "sscd" if self.sscd else "torchscript",
                "sha256": self.sha256, "input": "ImageNet-normalised RGB",
                "resize": self.size}


class EncoderEmbedding:
    """Cosine of the last-layer embeddings of an ``fp`` encoder plugin."""

    def __init__(self, encoder: str, device: torch.device, weights: str | None,
                 pool: str | None) -> None:
        from forensics.plugin import manager as plugins

        try:
            enc = plugins.get("encoders", encoder)
        except UnknownNameError as exc:
            raise UnknownNameError(f"similarity encoder:{encoder}: {exc}") from exc
        self.name = f"encoder:{encoder}"
        self.weights, self.pool = weights, pool
        self.loaded = enc.load(weights, str(device), pool)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        arr = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        pils = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")
                for a in arr]
        batch = torch.stack([torch.as_tensor(self.loaded.transform(p)) for p in pils])
        with torch.inference_mode():
            last = self.loaded.forward(batch)[-1]
        return F.normalize(torch.as_tensor(last).flatten(1).float().cpu(), dim=1)

    def __call__(self, refs: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        n, k = samples.shape[:2]
        r = self._embed(refs)
        s = self._embed(samples.flatten(0, 1)).view(n, k, -1)
        return torch.einsum("nd,nkd->nk", r, s).to(samples.device)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "encoder", "layer": "last",
                "weights": self.weights, "pool": self.pool}


def make_similarity(spec: str, device: torch.device, *, size: int | None = None,
                    encoder_weights: str | None = None, encoder_pool: str | None = None):
    """Build the similarity named by ``spec``.

    Args:
        spec: see the module docstring.
        device: where descriptor models run.
        size: side descriptor inputs are resized to (SSCD: the family's official size).
        encoder_weights: ``weights`` for ``encoder:NAME``.
        encoder_pool: ``pool`` for ``encoder:NAME``.

    Raises:
        UnknownNameError: ``spec`` names no similarity; the message lists the choices.
        InputError: an SSCD or ``torchscript:`` file is missing or invalid.
    """
    if spec == "sscd":
        return TorchScriptDescriptor(str(sscd_location()), device, size, sscd=True)
    if spec == "ncc":
        return NCC()
    if spec == "ssim":
        return SSIM()
    scheme, _, rest = spec.partition(":")
    if scheme == "sscd" and rest:
        return TorchScriptDescriptor(rest, device, size, sscd=True)
    if scheme == "torchscript" and rest:
        return TorchScriptDescriptor(rest, device, size)
    if scheme == "encoder" and rest:
        return EncoderEmbedding(rest, device, encoder_weights, encoder_pool)
    raise UnknownNameError(f"unknown similarity {spec!r}; choose one of: {_choices()}")


def is_sscd(spec: str) -> bool:
    """Whether ``spec`` names SSCD, whose copy threshold (0.5) is known."""
    return spec == "sscd" or spec.startswith("sscd:")


def check_sscd_present(spec: str) -> None:
    """Fail at once (before any model is loaded) when the SSCD file is missing."""
    if spec == "sscd" and not sscd_location().is_file():
        raise _missing_sscd(sscd_location())
    if spec.startswith("sscd:") and not Path(spec[5:]).expanduser().is_file():
        raise _missing_sscd(Path(spec[5:]).expanduser())


def calibrate_beta(similarity, images: torch.Tensor) -> dict[str, Any]:
    """The threshold at which no two distinct held-out images would count as copies.

    ``beta`` is the highest similarity between a held-out image and any *other* held-out
    image: a sample then succeeds only if it is at least as close to x0 as the closest
    pair of different images that the model was not trained on.

    Args:
        similarity: a similarity built by :func:`make_similarity`.
        images: ``(N, C, H, W)`` held-out images in [0, 1] at the model's size, N >= 2.

    Returns:
        ``{"beta", "images", "pair": [i, j]}``, ``pair`` the two most similar images.

    Raises:
        InputError: fewer than two images.
    """
    n = int(images.shape[0])
    if n < 2:
        raise InputError(f"--calibrate needs at least 2 held-out images, got {n}")
    best, pair = -float("inf"), [0, 1]
    for i in range(n):
        others = torch.cat([images[:i], images[i + 1:]]).unsqueeze(0)
        sims = similarity(images[i : i + 1], others)[0]
        j = int(sims.argmax())
        if float(sims[j]) > best:
            best, pair = float(sims[j]), [i, j + (j >= i)]
    return {"beta": min(best, 1.0), "images": n, "pair": pair}
