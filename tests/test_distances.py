"""Built-in nearest-neighbour distances: exactness, chunking, indices, errors."""

from __future__ import annotations

import numpy as np
import pytest

from forensics.errors import InputError, UnknownNameError
from forensics.plugin import manager as plugins

NAMES = ["euclidean", "sqeuclidean", "cosine", "abscosine"]


def brute(metric: str, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Every pair, the textbook formula, numpy: the oracle."""
    if metric in ("euclidean", "sqeuclidean"):
        d2 = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
        return d2 if metric == "sqeuclidean" else np.sqrt(d2)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    s = qn @ rn.T
    return 1.0 - (np.abs(s) if metric == "abscosine" else s)


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(37, 6)), rng.normal(size=(53, 6))


def test_builtin_distances_are_registered():
    assert set(NAMES) <= set(plugins.names("distances"))
    for name in NAMES:
        obj = plugins.get("distances", name)
        assert obj.name == name and obj.description
        assert plugins.registry("distances")[name].plugin == "fp_plugins.distances"


def test_unknown_distance_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="abscosine"):
        plugins.get("distances", "manhattan")


@pytest.mark.parametrize("name", NAMES)
def test_matches_brute_force(name, data):
    q, r = data
    full = brute(name, q, r)
    d, idx = plugins.get("distances", name).nn(q, r, return_index=True)
    assert d.dtype == np.float64 and d.shape == (37,)
    np.testing.assert_allclose(d, full.min(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(idx, full.argmin(axis=1))


@pytest.mark.parametrize("name", NAMES)
def test_block_search_matches_brute_force(name, data, monkeypatch):
    """Small searches take the numpy path; force the chunked torch path and compare."""
    from fp_plugins import distances

    q, r = data
    dist = plugins.get("distances", name)
    small, small_idx = dist.nn(q, r, return_index=True)
    monkeypatch.setattr(distances, "NUMPY_WORK", 0)
    d, idx = dist.nn(q, r, return_index=True)
    full = brute(name, q, r)
    np.testing.assert_allclose(d, full.min(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(idx, full.argmin(axis=1))
    np.testing.assert_allclose(d, small, rtol=1e-14, atol=1e-15)  # summation order only
    np.testing.assert_array_equal(idx, small_idx)


@pytest.mark.parametrize("name", NAMES)
def test_prepared_reference_gives_identical_results(name, data):
    q, r = data
    dist = plugins.get("distances", name)
    d, idx = dist.nn(q, r, return_index=True)
    d2, idx2 = dist.nn(q, dist.prepare_reference(r), return_index=True, prepared=True)
    np.testing.assert_array_equal(d, d2)
    np.testing.assert_array_equal(idx, idx2)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_chunks_give_the_same_answer(name, data, monkeypatch):
    from fp_plugins import distances

    q, r = data
    dist = plugins.get("distances", name)
    monkeypatch.setattr(distances, "NUMPY_WORK", 0)  # the chunked path, not the numpy one
    whole = dist.nn(q, r)
    # 200 bytes: reference chunks of 4 rows, query chunks of 6 rows; many blocks. Block
    # shapes change the matrix product's summation order, hence rounding only.
    for budget in (200, 1):
        d, idx = dist.nn(q, r, chunk_bytes=budget, return_index=True)
        np.testing.assert_allclose(d, whole, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(idx, brute(name, q, r).argmin(axis=1))


def test_chunk_rows_respect_the_budget():
    from fp_plugins.distances import chunk_rows

    for m, n, dim, budget in [(10**6, 10**7, 768, 32 * 2**20), (500, 2000, 64, 4096),
                              (3, 5, 2, 10**9)]:
        q_c, r_c = chunk_rows(m, n, dim, budget)
        assert 1 <= q_c <= m and 1 <= r_c <= n
        for block in (q_c * r_c, q_c * dim, r_c * dim):
            assert block * 8 <= max(budget, 8 * max(dim, 1))


def test_exact_copies_are_at_distance_zero():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(200, 32)) * 1000.0  # large norms: the expansion alone would not give 0
    q = r[[5, 17, 199]]
    for name in ("euclidean", "sqeuclidean"):
        d, idx = plugins.get("distances", name).nn(q, r, return_index=True)
        assert np.all(d == 0.0)
        np.testing.assert_array_equal(idx, [5, 17, 199])


def test_abscosine_ignores_sign_and_scale():
    r = np.array([[1.0, 0.0], [0.0, 1.0]])
    q = np.array([[-3.0, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(plugins.get("distances", "abscosine").nn(q, r), [0.0, 0.0])
    np.testing.assert_allclose(plugins.get("distances", "cosine").nn(q, r), [1.0, 0.0])


def test_zero_vectors_have_cosine_zero():
    r = np.array([[1.0, 0.0], [0.0, 0.0]])
    q = np.array([[0.0, 0.0], [2.0, 0.0]])
    for name in ("cosine", "abscosine"):
        d = plugins.get("distances", name).nn(q, r)
        assert np.all(np.isfinite(d))
        np.testing.assert_allclose(d, [1.0, 0.0])


def test_accepts_float32_and_read_only_arrays(data):
    q, r = data
    r32 = r.astype(np.float32)
    r32.setflags(write=False)
    d = plugins.get("distances", "euclidean").nn(q.astype(np.float32), r32)
    np.testing.assert_allclose(d, brute("euclidean", q.astype(np.float32).astype(float),
                                        r32.astype(float)).min(1), rtol=1e-12)


def test_empty_query_gives_empty_result(data):
    _, r = data
    d = plugins.get("distances", "abscosine").nn(np.zeros((0, 6)), r)
    assert d.shape == (0,)


@pytest.mark.parametrize(
    "q, r, match",
    [
        (np.zeros((3, 4)), np.zeros((5, 3)), "features"),
        (np.zeros(4), np.zeros((5, 4)), "2-D"),
        (np.zeros((3, 4)), np.zeros((0, 4)), "empty"),
    ],
)
def test_bad_inputs_are_clear_errors(q, r, match):
    with pytest.raises(InputError, match=match):
        plugins.get("distances", "euclidean").nn(q, r)


def test_deterministic(data):
    q, r = data
    for name in NAMES:
        dist = plugins.get("distances", name)
        a, b = dist.nn(q, r), dist.nn(q, r)
        assert a.tobytes() == b.tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_matches_cpu(name, data):
    q, r = data
    dist = plugins.get("distances", name)
    cpu, i_cpu = dist.nn(q, r, return_index=True)
    gpu, i_gpu = dist.nn(q, r, device="cuda", chunk_bytes=256, return_index=True)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(i_gpu, i_cpu)


def test_unavailable_device_is_a_clear_error(data):
    import torch

    q, r = data
    dist = plugins.get("distances", "euclidean")
    with pytest.raises(InputError, match="device"):
        dist.nn(q, r, device="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="not available"):
            dist.nn(q, r, device="cuda")
