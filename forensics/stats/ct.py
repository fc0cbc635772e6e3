"""The C_T statistic: Z_U per cell and their weighted average (the statistic, nothing else).

Given nearest-neighbour distances to the training set T of a held-out sample P (n) and a
generated sample Q (m), and the cell of each sample:

* in each cell, ``U`` is the one-sided Mann-Whitney statistic of Q against P: the number
  of (q, p) pairs with ``d(q) > d(p)``, ties counting 1/2 (``scipy.stats.mannwhitneyu(dQ, dP,
  alternative='less')``);
* ``Z_U = (U - (n*m/2 - 0.5)) / sqrt(n*m*(n + m + 1) / 12)`` with the cell's n and m, no tie
  correction;
* C_T is the average of the Z_U of the cells whose share of Q is strictly above ``tau``
  (default ``20 / m``), weighted by each cell's share of P.

C_T << 0: Q lies closer to T than fresh samples do (copying); C_T >> 0: Q lies farther
(underfitting). This reproduces the reference codes of Meehan et al. (2020) and He et al.
(2024) to floating-point rounding, and gives a result instead of crashing where they crash:

* a cell with no T or no P sample has no Z_U (``z`` is NaN) and is left out of C_T; it
  carries no P weight, or its P weight is spread over the other cells;
* no cell passing tau: ``status == "no_cells"``, ``ct`` is NaN, and the message says how
  many generated samples one cell needs;
* constant embeddings (every training sample identical, e.g. a ViT layer whose CLS token
  does not depend on the input): ``status == "constant"``, ``ct`` is NaN;
* fewer than 2 generated samples: :class:`~forensics.errors.InsufficientDataError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forensics import defaults
from forensics.errors import InputError, InsufficientDataError

STATUS_OK = "ok"
STATUS_NO_CELLS = "no_cells"
STATUS_CONSTANT = "constant"


def default_tau(m: int) -> float:
    """The paper's threshold: a cell needs more than 20 of the m generated samples."""
    return defaults.TAU_MIN_COUNT / m


def zu(dq: np.ndarray, dp: np.ndarray) -> float:
    """Z-scored one-sided Mann-Whitney U of ``dq`` (generated) against ``dp`` (held-out).

    Args:
        dq: (m,) distances of the generated samples, m >= 1.
        dp: (n,) distances of the held-out samples, n >= 1.

    Returns:
        ``(U - (n*m/2 - 0.5)) / sqrt(n*m*(n+m+1)/12)`` where U counts pairs with
        ``dq > dp`` (ties 1/2), exactly as Meehan et al.'s ``Zu``.
    """
    dq = np.asarray(dq, dtype=np.float64).ravel()
    sp = np.sort(np.asarray(dp, dtype=np.float64).ravel())
    m, n = dq.shape[0], sp.shape[0]
    if m == 0 or n == 0:
        raise InsufficientDataError(f"Z_U needs samples on both sides, got m={m}, n={n}")
    below = np.searchsorted(sp, dq, side="left")
    upto = np.searchsorted(sp, dq, side="right")
    u = float(below.sum()) + 0.5 * float((upto - below).sum())
    mean = (n * m / 2) - 0.5
    std = np.sqrt(n * m * (n + m + 1) / 12)
    return float((u - mean) / std)


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class CellStat:
    """One cell: how many T, P and Q samples it holds, its Z_U and whether C_T uses it."""

    cell: int
    n_T: int
    n_P: int
    n_Q: int
    z: float
    kept: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; a missing Z_U is ``None``."""
        return {"cell": self.cell, "n_T": self.n_T, "n_P": self.n_P, "n_Q": self.n_Q,
                "z": _finite_or_none(self.z), "kept": self.kept}


@dataclass
class CTResult:
    """C_T of one layer, its cells, and why it is NaN when it is.

    Attributes:
        ct: the statistic (NaN unless ``status == "ok"``).
        cells: one :class:`CellStat` per cell.
        tau: the threshold used.
        m: number of generated samples.
        status: ``"ok"``, ``"no_cells"`` or ``"constant"``.
        message: what happened, in words, when something needs saying.
        layer: name of the layer, when known.
        details: per generated sample, when asked for: ``cells`` (m,) labels,
            ``distance`` (m,) nearest-neighbour distances, ``nn_index`` (m,) index in T of
            the nearest training sample (-1 where the cell has no T sample).
    """

    ct: float
    cells: list[CellStat]
    tau: float
    m: int
    status: str = STATUS_OK
    message: str = ""
    layer: str = ""
    details: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN becomes ``None``; details become lists)."""
        out: dict[str, Any] = {
            "layer": self.layer, "ct": _finite_or_none(self.ct), "status": self.status,
            "message": self.message, "tau": self.tau, "m": self.m,
            "cells": [c.to_dict() for c in self.cells],
        }
        if self.details is not None:
            out["details"] = {
                k: [_finite_or_none(x) for x in v.tolist()] if v.dtype.kind == "f" else v.tolist()
                for k, v in self.details.items()
            }
        return out


