"""Could these images have come from this enrolled model? A calibrated two-sample test.

Attribution by nearest fingerprint always names someone; this module asks the question an
investigator can defend instead: *are the suspect images consistent with the images an
enrolled model made?* It is a set-level two-sample test on per-image features:

- **features**: a fingerprint's per-image vectors (``per_image``), stored whole with every
  enrolled curve in float16 precision (:func:`pack_rows`), and projected to ``dim`` entries
  by a fixed seeded Gaussian projection (:func:`projection`) when tested;
- **statistic**: the squared maximum mean discrepancy (unbiased, Gretton et al. 2012) between
  the suspect rows and the model's rows, with a Gaussian (RBF) kernel on features
  standardised by the model's own spread, its bandwidth the median distance between the
  model's rows (``kind="mmd"``); or the energy distance (Szekely and Rizzo), which needs no
  bandwidth (``kind="energy"``);
- **null, calibrated on the model's own curves at the suspect's size**: a model enrolled as
  several curves (checkpoints, windows, batches) gives genuine "new" sets for free: ``n``
  images drawn from one curve, tested against the model's *other* curves
  (leave-one-curve-out), ``draws`` times, seeded. The p-value of the suspect is the share of
  those genuine sets at least as far from the model as the suspect (plus one, Phipson and
  Smyth 2010). So another curve of the same model passes at level ``alpha`` about a
  ``1 - alpha`` share of the time by construction, at every size, and the spread between
  checkpoints of one model counts as "same model", not as evidence against it.

Suspects larger than :data:`MAX_TEST` images are tested on a seeded subset of that size
(the test's power is already near 1 there and its cost grows with the square of the size).

Everything is a pure function of arrays; every random step is seeded.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from forensics.errors import InputError

#: Entries kept per image by the projection.
DIM = 32
#: Seed of the projection (fixed: the stored rows of every bank use it).
PROJECTION_SEED = 20240529
#: Genuine sets drawn per model for the null.
DRAWS = 200
#: Most suspect images a test uses (a seeded subset beyond it).
MAX_TEST = 256
#: Statistics :func:`test` knows.
KINDS = ("mmd", "energy")
#: Key suffix of the stored per-image rows beside a fingerprint's vector.
ROWS_SUFFIX = "#rows"


def rows_key(fingerprint: str) -> str:
    """The ``fingerprints`` key of a curve's projected per-image rows."""
    return fingerprint + ROWS_SUFFIX


def projection(n_entries: int, dim: int = DIM, seed: int = PROJECTION_SEED) -> np.ndarray:
    """The fixed ``(n_entries, dim)`` Gaussian projection (Johnson-Lindenstrauss), scaled so
    that it keeps squared lengths on average."""
    if n_entries < 1 or dim < 1:
        raise InputError(f"a projection needs at least one entry and one output, got "
                         f"{n_entries} x {dim}")
    rng = np.random.default_rng([int(seed), int(n_entries), int(dim)])
    return rng.standard_normal((int(n_entries), int(dim))) / np.sqrt(dim)


