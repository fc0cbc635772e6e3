"""Storage conditions read from image files: format, JPEG quality, subsampling, size, JPEG
history of lossless files.

Every image fp ingests is described by :func:`file_condition` (from its header, no pixels),
and a set of them by :func:`set_conditions`, which adds the JPEG-history test of
:mod:`forensics.stats.conditions` on its lossless files. Enrolment stores a curve's set
conditions; an answer records the suspects' and :func:`mismatch` names, in words, where they
differ from the enrolled curves'.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forensics.errors import InputError

#: Lossless images read for the JPEG-history test of a set (the first in path order).
LATTICE_IMAGES = 64
#: Formats that keep every pixel as written.
LOSSLESS = frozenset({"PNG", "BMP", "TIFF", "PPM", "TGA", "QOI"})
#: Pillow's JPEG chroma subsampling codes.
_SUBSAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
_BITS = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "CMYK": 8, "YCbCr": 8,
         "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


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

    from forensics.stats.conditions import jpeg_quality

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


def _luma(data: bytes) -> np.ndarray:
    """The image's luma (ITU-R BT.601 weights, float, 0-255), unrounded."""
    from forensics.data.images import decode_rgb

    rgb = np.asarray(decode_rgb(data), dtype=np.float64)
    return rgb @ np.array([0.299, 0.587, 0.114])


def set_conditions(files: Sequence[bytes | str | Path] | Iterable[bytes | str | Path]
                   ) -> dict[str, Any]:
    """The storage conditions of an image set: a JSON-ready summary.

    ``files`` are image bytes or paths, in the set's order. The JPEG-history test reads the
    first :data:`LATTICE_IMAGES` lossless files.

    Returns:
        ``{"n_images", "formats" {name: count}, "sizes" {"WxH": count}, "modes", "bits",
        "jpeg": {"qualities": [min, median, max], "exact": share, "subsampling": {...}} or
        None, "jpeg_history": the lattice test (or None without lossless files), "label"}``;
        ``label`` names the condition in a few words (e.g. ``lossless``, ``JPEG q75``,
        ``lossless, earlier JPEG``).
    """
    from forensics.data.images import read_image_file
    from forensics.stats.conditions import jpeg_lattice

    conds: list[FileCondition] = []
    luma: list[np.ndarray] = []
    for f in files:
        data = f if isinstance(f, bytes) else read_image_file(f)
        c = file_condition(data)
        conds.append(c)
        if c.format in LOSSLESS and len(luma) < LATTICE_IMAGES:
            luma.append(_luma(data))
    if not conds:
        raise InputError("no images to describe")
    jpegs = [c for c in conds if c.jpeg_quality is not None]
    jpeg = None
    if jpegs:
        q = sorted(c.jpeg_quality for c in jpegs if c.jpeg_quality is not None)
        jpeg = {"qualities": [q[0], q[len(q) // 2], q[-1]],
                "exact": sum(bool(c.jpeg_quality_exact) for c in jpegs) / len(jpegs),
                "subsampling": dict(Counter(c.subsampling or "grey" for c in jpegs))}
    history = jpeg_lattice(luma).to_dict() if luma else None
    out = {
        "n_images": len(conds),
        "formats": dict(Counter(c.format for c in conds)),
        "sizes": dict(Counter(f"{c.width}x{c.height}" for c in conds).most_common(5)),
        "modes": dict(Counter(c.mode for c in conds)),
        "bits": sorted({c.bits for c in conds}),
        "jpeg": jpeg,
        "jpeg_history": history,
    }
    out["label"] = condition_label(out)
    return out


def condition_label(summary: dict[str, Any]) -> str:
    """A few words for a set's condition: ``lossless``, ``JPEG q75``, ``lossless, earlier
    JPEG``, or ``mixed: ...`` when the files differ."""
    formats = summary.get("formats") or {}
    n = max(int(summary.get("n_images") or 0), 1)
    jpeg = summary.get("jpeg")
    history = summary.get("jpeg_history") or {}
    parts = []
    n_jpeg = sum(v for k, v in formats.items() if k in ("JPEG", "MPO"))
    if jpeg:
        lo, mid, hi = jpeg["qualities"]
        parts.append(f"JPEG q{mid}" if lo == hi else f"JPEG q{lo}-{hi}")
    if n_jpeg < n:
        parts.append("lossless, earlier JPEG" if history.get("detected") else "lossless")
    return ("mixed: " + " + ".join(parts)) if len(parts) > 1 else (parts[0] if parts else "?")


def mismatch(suspect: dict[str, Any] | None, enrolled: Sequence[dict[str, Any] | None]
             ) -> list[str]:
    """Where the suspects' storage differs from the enrolled curves', in plain words.

    ``enrolled`` holds the conditions stored with each enrolled curve (None for curves
    enrolled before conditions were recorded; said once).
    """
    if not suspect:
        return []
    known = [e for e in enrolled if e]
    out = []
    if len(known) < len(enrolled):
        out.append(f"{len(enrolled) - len(known)} of {len(enrolled)} enrolled curve(s) were "
                   f"enrolled without a record of how their images were stored")
    if not known:
        return out
    labels = Counter(e.get("label", "?") for e in known)
    mine = suspect.get("label", "?")
    if mine not in labels:
        theirs = ", ".join(f"{k} ({v} curve{'s' if v > 1 else ''})" for k, v in labels.items())
        out.append(f"the suspect images are stored as {mine}, the enrolled curves as {theirs}: "
                   f"storage changes the traits fp compares, so the answer may reflect the "
                   f"storage rather than the generator")
    sizes = set().union(*(e.get("sizes", {}) for e in known))
    mine_sizes = set(suspect.get("sizes") or {})
    if mine_sizes and sizes and not mine_sizes & sizes:
        out.append(f"the suspect images are {', '.join(sorted(mine_sizes))} px, the enrolled "
                   f"ones {', '.join(sorted(sizes))} px (resized or cropped?)")
    return out


def manifest_conditions(manifest: Any, rows: Sequence[int] | None = None) -> dict[str, Any]:
    """:func:`set_conditions` of a manifest's images (``rows``: which entries; None: all).

    Each file is read again and must still have its manifest hash.

    Raises:
        InputError: a file is gone or changed since it was listed (named).
    """
    import hashlib

    from forensics.data.images import read_image_file

    def files() -> Iterable[bytes]:
        for i in range(len(manifest)) if rows is None else rows:
            path = manifest.path(int(i))
            try:
                data = read_image_file(path)
            except InputError as exc:
                raise InputError(f"{path}: {exc}") from None
            if hashlib.sha256(data).hexdigest() != manifest.entries[int(i)].sha256:
                raise InputError(f"{path} changed while fp was reading the set; run again")
            yield data

    return set_conditions(files())


def as_dict(condition: FileCondition) -> dict[str, Any]:
    """A :class:`FileCondition` as a JSON-ready dict."""
    return asdict(condition)
