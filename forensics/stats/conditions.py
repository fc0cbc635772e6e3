"""The JPEG history of lossless image files: arrays in, a dataclass out.

:mod:`forensics.data.conditions` reads the files (and a JPEG file's quality from its
tables); :mod:`forensics.steps.storage` puts both together.

**JPEG history of a lossless file** (a JPEG decoded and saved again as PNG). JPEG rounds
every 8x8 block's DCT coefficients to multiples of the quantization step; decoding adds only
rounding noise (about 0.3 in coefficient units), so the coefficients of a decoded JPEG, taken
on the encoder's block grid, stay close to a lattice. For each low-frequency coefficient the
test takes the strength of that lattice, ``|mean exp(2 pi i c / q)|`` over the set's blocks,
at its best step ``q``, and averages it over the coefficients: near 1 on a JPEG's grid, near
0 for a generator's own output. Content concentrates small coefficients near 0 at every grid
offset alike, so the score is the grid offset's strength against the other 63 offsets (the
number of median absolute deviations above their median), and the offset itself is found, so
a JPEG cropped afterwards is seen too. This is the quantization-lattice evidence used to
estimate quantization tables from decompressed images (Fan and de Queiroz, IEEE TIP 2003;
Fridrich, Goljan and Du, "Steganalysis based on JPEG compatibility", 2001). Resizing after
JPEG destroys the lattice: such files are not detected (they read as lossless).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: The DCT coefficients (row, column) whose lattice the JPEG-history test reads.
LATTICE_FREQUENCIES: tuple[tuple[int, int], ...] = ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0),
                                                    (1, 2), (2, 1))
#: Quantization steps tried per coefficient (JPEG quality about 5 to 100 at these frequencies).
LATTICE_STEPS = tuple(range(2, 41))
#: Median absolute deviations above the other grid offsets at which a set is said to have a
#: JPEG history (chosen on the development sets' clean and re-encoded sets, docs/conditions.md).
LATTICE_THRESHOLD = 12.0
#: Blocks whose pixels span fewer grey levels than this carry no lattice evidence (flat).
MIN_BLOCK_RANGE = 8.0


def _dct_matrix() -> np.ndarray:
    n = np.arange(8)
    c = np.sqrt(2 / 8) * np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 16)
    c[0] /= np.sqrt(2)
    return c


@dataclass(frozen=True)
class Lattice:
    """The JPEG-history test of one image set.

    Attributes:
        detected: whether the set shows a JPEG lattice (``score >= threshold``).
        score: the best grid offset's lattice strength, in median absolute deviations above
            the other 63 offsets (0 when no block carries evidence).
        strength: that offset's mean lattice strength (0 to 1).
        offset: the grid offset ``(dy, dx)`` of the lattice (``(0, 0)``: not cropped).
        steps: the best step per coefficient at that offset (an estimate of the earlier
            JPEG's quantization steps at ``LATTICE_FREQUENCIES``).
        blocks: blocks that carried evidence at that offset.
        threshold: the score at which ``detected``.
    """

    detected: bool
    score: float
    strength: float
    offset: tuple[int, int]
    steps: list[int] = field(default_factory=list)
    blocks: int = 0
    threshold: float = LATTICE_THRESHOLD

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _strengths(coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per coefficient, the best lattice strength over the steps and that step.

    ``coeffs``: ``(n_blocks, n_freq)``. Returns ``(strength (n_freq,), step (n_freq,))``.
    """
    steps = np.asarray(LATTICE_STEPS, dtype=np.float64)
    phase = 2 * np.pi * coeffs[:, :, None] / steps[None, None, :]
    # |mean(exp(i phase))|, from the real and imaginary parts (4x faster than complex exp)
    s = np.hypot(np.cos(phase).mean(axis=0), np.sin(phase).mean(axis=0))  # (n_freq, n_steps)
    best = s.argmax(axis=1)
    return s[np.arange(s.shape[0]), best], steps[best].astype(int)


def jpeg_lattice(luma: Sequence[np.ndarray], threshold: float = LATTICE_THRESHOLD) -> Lattice:
    """Test a set of images (luma, float, 0-255; any sizes) for a JPEG history.

    Every 8x8 block at each of the 64 grid offsets is transformed; blocks that are nearly
    flat or touch 0 or 255 (clipped by the decoder) carry no evidence and are left out.
    """
    dct = _dct_matrix()
    rows = np.asarray([r for r, _ in LATTICE_FREQUENCIES])
    cols = np.asarray([c for _, c in LATTICE_FREQUENCIES])
    per_offset: dict[tuple[int, int], list[np.ndarray]] = {}
    images = [np.asarray(img, dtype=np.float64) for img in luma]
    if any(y.ndim != 2 for y in images):
        raise ValueError("jpeg_lattice takes 2-D luma images")
    runs: list[list[np.ndarray]] = []  # consecutive images of one size, transformed together
    for y in images:
        if runs and runs[-1][0].shape == y.shape:
            runs[-1].append(y)
        else:
            runs.append([y])
    for run in runs:
        Y = np.stack(run)
        for dy in range(8):
            for dx in range(8):
                h, w = (Y.shape[1] - dy) // 8, (Y.shape[2] - dx) // 8
                if h < 1 or w < 1:
                    continue
                grid = Y[:, dy:dy + 8 * h, dx:dx + 8 * w].reshape(len(run), h, 8, w, 8)
                b = grid.transpose(0, 1, 3, 2, 4).reshape(-1, 8, 8)  # image by image, in order
                lo, hi = b.min(axis=(1, 2)), b.max(axis=(1, 2))
                keep = hi - lo >= MIN_BLOCK_RANGE
                if not keep.any():
                    continue
                c = np.einsum("ij,bjk,lk->bil", dct, b[keep] - 128.0, dct)
                per_offset.setdefault((dy, dx), []).append(c[:, rows, cols])
    if len(per_offset) < 2:
        return Lattice(False, 0.0, 0.0, (0, 0), threshold=threshold)
    offsets = sorted(per_offset)
    strength, steps, counts = [], [], []
    for o in offsets:
        coeffs = np.concatenate(per_offset[o])
        s, q = _strengths(coeffs)
        strength.append(float(s.mean()))
        steps.append(q.tolist())
        counts.append(len(coeffs))
    values = np.asarray(strength)
    best = int(values.argmax())
    others = np.delete(values, best)
    spread = float(np.median(np.abs(others - np.median(others))))
    spread = max(spread, 1e-3)  # a floor: identical offsets are no evidence either way
    score = float((values[best] - np.median(others)) / spread)
    return Lattice(bool(score >= threshold), score, float(values[best]), offsets[best],
                   steps[best], int(counts[best]), threshold)
