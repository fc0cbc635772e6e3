"""Built-in nearest-neighbour distances: ``euclidean``, ``sqeuclidean``, ``cosine``, ``abscosine``.

A distance plugin answers one question: for each row of ``query`` (m, D), how far is the
nearest row of ``ref`` (n, D)? The search is exact (every pair is compared) and runs with
torch on CPU or GPU, in float64, in blocks so that memory stays bounded whatever ``n`` is:

* ``ref`` is cut into chunks of at most ``chunk_bytes`` (``r_c = chunk_bytes // (8 D)`` rows),
* ``query`` into chunks whose block of distances (q_c x r_c) and rows (q_c x D) each fit in
  ``chunk_bytes``,

so the working memory beyond the inputs and the (m,) outputs is at most about
``5 * chunk_bytes`` (a reference chunk, a query chunk, their normalised or squared copies and
the block), 160 MiB with the default of 32 MiB, on the device the search runs on. Inputs are
converted to float64 one chunk at a time, so float32 inputs are never copied whole.

* ``euclidean``: ``||x - t||``, the distance of Meehan et al.'s reference code. The nearest
  row is found with the matrix-product expansion ``||t||^2 - 2 x.t``; its distance is then
  recomputed directly from ``x - t``, so an exact copy is at distance exactly 0.
* ``sqeuclidean``: ``||x - t||^2``, the distance written in He et al.'s paper.
* ``cosine``: ``1 - cos(x, t)``.
* ``abscosine``: ``1 - |cos(x, t)|``, what He et al.'s research code ran.

For the cosine distances a zero vector has cosine 0 with everything (distance 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forensics.plugin.hookspecs import hookimpl
from forensics.threads import torch_threads_for as _cpu_threads

#: Default working-memory budget of one block of the search, in bytes.
DEFAULT_CHUNK_BYTES = 32 * 2**20

#: Searches this small (m * n * D multiply-adds, on CPU) run in plain numpy: the same
#: float64 arithmetic without torch's per-call overhead, which dominates a per-cell search
#: of a few dozen queries (the cached baseline's query path).
NUMPY_WORK = 2**24


def _as_matrix(x: np.ndarray, what: str) -> np.ndarray:
    """Check a 2-D real array; rows are converted to float64 chunk by chunk, not here."""
    from forensics.errors import InputError

    arr = np.asarray(x)
    if arr.ndim != 2:
        raise InputError(f"{what} must be a 2-D array (samples, features), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    return arr


def _device(device: str):
    import torch

    from forensics.errors import InputError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown torch device {device!r} ({exc}); use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} is not available on this machine: use 'cpu'")
    return dev


def chunk_rows(m: int, n: int, dim: int, chunk_bytes: int) -> tuple[int, int]:
    """Rows per query chunk and per reference chunk for a block search within ``chunk_bytes``.

    Args:
        m: number of query rows.
        n: number of reference rows.
        dim: number of features.
        chunk_bytes: budget for each of the reference chunk, the query chunk and the block.

    Returns:
        ``(q_c, r_c)``: at least 1 each, at most ``m`` and ``n``.
    """
    budget = max(int(chunk_bytes) // 8, 1)
    r_c = max(1, min(n, budget // max(dim, 1)))
    q_c = max(1, min(m, budget // max(r_c, dim, 1)))
    return q_c, r_c


@dataclass(frozen=True)
class NNDistance:
    """Exact nearest-neighbour distance computed in float64 blocks with torch."""

    name: str
    metric: str
    description: str

    def nn(
        self,
        query: np.ndarray,
        ref: np.ndarray,
        *,
        device: str = "cpu",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        return_index: bool = False,
        prepared: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Distance from each row of ``query`` to its nearest row of ``ref``.

        Args:
            query: (m, D) array.
            ref: (n, D) array, n >= 1.
            device: torch device the search runs on (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
            chunk_bytes: memory budget of one block (see the module docstring).
            return_index: also return the index in ``ref`` of each nearest row.
            prepared: ``ref`` already went through :meth:`prepare_reference` (a caller that
                searches one reference set many times prepares it once).

        Returns:
            (m,) float64 distances, and with ``return_index`` also (m,) int64 indices (the
            first one on ties).

        Raises:
            InputError: wrong shapes, mismatched feature counts or an empty ``ref``.
        """
        from forensics.errors import InputError

        q = _as_matrix(query, "query")
        r = _as_matrix(ref, "reference set")
        if q.shape[1] != r.shape[1]:
            raise InputError(
                f"query has {q.shape[1]} features but the reference set has {r.shape[1]}: "
                f"both must come from the same layer"
            )
        m, n = q.shape[0], r.shape[0]
        if n == 0 and m > 0:
            raise InputError("the reference set is empty: there is no nearest neighbour")
        dist = np.empty(m, dtype=np.float64)
        index = np.zeros(m, dtype=np.int64)
        if str(device) == "cpu" and m * n * q.shape[1] <= NUMPY_WORK and m > 0:
            # without importing torch: a cached suspect's query needs nothing else
            dist, index = self._search_numpy(q, r, prepared)
            return (dist, index) if return_index else dist
        import torch

        dev = _device(device)
        if dev.type == "cpu" and m * n * q.shape[1] <= NUMPY_WORK and m > 0:
            dist, index = self._search_numpy(q, r, prepared)
            return (dist, index) if return_index else dist
        q_c, r_c = chunk_rows(m, n, q.shape[1], chunk_bytes)
        with torch.no_grad(), _cpu_threads(dev, m * n * q.shape[1]):
            for qs in range(0, m, q_c):
                qb = _to_device(q[qs : qs + q_c], dev)
                best, arg = self._search(qb, r, r_c, dev)
                dist[qs : qs + q_c], index[qs : qs + q_c] = self._finish(qb, r, best, arg, dev)
        return (dist, index) if return_index else dist

    def prepare_reference(self, ref: np.ndarray) -> np.ndarray:
        """``ref`` as the small-search path uses it: float64, unit rows for the cosines.

        Searching ``nn(q, prepare_reference(ref), prepared=True)`` gives bit-identical
        results to ``nn(q, ref)`` on that path, without redoing this work per call.
        """
        r = np.asarray(ref, dtype=np.float64)
        return _unit_rows(r) if self.metric in ("cosine", "abscosine") else r

    def _search_numpy(
        self, query: np.ndarray, ref: np.ndarray, prepared: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The whole (small) search at once, in float64 numpy; same rules as the blocks."""
        q = np.asarray(query, dtype=np.float64)
        r = ref if prepared else self.prepare_reference(ref)
        if self.metric in ("cosine", "abscosine"):
            sim = _unit_rows(q) @ r.T
            if self.metric == "abscosine":
                np.abs(sim, out=sim)
            idx = sim.argmax(axis=1)
            return 1.0 - sim[np.arange(q.shape[0]), idx], idx.astype(np.int64)
        block = (r * r).sum(axis=1)[None, :] - 2.0 * (q @ r.T)
        idx = block.argmin(axis=1)
        diff = q - r[idx]
        sq = (diff * diff).sum(axis=1)
        return (sq if self.metric == "sqeuclidean" else np.sqrt(sq)), idx.astype(np.int64)

    def _prepare(self, x):
        """What one side of the block product needs: unit rows, or squared norms."""
        if self.metric in ("cosine", "abscosine"):
            norms = x.norm(dim=1, keepdim=True)
            return x / norms.masked_fill(norms == 0, 1.0)
        return (x * x).sum(dim=1)

    def _search(self, qb, r: np.ndarray, r_c: int, dev):
        import torch

        m_c = qb.shape[0]
        best = torch.full((m_c,), float("inf"), dtype=torch.float64, device=dev)
        arg = torch.zeros(m_c, dtype=torch.int64, device=dev)
        q_unit = self._prepare(qb) if self.metric in ("cosine", "abscosine") else None
        for rs in range(0, r.shape[0], r_c):
            rb = _to_device(r[rs : rs + r_c], dev)
            if q_unit is not None:
                sim = q_unit @ self._prepare(rb).T
                if self.metric == "abscosine":
                    sim.abs_()
                # 1 - s is monotone, so the largest similarity gives the smallest distance.
                vals, idx = sim.max(dim=1)
                vals = 1.0 - vals
            else:
                # ||t||^2 - 2 x.t ranks references as ||x - t||^2 does for a fixed x.
                block = torch.addmm(self._prepare(rb).unsqueeze(0), qb, rb.T, alpha=-2.0)
                vals, idx = block.min(dim=1)
            better = vals < best
            best = torch.where(better, vals, best)
            arg = torch.where(better, idx + rs, arg)
        return best, arg

    def _finish(self, qb, r: np.ndarray, best, arg, dev) -> tuple[np.ndarray, np.ndarray]:
        idx = arg.cpu().numpy()
        if self.metric in ("cosine", "abscosine"):
            return best.cpu().numpy(), idx
        diff = qb - _to_device(r[idx], dev)
        sq = (diff * diff).sum(dim=1)
        out = sq if self.metric == "sqeuclidean" else sq.sqrt()
        return out.cpu().numpy(), idx


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero (cosine 0 with everything)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return x / norms


def _to_device(a: np.ndarray, dev):
    """A chunk of rows as a float64 tensor on ``dev`` (a copy only where needed)."""
    import torch

    a = np.ascontiguousarray(a, dtype=np.float64)
    if not a.flags.writeable:  # torch.from_numpy wants writable memory
        a = a.copy()
    return torch.from_numpy(a).to(dev)


DISTANCES = (
    NNDistance("euclidean", "euclidean", "||x - t|| (Meehan et al.'s reference code)"),
    NNDistance("sqeuclidean", "sqeuclidean", "||x - t||^2 (the distance in He et al.'s paper)"),
    NNDistance("cosine", "cosine", "1 - cos(x, t)"),
    NNDistance("abscosine", "abscosine", "1 - |cos(x, t)| (what He et al.'s code ran)"),
)


@hookimpl(trylast=True)
def register_distances(register):
    for distance in DISTANCES:
        register(distance)