#: Seeds are what NumPy's and scikit-learn's generators accept: 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1


def check_seed(seed: int, what: str = "--seed") -> int:
    """Return ``seed`` as an int if it is a whole number in ``0 .. SEED_MAX``.

    Raises:
        InputError: anything else (negative, too large, not a whole number).
    """
    try:
        value = int(seed)
        whole = value == seed
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or isinstance(seed, bool) or not 0 <= value <= SEED_MAX:
        raise InputError(f"{what} {seed!r}: give a whole number from 0 to {SEED_MAX}")
    return value


def check_n_boot(n_boot: Any) -> int:
    """``n_boot`` as an int from 0 to :data:`forensics.defaults.MAX_N_BOOT`.

    Raises:
        InputError: not a whole number in that range (1e11 resamples asked for 1.5 TiB).
    """
    try:
        value = int(n_boot)
    except (TypeError, ValueError, OverflowError):
        value = -1
    if value != n_boot or not 0 <= value <= defaults.MAX_N_BOOT:
        raise InputError(f"--n-boot {n_boot!r}: give a number of resamples from 0 to "
                         f"{defaults.MAX_N_BOOT}")
    return value


def check_tau(tau: float | None, m: int) -> float:
    """Resolve and validate tau: ``None`` gives ``20 / m``; otherwise a share from 0 to 1.

    tau is a share of the generated samples; at 1 no cell can pass it, and above 1 it means
    nothing (``1e308`` overflowed ``tau * m``), except as the default ``20 / m`` of fewer
    than 20 samples.
    """
    if tau is None:
        return default_tau(m)
    try:
        tau = float(tau)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"tau must be a share of the generated samples (from 0 to 1), "
                         f"got {tau!r}") from None
    # above 1 no cell can pass; only the default 20/m of a set under 20 images goes there
    if not (math.isfinite(tau) and 0.0 <= tau <= max(1.0, default_tau(max(int(m), 1)))):
        raise InputError(f"tau must be a share of the generated samples (from 0 to 1), "
                         f"got {tau:g}")
    return tau


def check_m(m: int) -> None:
    """Fail clearly when there are too few generated samples for any statistic."""
    if m < 2:
        raise InsufficientDataError(
            f"C_T compares two samples' distances: it needs at least 2 generated samples "
            f"(and more than 20 in one cell with the default tau), got {m}"
        )


def needed_count(tau: float, m: int) -> int:
    """Smallest number of generated samples a cell must hold to pass ``share > tau``."""
    c = int(math.floor(tau * m)) + 1
    while c > 1 and (c - 1) / m > tau:
        c -= 1
    while c / m <= tau:
        c += 1
    return c


def constant_message(layer: str = "") -> str:
    """Why C_T is undefined on a layer whose training embeddings are all identical."""
    return (f"layer {layer!r}: " if layer else "") + (
        "every training sample has the same embedding (the layer does not depend on the "
        "input, e.g. a ViT CLS token before the first block), so there are no cells and "
        "C_T is undefined here")


def constant_result(m: int, tau: float, layer: str = "") -> CTResult:
    """The result for a layer whose training embeddings are all identical."""
    return CTResult(float("nan"), [], tau, m, STATUS_CONSTANT, constant_message(layer), layer)


def is_constant(X: np.ndarray, rtol: float = 1e-6, rows: int = 4096) -> bool:
    """Whether every row of ``X`` equals the first up to ``rtol`` of its largest magnitude.

    Reads ``X`` in blocks of ``rows`` and stops at the first block that differs, so a
    varying layer costs one block.
    """
    if not (hasattr(X, "shape") and hasattr(X, "dtype")):
        X = np.asarray(X)  # a store's rows stay as they are: read by blocks below
    if X.shape[0] <= 1:
        return True
    first = np.asarray(X[0]).astype(np.float64)
    tol = rtol * float(np.max(np.abs(first))) if first.size else 0.0
    for s in range(1, X.shape[0], rows):
        if float(np.max(np.abs(X[s : s + rows] - first))) > tol:
            return False
    return True


