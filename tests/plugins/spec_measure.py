"""A memorization measure written to the README contract only: the pixel distance of each
image to its nearest training image (``model`` is the folder of training images)."""

from __future__ import annotations

from pathlib import Path

from forensics.plugin.hookspecs import hookimpl


def _pixels(image):
    import numpy as np
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.open(image)
    return np.asarray(im.convert("L").resize((16, 16)), dtype=np.float64).reshape(-1) / 255.0


class NearestCopy:
    name = "spec-nearest-copy"
    description = "RMS pixel distance to the nearest training image (test plugin)"

    def score(self, images, model, **params):
        import numpy as np

        train = np.stack([_pixels(p) for p in sorted(Path(model).glob("*.png"))])
        out = []
        for image in images:
            d = np.sqrt(((train - _pixels(image)) ** 2).mean(axis=1))
            out.append({"image": str(image), "score": float(d.min()),
                        "nearest": int(d.argmin())})
        return out


@hookimpl
def register_memorization_measures(register):
    register(NearestCopy())
