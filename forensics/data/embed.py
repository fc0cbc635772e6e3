"""Images x encoder -> per-layer embeddings: batched, on any device, cached.

::

    folder ──scan_folder──► Manifest ──┐
    uint8 array ───────────────────────┼─► decode + transform ─► encoder.forward ─► Embeddings
                                       │   (DataLoader workers)   (one pass, all layers)
                              cache ◄──┴── lookup by (image hash, encoder config key)

:func:`embed_folder` and :func:`embed_arrays` share one code path after decoding. The
embedding cache stores, per encoder configuration (encoder name, weights hash,
preprocessing, pooling, precision), chunks of ``.npz`` files keyed by image SHA-256, so a
second run on the same images computes nothing. A damaged chunk (unreadable, misshapen,
not finite) is set aside with one :class:`~forensics.errors.FpWarning` and its images are
embedded again. With ``ray=``, the images missing from the cache are embedded on a Ray
cluster (:mod:`forensics.data.ray_embed`) and collected into the arrays and the cache the
same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forensics import defaults
from forensics._version import __version__
from forensics.data.atomic import atomic_savez, atomic_write, atomic_write_text
from forensics.data.images import Manifest, decode_rgb, read_image_file, scan_folder, to_rgb
from forensics.errors import FpWarning, InputError

#: Version of the cache layout and of the saved-embeddings format.
FORMAT_VERSION = 1
#: Rows per cache chunk file.
CACHE_CHUNK_ROWS = 4096


class _DefaultCache:
    def __repr__(self) -> str:
        return "<default cache dir>"


#: Use :func:`default_cache_dir` (the default of ``cache_dir``); ``None`` disables caching.
DEFAULT_CACHE = _DefaultCache()


def default_cache_dir() -> Path:
    """``$FP_CACHE_DIR/embeddings``, or the platform's user cache dir ``fp/embeddings``."""
    root = os.environ.get(defaults.CACHE_ENV)
    if root:
        return Path(root).expanduser() / defaults.CACHE_FOLDER
    import platformdirs

    return Path(platformdirs.user_cache_dir(defaults.APP_NAME)) / defaults.CACHE_FOLDER


def check_output_path(path: str | os.PathLike) -> Path:
    """Return ``path`` if a ``.npz`` or ``.parquet`` file can be written there.

    Raises:
        InputError: another suffix, a folder, device, FIFO or socket of that name, or a file
            where a parent folder should be.
    """
    from forensics.data.atomic import check_output_file

    path = Path(path)
    if path.suffix.lower() not in (".npz", ".parquet"):
        raise InputError(f"--out {path}: use a .npz or .parquet file name")
    return check_output_file(path, "--out")


@dataclass
class Embeddings:
    """Per-layer embeddings of N images.

    Attributes:
        layers: layer names, in network order.
        arrays: one float32 ``(N, D_l)`` array per layer.
        manifest: the images (``None`` for in-memory arrays).
        encoder_info: provenance: name, family, weights spec, weights_sha256,
            weights_loading (what was done to fit a local checkpoint),
            preprocessing, pool, precision, fp/torch versions.
    """

    layers: list[str]
    arrays: list[np.ndarray]
    manifest: Manifest | None = None
    encoder_info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0]) if self.arrays else 0

    def layer(self, name: str) -> np.ndarray:
        """The ``(N, D)`` array of one layer, by name."""
        try:
            return self.arrays[self.layers.index(name)]
        except ValueError:
            raise InputError(f"no layer {name!r}; layers: {', '.join(self.layers)}") from None

    def _meta(self) -> dict[str, Any]:
        return {
            "format": "fp-embeddings",
            "version": FORMAT_VERSION,
            "layers": self.layers,
            "encoder_info": self.encoder_info,
            "manifest": self.manifest.to_dict() if self.manifest is not None else None,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``.npz`` or ``.parquet`` (chosen by the suffix), atomically.

        ``.npz``: arrays ``layer_000``, ``layer_001``, ... and ``meta`` (a JSON string with
        layers, encoder_info and the manifest). ``.parquet``: one row per image, columns
        ``image`` (relative path, or row index), ``sha256``, and one fixed-size float32 list
        column per layer; the same JSON in the schema metadata key ``fp``.
        """
        path = check_output_path(path)
        suffix = path.suffix.lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npz":
            arrays = {f"layer_{i:03d}": a for i, a in enumerate(self.arrays)}
            atomic_savez(path, {"meta": np.array(json.dumps(self._meta())), **arrays},
                         fsync=False)
        else:
            atomic_write(path, self._write_parquet, fsync=False)
        return path

    def _write_parquet(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(self)
        if self.manifest is not None:
            images = [e.relpath for e in self.manifest.entries]
            hashes = [e.sha256 for e in self.manifest.entries]
        else:
            images, hashes = [str(i) for i in range(n)], [""] * n
        columns = {"image": pa.array(images, pa.string()), "sha256": pa.array(hashes, pa.string())}
        for name, arr in zip(self.layers, self.arrays, strict=True):
            flat = pa.array(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1))
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
        table = pa.table(columns).replace_schema_metadata({"fp": json.dumps(self._meta())})
        pq.write_table(table, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Embeddings:
        """Read a file written by :meth:`save`.

        Raises:
            InputError: the file is missing or not an ``fp`` embeddings file.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path} does not exist")
        try:
            if path.suffix.lower() == ".parquet":
                meta, arrays = _read_parquet(path)
            else:
                with np.load(path, allow_pickle=False) as data:
                    meta = json.loads(str(data["meta"]))
                    arrays = [data[f"layer_{i:03d}"] for i in range(len(meta["layers"]))]
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path} is not an fp embeddings file ({exc})") from exc
        if meta.get("format") != "fp-embeddings":
            raise InputError(f"{path} is not an fp embeddings file")
        manifest = Manifest.from_dict(meta["manifest"]) if meta.get("manifest") else None
        return cls(list(meta["layers"]), arrays, manifest, meta.get("encoder_info", {}))


