"""Exact nearest neighbours within cells: one float32 product proposes, float64 decides.

A cell's reference rows are kept in float32. Each block of queries gets one float32
matrix product with them (BLAS, through numpy), and the candidates of a query are the
rows whose float32 score (similarity, or squared distance less ``|q|^2``) is within
twice the float32 rounding bound of its best: float32 rounding moves a similarity of
unit rows by at most ``eps = (D + 8) 2^-23`` and a squared distance by at most
``eps (|q| + R)^2`` (``R`` the largest row norm of the cell), so the exact nearest row is
always among them. Their distances are then recomputed in float64 with the distance
plugin's own preparation of the rows (``prepare_reference``: unit rows for the cosines)
and the plugin's final formula, and the nearest is taken (the lowest row index on ties,
as the plugin's exact search does). There is one product for ``abscosine`` too (its
absolute values), and a query has about one candidate, so the re-rank costs next to
nothing. A query with more than :data:`MAX_TIES` candidates (many rows as near as
rounding can tell, e.g. duplicates) and a cell of at most ``candidates`` rows are
searched exactly by the plugin itself, over the whole cell. The result is therefore the
exact nearest neighbour, and the same on every run. Euclidean distances are
bit-identical to the plugin's numpy path (the same final formula on the same row); a
cosine can differ from it in the last bits, because the plugin takes it from a matrix
product whose rounding depends on how many queries share the cell.

(This replaced FAISS's exhaustive ``IndexFlat`` search with ``k`` candidates and a
certificate on the ``k``-th: at the baseline's 64 dimensions its search was no faster
than the float32 product, ``abscosine`` needed two of them, for ``+q`` and ``-q``, and the
float64 re-rank of ``k`` candidates per query cost a tenth of a large build.)

**Approximate search, on request only** (``ivf``, for T far beyond what the exact search
affords): cells of at least ``min_rows`` rows get an inverted-file index
(``faiss.IndexIVFFlat``, ``nlist`` lists trained on the cell's rows with a fixed seed,
``nprobe`` of them searched); its ``candidates`` best are re-ranked in float64 as above,
but nothing bounds what it did not look at: a nearest row outside the probed lists is
missed, and the distance found is then larger than the exact one. Smaller cells are
searched exactly.
A baseline built this way records the search in its parameters and id, and its queries
use the same search, so P and Q are measured alike. ``benchmarks/bench_scale.py
--approximate`` measures its recall and its effect on C_T.

Distances this search (and FAISS's approximate one) can serve are those whose ``metric``
is one of :data:`METRICS`: ``cosine`` (``1 - cos``, inner product of unit rows),
``abscosine`` (``1 - |cos|``), ``euclidean`` and ``sqeuclidean`` (squared L2). Any other
distance is searched by the plugin alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forensics.plugin.protocols import prepares_reference

#: Distance ``metric`` values the candidate searches can serve.
METRICS = ("cosine", "abscosine", "euclidean", "sqeuclidean")
#: Candidates per query of the approximate search (per sign, for ``abscosine``); cells of
#: at most this many rows are searched by the plugin.
DEFAULT_CANDIDATES = 32
#: Most candidates of one query in the exact search before the plugin searches it.
MAX_TIES = 64
#: Float32 scores computed at once by the exact search (queries x cell rows): 64 MiB.
PRODUCT_ELEMENTS = 2**24
#: Queries re-ranked together (bounds the gathered candidate rows: block x k x D float64).
RERANK_BLOCK = 4096
#: Unit round-off of float32.
_U32 = 2.0**-24


def searchable(distance: Any) -> bool:
    """Whether the candidate searches can serve ``distance`` (its ``metric`` is known)."""
    return getattr(distance, "metric", None) in METRICS and prepares_reference(distance)


def _faiss():
    import faiss

    return faiss


def faiss_available() -> bool:
    """Whether ``faiss`` (the ``faiss-cpu`` package) can be imported."""
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


@dataclass
class _Cell:
    rows32: np.ndarray  # the prepared rows in float32; times -2 for the L2 metrics
    radius: float  # largest row norm (1 for the cosines)
    norms32: np.ndarray | None = None  # squared row norms in float32 (L2 metrics)
    index: Any = None  # the approximate search's FAISS index


#: ``faiss`` modes of :class:`CellSearch`: by size, always (where the metric allows), never.
MODES = ("auto", "always", "never")
#: The approximate mode: ``ivf`` or ``ivf:nlist=N,nprobe=P,min_rows=R`` (any of the three).
APPROXIMATE = "ivf"
#: Inverted lists searched per query by default.
IVF_NPROBE = 16
#: Cells of fewer rows than this are searched exactly even in ``ivf`` mode.
IVF_MIN_ROWS = 50_000
#: Seed of the inverted lists' training (FAISS k-means).
IVF_SEED = 0


@dataclass(frozen=True)
class IVF:
    """Parameters of the approximate search: ``nlist`` None is ``4 sqrt(rows)`` per cell
    (at most rows / 39, FAISS's least training rows per list)."""

    nlist: int | None = None
    nprobe: int = IVF_NPROBE
    min_rows: int = IVF_MIN_ROWS

    @property
    def spec(self) -> str:
        """The canonical spelling, recorded in a baseline's parameters."""
        return (f"{APPROXIMATE}:nlist={self.nlist or 'auto'},nprobe={self.nprobe},"
                f"min_rows={self.min_rows}")

    def lists(self, rows: int) -> int:
        """Inverted lists of a cell of ``rows`` rows."""
        n = self.nlist if self.nlist is not None else int(4 * np.sqrt(rows))
        return int(max(1, min(n, rows // 39)))


def parse_search(search: str) -> IVF | None:
    """The approximate search's parameters, or None for an exact mode (:data:`MODES`).

    Raises:
        InputError: neither an exact mode nor a well-formed ``ivf[:key=value,...]``.
    """
    from forensics.errors import InputError

    text = str(search).strip()
    if text in MODES:
        return None
    head, _, rest = text.partition(":")
    if head != APPROXIMATE:
        raise InputError(f"search must be one of {', '.join(MODES)} or {APPROXIMATE}"
                         f"[:nlist=N,nprobe=P,min_rows=R], got {search!r}")
    values: dict[str, int | None] = {}
    for part in filter(None, (x.strip() for x in rest.split(","))):
        key, _, value = part.partition("=")
        if key not in ("nlist", "nprobe", "min_rows") or key in values:
            raise InputError(f"search {search!r}: unknown or repeated key {key!r}; give "
                             f"nlist, nprobe and/or min_rows, e.g. ivf:nprobe=32")
        if key == "nlist" and value == "auto":
            values[key] = None
            continue
        if not value.isdigit() or int(value) < (0 if key == "min_rows" else 1):
            raise InputError(f"search {search!r}: {key} must be a whole number"
                             f"{'' if key == 'min_rows' else ' >= 1'}, got {value!r}")
        values[key] = int(value)
    return IVF(**values)  # type: ignore[arg-type]


def check_search(search: str, distance: Any) -> IVF | None:
    """:func:`parse_search`, and for the approximate search that FAISS is there and can
    search ``distance`` (cheap: callers check before any expensive work).

    Raises:
        InputError: a malformed spec, or an approximate one that cannot run.
    """
    from forensics.errors import InputError

    ivf = parse_search(search)
    if ivf is not None:
        if not searchable(distance):
            raise InputError(f"search={search!r}: the approximate search needs a distance "
                             f"FAISS can search ({', '.join(METRICS)}); "
                             f"{getattr(distance, 'name', distance)!r} is not")
        if not faiss_available():
            raise InputError(f"search={search!r} needs FAISS: pip install faiss-cpu")
    return ivf


#: In ``auto`` mode, a cell's search of fewer multiply-adds (queries x rows x features)
#: than this stays with the plugin's exact search (for the built-ins, its numpy path).
FAISS_MIN_WORK = 2**24


@dataclass
class CellSearch:
    """Nearest row, within its cell, of each query, over reference rows grouped by cell.

    The one per-cell search of a baseline, at build time (P) and query time (Q). A cell is
    searched by float32 candidates (see the module docstring) when ``faiss`` is
    ``always``, or ``auto`` and the search is large (:data:`FAISS_MIN_WORK`), on CPU, for
    a distance they can serve; otherwise by the distance plugin's own exact ``nn``. (The
    parameter keeps its name from when FAISS proposed the exact search's candidates; it
    now proposes those of the approximate ``ivf`` search only.)

    Args:
        distance: the distance plugin.
        points: (n, d) reference rows grouped by cell (a baseline's ``t_points``).
        offsets: (k+1,) rows of cell ``c`` are ``offsets[c]:offsets[c+1]``.
        candidates: the approximate search's candidates per query; cells of at most this
            many rows are searched by the plugin.
        device: torch device of the plugin's exact search.
        prepared: ``distance.prepare_reference(points)``, if the caller has it.
        faiss: ``auto``, ``always``, ``never`` or the approximate ``ivf[:...]``
            (:func:`parse_search`).
        prepared_exact: the plugin's exact search gets the prepared rows (``prepared=True``,
            as a baseline's queries always did) rather than the raw ones (its build did).
    """

    distance: Any
    points: np.ndarray
    offsets: np.ndarray
    candidates: int = DEFAULT_CANDIDATES
    device: str = "cpu"
    prepared: np.ndarray | None = None
    faiss: str = "auto"
    prepared_exact: bool = True
    #: Queries with too many candidates (:data:`MAX_TIES`), answered by the plugin's
    #: exact search; in the approximate search, queries with none.
    fallbacks: int = 0
    #: Queries answered by the approximate search (``ivf`` mode, large cells).
    approximate: int = 0
    #: ``ivf`` mode: the trained lists' centroids of cells, by cell (a stored baseline's);
    #: a cell found here is not trained again. Cells trained here are added.
    centroids: dict[int, np.ndarray] = field(default_factory=dict)
    _cells: dict[int, _Cell] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.ivf = check_search(self.faiss, self.distance)
        self._options: dict[str, Any] = {}
        if prepares_reference(self.distance):
            self._options = {"prepared": True}
        else:
            self.prepared, self.prepared_exact = self.points, True
        self.metric = getattr(self.distance, "metric", None)
        self._candidates_ok = (self.faiss != "never" and searchable(self.distance)
                          and str(self.device) == "cpu")
        if self.ivf is not None:
            self._candidates_ok = True  # the index is searched on CPU whatever the device

    def _ref(self) -> np.ndarray:
        """The prepared reference rows (prepared on first use)."""
        if self.prepared is None:
            self.prepared = self.distance.prepare_reference(self.points)
        return self.prepared

    def _approximate(self, n: int) -> bool:
        return self.ivf is not None and n >= self.ivf.min_rows and n > self.candidates

    def _uses_candidates(self, m: int, n: int) -> bool:
        if self._approximate(n):
            return True
        if not self._candidates_ok or n <= self.candidates:
            return False
        return self.faiss == "always" or m * n * self.points.shape[1] > FAISS_MIN_WORK

    def _cell(self, c: int) -> _Cell:
        if c not in self._cells:
            ref = self._ref()[self.offsets[c] : self.offsets[c + 1]]
            r32 = np.ascontiguousarray(ref, dtype=np.float32)
            inner = self.metric in ("cosine", "abscosine")
            radius = 1.0 if inner else float(np.sqrt((ref * ref).sum(axis=1).max()))
            cell = _Cell(r32, radius)
            if not inner:  # q.(-2 r) is -2 (q.r) exactly: one pass less per product
                cell.rows32, cell.norms32 = r32 * np.float32(-2), (r32 * r32).sum(axis=1)
            if self._approximate(r32.shape[0]):
                assert self.ivf is not None
                faiss = _faiss()
                flat = faiss.IndexFlatIP if inner else faiss.IndexFlatL2
                metric = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
                quantizer = flat(r32.shape[1])
                given = self.centroids.get(c)
                if given is not None:  # the lists trained at build time: no training
                    quantizer.add(np.ascontiguousarray(given, dtype=np.float32))
                    nlist = int(given.shape[0])
                    index = faiss.IndexIVFFlat(quantizer, r32.shape[1], nlist, metric)
                else:
                    nlist = self.ivf.lists(r32.shape[0])
                    index = faiss.IndexIVFFlat(quantizer, r32.shape[1], nlist, metric)
                    index.cp.seed = IVF_SEED
                    index.train(r32)
                    self.centroids[c] = quantizer.reconstruct_n(0, nlist)
                index.nprobe = min(self.ivf.nprobe, nlist)
                index.add(r32)
                cell.index = index
            self._cells[c] = cell
        return self._cells[c]

    def search(self, Z: np.ndarray, labels: np.ndarray,
               on_cell: Callable[[int], None] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Distance to, and row in ``points`` of, each query's nearest row of its cell.

        Args:
            Z: (m, d) queries, in the space of ``points``.
            labels: (m,) cell of each query.
            on_cell: called with the number of queries of each cell once it is searched.

        Returns:
            (m,) float64 distances (NaN for a query whose cell has no rows) and (m,) int64
            rows (-1 there).
        """
        m = Z.shape[0]
        dist = np.full(m, np.nan)
        rows_out = np.full(m, -1, dtype=np.int64)
        n_cells = self.offsets.shape[0] - 1
        for c in np.unique(labels):
            if c >= n_cells or self.offsets[c + 1] == self.offsets[c]:
                continue
            rows = np.flatnonzero(labels == c)
            d, i = self.search_cell(int(c), Z[rows])
            dist[rows], rows_out[rows] = d, i + self.offsets[c]
            if on_cell is not None:
                on_cell(rows.size)
        return dist, rows_out

    def search_cell(self, c: int, Zc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest row (index within cell ``c``) and its distance for each row of ``Zc``."""
        n = int(self.offsets[c + 1] - self.offsets[c])
        if not self._uses_candidates(Zc.shape[0], n):
            return self._exact(c, Zc)
        Zc = np.asarray(Zc, dtype=np.float64)
        dist = np.empty(Zc.shape[0])
        index = np.empty(Zc.shape[0], dtype=np.int64)
        approximate = self._approximate(n)
        for s in range(0, Zc.shape[0], RERANK_BLOCK):
            block = Zc[s : s + RERANK_BLOCK]
            if approximate:  # no bound: only queries with no candidate at all are redone
                d, i, ok = self._candidates(c, block)
                self.approximate += int(ok.sum())
            else:
                d, i, ok = self._product_candidates(c, block)
            if not ok.all():
                bad = np.flatnonzero(~ok)
                self.fallbacks += bad.size
                d[bad], i[bad] = self._exact(c, block[bad])
            dist[s : s + block.shape[0]], index[s : s + block.shape[0]] = d, i
        return dist, index

    def _exact(self, c: int, Zc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[c], self.offsets[c + 1]
        if self.prepared_exact:
            return self.distance.nn(Zc, self._ref()[lo:hi], device=self.device,
                                    return_index=True, **self._options)
        return self.distance.nn(Zc, self.points[lo:hi], device=self.device, return_index=True)

    def _product_candidates(self, c: int, Zq: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exact search of a block of queries: (distances, rows, answered).

        One float32 product per slice of queries; a query's candidates are the rows whose
        float32 score is within twice the rounding bound of its best (so the exact nearest
        row is among them), re-ranked in float64. A query with more than
        :data:`MAX_TIES` candidates is not answered here (``answered`` False).
        """
        cell = self._cell(c)
        q = self.distance.prepare_reference(Zq)
        q32 = np.ascontiguousarray(q, dtype=np.float32)
        n, dim = cell.rows32.shape
        eps = (dim + 8) * 2 * _U32
        inner = self.metric in ("cosine", "abscosine")
        if inner:
            slack = np.full(q.shape[0], 2 * eps)
        else:
            slack = 2 * eps * (np.sqrt((q * q).sum(axis=1)) + cell.radius) ** 2
        ref = self._ref()[self.offsets[c] : self.offsets[c + 1]]
        best = np.zeros(q.shape[0], dtype=np.int64)
        answered = np.ones(q.shape[0], dtype=bool)
        step = max(1, PRODUCT_ELEMENTS // n)
        for s in range(0, q.shape[0], step):
            score = q32[s : s + step] @ cell.rows32.T  # (b, n) float32
            if inner:  # similarities: the higher the nearer
                if self.metric == "abscosine":
                    np.abs(score, out=score)
                near = score >= (score.max(axis=1) - slack[s : s + step])[:, None]
            else:  # |r|^2 - 2 q.r, the squared distance less |q|^2: the lower the nearer
                score += cell.norms32
                near = score <= (score.min(axis=1) + slack[s : s + step])[:, None]
            count = near.sum(axis=1)
            few = (count >= 1) & (count <= MAX_TIES)  # none: NaN in the query
            answered[s : s + step] = few
            qi, rj = np.nonzero(near[few])  # rows ascending within each query
            if not qi.size:
                continue
            # One row of candidates per query, padded with its first (lowest) row.
            counts = count[few]
            starts = np.cumsum(counts) - counts
            cand = np.repeat(rj[starts][:, None], counts.max(), axis=1)
            cand[qi, np.arange(qi.size) - starts[qi]] = rj
            best[s + np.flatnonzero(few)] = self._rerank(q[s : s + step][few], ref, cand)
        return self._final(q, ref, best), best, answered

    def _candidates(self, c: int, Zq: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The approximate search of a block of queries: (distances, rows, answered)."""
        cell = self._cell(c)
        k = self.candidates
        q = self.distance.prepare_reference(Zq)
        q32 = np.ascontiguousarray(q, dtype=np.float32)
        if self.metric == "abscosine":
            _, i_pos = cell.index.search(q32, k)
            _, i_neg = cell.index.search(-q32, k)
            cand = np.concatenate([i_pos, i_neg], axis=1)
        else:
            _, cand = cell.index.search(q32, k)
        ref = self._ref()[self.offsets[c] : self.offsets[c + 1]]
        # Probed lists can hold fewer than k rows (FAISS pads with -1): pad with the
        # best candidate; a query with none at all is searched exactly.
        top = cand.max(axis=1)
        found = top >= 0
        first = np.where(found, top, 0)[:, None]
        cand = np.where(cand >= 0, cand, first)
        cand = np.sort(cand, axis=1)  # ties go to the lowest row, as in the exact search
        best = self._rerank(q, ref, cand)
        return self._final(q, ref, best), best, found

    def _rerank(self, q: np.ndarray, ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Row of each query's best candidate in float64 (``cand``: (b, k) rows; on ties
        the first in its row of ``cand``)."""
        rows = ref[cand]  # (b, k, d)
        if self.metric in ("cosine", "abscosine"):
            sim = (q[:, None, :] * rows).sum(axis=2)
            if self.metric == "abscosine":
                np.abs(sim, out=sim)
            j = sim.argmax(axis=1)
        else:
            diff = q[:, None, :] - rows
            sim = (diff * diff).sum(axis=2)
            j = sim.argmin(axis=1)
        return cand[np.arange(q.shape[0]), j].astype(np.int64)

    def _final(self, q: np.ndarray, ref: np.ndarray, best: np.ndarray) -> np.ndarray:
        """The plugin's distance of each query to its chosen row, in float64."""
        r = ref[best]
        if self.metric in ("cosine", "abscosine"):
            s = (q * r).sum(axis=1)
            return 1.0 - (np.abs(s) if self.metric == "abscosine" else s)
        diff = q - r
        sq = (diff * diff).sum(axis=1)
        return sq if self.metric == "sqeuclidean" else np.sqrt(sq)
