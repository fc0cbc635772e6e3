"""Pathological generators: image-folder transforms of Sec. 4 of He et al. (2024).

Each kind turns every image of a source folder into a derived image, as if a
"generator" produced it:

``rotate``      rotate by ``angle`` degrees (counter-clockwise), or by a random angle in
                ``[-max_angle, max_angle]`` per image (the authors' choice: 30); nearest
                resampling, same size, uncovered corners black.
``downup``      downsample by ``factor`` then upsample back (bicubic, antialiased); the
                authors used CIFAR-10 32 -> 8 -> 32, i.e. factor 4.
``updown``      upsample by ``factor`` then downsample back (bicubic; default 2): an image
                shown or saved at double size and shrunk again.
``shuffle``     cut the image into ``grid`` x ``grid`` patches (16 for grid 4) and put them
                back in a random order; rows/columns beyond a multiple of ``grid`` stay put.
``noise``       add Gaussian noise of std ``sigma`` (0-255 scale; the authors used 25),
                rounded and clipped to 0..255.
``jpeg``        re-encode as JPEG of ``quality`` (1-95; default 75), as images passed
                around the web are; ``synth_folder`` writes the ``.jpg`` files themselves.
``crop``        keep the centre ``fraction`` (default 0.9) of each side.
``background``  keep the foreground of dark-background images (pixels whose grey level
                exceeds ``threshold``) and replace the rest by ``mode``: a random solid
                ``color``, uniform ``noise``, or a random two-colour ``checker`` texture.

Randomness is seeded per image from ``seed`` and the image's relative path, so results
do not depend on the order images are processed in. Outputs are PNG files at the same
relative paths (suffix ``.png``), written atomically; ``fp-synth.json`` in the output
folder records kind, parameters, seed and source.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from forensics.data.atomic import atomic_write, atomic_write_text, check_output_folder
from forensics.data.images import IMAGE_EXTENSIONS, list_image_files, read_image_file
from forensics.errors import InputError

MANIFEST = "fp-synth.json"
BACKGROUND_MODES = ("color", "noise", "checker")

#: Parameters of each kind and their defaults (``None``: optional, no default).
KINDS: dict[str, dict[str, Any]] = {
    "rotate": {"angle": None, "max_angle": 30.0},
    "downup": {"factor": 4.0},
    "updown": {"factor": 2.0},
    "shuffle": {"grid": 4},
    "noise": {"sigma": 25.0},
    "background": {"mode": "color", "threshold": 32},
    "jpeg": {"quality": 75},
    "crop": {"fraction": 0.9},
}


def rotate(img: Image.Image, angle: float) -> Image.Image:
    """Rotate counter-clockwise by ``angle`` degrees, same size, nearest, black corners."""
    return img.rotate(float(angle), resample=Image.Resampling.NEAREST, expand=False)


def downup(img: Image.Image, factor: float) -> Image.Image:
    """Downsample by ``factor`` (> 1) and upsample back to the original size (bicubic)."""
    if not factor > 1:
        raise InputError(f"downup factor must be > 1, got {factor}")
    w, h = img.size
    small = (max(1, round(w / factor)), max(1, round(h / factor)))
    bicubic = Image.Resampling.BICUBIC
    return img.resize(small, resample=bicubic).resize((w, h), resample=bicubic)


def updown(img: Image.Image, factor: float) -> Image.Image:
    """Upsample by ``factor`` (> 1) and downsample back to the original size (bicubic)."""
    if not factor > 1:
        raise InputError(f"updown factor must be > 1, got {factor}")
    w, h = img.size
    big = (max(1, round(w * factor)), max(1, round(h * factor)))
    bicubic = Image.Resampling.BICUBIC
    return img.resize(big, resample=bicubic).resize((w, h), resample=bicubic)


def patch_shuffle(img: Image.Image, grid: int, rng: np.random.Generator) -> Image.Image:
    """Permute the ``grid`` x ``grid`` patches of ``img`` at random.

    Raises:
        InputError: ``grid`` < 2, or the image is smaller than ``grid`` pixels on a side.
    """
    if grid < 2:
        raise InputError(f"shuffle grid must be >= 2, got {grid}")
    arr = np.asarray(img)
    ph, pw = arr.shape[0] // grid, arr.shape[1] // grid
    if ph == 0 or pw == 0:
        w, h = img.size
        raise InputError(f"image of {w}x{h} pixels is too small for a {grid}x{grid} grid")
    patches = [
        arr[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] for r in range(grid) for c in range(grid)
    ]
    order = rng.permutation(len(patches))
    out = arr.copy()
    for k, src in enumerate(order):
        r, c = divmod(k, grid)
        out[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = patches[src]
    return Image.fromarray(out)


def add_noise(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Add Gaussian noise of std ``sigma`` (0-255 scale), round, clip to 0..255."""
    if sigma < 0:
        raise InputError(f"noise sigma must be >= 0, got {sigma}")
    arr = np.asarray(img, dtype=np.float64)
    noisy = np.clip(np.rint(arr + rng.normal(0.0, sigma, arr.shape)), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    """``img`` encoded as a baseline JPEG of ``quality`` (PIL's encoder, 4:2:0 for colour)."""
    import io

    if not 1 <= int(quality) <= 95:
        raise InputError(f"jpeg quality must be within 1..95, got {quality}")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """``img`` after a JPEG round trip at ``quality``."""
    import io

    with Image.open(io.BytesIO(jpeg_bytes(img, quality))) as im:
        im.load()
        return im.copy()


def center_crop(img: Image.Image, fraction: float) -> Image.Image:
    """The centre ``fraction`` (0 < f <= 1) of each side of ``img``."""
    if not 0 < float(fraction) <= 1:
        raise InputError(f"crop fraction must be within (0, 1], got {fraction}")
    w, h = img.size
    cw, ch = max(1, round(w * float(fraction))), max(1, round(h * float(fraction)))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def _background(shape: tuple[int, int], mode: str, rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    if mode == "color":
        return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (h, w, 3))
    if mode == "noise":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if mode == "checker":
        colours = rng.integers(0, 256, (2, 3), dtype=np.uint8)
        cell = int(rng.integers(1, max(2, min(h, w) // 4) + 1))
        dy, dx = (int(v) for v in rng.integers(0, cell, 2))
        yy, xx = np.indices((h, w))
        return colours[((yy + dy) // cell + (xx + dx) // cell) % 2]
    raise InputError(
        f"unknown background mode {mode!r}; choose one of: {', '.join(BACKGROUND_MODES)}"
    )


def replace_background(
    img: Image.Image, rng: np.random.Generator, mode: str = "color", threshold: int = 32
) -> Image.Image:
    """Replace the dark background of ``img`` by ``mode``; foreground pixels stay as they are.

    The foreground is every pixel whose grey level (``img.convert("L")``) exceeds
    ``threshold``: right for bright objects on a dark background (digits, Fashion-MNIST).
    The result is RGB.
    """
    if not 0 <= threshold <= 255:
        raise InputError(f"background threshold must be within 0..255, got {threshold}")
    foreground = np.asarray(img.convert("L")) > threshold
    rgb = np.asarray(img.convert("RGB"))
    back = _background(foreground.shape, mode, rng)
    return Image.fromarray(np.where(foreground[..., None], rgb, back).astype(np.uint8))


def _check_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise InputError(f"unknown synth kind {kind!r}; choose one of: {', '.join(KINDS)}")
    allowed = KINDS[kind]
    extra = sorted(set(params) - set(allowed))
    if extra:
        options = ", ".join("--" + k.replace("_", "-") for k in allowed)
        raise InputError(
            f"option(s) {', '.join('--' + k.replace('_', '-') for k in extra)} do not apply to "
            f"{kind}; it takes {options}"
        )
    merged = {**allowed, **{k: v for k, v in params.items() if v is not None}}
    for key, value in merged.items():  # nan would write black images, inf fails later
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"--{key.replace('_', '-')} {value}: give a finite number")
    if kind == "background" and merged["mode"] not in BACKGROUND_MODES:
        raise InputError(
            f"unknown background mode {merged['mode']!r}; "
            f"choose one of: {', '.join(BACKGROUND_MODES)}"
        )
    if kind == "rotate" and merged["angle"] is None and merged["max_angle"] < 0:
        raise InputError(f"rotate max-angle must be >= 0, got {merged['max_angle']}")
    if kind == "rotate" and merged["angle"] is not None:
        merged["max_angle"] = None  # a fixed angle: no random draw
    return merged


def _apply(kind: str, img: Image.Image, rng: np.random.Generator, p: dict[str, Any]) -> Image.Image:
    if kind == "rotate":
        angle = p["angle"]
        if angle is None:
            angle = rng.uniform(-p["max_angle"], p["max_angle"])
        return rotate(img, angle)
    if kind == "downup":
        return downup(img, float(p["factor"]))
    if kind == "updown":
        return updown(img, float(p["factor"]))
    if kind == "shuffle":
        return patch_shuffle(img, int(p["grid"]), rng)
    if kind == "noise":
        return add_noise(img, float(p["sigma"]), rng)
    if kind == "jpeg":
        return jpeg(img, int(p["quality"]))
    if kind == "crop":
        return center_crop(img, float(p["fraction"]))
    return replace_background(img, rng, p["mode"], int(p["threshold"]))


def transform(kind: str, img: Image.Image, rng: np.random.Generator, **params: Any) -> Image.Image:
    """Apply one kind to one image with its parameters (defaults from :data:`KINDS`).

    Raises:
        InputError: unknown kind, a parameter the kind does not take, or a bad value.
    """
    return _apply(kind, img, rng, _check_params(kind, params))


def image_rng(seed: int, relpath: str) -> np.random.Generator:
    """The generator for one image: from ``seed`` and its relative path (POSIX form)."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


def list_images(src: Path) -> list[Path]:
    """Image files under ``src``, relative, as fp lists them (``list_image_files``)."""
    return [Path(rel) for rel in list_image_files(Path(src))]


def _open(path: Path) -> Image.Image:
    try:
        data = read_image_file(path)  # a regular file under the size cap: never blocks
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            img = im.copy()
    except InputError as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    if img.mode in ("L", "RGB"):
        return img
    return img.convert("L" if img.mode in ("1", "I", "I;16", "F") else "RGB")


def synth_folder(
    kind: str,
    src: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    force: bool = False,
    **params: Any,
) -> dict[str, Any]:
    """Write the ``kind`` transform of every image under ``src`` to ``out``.

    Args:
        kind: one of :data:`KINDS` (``rotate``, ``downup``, ``updown``, ``shuffle``, ``noise``,
            ``background``, ``jpeg``, ``crop``).
        src: folder of images (searched recursively).
        out: output folder; relative paths are kept, every output is a PNG (a JPEG for
            ``jpeg``).
        seed: seed of every random step (per image: seed + relative path).
        force: write into a non-empty ``out`` (overwriting files of the same name).
        **params: the kind's parameters (see :data:`KINDS`); others are an error.

    Returns:
        The manifest also written to ``out/fp-synth.json``: kind, params, seed, source,
        image count and the relative output paths.

    Raises:
        InputError: unknown kind or parameter, bad value, missing or empty ``src``,
            ``out`` inside ``src`` or non-empty without ``force``, unreadable image, two
            inputs that would write the same output.
    """
    from forensics._version import __version__
    from forensics.stats.ct import check_seed

    seed = check_seed(seed)
    p = _check_params(kind, params)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InputError(f"source folder {src} does not exist or is not a folder")
    src_abs, out_abs = src.resolve(), out.resolve()
    if out_abs == src_abs or src_abs in out_abs.parents:
        raise InputError(f"output folder {out} must not be inside the source folder {src}")
    check_output_folder(out, "output folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"output folder {out} is not empty; choose another or pass --force")
    images = list_images(src)
    if not images:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {src}")
    targets: dict[Path, Path] = {}
    for rel in images:
        target = rel.with_suffix(".jpg" if kind == "jpeg" else ".png")
        if target in targets:
            raise InputError(
                f"{src / targets[target]} and {src / rel} would both be written as {out / target}; "
                f"rename one of them"
            )
        targets[target] = rel

    out.mkdir(parents=True, exist_ok=True)
    for target, rel in targets.items():
        rng = image_rng(seed, rel.as_posix())
        dest = out / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        if kind == "jpeg":  # the JPEG file itself, compressed once
            data = jpeg_bytes(_open(src / rel), int(p["quality"]))
            atomic_write(dest, lambda tmp, b=data: Path(tmp).write_bytes(b), fsync=False)
            continue
        result = _apply(kind, _open(src / rel), rng, p)
        atomic_write(dest, lambda tmp, im=result: im.save(tmp, format="PNG"), fsync=False)

    manifest = {
        "kind": kind,
        "params": p,
        "seed": int(seed),
        "source": str(src_abs),
        "n_images": len(targets),
        "outputs": [t.as_posix() for t in targets],
        "fp_version": __version__,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write_text(out / MANIFEST, text)
    return manifest