def _read_parquet(path: Path) -> tuple[dict[str, Any], list[np.ndarray]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {})[b"fp"])
    arrays = []
    for name in meta["layers"]:
        column = table.column(name).combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        arrays.append(flat.reshape(len(table), -1))
    return meta, arrays


# --------------------------------------------------------------------------- encoders


def get_encoder(name: str):
    """Look up an encoder by name; ``NAME@SIZE`` sets the input size where supported.

    Raises:
        UnknownNameError: unknown name (the message lists valid names).
        InputError: ``@SIZE`` is malformed or the encoder has a fixed input size.
    """
    from forensics.plugin.manager import get

    base, sep, size = name.partition("@")
    encoder = get("encoders", base)
    if not sep:
        return encoder
    if not size.isdigit():
        raise InputError(f"encoder {name!r}: the part after '@' must be an input size in pixels")
    if not hasattr(encoder, "with_input_size"):
        raise InputError(f"encoder {base!r} has a fixed input size; drop '@{size}'")
    return encoder.with_input_size(int(size))


def encoder_info(encoder, loaded, weights: str | None, pool: str) -> dict[str, Any]:
    """Provenance of one loaded encoder (also the basis of the cache key)."""
    import torch

    spec = weights if weights is not None else getattr(encoder, "default_weights", "hub")
    return {
        "name": encoder.name,
        "family": getattr(encoder, "family", ""),
        "weights": str(spec),
        "weights_sha256": loaded.weights_sha256,
        "weights_loading": list(getattr(loaded, "weights_loading", [])),
        "preprocessing": loaded.preprocess,
        "pool": pool,
        "precision": getattr(loaded, "precision", "float32"),
        "layers": list(loaded.layer_names),
        "fp_version": __version__,
        "torch_version": torch.__version__,
    }


#: What determines an embedding besides the image itself: the fields the cache is keyed by.
KEYED = ("name", "weights_sha256", "preprocessing", "pool", "precision", "layers")


