"""Image intake: a folder becomes a validated, hashed, ordered manifest of images.

:func:`scan_folder` finds every image under a folder (recursively, in sorted order of
relative POSIX path), hashes each file (SHA-256) and decodes it once to prove it is usable.
Bad files (not a regular file, larger than the size cap, zero bytes, not an image,
truncated or corrupt, animations, decompression bombs) stop the scan with one
:class:`~forensics.errors.InputError` that lists all of them, unless ``skip_bad`` is set, in
which case they are recorded in :attr:`Manifest.skipped`.

:func:`read_image_file` is how every image file is read: only regular files (a FIFO or a
device named ``x.png``, or a symlink to one, is refused without blocking), at most
:func:`max_image_bytes` bytes.

:func:`load_rgb` decodes one image the way every encoder sees it: EXIF orientation
applied, then converted to 8-bit RGB (see :func:`to_rgb` for each mode).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from forensics.errors import InputError, printable

#: File extensions (lower case) that are scanned as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif",
)

#: Largest image file read, in bytes, unless :data:`MAX_BYTES_ENV` says otherwise.
MAX_IMAGE_BYTES = 256 * 2**20
#: Environment variable that sets the per-file size cap in bytes.
MAX_BYTES_ENV = "FP_MAX_IMAGE_BYTES"

#: Background that transparent pixels are composited over.
ALPHA_BACKGROUND = (255, 255, 255)

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class Entry(NamedTuple):
    """One usable image: path relative to the root, SHA-256 of the file, size in bytes."""

    relpath: str
    sha256: str
    size: int


class Skipped(NamedTuple):
    """One file left out with ``skip_bad``, and why."""

    relpath: str
    reason: str


@dataclass
class Manifest:
    """The images of one folder, in a fixed order, with their hashes.

    Attributes:
        root: the scanned folder (absolute path).
        entries: usable images, sorted by relative path.
        skipped: bad files left out because ``skip_bad`` was set.
    """

    root: str
    entries: list[Entry]
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def sha256(self) -> str:
        """Hash of the manifest content (entries and skipped files; not the root path)."""
        content = {"entries": [list(e) for e in self.entries],
                   "skipped": [list(s) for s in self.skipped]}
        text = json.dumps(content, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def hashes(self) -> list[str]:
        """SHA-256 of each entry, in order."""
        return [e.sha256 for e in self.entries]

    def path(self, i: int) -> Path:
        """Absolute path of entry ``i``."""
        return Path(self.root) / self.entries[i].relpath

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (what provenance records store)."""
        return {
            "root": self.root,
            "count": len(self.entries),
            "sha256": self.sha256,
            "entries": [list(e) for e in self.entries],
            "skipped": [list(s) for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Inverse of :meth:`to_dict`."""
        return cls(
            root=data["root"],
            entries=[Entry(str(r), str(h), int(n)) for r, h, n in data["entries"]],
            skipped=[Skipped(str(r), str(why)) for r, why in data.get("skipped", [])],
        )


def list_image_files(root: Path, links: list[str] | None = None) -> list[str]:
    """Relative POSIX paths of files with an image extension under ``root``, sorted.

    Symbolic links to folders are not followed (a link can loop, or lead out of the
    evidence); given a list ``links``, their relative paths are appended to it.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if links is not None:
            links.extend(Path(dirpath, d).relative_to(root).as_posix() for d in dirnames
                         if os.path.islink(os.path.join(dirpath, d)))
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def scan_folder(
    path: str | os.PathLike, *, skip_bad: bool = False, threads: int | None = None,
    known: Callable[[str], bool] | None = None,
) -> Manifest:
    """Find, hash and validate every image under ``path``.

    Args:
        path: folder to scan recursively for png/jpg/jpeg/webp/bmp/tif/tiff/gif files.
        skip_bad: leave bad files out (recorded in ``Manifest.skipped``) instead of failing.
        threads: decoding threads (default: a few per CPU).
        known: ``known(sha256)`` is true for content already decoded with success (an
            image in the embedding cache): such a file is hashed, not decoded again.

    Returns:
        The manifest, entries sorted by relative path.

    Raises:
        InputError: the folder is missing or holds no images; or some files are bad and
            ``skip_bad`` is not set (the message lists every bad file).
    """
    root = Path(path).expanduser().resolve()
    max_image_bytes()  # a bad size cap is reported before any file is read
    if not root.is_dir():
        raise InputError(f"{path} is not a folder; give a folder of images")
    links: list[str] = []
    relpaths = list_image_files(root, links)
    linked = [Skipped(rel, "a symbolic link to a folder; not followed (give that folder, or "
                           "copy its images in)") for rel in sorted(links)]
    if not relpaths:
        raise InputError(
            f"no images found in {root} (looked recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}); check the path"
        )
    workers = threads or min(16, 4 * (os.cpu_count() or 1))
    chunks = [relpaths[i:i + 64] for i in range(0, len(relpaths), 64)]  # few, larger tasks
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = pool.map(lambda chunk: [_check_file(root / rel, known) for rel in chunk],
                        chunks)
        checked = [result for chunk in done for result in chunk]
    entries, bad = [], []
    for rel, (sha, size, problem) in zip(relpaths, checked, strict=True):
        if problem is None:
            entries.append(Entry(rel, sha, size))
        else:
            bad.append(Skipped(rel, problem))
    if bad and not skip_bad:
        raise InputError(_bad_files_message(root, bad, len(relpaths)))
    if not entries:
        raise InputError(f"none of the {len(relpaths)} image files in {root} can be decoded")
    return Manifest(root=str(root), entries=entries, skipped=bad + linked)


def _bad_files_message(root: Path, bad: Iterable[Skipped], total: int) -> str:
    bad = list(bad)
    lines = "\n".join(f"  {printable(s.relpath, 1000)}: {s.reason}" for s in bad)
    return (
        f"{len(bad)} of {total} image files in {root} cannot be used:\n{lines}\n"
        f"Fix or remove them, or use --skip-bad to skip them (skipped files are recorded "
        f"in the provenance)."
    )


def max_image_bytes() -> int:
    """The per-file size cap: ``$FP_MAX_IMAGE_BYTES``, else :data:`MAX_IMAGE_BYTES`.

    Raises:
        InputError: the variable is not a positive whole number of bytes.
    """
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not text:
        return MAX_IMAGE_BYTES
    from forensics import defaults

    top = defaults.MAX_IMAGE_BYTES_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= top:
        raise InputError(f"{MAX_BYTES_ENV}={text[:40]!r}: give the largest image file to read "
                         f"as a whole number of bytes from 1 to {top}, e.g. "
                         f"{MAX_BYTES_ENV}={2 * MAX_IMAGE_BYTES}")
    return int(text)


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return f"{kind}, not a regular file; only regular files are read"


def _too_large(size: int, limit: int) -> str:
    return (f"{size / 2**20:.1f} MiB, more than the limit of {limit / 2**20:.1f} MiB per image "
            f"file; to read it, raise the limit: {MAX_BYTES_ENV}={max(size, 2 * limit)}")


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of one image file: a regular file of at most :func:`max_image_bytes`.

    A FIFO, device or socket (also behind a symlink) is refused without reading from it,
    so it can neither block nor fill memory.

    Raises:
        InputError: the file is missing, unreadable, not a regular file or too large (the
            message does not name the file; callers add it).
    """
    limit = max_image_bytes()
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(_not_regular(st.st_mode))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())  # what was opened, should the path have been swapped
            if not stat.S_ISREG(st.st_mode):
                raise InputError(_not_regular(st.st_mode))
            if st.st_size > limit:
                raise InputError(_too_large(st.st_size, limit))
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise InputError(_too_large(len(data), limit))
    return data


def file_status(path: str | os.PathLike, sha256: str) -> str:
    """``ok``, ``missing`` or ``changed`` (the file no longer has its manifest hash)."""
    try:
        data = read_image_file(path)
    except InputError:  # gone, unreadable, or no longer a regular file
        return "missing"
    return "ok" if hashlib.sha256(data).hexdigest() == sha256 else "changed"


def _check_file(path: Path, known: Callable[[str], bool] | None = None
                ) -> tuple[str, int, str | None]:
    """Hash ``path`` and decode it fully (unless ``known(sha256)``: decoded before);
    return (sha256, size, problem or None)."""
    try:
        data = read_image_file(path)
    except InputError as exc:
        return "", 0, str(exc)
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return sha, 0, "empty file (0 bytes)"
    if known is not None and known(sha):
        return sha, len(data), None
    try:
        decode_rgb(data)
    except InputError as exc:
        return sha, len(data), str(exc)
    return sha, len(data), None


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes into an EXIF-transposed 8-bit RGB image.

    Raises:
        InputError: the bytes are not a decodable image, or the image is a decompression
            bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    try:
        im = Image.open(io.BytesIO(data))
        _check_pixels(im)
        frames = getattr(im, "n_frames", 1) if im.format in _ANIMATED_FORMATS else 1
        if frames > 1:
            raise InputError(f"an animation of {frames} frames, not one image; save the "
                             f"frame to use as an image of its own")
        pages = getattr(im, "n_frames", 1) if im.format == "TIFF" else 1
        if pages > 1:
            raise InputError(f"a TIFF of {pages} pages, not one image; save the page to use "
                             f"as an image of its own")
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise InputError(f"decompression bomb refused ({exc})") from exc
    except UnidentifiedImageError as exc:
        kind = _signature(data)
        if kind:
            raise InputError(f"truncated or corrupt (a {kind} file that cannot be read)") from exc
        raise InputError("not an image (unknown or unsupported format)") from exc
    except InputError:
        raise
    except Exception as exc:  # decoders raise many types on corrupt data
        raise InputError(f"truncated or corrupt ({type(exc).__name__}: {exc})") from exc


#: Formats whose several frames are an animation (a JPEG's extra MPO frames, such as a
#: phone's preview, are not: the first frame is the image). A TIFF of several pages is
#: refused as well: which page is the image is not for fp to guess.
_ANIMATED_FORMATS = {"GIF", "PNG", "WEBP"}

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
)


def _signature(data: bytes) -> str | None:
    """The image format announced by the first bytes, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES if data.startswith(magic)), None)


