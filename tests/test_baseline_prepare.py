"""Fingerprint arrays of a baseline: computed once when shared, stored once, same answers.

The reference values come from the per-fingerprint code the built-ins ran before the
arrays were shared (each fingerprint its own PCA of T; setstats T's full covariance and
its square root), written out here, and from scipy's matrix square root.
"""

from __future__ import annotations

import numpy as np
import pytest

from forensics.plugin import manager as plugins
from forensics.stats import fingerprints as fpmod
from forensics.stats.fingerprints import FingerprintContext, PrepareContext
from forensics.stats.setstats import (
    CompactStats,
    covariance_factor,
    frechet_distance,
    frechet_to_compact,
    gaussian_stats,
    psd_sqrt,
)
from forensics.steps import baseline_files

DIMS = (6, 40, 12, 90, 30, 20, 8)


def _layers(n, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    out = []
    for i, d in enumerate(DIMS):
        mix = np.random.default_rng(100 + i).normal(size=(5, d))
        x = rng.normal(size=(n, 5)) @ mix + 0.3 * rng.normal(size=(n, d)) + shift * i
        out.append(x.astype(np.float32))  # as embeddings are
    return out


def _old_exact_pca(T, k):
    """The built-ins' PCA before it was shared (verbatim)."""
    X = np.asarray(T, dtype=np.float64)
    mean = X.mean(axis=0)
    Xc = X - mean
    cov = Xc.T @ Xc / max(len(X) - 1, 1)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:k]
    axes = vecs[:, order].T.copy()
    big = np.argmax(np.abs(axes), axis=1)
    axes *= np.where(axes[np.arange(len(axes)), big] < 0, -1.0, 1.0)[:, None]
    return mean, axes


def _old_setstats_extras(T_layers):
    """setstats' arrays before they were made compact: mean, covariance and its root."""
    out = {}
    for i, T in enumerate(T_layers):
        stats = gaussian_stats(T)
        out[f"mu.{i}"], out[f"cov.{i}"], out[f"n.{i}"] = stats.mu, stats.cov, stats.n
        out[f"root.{i}"] = psd_sqrt(stats.cov)
    return out


def _builtins():
    fps = [plugins.get("fingerprints", n) for n in plugins.names("fingerprints")]
    return [fp for fp in fps if fpmod.needs_extras(fp)]


def _ctx(layers, Q, extras):
    names = [f"l{i}" for i in range(len(layers))]
    return FingerprintContext(names, [], Q, None, extras)


def test_every_builtin_fingerprint_shares_each_decomposition_of_t(monkeypatch):
    T, P = _layers(80), _layers(40, 1)
    calls = []
    for fn in ("eigh", "svd"):
        real = getattr(np.linalg, fn)
        monkeypatch.setattr(np.linalg, fn, lambda a, *k, _f=real, _n=fn, **kw:
                            calls.append((_n, a.shape, a.tobytes())) or _f(a, *k, **kw))
    ctx = PrepareContext([f"l{i}" for i in range(len(DIMS))], T, P, None)
    for fp in _builtins():
        fp.prepare(ctx)
    assert len(_builtins()) >= 6
    assert len(calls) == len(set(calls))  # no decomposition runs twice
    # One per layer (here two for the 90-wide layer of 80 samples: thin for 64 axes, full
    # for 90), not one per fingerprint and layer.
    assert len(DIMS) <= len(calls) <= 2 * len(DIMS)


@pytest.mark.parametrize("n", [25, 300])  # fewer and more samples than the widest layer
def test_shared_pca_and_ridge_equal_each_fingerprint_computing_its_own(n):
    from fp_plugins.fingerprints import RESID_RIDGE

    T, P, Q = _layers(n), _layers(40, 1), _layers(30, 2, shift=0.5)
    ctx = PrepareContext([f"l{i}" for i in range(len(DIMS))], T, P, None)
    for fp in _builtins():
        if fp.name == "setstats":
            continue
        extras = fp.prepare(ctx)
        for key, value in extras.items():
            kind, i = key.split(".")
            if kind in ("mean", "axes"):
                d = DIMS[int(i)]
                ref = _old_exact_pca(T[int(i)], min(fp.dim, d))[kind == "axes"]
                if kind == "axes" and min(fp.dim, d) < n <= d:  # thin: from the Gram matrix
                    np.testing.assert_allclose(value, ref, atol=1e-9)
                elif min(fp.dim, d) < n <= d:
                    np.testing.assert_array_equal(value, ref)  # bit-identical
                else:  # the covariance streamed over rows: equal up to rounding
                    np.testing.assert_allclose(value, ref, rtol=0, atol=1e-10)
        if "coef.0" in extras:  # the ridge, recomputed as each resid fingerprint did
            content = fp.content(len(DIMS))
            proj = {i: (T[i] - extras[f"mean.{i}"]) @ extras[f"axes.{i}"].T
                    for i in content + fp.selected(len(DIMS))}
            A = np.hstack([proj[i] for i in content])
            gram = A.T @ A
            gram[np.diag_indices_from(gram)] += RESID_RIDGE * np.trace(gram) / gram.shape[0]
            for i in fp.selected(len(DIMS)):  # sums streamed over rows: equal up to rounding
                np.testing.assert_allclose(extras[f"coef.{i}"],
                                           np.linalg.solve(gram, A.T @ proj[i]),
                                           rtol=1e-10, atol=1e-12)
        assert np.isfinite(fpmod.compute(fp, _ctx(T, Q, extras))).all()


