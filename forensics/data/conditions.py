"""Storage conditions read from one image file: format, size, mode, bits, JPEG quality and
chroma subsampling.

Every image fp ingests is described by :func:`file_condition` (from its header, no pixels);
:mod:`forensics.steps.storage` describes a set of them, adding the JPEG-history test of
:mod:`forensics.stats.conditions` on its lossless files.

**JPEG quality.** A JPEG file carries its quantization tables. Encoders built on the IJG
library (libjpeg, libjpeg-turbo, Pillow, OpenCV, ImageMagick) scale the standard tables of
ITU-T T.81 Annex K by ``S = 5000 / Q`` (Q < 50) or ``200 - 2 Q`` and round, so the quality
``Q`` is read back exactly by comparing the file's luminance table with the 100 scaled ones.
Tables from other encoders match none exactly: the nearest scaled table gives an estimate,
marked ``exact=False``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from forensics.errors import InputError

#: ITU-T T.81 Annex K, table K.1: the standard luminance quantization table (row order).
STANDARD_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)
#: Formats that keep every pixel as written.
LOSSLESS = frozenset({"PNG", "BMP", "TIFF", "PPM", "TGA", "QOI"})
#: Pillow's JPEG chroma subsampling codes.
_SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
_BITS = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "CMYK": 8, "YCbCr": 8,
         "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


@lru_cache(maxsize=1)
def _ijg_tables() -> np.ndarray:
    """``(100, 64)``: the IJG-scaled standard luminance table for qualities 1..100."""
    base = np.asarray(STANDARD_LUMA, dtype=np.int64)
    out = np.empty((100, 64), dtype=np.int64)
    for q in range(1, 101):
        scale = 5000 // q if q < 50 else 200 - 2 * q
        out[q - 1] = np.clip((base * scale + 50) // 100, 1, 255)  # baseline: 8-bit tables
    return out


def jpeg_quality(luma_table: Sequence[int]) -> tuple[int, bool]:
    """The JPEG quality of a luminance quantization table (row order) and whether it is exact.

    Returns:
        ``(quality, exact)``: the IJG quality whose table equals ``luma_table`` (``exact``), or
        the one nearest to it in summed log ratio (another encoder's table).
    """
    table = np.asarray(luma_table, dtype=np.int64).reshape(-1)
    if table.size != 64:
        raise ValueError(f"a quantization table has 64 entries, got {table.size}")
    tables = _ijg_tables()
    equal = np.flatnonzero((tables == table).all(axis=1))
    if equal.size:  # several qualities can share a table (e.g. near 100): take the highest
        return int(equal[-1] + 1), True
    cost = np.abs(np.log(np.maximum(tables, 1)) - np.log(np.maximum(table, 1))).sum(axis=1)
    return int(np.argmin(cost) + 1), False


def quality_from_steps(steps: Sequence[int], frequencies: Sequence[tuple[int, int]]) -> int:
    """The IJG quality whose luminance table is nearest to quantization steps found at
    ``frequencies`` ((row, column) of the 8x8 DCT): a decoded JPEG's quality, estimated from
    its pixels (:func:`forensics.stats.conditions.jpeg_lattice`)."""
    index = [r * 8 + c for r, c in frequencies]
    tables = _ijg_tables()[:, index].astype(np.float64)
    found = np.log(np.maximum(np.asarray(steps, dtype=np.float64), 1.0))
    cost = np.abs(np.log(tables) - found).sum(axis=1)
    tied = np.flatnonzero(cost <= cost.min() + 1e-12)  # a few steps fit several qualities
    return int(tied[len(tied) // 2] + 1)


@dataclass(frozen=True)
class FileCondition:
    """How one image file is stored (its header; no pixels are decoded).

    Attributes:
        format: Pillow's format name (``PNG``, ``JPEG``, ``WEBP``, ...).
        width, height: pixel size.
        mode: Pillow's mode (``L``, ``RGB``, ``RGBA``, ``I;16``, ...).
        bits: bits per channel.
        jpeg_quality: the IJG quality of its luminance table (JPEG only).
        jpeg_quality_exact: whether the table is exactly an IJG one (else the nearest).
        subsampling: chroma subsampling (JPEG only): ``4:4:4``, ``4:2:2``, ``4:2:0``.
        lossy: whether the format itself lost information (JPEG, lossy WebP).
    """

    format: str
    width: int
    height: int
    mode: str
    bits: int
    jpeg_quality: int | None = None
    jpeg_quality_exact: bool | None = None
    subsampling: str | None = None
    lossy: bool = False


def file_condition(data: bytes) -> FileCondition:
    """The storage condition of one image file's bytes.

    Raises:
        InputError: the bytes are not an image Pillow can open.
    """
    from PIL import Image, JpegImagePlugin, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"not an image ({exc})") from None
    fmt = str(im.format or "unknown")
    quality = exact = sub = None
    lossy = False
    if fmt in ("JPEG", "MPO"):
        lossy = True
        tables = getattr(im, "quantization", None) or {}
        if 0 in tables:
            quality, exact = jpeg_quality(list(tables[0]))
        code = JpegImagePlugin.get_sampling(im) if im.mode not in ("L", "1") else -1
        sub = _SUBSAMPLING.get(code)
    elif fmt == "WEBP":
        lossy = not bool(im.info.get("lossless", False))
    return FileCondition(fmt, int(im.size[0]), int(im.size[1]), str(im.mode),
                         _BITS.get(im.mode, 8), quality, exact, sub, lossy)


def luma(data: bytes) -> np.ndarray:
    """The image's luma (ITU-R BT.601 weights, float, 0-255), unrounded."""
    from forensics.data.images import decode_rgb

    rgb = np.asarray(decode_rgb(data), dtype=np.float64)
    return rgb @ np.array([0.299, 0.587, 0.114])