def check_labels(cells: np.ndarray, n: int, what: str) -> np.ndarray:
    """Validate cell labels: (n,) integers from 0 to ``MAX_CELL_LABEL``, returned as int64.

    Raises:
        InputError: wrong length, non-integer, negative or too large labels (the message
            names ``what``).
    """
    arr = np.asarray(cells)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InputError(f"{what} must hold one cell label per sample ({n}), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise InputError(f"{what} must hold integer cell labels")
    if arr.size and arr.min() < 0:
        raise InputError(f"{what} must hold cell labels >= 0, found {arr.min()}")
    if arr.size and arr.max() > defaults.MAX_CELL_LABEL:
        raise InputError(f"{what} must hold cell labels from 0 to {defaults.MAX_CELL_LABEL}, "
                         f"found {arr.max():g}; number the cells 0, 1, 2, ... (e.g. with "
                         f"numpy.unique(labels, return_inverse=True))")
    return arr.astype(np.int64)


def ct_from_distances(
    dQ: np.ndarray,
    Q_cells: np.ndarray,
    dP: np.ndarray,
    P_cells: np.ndarray,
    T_counts: np.ndarray,
    tau: float | None = None,
    *,
    layer: str = "",
) -> CTResult:
    """C_T from nearest-neighbour distances and cell labels.

    Args:
        dQ: (m,) distance of each generated sample to the T samples of its cell.
        Q_cells: (m,) cell of each generated sample.
        dP: (n,) distance of each held-out sample to the T samples of its cell.
        P_cells: (n,) cell of each held-out sample.
        T_counts: (k,) number of training samples per cell (labels 0..k-1); cells
            beyond ``len(T_counts)`` hold no T sample.
        tau: a cell enters C_T when its share of Q is strictly above tau; ``None``: 20/m.
        layer: layer name to carry into the result.

    Returns:
        The :class:`CTResult`; ``status`` is ``"ok"`` or ``"no_cells"``.

    Raises:
        InsufficientDataError: fewer than 2 generated samples, or no held-out sample.
        InputError: mismatched shapes, bad labels, non-finite distances or tau.
    """
    dQ = np.asarray(dQ, dtype=np.float64).ravel()
    dP = np.asarray(dP, dtype=np.float64).ravel()
    m, n = dQ.shape[0], dP.shape[0]
    check_m(m)
    if n == 0:
        raise InsufficientDataError("C_T needs held-out samples (P) to compare with; P is empty")
    tau = check_tau(tau, m)
    q_lab = check_labels(Q_cells, m, "Q_cells")
    p_lab = check_labels(P_cells, n, "P_cells")
    t_counts = np.asarray(T_counts, dtype=np.int64).ravel()
    k = max(t_counts.shape[0], int(q_lab.max()) + 1, int(p_lab.max()) + 1)
    t_counts = np.concatenate([t_counts, np.zeros(k - t_counts.shape[0], dtype=np.int64)])
    q_counts = np.bincount(q_lab, minlength=k)
    p_counts = np.bincount(p_lab, minlength=k)

    # Shares and weights are computed as in the reference code, for bit-level agreement.
    q_share = q_counts.astype(np.float64) / m
    p_share = p_counts.astype(np.float64) / n
    z = np.full(k, np.nan)
    q_order = np.argsort(q_lab, kind="stable")
    p_order = np.argsort(p_lab, kind="stable")
    q_off = np.concatenate([[0], np.cumsum(q_counts)])
    p_off = np.concatenate([[0], np.cumsum(p_counts)])
    for c in np.flatnonzero((q_counts > 0) & (p_counts > 0) & (t_counts > 0)):
        dq = dQ[q_order[q_off[c] : q_off[c + 1]]]
        dp = dP[p_order[p_off[c] : p_off[c + 1]]]
        if not (np.all(np.isfinite(dq)) and np.all(np.isfinite(dp))):
            raise InputError(f"cell {c}: nearest-neighbour distances must be finite")
        z[c] = zu(dq, dp)
    passing = q_share > tau
    kept = passing & np.isfinite(z)
    cells = [
        CellStat(int(c), int(t_counts[c]), int(p_counts[c]), int(q_counts[c]), float(z[c]),
                 bool(kept[c]))
        for c in range(k)
    ]
    notes = [
        f"cell {c} holds {q_counts[c]} generated samples but no "
        f"{'training' if t_counts[c] == 0 else 'held-out'} sample, so it has no Z_U and is "
        f"left out"
        for c in np.flatnonzero(passing & ~kept)
    ]
    if not kept.any():
        need = needed_count(tau, m)
        notes.insert(0,
            f"no cell holds more than tau*m = {tau * m:g} of the {m} generated samples with "
            f"held-out and training samples beside them (largest: {int(q_counts.max())} in "
            f"cell {int(q_counts.argmax())}), so C_T is undefined. A cell needs at least "
            f"{need} generated samples: supply more images (about {need * k} spread over "
            f"{k} cells) or lower tau")
        return CTResult(float("nan"), cells, tau, m, STATUS_NO_CELLS, "; ".join(notes), layer)
    ct = p_share[kept].dot(z[kept]) / np.sum(p_share[kept])
    return CTResult(float(ct), cells, tau, m, STATUS_OK, "; ".join(notes), layer)
