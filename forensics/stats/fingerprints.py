"""Fingerprints: what a set of suspect images is matched on.

A fingerprint turns one image set's per-layer statistics into the vector that a matcher
compares with the enrolled vectors. Fingerprints are plugins (``register_fingerprints``);
their contract is :class:`forensics.plugin.protocols.Fingerprint` (with the optional
members of :class:`~forensics.plugin.protocols.FingerprintOptions`). This module holds what
the engine hands them (:class:`FingerprintContext`, :class:`PrepareContext`) and how it
uses their optional members. What several fingerprints' ``prepare`` need is computed
once per baseline: ``ctx.pca(i, k)`` and ``ctx.covariance(i)`` (T's exact PCA and
covariance eigenbasis of layer ``i``), or ``ctx.shared(key, fn)`` for anything else; an
array that several fingerprints return is stored once.

Every registered fingerprint is computed and stored when a curve is enrolled, so a bank
can be matched on any of them later.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forensics.errors import InputError
from forensics.stats.streaming import CovarianceEigen, orient
from forensics.stats.streaming import covariance_eigen as streamed_eigen


@dataclass
class FingerprintContext:
    """What a fingerprint sees of one image set.

    Attributes:
        layers: layer names, in order.
        results: one :class:`~forensics.stats.ct.CTResult` per layer (with ``details`` when the
            fingerprint asked for them).
        embeddings: the set's raw embeddings, one ``(m, D_l)`` array per layer.
        baseline: the :class:`~forensics.stats.baseline.Baseline` the set was measured against.
        extras: the arrays this fingerprint's ``prepare`` stored with the baseline.
    """

    layers: list[str]
    results: list[Any]
    embeddings: list[np.ndarray]
    baseline: Any
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def values(self) -> np.ndarray:
        """C_T per layer (NaN where undefined): the paper's curve."""
        return np.array([r.ct for r in self.results], dtype=np.float64)


def covariance_eigen(T: np.ndarray, thin: bool | None = None,
                     chunk_rows: int | None = None) -> CovarianceEigen:
    """:class:`CovarianceEigen` of ``T`` (n, D): exact and deterministic.

    Args:
        T: (n, D) samples (an array, a memory map or a store's rows).
        thin: from the eigendecomposition of the samples' (n, n) Gram matrix,
            ``O(n^2 D)``: the ``n`` leading eigenpairs only (default when ``n <= D``,
            where the other ``D - n`` have zero variance; T is then read whole, at most
            ``D`` rows); else from the (D, D) covariance, ``O(n D^2)``, streamed over
            chunks of ``chunk_rows`` rows (:func:`forensics.stats.streaming.covariance_eigen`).
    """
    n, d = np.shape(T)
    if not (thin if thin is not None else n <= d):
        return streamed_eigen(T, chunk_rows)
    X = np.asarray(T, dtype=np.float64)
    mean = X.mean(axis=0)
    Xc = X - mean
    # The (n, n) Gram matrix shares the covariance's nonzero eigenvalues; its
    # eigenvectors map to the covariance's through Xc^T.
    gram_vals, u = np.linalg.eigh(Xc @ Xc.T)
    order = np.argsort(gram_vals)[::-1]
    vecs = Xc.T @ u[:, order]
    norms = np.linalg.norm(vecs, axis=0)
    vecs /= np.where(norms > 0, norms, 1.0)
    vals = np.clip(gram_vals[order], 0.0, None) / max(n - 1, 1)
    trace = float(np.einsum("ij,ij->", Xc, Xc) / max(n - 1, 1))
    return CovarianceEigen(mean, vals, orient(vecs), trace, n)


def _thin_enough(n: int, d: int, k: int) -> bool:
    """Whether the thin decomposition holds ``k`` axes with variance (``k < n <= D``)."""
    return k < n <= d