def _exact_fid(x, T):
    """FID by the nuclear norm: ``tr sqrt(C_T C_x)`` is the sum of the singular values of
    ``A B^T / sqrt((n-1)(m-1))`` (A, B the centred samples): exact even when singular."""
    T, x = np.asarray(T, dtype=np.float64), np.asarray(x, dtype=np.float64)
    A, B = T - T.mean(0), x - x.mean(0)
    nuc = np.linalg.svd(A @ B.T, compute_uv=False).sum() / np.sqrt((len(A) - 1) * (len(B) - 1))
    d = x.mean(0) - T.mean(0)
    return d @ d + (A * A).sum() / (len(A) - 1) + (B * B).sum() / (len(B) - 1) - 2 * nuc


@pytest.mark.parametrize("n", [25, 300])  # fewer and more samples than the widest layer
def test_setstats_from_the_compact_arrays_equals_the_full_covariance_and_an_exact_fid(n):
    T, P, Q = _layers(n), _layers(40, 1), _layers(30, 2, shift=0.5)
    fp = plugins.get("fingerprints", "setstats")
    new = fp.prepare(PrepareContext([f"l{i}" for i in range(len(DIMS))], T, P, None))
    old = _old_setstats_extras(T)
    # Stored compactly: T's rows or a covariance factor, whichever is smaller.
    assert not any(k.startswith(("cov.", "root.")) for k in new)
    for i, d in enumerate(DIMS):
        kept = new.get(f"rows.{i}", new.get(f"factor.{i}"))
        assert kept.nbytes == min(n * d * 4, d * min(d, n - 1) * 8)
    forms = {k.split(".")[0] for k in new} & {"rows", "factor"}
    assert forms == ({"rows", "factor"} if n == 25 else {"factor"})
    v_new = fpmod.compute(fp, _ctx(T, Q, new))
    v_old = fpmod.compute(fp, _ctx(T, Q, old))  # baselines stored before still work
    k = len(DIMS)
    np.testing.assert_array_equal(v_new[:-k], v_old[:-k])  # means and stds
    exact = [_exact_fid(Q[i], T[i]) for i in range(k)]
    np.testing.assert_allclose(v_new[-k:], exact, rtol=1e-12)
    # The full root's noise eigenvalues (a singular covariance) cost it up to 1e-7.
    np.testing.assert_allclose(v_old[-k:], exact, rtol=1e-6)
    np.testing.assert_allclose([frechet_distance(gaussian_stats(Q[i]), gaussian_stats(T[i]))
                                for i in range(k)], exact, rtol=1e-6)


def test_frechet_to_compact_stats_of_a_rank_deficient_reference():
    rng = np.random.default_rng(3)
    T = rng.normal(size=(10, 4)) @ rng.normal(size=(4, 30))  # rank 4 in 30 dimensions
    x = rng.normal(size=(12, 30))
    eig = fpmod.covariance_eigen(T)
    F = covariance_factor(eig.values, eig.vectors)
    assert F.shape == (30, 4)
    exact = _exact_fid(x, T)
    for ref in (CompactStats(eig.mean, eig.trace, 10, factor=F),
                CompactStats(eig.mean, eig.trace, 10, rows=T)):
        assert frechet_to_compact(x, ref) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(gaussian_stats(x), gaussian_stats(T)) == pytest.approx(exact,
                                                                                   rel=1e-6)


def test_arrays_several_fingerprints_return_are_stored_once(tmp_path):
    rng = np.random.default_rng(0)
    shared, own = rng.normal(size=(64, 300)), rng.normal(size=(5,))
    extras = {"a": {"axes.0": shared, "x": own}, "b": {"axes.0": shared.copy()},
              "c": {}}
    baseline_files.save_all_extras(tmp_path, extras)
    with np.load(tmp_path / baseline_files.SHARED_ARRAYS_FILE) as npz:
        assert len(npz.files) == 2
    for name, arrays in extras.items():
        back = baseline_files.load_extras(tmp_path, name)
        assert sorted(back) == sorted(arrays)
        for k, v in arrays.items():
            np.testing.assert_array_equal(back[k], v)
    assert baseline_files.load_extras(tmp_path, "missing") is None


def test_the_per_fingerprint_files_of_older_baselines_still_load(tmp_path):
    arrays = {"mean.0": np.arange(3.0)}
    baseline_files.save_extras(tmp_path, "old-fp", arrays)
    back = baseline_files.load_extras(tmp_path, "old-fp")
    np.testing.assert_array_equal(back["mean.0"], arrays["mean.0"])
    baseline_files.save_all_extras(tmp_path, {"new-fp": arrays})  # both layouts in one folder
    assert baseline_files.load_extras(tmp_path, "old-fp") is not None


def test_a_damaged_index_says_to_rebuild(tmp_path):
    from forensics.errors import InputError

    baseline_files.save_all_extras(tmp_path, {"a": {"x": np.zeros(2)}})
    (tmp_path / baseline_files.SHARED_INDEX_FILE).write_text("{not json")
    with pytest.raises(InputError, match="rebuild the baseline"):
        baseline_files.load_extras(tmp_path, "a")
