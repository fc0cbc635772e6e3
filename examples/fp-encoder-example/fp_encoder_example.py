"""An example third-party ``fp`` encoder: pixel statistics and a random projection.

Registered through the entry point group ``fp`` (see pyproject.toml). The module imports
nothing heavy at top level; numpy and torch are imported inside ``load()``.
"""

from __future__ import annotations

from forensics.plugin.hookspecs import hookimpl

LAYERS = ["pixels", "proj", "stats"]
DIMS = [64, 32, 6]


class _Transform:
    """PIL RGB image -> (3, 16, 16) float tensor in [0, 1]."""

    def __call__(self, image):
        import numpy as np
        import torch
        from PIL import Image

        small = image.resize((16, 16), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)


class _Loaded:
    def __init__(self, seed: int):
        import hashlib

        import numpy as np

        rng = np.random.default_rng(seed)
        self.projection = (rng.standard_normal((64, 32)) / 8.0).astype(np.float32)
        self.layer_names = list(LAYERS)
        self.weights_sha256 = hashlib.sha256(self.projection.tobytes()).hexdigest()
        self.preprocess = {"resize": [16, 16], "interpolation": "bilinear", "range": [0, 1]}
        self.transform = _Transform()

    def forward(self, batch):
        import numpy as np

        x = batch.numpy()
        grey = x.mean(axis=1)  # (B, 16, 16)
        pixels = grey.reshape(len(x), 8, 2, 8, 2).mean(axis=(2, 4)).reshape(len(x), 64)
        proj = np.tanh(pixels @ self.projection)
        stats = np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1)
        return [a.astype(np.float32) for a in (pixels, proj, stats)]


class PixelProjEncoder:
    name = "pixel-proj"
    family = "example"
    description = "pixel statistics and a seeded random projection (example plugin)"
    default_weights = "random:0"

    def layer_names(self, pool: str = "cls") -> list[str]:
        return list(LAYERS)

    def layer_dims(self, pool: str = "cls") -> list[int]:
        return list(DIMS)

    def load(self, weights, device, pool):
        from forensics.errors import InputError
        from forensics.plugin.encoders import parse_weights

        spec = parse_weights(weights, self.default_weights)
        if spec.kind != "random":
            raise InputError("pixel-proj only takes --weights random:SEED")
        return _Loaded(spec.seed)


@hookimpl
def register_encoders(register):
    register(PixelProjEncoder())