def exact_pca(T: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the ``k`` leading principal axes ``(k, D)`` of ``T`` (n, D), exactly.

    From :func:`covariance_eigen` (no randomised solver, so no seed), axes in decreasing
    order of variance; thin when T has fewer samples than dimensions and ``k < n``.
    """
    n, d = np.shape(T)
    eig = covariance_eigen(T, thin=_thin_enough(n, d, int(k)))
    return eig.mean, eig.vectors[:, :k].T.copy()


@dataclass
class PrepareContext:
    """What ``prepare`` sees when a baseline is built: T and P per layer, and the engine.

    Arrays that several fingerprints need are computed once per context and shared,
    keyed by what they are (:meth:`shared`, :meth:`covariance`, :meth:`pca`); treat
    them as read-only. ``train`` and ``heldout`` may be memory maps or a store's rows
    (:mod:`forensics.data.store`): read them a chunk of rows at a time
    (:func:`forensics.stats.streaming.row_chunks`) rather than whole. The baseline build
    hands its cache on, so T's covariance, read once for the partition's PCA, serves the
    fingerprints too.
    """

    layers: list[str]
    train: list[np.ndarray]
    heldout: list[np.ndarray]
    baseline: Any
    _cache: dict[Hashable, Any] = field(default_factory=dict, repr=False, compare=False)
    #: Rows of T read at a time by the streamed statistics (``None``: their default).
    chunk_rows: int | None = None

    def shared(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, run once per ``key`` for this baseline and then reused."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def covariance(self, i: int, thin: bool | None = None) -> CovarianceEigen:
        """T's mean and covariance eigendecomposition of layer ``i`` (computed once).

        ``thin`` as for :func:`covariance_eigen` (default: thin when T has fewer samples
        than dimensions).
        """
        n, d = np.shape(self.train[int(i)])
        thin = n <= d if thin is None else bool(thin)
        return self.shared(("covariance_eigen", "train", int(i), thin),
                           lambda: covariance_eigen(self.train[int(i)], thin=thin,
                                                    chunk_rows=self.chunk_rows))

    def pca(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """T's mean and ``k`` leading principal axes ``(k, D)`` of layer ``i``, exactly.

        Equal to :func:`exact_pca` of ``train[i]``; one decomposition serves every ``k``
        and every fingerprint.
        """
        n, d = np.shape(self.train[int(i)])
        eig = self.covariance(i, thin=_thin_enough(n, d, int(k)))
        return self.shared(("pca", "train", int(i), int(k)),
                           lambda: (eig.mean, eig.vectors[:, :int(k)].T.copy()))


def needs_ct(fp: Any) -> bool:
    """Whether ``fp`` reads C_T (default True: a fingerprint that says nothing may)."""
    return bool(getattr(fp, "needs_ct", True))


def per_image_rows(fp: Any, ctx: FingerprintContext) -> np.ndarray | None:
    """``fp``'s per-image vectors ``(m, K)`` (None: it has no ``per_image``)."""
    method = getattr(fp, "per_image", None)
    if not callable(method):
        return None
    return np.asarray(method(ctx), dtype=np.float64)


def per_image_variance(fp: Any, ctx: FingerprintContext) -> np.ndarray | None:
    """Per-entry variance of ``fp``'s per-image vectors (None: it has no ``per_image``)."""
    rows = per_image_rows(fp, ctx)
    return None if rows is None else rows.var(axis=0)


def needs_extras(fp: Any) -> bool:
    """Whether ``fp`` stores arrays with each baseline."""
    return callable(getattr(fp, "prepare", None))


def entry_layers(fp: Any, dims: Sequence[int]) -> np.ndarray:
    """Layer index of each entry of ``fp``'s vector (-1: no layer)."""
    method = getattr(fp, "entry_layers", None)
    if method is None:
        return np.arange(len(dims), dtype=np.int64)
    return np.asarray(method([int(d) for d in dims]), dtype=np.int64).reshape(-1)


def entry_mask(fp: Any, dims: Sequence[int], keep: np.ndarray) -> np.ndarray:
    """Entries of ``fp``'s vector that belong to kept layers (or to no layer)."""
    layers = entry_layers(fp, dims)
    keep = np.asarray(keep, dtype=bool)
    return np.where(layers < 0, True, keep[np.clip(layers, 0, None)])


def compute(fp: Any, ctx: FingerprintContext) -> np.ndarray:
    """Run ``fp.compute`` and check that it gives a 1-D float vector."""
    vec = np.asarray(fp.compute(ctx), dtype=np.float64)
    if vec.ndim != 1 or vec.size == 0:
        raise InputError(f"fingerprint {fp.name!r} must give a non-empty 1-D vector, "
                         f"got shape {vec.shape}")
    return vec