def project(rows: np.ndarray, dim: int = DIM, seed: int = PROJECTION_SEED) -> np.ndarray:
    """Per-image rows ``(m, K)`` projected to ``(m, dim)`` (NaN counts as 0)."""
    X = np.nan_to_num(np.asarray(rows, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if X.ndim != 2:
        raise InputError(f"per-image rows must be a 2-d array (images x entries), got {X.shape}")
    return X @ projection(X.shape[1], dim, seed)


#: Prefix of packed rows: float16, little-endian, base64 (:func:`pack_rows`).
PACKED = "float16le-base64:"


def pack_rows(rows: np.ndarray) -> str:
    """Per-image rows as the bank stores them: every entry in float16 precision, the
    little-endian bytes in base64 behind :data:`PACKED` (one string: 2.7 bytes per value,
    against about 7 for decimals in JSON). Rows are stored whole, so that the per-image
    attributor reads every entry; the belonging test projects them (:func:`project`)."""
    a = np.ascontiguousarray(np.asarray(rows, dtype="<f2"))
    return PACKED + base64.b64encode(a.tobytes()).decode("ascii")


def packed_values(values: str | Sequence[float]) -> np.ndarray:
    """The flat float16 values of :func:`pack_rows` (or of a list of decimals, as banks
    before wide rows stored their 32 projected entries).

    Raises:
        InputError: a string that is not packed rows.
    """
    if isinstance(values, str):
        if not values.startswith(PACKED):
            raise InputError(f"stored per-image rows must start with {PACKED!r}; run fp bank "
                             f"verify")
        try:
            raw = base64.b64decode(values[len(PACKED):].encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise InputError("stored per-image rows are not valid base64; run fp bank "
                             "verify") from None
        if len(raw) % 2:
            raise InputError("stored per-image rows have an odd number of bytes; run fp bank "
                             "verify")
        return np.frombuffer(raw, dtype="<f2").astype(np.float16)
    return np.asarray(values, dtype=np.float16).ravel()


def unpack_rows(values: str | Sequence[float], n_images: int) -> np.ndarray:
    """The ``(n_images, width)`` rows of :func:`pack_rows` (exactly their float16 values).

    Raises:
        InputError: the length is no multiple of ``n_images``.
    """
    a = packed_values(values).astype(np.float64)
    if n_images < 1 or a.size % int(n_images) or a.size == 0:
        raise InputError(f"{a.size} stored values do not make rows of {n_images} images")
    return a.reshape(int(n_images), -1)


@dataclass(frozen=True)
class Belonging:
    """The test of one enrolled model against the suspect images.

    Attributes:
        model: the enrolled model.
        family: its family.
        p_value: share of genuine sets of the suspect's size at least as far (plus one).
        consistent: ``p_value >= alpha``.
        statistic: the suspect's distance to the model's images.
        null_median: median distance of the genuine sets.
        n_images: suspect images used by the test.
        n_curves: enrolled curves of the model.
        draws: genuine sets behind the p-value (0: the model has one curve, untestable).
        kind: ``mmd`` or ``energy`` (``probe``: :meth:`forensics.stats.probe.ProbeBank.tests`).
    """

    model: str
    family: str
    p_value: float | None
    consistent: bool
    statistic: float
    null_median: float | None
    n_images: int
    n_curves: int
    draws: int
    kind: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class ModelRows:
    """One enrolled model's projected rows, standardised by their own spread.

    Args:
        curves: the rows of each of its curves, ``[(m_i, dim), ...]``.
        bandwidth2: the kernel's squared bandwidth computed before for these rows (None:
            computed: the median squared distance between distinct rows).
        gram_means: ``{kind: mean kernel between distinct rows}`` computed before.
    """

    def __init__(self, curves: Sequence[np.ndarray], bandwidth2: float | None = None,
                 gram_means: dict[str, float] | None = None):
        if not curves:
            raise InputError("a model needs at least one curve of rows")
        arrs = [np.asarray(c, dtype=np.float64) for c in curves]
        if len({a.shape[1] for a in arrs}) != 1 or any(a.ndim != 2 or len(a) < 2 for a in arrs):
            raise InputError("every curve needs at least 2 rows of the same width")
        allx = np.concatenate(arrs)
        self.raw = arrs
        self.center = allx.mean(axis=0)
        sd = allx.std(axis=0)
        self.scale = np.where(sd > 1e-12, sd, 1.0)
        self.curves = [(a - self.center) / self.scale for a in arrs]
        self.all = np.concatenate(self.curves)
        self.curve_of = np.concatenate([np.full(len(a), i) for i, a in enumerate(arrs)])
        if bandwidth2 is None:
            d = _sqdist(self.all, self.all)
            off = d[~np.eye(len(d), dtype=bool)]
            bandwidth2 = float(max(np.median(off), 1e-12))
        self.bandwidth2 = float(bandwidth2)
        self._grams: dict[str, np.ndarray] = {}
        self._means: dict[str, float] = dict(gram_means or {})

    def gram_mean(self, kind: str) -> float:
        """The mean kernel between distinct rows of the model (computed once per kind)."""
        if kind not in self._means:
            self._means[kind] = _mean_offdiag(self.gram(kind))
        return self._means[kind]

    def gram(self, kind: str) -> np.ndarray:
        """The kernel between all of the model's rows (computed once per kind)."""
        if kind not in self._grams:
            self._grams[kind] = _gram(kind, self.all, self.all, self.bandwidth2)
        return self._grams[kind]

    def standardise(self, rows: np.ndarray) -> np.ndarray:
        """Suspect rows in the model's coordinates."""
        return (np.asarray(rows, dtype=np.float64) - self.center) / self.scale


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _gram(kind: str, a: np.ndarray, b: np.ndarray, bw2: float) -> np.ndarray:
    d2 = _sqdist(a, b)
    if kind == "mmd":
        return np.exp(-d2 / bw2)
    return -np.sqrt(d2)  # energy distance: the kernel -|x - y| (a negative-type metric)


def _mean_offdiag(K: np.ndarray, same: np.ndarray | None = None) -> float:
    """Mean of ``K`` over pairs of distinct images (``same``: which pairs are one image)."""
    mask = ~np.eye(len(K), dtype=bool) if same is None else ~same
    return float(K[mask].mean()) if mask.any() else 0.0


def _statistic(Kxx: np.ndarray, Kyy_mean: float, Kxy: np.ndarray,
               src: np.ndarray | None = None) -> float:
    same = None if src is None else src[:, None] == src[None, :]
    return _mean_offdiag(Kxx, same) + Kyy_mean - 2.0 * float(Kxy.mean())


def statistic(model: ModelRows, suspect: np.ndarray, kind: str = "mmd") -> float:
    """The suspect's distance to all of the model's rows (squared MMD, or energy distance)."""
    _check_kind(kind)
    x = model.standardise(suspect)
    return _statistic(_gram(kind, x, x, model.bandwidth2), model.gram_mean(kind),
                      _gram(kind, x, model.all, model.bandwidth2))


def null(model: ModelRows, n: int, *, kind: str = "mmd", draws: int = DRAWS,
         seed: int = 0) -> np.ndarray:
    """Distances of genuine sets of ``n`` images: drawn from one curve, measured against
    the model's other curves (leave-one-curve-out), ``draws`` of them, seeded.

    A curve with fewer than ``2 n`` images is drawn from with replacement (the bootstrap:
    without it, ``n`` of ``n`` images would be the same set every time and the null a few
    values), and pairs of one image with itself are left out of the within-set mean. Empty
    for a one-curve model.
    """
    _check_kind(kind)
    k = len(model.curves)
    if k < 2 or draws < 1:
        return np.zeros(0)
    n = int(min(max(int(n), 2), MAX_TEST))
    K = model.gram(kind)
    rng = np.random.default_rng([int(seed), n])
    out = np.empty(int(draws))
    ref_mean, ref_rows = {}, {}
    for i in range(k):
        r = np.flatnonzero(model.curve_of != i)
        ref_rows[i] = r
        ref_mean[i] = _mean_offdiag(K[np.ix_(r, r)])
    for b in range(int(draws)):
        i = b % k
        own = np.flatnonzero(model.curve_of == i)
        boot = 2 * n > len(own)
        idx = rng.choice(own, size=n, replace=boot)
        r = ref_rows[i]
        out[b] = _statistic(K[np.ix_(idx, idx)], ref_mean[i], K[np.ix_(idx, r)],
                            src=idx if boot else None)
    return out


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"unknown belonging statistic {kind!r}; choose one of {', '.join(KINDS)}")


def subset(n_images: int, seed: int = 0) -> np.ndarray:
    """The suspect images a test uses: all, or a seeded :data:`MAX_TEST` of them."""
    if n_images <= MAX_TEST:
        return np.arange(n_images)
    return np.sort(np.random.default_rng(int(seed)).choice(n_images, MAX_TEST, replace=False))


def test(model: ModelRows, suspect: np.ndarray, *, name: str, family: str,
         alpha: float = 0.05, kind: str = "mmd", draws: int = DRAWS, seed: int = 0,
         null_values: np.ndarray | None = None) -> Belonging:
    """Test whether the suspect rows ``(n, dim)`` could be a new set of ``model``.

    Args:
        model: the enrolled model's rows.
        suspect: the suspect's projected rows.
        name, family: the model's name and family, for the answer.
        alpha: level: consistent when ``p >= alpha``.
        kind: ``mmd`` or ``energy``.
        draws: genuine sets in the null.
        seed: seed of the subset and the null.
        null_values: a null computed before for this model, size and seed (reused as is).

    Raises:
        InputError: bad ``alpha``, ``kind`` or shapes.
    """
    if not 0.0 < alpha < 1.0:
        raise InputError(f"the belonging level must be within (0, 1), got {alpha}")
    s = np.asarray(suspect, dtype=np.float64)
    if s.ndim != 2 or len(s) < 2 or s.shape[1] != model.all.shape[1]:
        raise InputError(f"suspect rows {s.shape} do not fit the model's rows "
                         f"{model.all.shape}; need at least 2 images of the same width")
    s = s[subset(len(s), seed)]
    stat = statistic(model, s, kind)
    nv = null(model, len(s), kind=kind, draws=draws, seed=seed) if null_values is None \
        else np.asarray(null_values, dtype=np.float64)
    if nv.size == 0:
        return Belonging(name, family, None, False, stat, None, len(s), len(model.curves), 0,
                         kind)
    p = float((1 + np.sum(nv >= stat)) / (1 + nv.size))
    return Belonging(name, family, p, p >= alpha, stat, float(np.median(nv)), len(s),
                     len(model.curves), int(nv.size), kind)