def cache_key(info: dict[str, Any]) -> str:
    """Hash of what determines an embedding besides the image itself."""
    keyed = {k: info[k] for k in KEYED}
    keyed["cache_format"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- cache


#: Each cache folder's index, read once per process: folder -> (chunk stamps, index, rows).
_INDEXES: dict[Path, tuple[tuple, dict[bytes, tuple[Path, int]], dict[Path, int]]] = {}


class EmbeddingCache:
    """Cached embeddings of one encoder configuration: ``.npz`` chunks keyed by image hash.

    Each chunk holds ``sha256`` (the image hashes, ``S64``) and ``layer_000``...; chunks are
    written atomically under ``<cache_dir>/<key>/`` and never modified; ``info.json`` beside
    them records the configuration and each layer's embedding size. No pickle. A chunk that
    cannot be read, whose arrays do not have one row per hash or the recorded sizes (or those
    of the other chunks), or that holds NaN or infinity, is renamed ``damaged-<name>`` (so
    it is reported once), reported with a :class:`~forensics.errors.FpWarning`, and not used.
    """

    def __init__(self, cache_dir: Path, key: str, info: dict[str, Any]):
        self.dir = Path(cache_dir) / key
        self.n_layers = len(info["layers"])
        self._index: dict[bytes, tuple[Path, int]] | None = None
        self._rows: dict[Path, int] = {}
        self._dims: list[int] | None = None
        self._info = info
        #: Chunks found damaged and set aside by this object (file names).
        self.damaged: list[str] = []
        #: Read, never written (a folder this process cannot write; see :meth:`checked`).
        self.read_only = False

    def checked(self) -> EmbeddingCache | None:
        """This cache if its folder can be used, before anything is embedded.

        A folder that cannot be created (``FP_CACHE_DIR`` a file or under one, a read-only
        home) gives None: embedding goes on without a cache. A folder that exists but
        cannot be written is read and not written. Either way a warning says why.
        """
        root = self.dir.parent
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
            return self
        except OSError as exc:
            why = f"{type(exc).__name__}: {exc.strerror or exc}"
        if self.dir.is_dir() and os.access(self.dir, os.R_OK | os.X_OK):
            self.read_only = True
            warnings.warn(f"the embedding cache folder {root} cannot be written ({why}); it is "
                          f"read but new embeddings are not stored: set FP_CACHE_DIR to a "
                          f"writable folder", FpWarning, stacklevel=3)
            return self
        warnings.warn(f"the embedding cache folder {root} cannot be used ({why}); embedding "
                      f"without a cache: set FP_CACHE_DIR to a writable folder, or pass "
                      f"--no-cache", FpWarning, stacklevel=3)
        return None

    def index(self) -> dict[bytes, tuple[Path, int]]:
        """image hash -> (chunk file, row).

        Read once per process and cache folder while its chunks stay as they are (by name,
        size and modification time): a call that answers many suspect sets lists the
        folder for each, and reads its hashes once.
        """
        if self._index is None:
            chunks = sorted(self.dir.glob("chunk-*.npz"))
            try:
                stamp = tuple((c.name, c.stat().st_size, c.stat().st_mtime_ns) for c in chunks)
            except OSError:
                stamp = None
            known = _INDEXES.get(self.dir)
            if stamp is not None and known is not None and known[0] == stamp:
                self._index, self._rows = dict(known[1]), dict(known[2])
                return self._index
            self._index = {}
            for chunk in chunks:
                try:
                    with np.load(chunk, allow_pickle=False) as data:
                        hashes = data["sha256"]
                    if hashes.ndim != 1 or hashes.dtype != np.dtype("S64"):
                        raise ValueError(f"its image hashes have dtype {hashes.dtype} and "
                                         f"shape {hashes.shape}")
                except Exception as exc:  # a damaged zip raises many types  # noqa: BLE001
                    self.set_aside(chunk, _reason(exc))
                    continue
                self._rows[chunk] = len(hashes)
                for row, h in enumerate(hashes):
                    self._index[bytes(h)] = (chunk, row)
            if stamp is not None and not self.damaged:
                _INDEXES[self.dir] = (stamp, dict(self._index), dict(self._rows))
        return self._index

    def fetch(self, hashes: Sequence[str], rows: Sequence[int], n: int,
              allocate: Any = None) -> tuple[list[np.ndarray] | None, list[int]]:
        """Cached embeddings of ``hashes`` placed at ``rows`` of ``n``-row arrays.

        ``allocate(dims)`` makes those arrays (default: zeros in memory); a store's layers
        take the rows a chunk at a time.

        Returns:
            The per-layer arrays (None when no chunk could be used) and the rows whose
            chunk turned out damaged (they must be embedded again).
        """
        index = self.index()
        by_chunk: dict[Path, list[tuple[int, int]]] = {}
        for h, row in zip(hashes, rows, strict=True):
            chunk, src = index[h.encode()]
            by_chunk.setdefault(chunk, []).append((row, src))
        out: list[np.ndarray] | None = None
        lost: list[int] = []
        for chunk, pairs in by_chunk.items():
            dst = np.array([p[0] for p in pairs])
            src = np.array([p[1] for p in pairs])
            try:
                layers = self._read_rows(chunk, src)
            except Exception as exc:  # noqa: BLE001 - any failure means a damaged chunk
                self.set_aside(chunk, _reason(exc))
                lost.extend(int(r) for r in dst)
                continue
            if out is None:
                dims = [a.shape[1] for a in layers]
                out = (allocate(dims) if allocate is not None
                       else [np.zeros((n, d), dtype=np.float32) for d in dims])
            for layer, arr in zip(out, layers, strict=True):
                layer[dst] = arr
        return out, sorted(lost)

    def _read_rows(self, chunk: Path, src: np.ndarray) -> list[np.ndarray]:
        """Rows ``src`` of every layer of one chunk, checked as :meth:`_read_chunk` checks
        a whole chunk (the rows read must be finite).

        A chunk is a plain ``.npz`` (members stored, not compressed): each layer is read
        in place through a memory map, so taking 512 rows of a 4,096-row chunk reads
        those rows, not the chunk. Any other layout is read whole.
        """
        import struct
        import zipfile

        layers: list[np.ndarray] = []
        rows = self._rows[chunk]
        with open(chunk, "rb") as fh, zipfile.ZipFile(fh) as zf:
            for i in range(self.n_layers):
                info = zf.getinfo(f"layer_{i:03d}.npy")
                if info.compress_type != zipfile.ZIP_STORED:
                    return [a[src] for a in self._read_chunk(chunk)]
                fh.seek(info.header_offset)
                head = fh.read(30)
                if head[:4] != b"PK\x03\x04":
                    raise ValueError(f"layer {i} has no zip entry header")
                name_len, extra_len = struct.unpack("<HH", head[26:30])
                fh.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(fh)
                if (len(shape) != 2 or shape[0] != rows or dtype.kind != "f" or fortran
                        or fh.tell() + int(np.prod(shape)) * dtype.itemsize
                        > info.header_offset + 30 + name_len + extra_len + info.file_size):
                    raise ValueError(f"layer {i} has shape {shape} and dtype {dtype}, not "
                                     f"({rows}, D) floats")
                mm = np.memmap(chunk, dtype=dtype, mode="r", offset=fh.tell(), shape=shape)
                a = np.array(mm[src])
                del mm
                if not np.isfinite(a).all():
                    raise ValueError(f"layer {i} holds NaN or infinite values")
                layers.append(a)
        return self._same_dims(layers)

    def _read_chunk(self, chunk: Path) -> list[np.ndarray]:
        """Every layer of one chunk, checked against its hashes and the other chunks."""
        with np.load(chunk, allow_pickle=False) as data:
            layers = [data[f"layer_{i:03d}"] for i in range(self.n_layers)]
        rows = self._rows[chunk]
        for i, a in enumerate(layers):
            if a.ndim != 2 or a.shape[0] != rows or a.dtype.kind != "f":
                raise ValueError(f"layer {i} has shape {a.shape} and dtype {a.dtype}, not "
                                 f"({rows}, D) floats")
            if not np.isfinite(a).all():
                raise ValueError(f"layer {i} holds NaN or infinite values")
        return self._same_dims(layers)

    def _same_dims(self, layers: list[np.ndarray]) -> list[np.ndarray]:
        """``layers``, once their embedding sizes are checked against the other chunks'
        (the sizes recorded by the first write, or those of the first chunk read)."""
        dims = [int(a.shape[1]) for a in layers]
        if self._dims is None:
            self._dims = self._recorded_dims() or dims
        if dims != self._dims:
            raise ValueError(f"its embedding sizes {dims} differ from the recorded "
                             f"{self._dims}")
        return layers

    def _recorded_dims(self) -> list[int] | None:
        """Embedding sizes recorded in ``info.json`` by the first write (None: unknown)."""
        try:
            dims = json.loads((self.dir / "info.json").read_text()).get("dims")
        except (OSError, ValueError, AttributeError):
            return None
        ok = isinstance(dims, list) and len(dims) == self.n_layers
        return [int(d) for d in dims] if ok and all(isinstance(d, int) for d in dims) else None

    def set_aside(self, chunk: Path, reason: str) -> None:
        """Rename a damaged chunk out of the way and report it (once)."""
        target = chunk.with_name(f"damaged-{chunk.name}")
        try:
            os.replace(chunk, target)
            where = f"set aside as {target.name}"
        except OSError:  # e.g. a read-only cache: it will be reported again next time
            where = "left in place (it cannot be renamed)"
        self.damaged.append(chunk.name)
        if self._index is not None:
            self._index = {h: v for h, v in self._index.items() if v[0] != chunk}
        warnings.warn(f"the embedding cache file {chunk} is damaged ({reason}); it is {where} "
                      f"and its images are embedded again", FpWarning, stacklevel=2)

    def write(self, hashes: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
        """Store one chunk (atomically)."""
        if not len(hashes) or self.read_only:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        info_path = self.dir / "info.json"
        if not info_path.exists():
            dims = [int(np.shape(a)[1]) for a in arrays]
            atomic_write_text(info_path, json.dumps({**self._info, "dims": dims}, indent=2))
        chunk = self.dir / f"chunk-{uuid.uuid4().hex}.npz"
        payload = {f"layer_{i:03d}": np.ascontiguousarray(a) for i, a in enumerate(arrays)}
        atomic_savez(chunk, {"sha256": np.array(hashes, dtype="S64"), **payload}, fsync=False)


def _expected_cache(expect: dict[str, Any], cache_dir: Path | str | _DefaultCache
                    ) -> EmbeddingCache | None:
    """The cache entry of configuration ``expect`` (what :func:`cache_key` reads), if its
    ``info.json`` records that configuration (None: no such entry)."""
    if cache_dir is DEFAULT_CACHE:
        cache_dir = default_cache_dir()
    try:
        key = cache_key(expect)
    except KeyError:
        return None
    try:
        info = json.loads((Path(cache_dir) / key / "info.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or any(info.get(k) != expect.get(k) for k in KEYED):
        return None
    return EmbeddingCache(Path(cache_dir), key, info)


def cached_embeddings(manifest: Manifest, expect: dict[str, Any],
                      cache_dir: Path | str | _DefaultCache) -> Embeddings | None:
    """Every image of ``manifest`` read from the cache of the configuration ``expect``,
    without loading the encoder; None when any image is missing, or the cache entry does
    not record that configuration (the caller embeds as usual).

    ``expect`` holds what :func:`cache_key` reads (``name``, ``weights_sha256``,
    ``preprocessing``, ``pool``, ``precision``, ``layers``); the entry's ``info.json`` must
    record the same, and the returned :attr:`Embeddings.encoder_info` is that record, as
    written when the entry's first image was embedded.
    """
    cache = _expected_cache(expect, cache_dir)
    return None if cache is None else _all_cached(cache, manifest)


def _all_cached(cache: EmbeddingCache, manifest: Manifest) -> Embeddings | None:
    """Every image of ``manifest`` from ``cache`` (None: any is missing or damaged)."""
    hashes = manifest.hashes
    index = cache.index()
    if not hashes or any(h.encode() not in index for h in hashes):
        return None
    rows = list(range(len(hashes)))
    out, lost = cache.fetch(hashes, rows, len(hashes))
    if lost or out is None:
        return None
    info = {k: v for k, v in cache._info.items() if k != "dims"}
    info["cache"] = {"hits": len(hashes), "computed": 0}
    if cache.damaged:
        info["cache"]["damaged"] = list(cache.damaged)
    info["num_images"] = len(hashes)
    return Embeddings(list(info["layers"]), out, manifest, info)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _cache_entries(cache_dir: Path) -> list[Path]:
    """The folders of ``cache_dir`` that are embedding caches (hold info.json or chunks)."""
    if not cache_dir.is_dir():
        return []
    return sorted(d for d in cache_dir.iterdir() if d.is_dir() and (
        (d / "info.json").is_file() or any(d.glob("chunk-*.npz"))))


def _cache_entry(folder: Path) -> dict[str, Any]:
    try:
        info = json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        info = {}
    chunks = sorted(folder.glob("chunk-*.npz"))
    seen: set[bytes] = set()  # distinct images: two runs at once may both store one
    for chunk in chunks:
        try:
            with np.load(chunk, allow_pickle=False) as data:
                seen.update(bytes(h) for h in data["sha256"])
        except (OSError, KeyError, ValueError, TypeError):
            continue
    images = len(seen)
    return {"key": folder.name, "encoder": info.get("name"), "weights": info.get("weights"),
            "weights_sha256": info.get("weights_sha256"), "pool": info.get("pool"),
            "n_layers": len(info.get("layers", [])) or None, "n_chunks": len(chunks),
            "n_images": images,
            "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file())}


def cache_info(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the embedding cache holds, per encoder configuration.

    Args:
        cache_dir: the cache folder (None: :func:`default_cache_dir`).

    Returns:
        ``{"cache_dir", "entries": [{"key", "encoder", "weights", "weights_sha256",
        "pool", "n_layers", "n_chunks", "n_images", "bytes"}], "bytes"}``.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entries = [_cache_entry(d) for d in _cache_entries(root)]
    return {"cache_dir": str(root), "entries": entries,
            "bytes": sum(e["bytes"] for e in entries)}


def clear_cache(cache_dir: str | os.PathLike | None = None, *,
                encoder: str | None = None) -> dict[str, Any]:
    """Delete cached embeddings (every configuration, or those of one encoder).

    Only folders that are embedding caches are removed; anything else in ``cache_dir``
    is left alone. Embeddings are recomputed on next use.

    Returns:
        ``{"cache_dir", "removed": [entry dicts as in :func:`cache_info`], "bytes"}``.
    """
    import shutil

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    removed = []
    for folder in _cache_entries(root):
        entry = _cache_entry(folder)
        if encoder is not None and entry["encoder"] != encoder:
            continue
        shutil.rmtree(folder)
        removed.append(entry)
    return {"cache_dir": str(root), "removed": removed,
            "bytes": sum(e["bytes"] for e in removed)}


# --------------------------------------------------------------------------- datasets


class _FileImages:
    """Manifest entries -> (row, tensor or None, error) in DataLoader workers."""

    def __init__(self, manifest: Manifest, rows: Sequence[int], transform):
        self.root = Path(manifest.root)
        self.items = [(r, manifest.entries[r].relpath, manifest.entries[r].sha256) for r in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return read_item(self.root, self.transform, *self.items[i])


def read_item(root: Path, transform, row: int, relpath: str, sha256: str):
    """One manifest entry -> ``(row, tensor or None, error)``: read, hash-checked, transformed."""
    try:
        data = read_image_file(Path(root) / relpath)
        if hashlib.sha256(data).hexdigest() != sha256:
            return row, None, f"{relpath}: changed since it was scanned; run again"
        return row, transform(decode_rgb(data)), ""
    except (OSError, InputError) as exc:
        return row, None, f"{relpath}: {exc}"


class _ArrayImages:
    """Rows of a uint8 array -> (row, tensor, "")."""

    def __init__(self, images: np.ndarray, rows: Sequence[int], transform):
        self.images = images
        self.rows = list(rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image

        row = self.rows[i]
        return row, self.transform(to_rgb(Image.fromarray(self.images[row]))), ""


def _collate(items):
    import torch

    good = [(row, t) for row, t, err in items if t is not None]
    errors = [err for _, t, err in items if t is None]
    rows = [row for row, _ in good]
    batch = torch.stack([t for _, t in good]) if good else None
    return rows, batch, errors


def default_num_workers(device: str) -> int:
    """DataLoader workers: up to 8 on GPU; on CPU one per core beyond the first two."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    if device.startswith("cuda"):
        return min(8, cpus)
    return min(4, max(0, cpus - 2))


# --------------------------------------------------------------------------- entry points


def embed_folder(
    folder_or_manifest: str | os.PathLike | Manifest,
    encoder: str,
    *,
    weights: str | None = None,
    pool: str = defaults.POOL,
    device: str = defaults.DEVICE,
    batch_size: int = defaults.BATCH_SIZE,
    num_workers: int | None = None,
    cache_dir: Path | str | None | _DefaultCache = DEFAULT_CACHE,
    progress: bool = True,
    skip_bad: bool = False,
    ray: str | None = None,
    store: str | os.PathLike | None = None,
    on_batch: Callable[[int], None] | None = None,
    expect: dict[str, Any] | None = None,
) -> Embeddings:
    """Embed every image of a folder (or of a manifest) at every layer of ``encoder``.

    Args:
        folder_or_manifest: a folder (scanned with :func:`~forensics.data.images.scan_folder`)
            or a manifest from it.
        encoder: encoder name (``fp encoders list``); ``NAME@SIZE`` sets the input size
            where the encoder allows it.
        weights: ``hub``, a local file, or ``random:SEED``; ``None``: the encoder's default
            (``hub`` for pretrained models).
        pool: ``cls`` (class token) or ``mean`` (mean of patch tokens) for transformer
            layers; feature maps are always global-average pooled.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per forward pass.
        num_workers: DataLoader decoding workers (default: see :func:`default_num_workers`).
        cache_dir: embedding cache folder; default :func:`default_cache_dir`; ``None``
            disables the cache.
        progress: show a progress bar (images/s) on stderr.
        skip_bad: skip bad image files (recorded in the manifest) instead of failing.
        ray: embed the images missing from the cache on a Ray cluster: ``auto`` (a running
            cluster, else a local one), ``local``, or a cluster address
            (see :mod:`forensics.data.ray_embed`); ``None``: in this process.
        store: a folder for an on-disk, layer-major store (:mod:`forensics.data.store`):
            rows go there as they are fetched from the cache or computed, and the
            returned arrays read them back a chunk at a time (memory stays bounded by
            the batch and the cache chunk, whatever the number of images).
        expect: the encoder configuration the embeddings must have (what
            :func:`cache_key` reads: a baseline's record of it). When every image is in the
            cache under it, the rows are read from there without loading the encoder (or
            importing torch): :func:`cached_embeddings`.

    Returns:
        The embeddings, rows in manifest order.

    Raises:
        InputError: bad inputs (see :func:`~forensics.data.images.scan_folder`) or parameters.
        OfflineError: hub weights are needed but cannot be fetched.
    """
    from forensics.plugin.encoders import check_pool

    check_pool(pool)  # names first: scanning a large folder takes a while
    get_encoder(encoder)
    if ray is not None:
        from forensics.data.ray_embed import require_ray

        require_ray()
    cached = (_expected_cache(expect, cache_dir)
              if expect is not None and ray is None and store is None and cache_dir is not None
              else None)
    if isinstance(folder_or_manifest, Manifest):
        manifest = folder_or_manifest
    else:  # images embedded before were decoded then: hashed, not decoded again
        index = None if cached is None else cached.index()
        manifest = scan_folder(folder_or_manifest, skip_bad=skip_bad, known=None
                               if index is None else (lambda sha: sha.encode() in index))
    if cached is not None:
        found = _all_cached(cached, manifest)
        if found is not None:
            return found
    return _embed(
        manifest.hashes,
        lambda rows, transform: _FileImages(manifest, rows, transform),
        manifest, encoder, weights, pool, device, batch_size, num_workers, cache_dir, progress,
        ray=ray,
        store=store,
        on_batch=on_batch,
    )


def embed_arrays(
    images: np.ndarray,
    encoder: str,
    *,
    weights: str | None = None,
    pool: str = defaults.POOL,
    device: str = defaults.DEVICE,
    batch_size: int = defaults.BATCH_SIZE,
    num_workers: int | None = 0,
    cache_dir: Path | str | None | _DefaultCache = DEFAULT_CACHE,
    progress: bool = False,
) -> Embeddings:
    """Embed in-memory images: uint8 ``(N, H, W)`` greyscale or ``(N, H, W, 3)`` RGB.

    Same path as :func:`embed_folder` once an image is decoded; the cache keys each image
    by the SHA-256 of its shape and pixels. Arguments as in :func:`embed_folder`.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or not (
        images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
    ):
        raise InputError(
            f"images must be uint8 of shape (N, H, W) or (N, H, W, 3); got {images.dtype} "
            f"{images.shape}"
        )
    if len(images) == 0:
        raise InputError("no images given (the array is empty)")
    images = np.ascontiguousarray(images)
    header = ("x".join(map(str, images.shape[1:])) + "|").encode()
    hashes = [hashlib.sha256(header + im.tobytes()).hexdigest() for im in images]
    return _embed(
        hashes, lambda rows, transform: _ArrayImages(images, rows, transform),
        None, encoder, weights, pool, device, batch_size, num_workers, cache_dir, progress,
    )


#: Loaded encoders kept while :func:`reusing_encoders` is active (None: not active).
_reused: dict[tuple, tuple[Any, dict[str, Any]]] | None = None


@contextmanager
def reusing_encoders() -> Iterator[None]:
    """Within this block, embedding with the same encoder, weights, device and pool loads
    (and hashes) the encoder once: a step that embeds several folders (T and P) pays for it
    once. A weights file is loaded again if its size, modification time or inode changed.
    The loaded models are released when the block ends."""
    global _reused
    outer = _reused
    if outer is None:
        _reused = {}
    try:
        yield
    finally:
        if outer is None:
            _reused = None


def _weights_stamp(weights: str | None) -> tuple | None:
    """What identifies a weights file's content cheaply (None for hub/random specs)."""
    if weights is None or not os.path.isfile(weights):
        return None
    st = os.stat(weights)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _load_encoder(encoder, weights, device, pool) -> tuple[Any, dict[str, Any]]:
    """The loaded encoder and its provenance, reused inside :func:`reusing_encoders`."""
    # By class and name: a sized name (``NAME@SIZE``) makes a new encoder object per lookup.
    key = (type(encoder), encoder.name, weights, device, pool, _weights_stamp(weights))
    if _reused is not None and key in _reused:
        loaded, info = _reused[key]
        return loaded, dict(info)
    loaded = encoder.load(weights, device, pool)
    info = encoder_info(encoder, loaded, weights, pool)
    if _reused is not None:
        _reused[key] = (loaded, dict(info))
    return loaded, info


def _embed(hashes, make_dataset, manifest, encoder_name, weights, pool, device, batch_size,
           num_workers, cache_dir, progress, ray=None, store=None, on_batch=None
           ) -> Embeddings:
    from forensics.plugin.encoders import check_pool, resolve_device

    check_pool(pool)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    encoder = get_encoder(encoder_name)
    if ray is None:
        device = resolve_device(device)
    else:
        from forensics.data.ray_embed import RayEmbedder

        runner = RayEmbedder(ray, device)
        device = runner.device
        load = functools.partial(load_named_encoder, encoder_name, weights, pool)
    if ray is not None and device != "cpu":  # loaded on the cluster's GPUs, described here
        loaded = runner.describe(load)
        info = encoder_info(encoder, loaded, weights, pool)
    else:
        loaded, info = _load_encoder(encoder, weights, device, pool)
    if cache_dir is DEFAULT_CACHE:
        cache_dir = default_cache_dir()
    cache = EmbeddingCache(Path(cache_dir), cache_key(info), info) if cache_dir else None
    if cache is not None:
        cache = cache.checked()

    n = len(hashes)
    writer: list[Any] = []

    def allocate(dims: list[int]) -> list[Any]:
        """Where the rows go: arrays in memory, or the layers of a new store."""
        if store is None:
            return [np.zeros((n, d), dtype=np.float32) for d in dims]
        from forensics.data.store import StoreWriter

        writer[:] = [StoreWriter(store, list(loaded.layer_names), dims, n)]
        return writer[0].arrays

    cached = cache.index() if cache is not None else {}
    hit_rows = [r for r, h in enumerate(hashes) if h.encode() in cached]
    out = None
    if hit_rows:
        out, lost = cache.fetch([hashes[r] for r in hit_rows], hit_rows, n, allocate)
        hit_rows = sorted(set(hit_rows) - set(lost))
    workers = default_num_workers(device) if num_workers is None else num_workers
    for _attempt in range(2):
        todo = sorted(set(range(n)) - set(hit_rows))
        if not todo:
            break
        dataset = make_dataset(todo, loaded.transform)
        if ray is None:
            batches = _local_batches(dataset, loaded, batch_size, workers, device)
        else:
            read = functools.partial(read_item, dataset.root, dataset.transform)
            batches = runner.batches(load, dataset.items, read, dataset.transform,
                                     batch_size)
        try:
            out = _compute(batches, out, n, hashes, cache, progress, len(hit_rows), allocate,
                           on_batch)
            break
        except _CachedSizesDiffer as exc:  # every chunk used is wrong: embed all again
            for chunk in sorted({cache.index()[hashes[r].encode()][0] for r in hit_rows}):
                cache.set_aside(chunk, str(exc))
            out, hit_rows = None, []
    info["cache"] = {"hits": len(hit_rows), "computed": len(todo)}
    if cache is not None and cache.damaged:
        info["cache"]["damaged"] = list(cache.damaged)
    info["num_images"] = n
    if writer:
        out = writer[0].close(hashes=hashes, encoder=info.get("name")).arrays
    return Embeddings(list(loaded.layer_names), out, manifest, info)


def load_named_encoder(name: str, weights: str | None, pool: str, device: str):
    """The encoder ``name`` loaded on ``device`` (what each Ray encoder actor runs)."""
    return _load_encoder(get_encoder(name), weights, device, pool)[0]


def _local_batches(dataset, loaded, batch_size, workers, device):
    """``(rows, per-layer features, errors)`` per batch, decoded by DataLoader workers."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=device.startswith("cuda"),
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    for rows, batch, bad in loader:
        yield rows, (loaded.forward(batch) if batch is not None else None), bad


def _compute(batches, out, n, hashes, cache, progress, already, allocate, on_batch=None):
    """Collect ``batches`` into ``out`` (``allocate(dims)`` on the first batch) and the cache."""
    errors: list[str] = []
    pending: list[int] = []
    bar = _Progress(n, already, enabled=progress)
    with bar:
        for rows, feats, bad in batches:
            errors.extend(bad)
            if feats is None:
                continue
            if out is not None and [a.shape[1] for a in out] != [f.shape[1] for f in feats]:
                raise _CachedSizesDiffer(
                    f"its embedding sizes {[a.shape[1] for a in out]} differ from the "
                    f"encoder's {[f.shape[1] for f in feats]}")
            if out is None:
                out = allocate([f.shape[1] for f in feats])
            for layer, f in zip(out, feats, strict=True):
                layer[rows] = f
            pending.extend(rows)
            if cache is not None and len(pending) >= CACHE_CHUNK_ROWS:
                _flush(cache, out, hashes, pending)
            bar.advance(len(rows))
            if on_batch is not None:
                on_batch(len(rows))
    if cache is not None and pending:
        _flush(cache, out, hashes, pending)
    if errors:
        lines = "\n".join(f"  {e}" for e in errors)
        raise InputError(f"{len(errors)} image(s) could not be read while embedding:\n{lines}")
    return out


class _CachedSizesDiffer(Exception):
    """Cached rows have other embedding sizes than the encoder computes."""


def _flush(cache: EmbeddingCache, out: list[np.ndarray], hashes, pending: list[int]) -> None:
    rows = np.array(pending, dtype=np.int64)
    cache.write([hashes[r] for r in pending], [layer[rows] for layer in out])
    pending.clear()


class _Progress:
    """A Rich progress bar on stderr with images/s; does nothing when disabled."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        self.total, self.done = total, done
        self._computed = 0
        self._start = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("embedding"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} images/s"), TimeElapsedColumn(),
                TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("embed", total=self.total, completed=self.done,
                                            rate="-")
        return self

    def advance(self, k: int) -> None:
        self._computed += k
        if self.enabled:
            rate = self._computed / max(time.perf_counter() - self._start, 1e-9)
            self._bar.update(self._task, advance=k, rate=f"{rate:,.0f}")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()