def _check_pixels(im: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    pixels = im.size[0] * im.size[1]
    if limit is not None and pixels > limit:
        raise InputError(
            f"decompression bomb refused: {im.size[0]}x{im.size[1]} = {pixels} pixels is more "
            f"than the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)"
        )


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read one image file as an EXIF-transposed 8-bit RGB image.

    Raises:
        InputError: the file cannot be read or decoded; the message names it.
    """
    try:
        data = read_image_file(path)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    if not data:
        raise InputError(f"{path}: empty file (0 bytes)")
    try:
        return decode_rgb(data)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    - Palette, greyscale, bilevel, YCbCr, LAB, HSV: Pillow's conversion.
    - Anything with transparency (RGBA, LA, PA, palette or greyscale with a transparent
      colour): composited over :data:`ALPHA_BACKGROUND` (white).
    - 16-bit greyscale (``I;16*``, and ``I`` taken as 16-bit): scaled by 255/65535 and
      rounded, not clipped.
    - 32-bit float (``F``): values in [0, 1] scaled to [0, 255], clipped.
    - CMYK: through the embedded ICC profile when there is one, else Pillow's conversion.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im, dtype=np.float64)
        grey = np.rint(np.clip(arr, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        grey = np.rint(np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
        except Exception:  # a broken profile falls back to the plain conversion
            pass
    return im.convert("RGB")
