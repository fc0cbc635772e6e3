"""The baseline: everything about T and P that C_T needs, computed once per layer.

Building a baseline fits, per layer, the partition on the training embeddings T (for
``kmeans``: PCA then KMeans), groups T's projected points by cell, and measures each
held-out sample's nearest-neighbour distance to the T samples of its cell, sorted within
the cell. A query set Q then costs only: project, assign cells, nearest neighbour among
its cell's T samples, and ranking against the stored P distances::

    T, P (per layer) --build--> Baseline   (stored and reloaded by forensics.steps.baseline_files)
                                   |
    Q (per layer) -------------> query --> [CTResult per layer]

A baseline is identified by a content hash of its inputs (every T and P array, their cell
labels) and of its parameters (distance, partitioner and its parameters, seed, format and
``fp`` version): :func:`forensics.steps.baseline_files.load_or_build` reuses a stored one
when the hash matches. Nothing here reads or writes files or looks plugins up by name:
the distance and the partitioner come in as objects.
:func:`ct_score` scores one layer through a one-off baseline.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forensics import defaults
from forensics._version import __version__
from forensics.errors import InputError
from forensics.stats.ct import (
    STATUS_CONSTANT,
    STATUS_OK,
    CTResult,
    check_labels,
    check_m,
    check_seed,
    check_tau,
    constant_message,
    constant_result,
    ct_from_distances,
    is_constant,
)
from forensics.threads import blas_threads_for as _blas_threads_for

#: Version of the stored layout; part of every baseline's id.
FORMAT = 1
ARRAYS_FILE = "arrays.npz"
META_FILE = "meta.json"

def array_digest(a: np.ndarray, chunk_rows: int | None = None) -> str:
    """SHA-256 of an array's dtype, shape and bytes (C order).

    A 2-D array with more rows than ``chunk_rows`` (a memory map, a store's rows) is read
    a chunk of rows at a time; the digest is the same.
    """
    from forensics.stats.streaming import DEFAULT_CHUNK_ROWS

    step = chunk_rows or DEFAULT_CHUNK_ROWS
    if not (hasattr(a, "shape") and hasattr(a, "dtype") and len(a.shape) == 2):
        a = np.asarray(a)  # a store's rows stay as they are: read by chunks below
    if len(a.shape) != 2 or a.shape[0] <= step:
        a = np.ascontiguousarray(a if isinstance(a, np.ndarray) else a[:])
        h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
        return h.hexdigest()
    h = hashlib.sha256(f"{np.dtype(a.dtype).str}|{tuple(a.shape)}|".encode())
    for s in range(0, a.shape[0], step):
        h.update(memoryview(np.ascontiguousarray(a[s : s + step])).cast("B"))
    return h.hexdigest()


#: Largest magnitude accepted in T, P and Q: sums of squares must stay finite in float64.
MAX_ABS_VALUE = 1e100


def _digest_of(mapping: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(mapping, sort_keys=True).encode()).hexdigest()


def _matrix(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{what} must be a non-empty 2-D array (samples, features), "
                         f"got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} holds NaN or infinite values")
    largest = float(np.abs(arr).max())
    if largest > MAX_ABS_VALUE:
        raise InputError(f"{what} holds values as large as {largest:.3g}; PCA, KMeans and "
                         f"distances need values below {MAX_ABS_VALUE:g} in magnitude (their "
                         f"squares must stay finite): scale the embeddings down")
    return arr


def _rows(x: Any, what: str, chunk_rows: int | None = None) -> Any:
    """Check T or P as :func:`_matrix` does, reading rows a chunk at a time (no copy).

    An array, a memory map or a store's rows (anything with ``shape``, ``dtype`` and row
    slicing) is returned as it is; anything else becomes an array.
    """
    from forensics.stats.streaming import check_rows

    arr = x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)
    shape = tuple(arr.shape)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise InputError(f"{what} must be a non-empty 2-D array (samples, features), "
                         f"got shape {shape}")
    dtype = np.dtype(arr.dtype)
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"{what} must hold real numbers, got dtype {dtype}")
    check_rows(arr, what, MAX_ABS_VALUE, chunk_rows)
    return arr


def _declares(method: Any, name: str) -> bool:
    """Whether ``method`` takes the keyword ``name`` (new options go only to those that do)."""
    import inspect

    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _per_layer(cells: Any, n_layers: int, what: str) -> list[Any] | None:
    """``None``, one label array for every layer, or a list with one per layer."""
    if cells is None:
        return None
    if isinstance(cells, np.ndarray) and cells.ndim == 1:
        return [cells] * n_layers
    cells = list(cells)
    if len(cells) != n_layers:
        raise InputError(f"{what} must be one label array, or one per layer ({n_layers}), "
                         f"got {len(cells)}")
    return cells


@dataclass
class LayerBaseline:
    """One layer's stored state.

    Attributes:
        name: layer name.
        status: ``"ok"``, or ``"constant"`` when every T embedding is the same.
        message: why the layer is not usable, when it is not.
        dim: number of raw features.
        partition: the fitted partition (``None`` for a constant layer).
        t_points: (n_T, d) T in the partition's space, grouped by cell.
        t_index: (n_T,) index in the original T of each row of ``t_points``.
        t_offsets: (k+1,) rows of cell c are ``t_offsets[c]:t_offsets[c+1]``.
        p_dist: (n_P,) P's nearest-neighbour distances, grouped by cell, sorted within it
            (NaN in a cell without T samples).
        p_offsets: (k+1,) as ``t_offsets``, for ``p_dist``.
        ivf_centroids: approximate search only: the trained lists' centroids of each cell
            searched that way (by cell), stored so that queries need not train them again.
    """

    name: str
    status: str
    message: str
    dim: int
    partition: Any = None
    t_points: np.ndarray | None = None
    t_index: np.ndarray | None = None
    t_offsets: np.ndarray | None = None
    p_dist: np.ndarray | None = None
    p_offsets: np.ndarray | None = None
    ivf_centroids: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def t_counts(self) -> np.ndarray:
        """T samples per cell."""
        return np.diff(self.t_offsets)

    @property
    def p_cells(self) -> np.ndarray:
        """Cell of each entry of ``p_dist``."""
        counts = np.diff(self.p_offsets)
        return np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)

    def arrays(self) -> dict[str, np.ndarray]:
        """Numeric state for storage (empty for a constant layer)."""
        if self.status != STATUS_OK:
            return {}
        out = {k: getattr(self, k) for k in
               ("t_points", "t_index", "t_offsets", "p_dist", "p_offsets")}
        out.update({f"partition.{k}": v for k, v in self.partition.to_arrays().items()})
        out.update({f"ivf.{c}": v for c, v in sorted(self.ivf_centroids.items())})
        return out


def _group(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable order grouping ``labels`` by cell, and the (k+1,) cell offsets."""
    order = np.argsort(labels, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=k))]).astype(np.int64)
    return order, offsets


