"""An encoder written to the README contract only: block means of the grey image, and the
colour statistics. Heavy imports live inside the methods."""

from __future__ import annotations

from forensics.plugin.hookspecs import hookimpl

LAYERS = ["blocks", "colour"]


class ToTensor:
    """PIL RGB image -> (3, 16, 16) float tensor in [0, 1] (picklable, for DataLoader)."""

    def __call__(self, image):
        import numpy as np
        import torch

        small = image.resize((16, 16))
        return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)


class Loaded:
    layer_names = LAYERS
    weights_sha256 = "0" * 64  # no weights
    preprocess = {"resize": [16, 16], "range": [0, 1]}
    transform = ToTensor()

    def forward(self, batch):
        import numpy as np

        x = batch.numpy()
        grey = x.mean(axis=1).reshape(len(x), 4, 4, 4, 4).mean(axis=(2, 4)).reshape(len(x), 16)
        colour = np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1)
        return [grey.astype(np.float32), colour.astype(np.float32)]


class BlockEncoder:
    name = "spec-blocks"
    description = "4x4 block means of the grey image and colour statistics (test plugin)"
    family = "test"

    def layer_names(self, pool="cls"):
        return list(LAYERS)

    def load(self, weights, device, pool):
        return Loaded()


@hookimpl
def register_encoders(register):
    register(BlockEncoder())
