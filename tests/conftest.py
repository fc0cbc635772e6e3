"""Shared test set-up.

Tests never load third-party plugins that happen to be installed: ``FP_LOAD_PLUGINS`` is
set to the empty string for the whole session (a test that needs one sets it itself).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ["FP_LOAD_PLUGINS"] = ""
# Spinning OpenMP waiters (torch, sklearn) slow small parallel regions by orders of
# magnitude when the CPU is shared; set before any test imports them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Test arrays are tiny: one BLAS/OpenMP thread is faster than a pool fighting over two
# cores, and results do not depend on it (the engine is deterministic per machine).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


#: float32's unit round-off.
U32 = 2.0**-24


def assert_close32(actual, expected, *, terms: int, scale: float | None = None) -> None:
    """Assert two float32 computations of one quantity agree as far as float32 can promise.

    Other kernels, batch shapes, memory layouts or summation orders change float32 results
    in the last bits, and which ones differ changes from CPU to CPU. A sum of ``terms``
    rounded products errs by at most about ``terms * u * sum |x_i|`` (Higham, *Accuracy and
    Stability of Numerical Algorithms*, sec. 3.1), so every entry is held to ``terms * u``
    times the array's largest magnitude, never to a relative bound per entry that entries
    near zero cannot meet. ``terms`` is the longest chain of accumulations behind an entry
    (for a network, roughly its depth times its widest sum). A real fault (another layer,
    pooling, weight or image) is orders of magnitude above this bound. ``scale`` replaces
    the largest magnitude where the quantity has a natural one (1 for a correlation or a
    cosine, whose value may itself be near zero).
    """
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.array_equal(np.isnan(a), np.isnan(b)), "NaN in different places"
    a, b = np.nan_to_num(a), np.nan_to_num(b)
    if scale is None:
        scale = max(float(np.abs(b).max(initial=0.0)), float(np.finfo(np.float32).tiny))
    bound = terms * U32 * scale
    err = float(np.abs(a - b).max(initial=0.0))
    assert err <= bound, (f"max |difference| {err:.3g} is above what float32 can promise, "
                          f"{bound:.3g} ({terms} terms x 2^-24 x scale {scale:.3g})")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run slow tests")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    run_slow = config.getoption("--run-slow")
    gpu = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords:
            if gpu is None:
                gpu = _cuda_available()
            if not gpu:
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Every test starts from freshly loaded plugins with no third-party ones."""
    from forensics.plugin import manager as plugins

    monkeypatch.setenv("FP_LOAD_PLUGINS", "")
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def shared_dir() -> Path:
    """``../shared`` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the checkout")
    return SHARED


#: Spec-only plugins (one per hook), loaded by path: see tests/plugins/README.md.
TEST_PLUGINS = REPO / "tests" / "plugins"


def load_test_plugin(name: str):
    """Register ``tests/plugins/<name>.py`` with the plugin manager, as ``tests.plugins.<name>``.

    Returns the module. Plugins are reset before each test, so register within the test.
    """
    import importlib.util

    from forensics.plugin import manager as plugins

    module_name = f"tests.plugins.{name}"
    registered = plugins.get_plugin_manager().get_plugin(module_name)
    if registered is not None:
        return registered
    spec = importlib.util.spec_from_file_location(module_name, TEST_PLUGINS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugins.get_plugin_manager().register(module, name=module_name)
    return module