def _build_layer(name: str, T: Any, P: Any, *, distance: Any, partitioner: Any, seed: int,
                 params: dict, device: str, T_lab: Any = None, P_lab: Any = None,
                 search: str = "auto", chunk_rows: int | None = None,
                 shared: dict | None = None, index: int = 0,
                 progress: dict[str, Callable[..., None]] | None = None
                 ) -> LayerBaseline:
    from forensics.stats.neighbours import CellSearch
    from forensics.stats.streaming import covariance_eigen, covariance_solver

    if _declares(partitioner.fit, "chunk_rows"):  # it reads T a chunk at a time itself
        T = _rows(T, f"layer {name!r}: T", chunk_rows)
        P = _rows(P, f"layer {name!r}: P", chunk_rows)
    else:  # a partitioner that takes T as one float64 array gets it so, as it always did
        T = _matrix(T, f"layer {name!r}: T")
        P = _matrix(P, f"layer {name!r}: P")
    if P.shape[1] != T.shape[1]:
        raise InputError(f"layer {name!r}: P has {P.shape[1]} features but T has {T.shape[1]}")
    if is_constant(T):
        return LayerBaseline(name, STATUS_CONSTANT, constant_message(name), T.shape[1])
    bar = progress or {}
    if T_lab is not None:
        T_lab = check_labels(T_lab, T.shape[0], f"layer {name!r}: T_cells")
        P_lab = check_labels(P_lab, P.shape[0], f"layer {name!r}: P_cells")
        k = int(max(T_lab.max(), P_lab.max())) + 1
        partition = partitioner.fit(T, seed=seed, labels=T_lab, n_cells=k, **params)
    else:
        options: dict[str, Any] = {}
        if _declares(partitioner.fit, "chunk_rows"):
            options["chunk_rows"] = chunk_rows
        n, d = T.shape
        read = False
        if _declares(partitioner.fit, "eigen") and covariance_solver(n, d):
            # T's covariance is read once: the partition's PCA and the fingerprints' share it.
            key = ("covariance_eigen", "train", index, False)
            cache = shared if shared is not None else {}
            if key not in cache:
                update = bar.get("pca")
                on_chunk = None if update is None else functools.partial(update, name)
                cache[key] = covariance_eigen(T, chunk_rows, on_chunk=on_chunk)
                read = True
            options["eigen"] = cache[key]
        if not read and "pca" in bar:
            bar["pca"](name, n)
        partition = partitioner.fit(T, seed=seed, **options, **params)
    if "cells" in bar:
        bar["cells"](name, 1)
    Zt, Zp = partition.transform(T), partition.transform(P)
    if T_lab is None:
        T_lab, P_lab = partition.cells(Zt), partition.cells(Zp)
    k = int(max(partition.n_cells, T_lab.max() + 1, P_lab.max() + 1))
    t_order, t_off = _group(T_lab, k)
    t_points = np.ascontiguousarray(Zt[t_order])
    del Zt
    p_off = _group(P_lab, k)[1]
    update = bar.get("nn")
    cells = CellSearch(distance, t_points, t_off, device=device, faiss=search,
                       prepared_exact=False)
    dP, _rows_in_t = cells.search(Zp, P_lab,
                                  on_cell=(lambda b: update(name, b)) if update else None)
    by_cell_then_distance = np.lexsort((dP, P_lab))
    return LayerBaseline(
        name, STATUS_OK, "", T.shape[1], partition, t_points, t_order.astype(np.int64), t_off,
        dP[by_cell_then_distance], p_off, ivf_centroids=dict(cells.centroids),
    )


def _build_bars(bars: Any, T_layers: Sequence[Any], P_layers: Sequence[Any]
                ) -> dict[str, Callable[..., None]]:
    """One bar per stage of the build, over every layer: ``update(layer, units)``."""
    out = {}
    for key, label, total in (
            ("pca", "PCA of T (rows)", sum(int(np.shape(t)[0]) for t in T_layers)),
            ("cells", "cells (KMeans)", len(T_layers)),
            ("nn", "P distances (rows)", sum(int(np.shape(p)[0]) for p in P_layers))):
        update = bars.stage(label, total)
        out[key] = lambda layer, units, _u=update: _u(layer, advance=units)
    return out


def baseline_key(
    T_layers: Sequence[np.ndarray],
    P_layers: Sequence[np.ndarray],
    layer_names: Sequence[str],
    *,
    distance: str = defaults.DISTANCE,
    partitioner: str = defaults.PARTITIONER,
    seed: int = 0,
    partitioner_params: dict | None = None,
    T_cells: Any = None,
    P_cells: Any = None,
    search: str | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The id a baseline built from these inputs and parameters gets, and the input hashes.

    ``search`` enters the id only when it is approximate (``ivf...``): every exact mode
    gives the same baseline.

    Returns:
        ``(id, inputs)``: a 24-hex-digit id and, per layer, the SHA-256 of T and P (and of
        their cell labels) with their shapes.
    """
    n = len(layer_names)
    if not (len(T_layers) == len(P_layers) == n) or n == 0:
        raise InputError(f"need one T and one P array per layer: got {len(T_layers)} T, "
                         f"{len(P_layers)} P and {n} layer names")
    if len(set(layer_names)) != n or not all(isinstance(x, str) for x in layer_names):
        raise InputError("layer names must be distinct strings")
    T_cells = _per_layer(T_cells, n, "T_cells")
    P_cells = _per_layer(P_cells, n, "P_cells")
    inputs = []
    for i, name in enumerate(layer_names):
        entry: dict[str, Any] = {"layer": name}
        for what, arrs in (("T", T_layers), ("P", P_layers), ("T_cells", T_cells),
                           ("P_cells", P_cells)):
            if arrs is not None:
                a = arrs[i]
                if not (hasattr(a, "shape") and hasattr(a, "dtype")):
                    a = np.asarray(a)  # a store's rows are hashed by chunks, not read whole
                entry[what] = array_digest(a)
                entry[f"{what}_shape"] = list(a.shape)
        inputs.append(entry)
    key = {
        "format": FORMAT, "fp_version": __version__, "distance": distance,
        "partitioner": partitioner, "partitioner_params": partitioner_params or {},
        "seed": int(seed), "inputs": inputs,
    }
    approximate = _approximate_spec(search)
    if approximate is not None:
        key["search"] = approximate
    return _digest_of(key)[:24], inputs


def _approximate_spec(search: str | None) -> str | None:
    """The canonical spelling of an approximate search; None for the exact modes."""
    if search is None:
        return None
    from forensics.stats.neighbours import parse_search

    ivf = parse_search(search)
    return None if ivf is None else ivf.spec


class Baseline:
    """Per-layer state of T and P, built once and queried with any number of Q sets.

    Build with :meth:`build`; :mod:`forensics.steps.baseline_files` stores and reloads it
    (``save_engine``, ``load_engine``, or ``load_or_build`` by content hash).

    Attributes:
        layers: one :class:`LayerBaseline` per layer.
        meta: every parameter, the seed, the input hashes, the format and ``fp`` version.
        device: torch device the nearest-neighbour search of queries runs on.
    """

    def __init__(self, layers: list[LayerBaseline], meta: dict[str, Any], device: str = "cpu",
                 distance: Any = None, search: str = "auto"):
        self.layers = layers
        self.meta = meta
        self.device = device
        self.distance = distance  # the distance plugin named by meta["distance"]
        # A baseline built with the approximate search is queried with it: P and Q alike.
        self.search = meta.get("search") or search
        self._searches: dict[tuple[str, str], Any] = {}  # per layer: T rows ready for search

    @property
    def id(self) -> str:
        """Content hash of the inputs and parameters."""
        return self.meta["id"]

    @property
    def layer_names(self) -> list[str]:
        """Names of the layers, in order."""
        return [lb.name for lb in self.layers]

    def _distance(self):
        return self.distance

    @classmethod
    def build(
        cls,
        T_layers: Sequence[np.ndarray],
        P_layers: Sequence[np.ndarray],
        layer_names: Sequence[str],
        *,
        distance: Any,
        partitioner: Any,
        seed: int = 0,
        partitioner_params: dict | None = None,
        device: str = "cpu",
        T_cells: Any = None,
        P_cells: Any = None,
        on_layer: Callable[[int, str], None] | None = None,
        search: str = "auto",
        chunk_rows: int | None = None,
        shared: dict | None = None,
        bars: Any = None,
        _key: tuple[str, list] | None = None,
    ) -> Baseline:
        """Fit the partition of every layer and measure P's distances to T.

        Args:
            T_layers: per layer, (n_T, D_l) training embeddings.
            P_layers: per layer, (n, D_l) held-out embeddings.
            layer_names: per layer, a distinct name.
            distance: the distance plugin (its name is recorded in ``meta``).
            partitioner: the partitioner plugin (its name is recorded in ``meta``).
            seed: seed of every random step.
            partitioner_params: keyword parameters of the partitioner's ``fit``.
            device: torch device of the nearest-neighbour search.
            T_cells: for the ``given`` partitioner: T's cell labels, one array for every
                layer or a list with one per layer.
            P_cells: as ``T_cells``, for P.
            on_layer: called with the index and name of each layer once it is built
                (e.g. to show progress).
            search: nearest-neighbour search of each cell (:mod:`forensics.stats.neighbours`):
                ``auto`` (float32 candidates of one matrix product, re-ranked in float64,
                for large cells on CPU; the distance's own exact search otherwise),
                ``always`` or ``never``; every one
                of these finds the exact nearest neighbour. ``ivf[:nlist=N,nprobe=P,
                min_rows=R]`` is the approximate search (an inverted-file index for cells
                of at least R rows; :mod:`forensics.stats.neighbours`): recorded in the
                parameters and the id, and used by the baseline's queries too.
            chunk_rows: rows of T and P read at a time (T and P may be memory maps or a
                store's rows); ``None``: :data:`forensics.stats.streaming.DEFAULT_CHUNK_ROWS`.
            shared: a cache of arrays computed from T (T's covariance of each layer), handed
                on to the fingerprints' ``prepare`` so that T is read once for both.
            bars: a :class:`forensics.progress.Stages` for progress bars (PCA accumulation,
                P's distances).

        Raises:
            InputError: mismatched layers, bad arrays or labels, unknown names.
            InsufficientDataError: too few training samples for the partition.
        """
        seed = check_seed(seed)
        params = dict(partitioner_params or {})
        dist, part = distance, partitioner
        distance, partitioner = dist.name, part.name
        if (T_cells is None) != (P_cells is None):
            raise InputError("pass both T_cells and P_cells, or neither")
        if T_cells is not None and partitioner != defaults.GIVEN_PARTITIONER:
            raise InputError(f"cell labels are used by the 'given' partitioner, not by "
                             f"{partitioner!r}: drop them or use partitioner='given'")
        if partitioner == defaults.GIVEN_PARTITIONER and T_cells is None:
            raise InputError("the 'given' partitioner needs T_cells and P_cells")
        approximate = _approximate_spec(search)  # also checks the spelling, before any work
        key, inputs = _key or baseline_key(
            T_layers, P_layers, layer_names, distance=distance, partitioner=partitioner,
            seed=seed, partitioner_params=params, T_cells=T_cells, P_cells=P_cells,
            search=search)
        n = len(layer_names)
        t_cells = _per_layer(T_cells, n, "T_cells") or [None] * n
        p_cells = _per_layer(P_cells, n, "P_cells") or [None] * n
        progress = _build_bars(bars, T_layers, P_layers) if bars is not None else None
        layers = []
        for i, name in enumerate(layer_names):
            layers.append(_build_layer(name, T_layers[i], P_layers[i], distance=dist,
                                       partitioner=part, seed=seed, params=params,
                                       device=device, T_lab=t_cells[i], P_lab=p_cells[i],
                                       search=search, chunk_rows=chunk_rows, shared=shared,
                                       index=i, progress=progress))
            if on_layer is not None:
                on_layer(i, name)
        meta = {
            "format": FORMAT, "fp_version": __version__, "id": key, "distance": distance,
            "partitioner": partitioner, "partitioner_params": params, "seed": int(seed),
            "inputs": inputs, "layers": [_layer_meta(lb) for lb in layers],
        }
        if approximate is not None:
            meta["search"] = approximate
        return cls(layers, meta, device, dist, search=search)

    def query(
        self,
        Q_layers: Sequence[np.ndarray],
        tau: float | None = None,
        details: bool = False,
        *,
        Q_cells: Any = None,
    ) -> list[CTResult]:
        """C_T of a generated set against this baseline, one result per layer.

        Args:
            Q_layers: per layer, (m, D_l) generated embeddings (same m for every layer).
            tau: cell threshold on Q's share; default 20/m.
            details: also return, per generated sample, its cell, its nearest-neighbour
                distance and the index in T of its nearest training sample.
            Q_cells: for the ``given`` partitioner: Q's cell labels (one array, or one per
                layer).

        Returns:
            One :class:`~forensics.stats.ct.CTResult` per layer, in layer order.
        """
        if len(Q_layers) != len(self.layers):
            raise InputError(f"the baseline has {len(self.layers)} layers "
                             f"({', '.join(self.layer_names)}) but {len(Q_layers)} Q arrays "
                             f"were given")
        q_cells = _per_layer(Q_cells, len(self.layers), "Q_cells") or [None] * len(self.layers)
        dist = self._distance()
        return [self._query_layer(lb, Q, tau, details, q_cells[i], dist)
                for i, (lb, Q) in enumerate(zip(self.layers, Q_layers, strict=True))]

    def _query_layer(self, lb: LayerBaseline, Q: Any, tau: float | None, details: bool,
                     q_lab: Any, dist: Any) -> CTResult:
        Q = _matrix(Q, f"layer {lb.name!r}: Q")
        m = Q.shape[0]
        check_m(m)
        tau = check_tau(tau, m)
        if Q.shape[1] != lb.dim:
            raise InputError(f"layer {lb.name!r}: Q has {Q.shape[1]} features but the "
                             f"baseline's T has {lb.dim}: use embeddings of the same layer")
        if lb.status == STATUS_CONSTANT:
            return constant_result(m, tau, lb.name)
        with _blas_threads_for(m * lb.dim * lb.t_points.shape[1]):
            Zq = lb.partition.transform(Q)
            if q_lab is None:
                q_lab = lb.partition.cells(Zq)
            else:
                q_lab = check_labels(q_lab, m, f"layer {lb.name!r}: Q_cells")
            dQ, nn_index = self._nn_in_cells(lb, Zq, q_lab, dist)
        result = ct_from_distances(dQ, q_lab, lb.p_dist, lb.p_cells, lb.t_counts, tau,
                                   layer=lb.name)
        if details:
            result.details = {"cells": q_lab, "distance": dQ, "nn_index": nn_index}
        return result

    def _nn_in_cells(self, lb: LayerBaseline, Zq: np.ndarray, q_lab: np.ndarray, dist: Any
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Each query row's distance to, and index in T of, its nearest T row in its cell."""
        from forensics.stats.neighbours import CellSearch

        key = (lb.name, dist.name)
        if key not in self._searches:  # once per layer, not once per cell and query
            self._searches[key] = CellSearch(dist, lb.t_points, lb.t_offsets,
                                             device=self.device, faiss=self.search,
                                             centroids=dict(lb.ivf_centroids))
        dQ, rows = self._searches[key].search(Zq, q_lab)
        nn_index = np.where(rows >= 0, lb.t_index[np.clip(rows, 0, None)], -1)
        return dQ, nn_index.astype(np.int64)


def ct_score(
    T: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    *,
    distance: Any,
    partitioner: Any,
    tau: float | None = None,
    seed: int = 0,
    T_cells: np.ndarray | None = None,
    P_cells: np.ndarray | None = None,
    Q_cells: np.ndarray | None = None,
    device: str = "cpu",
    search: str = "auto",
    **partitioner_params: Any,
) -> CTResult:
    """C_T of generated embeddings ``Q`` against training ``T`` and held-out ``P`` (one layer).

    Args:
        T: (n_T, D) training embeddings.
        P: (n, D) held-out embeddings from T's distribution.
        Q: (m, D) generated embeddings.
        distance: the distance plugin (``abscosine``, ``euclidean``, ...).
        partitioner: the partitioner plugin (``given`` with cell labels, else e.g.
            ``kmeans``).
        tau: cell threshold on Q's share; default 20/m.
        seed: seed of every random step (PCA solver, KMeans).
        T_cells: cell labels of T, P and Q for the ``given`` partitioner.
        P_cells: see ``T_cells``.
        Q_cells: see ``T_cells``.
        device: torch device of the nearest-neighbour search.
        search: ``auto``, ``always``, ``never`` or ``ivf[:...]`` (see :meth:`Baseline.build`).
        **partitioner_params: e.g. ``n_cells``, ``pca_dim``, ``n_init`` for ``kmeans``.

    Returns:
        The :class:`CTResult`; identical to ``Baseline.build([T], [P], ...).query([Q])[0]``.
    """
    has_cells = [x is not None for x in (T_cells, P_cells, Q_cells)]
    if any(has_cells) and not all(has_cells):
        raise InputError("pass all of T_cells, P_cells and Q_cells, or none of them")
    base = Baseline.build(
        [T], [P], ["layer"], distance=distance, partitioner=partitioner, seed=seed,
        partitioner_params=partitioner_params, device=device, search=search,
        T_cells=None if T_cells is None else [T_cells],
        P_cells=None if P_cells is None else [P_cells],
    )
    result = base.query([Q], tau=tau, Q_cells=None if Q_cells is None else [Q_cells])[0]
    result.layer = ""
    return result


def _layer_meta(lb: LayerBaseline) -> dict[str, Any]:
    out: dict[str, Any] = {"name": lb.name, "status": lb.status, "message": lb.message,
                           "dim": lb.dim}
    if lb.status == STATUS_OK:
        out["partition"] = dict(lb.partition.params)
        out["n_cells"] = int(lb.t_offsets.shape[0] - 1)
        out["n_T"] = int(lb.t_offsets[-1])
        out["n_P"] = int(lb.p_offsets[-1])
    return out
