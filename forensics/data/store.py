"""An on-disk, layer-major store of one image set's embeddings: one ``.npy`` per layer.

::

    store/  meta.json            layers, dims, rows, dtype, image hashes' digest; last written
            layer-000.npy        (n, D_0) rows in the set's (manifest) order
            layer-001.npy        ...

Each layer is a plain ``.npy`` file opened as a read-only memory map, so a statistic that
reads one layer a chunk of rows at a time (:mod:`forensics.stats.streaming`) holds one
chunk in memory, whatever the set's size; gathering rows (a cell's members) is a slice of
the map. A store is filled a chunk of images at a time (:class:`StoreWriter`);
``meta.json`` is written last, atomically, so a store whose filling was interrupted is
never opened as complete. The embedding cache stays the record of which images were
already embedded: a store is filled from it and can always be rebuilt from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from forensics.data.atomic import atomic_write_text
from forensics.errors import InputError

#: Version of the store layout.
STORE_FORMAT = 1
META_FILE = "meta.json"


def layer_file(i: int) -> str:
    """File name of layer ``i``."""
    return f"layer-{i:03d}.npy"


def hashes_digest(hashes: Sequence[str]) -> str:
    """SHA-256 of the rows' image hashes, in row order (what the store holds, by content)."""
    h = hashlib.sha256()
    for x in hashes:
        h.update(x.encode() + b"\n")
    return h.hexdigest()


class LayerStore:
    """A complete store, opened read-only: one memory map per layer.

    Attributes:
        root: the store's folder.
        meta: its ``meta.json``.
    """

    def __init__(self, root: str | os.PathLike, meta: dict):
        self.root = Path(root)
        self.meta = meta
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, root: str | os.PathLike) -> LayerStore:
        """Open a complete store.

        Raises:
            InputError: no store there, an incomplete one, or one of another format.
        """
        root = Path(root)
        try:
            meta = json.loads((root / META_FILE).read_text())
        except FileNotFoundError:
            raise InputError(f"{root} holds no complete embedding store (no {META_FILE}); "
                             f"fill it again") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{root / META_FILE} is unreadable ({exc}); fill the store "
                             f"again") from None
        if meta.get("format") != STORE_FORMAT:
            raise InputError(f"{root} holds a store of format {meta.get('format')!r}; this "
                             f"fp reads format {STORE_FORMAT}: fill it again")
        return cls(root, meta)

    @property
    def layers(self) -> list[str]:
        """Layer names, in order."""
        return list(self.meta["layers"])

    @property
    def dims(self) -> list[int]:
        """Features per layer."""
        return [int(d) for d in self.meta["dims"]]

    def __len__(self) -> int:
        return int(self.meta["n"])

    def layer(self, i: int) -> np.ndarray:
        """Layer ``i`` as a read-only (n, D_i) memory map.

        Raises:
            InputError: the layer's file is missing or of the wrong shape.
        """
        if i not in self._maps:
            path = self.root / layer_file(i)
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"{path} is unreadable ({exc}); fill the store again") from None
            if arr.shape != (len(self), self.dims[i]):
                raise InputError(f"{path} holds shape {arr.shape}, the store says "
                                 f"{(len(self), self.dims[i])}: fill the store again")
            self._maps[i] = arr
        return self._maps[i]

    @property
    def arrays(self) -> list[np.ndarray]:
        """Every layer's memory map, in order (what a baseline is built from)."""
        return [self.layer(i) for i in range(len(self.layers))]

    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())


class StoreWriter:
    """Fills a new store a chunk of rows at a time; :meth:`close` makes it complete.

    Args:
        root: the store's folder (created; an existing store there is replaced).
        layers: layer names.
        dims: features per layer.
        n: rows (images) the store will hold.
        dtype: stored dtype (``float32``, as encoders give).
    """

    def __init__(self, root: str | os.PathLike, layers: Sequence[str], dims: Sequence[int],
                 n: int, dtype: str = "float32"):
        if len(layers) != len(dims) or not layers:
            raise InputError(f"a store needs one size per layer: {len(layers)} layers, "
                             f"{len(dims)} sizes")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / META_FILE).unlink(missing_ok=True)  # incomplete until close()
        self.layers, self.dims, self.n = list(layers), [int(d) for d in dims], int(n)
        self.dtype = np.dtype(dtype)
        self._maps = [np.lib.format.open_memmap(self.root / layer_file(i), mode="w+",
                                                dtype=self.dtype, shape=(self.n, d))
                      for i, d in enumerate(self.dims)]
        self._filled = np.zeros(self.n, dtype=bool)

    def write(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Rows ``start : start + b`` of every layer, one (b, D_l) array per layer."""
        if len(arrays) != len(self.layers):
            raise InputError(f"expected {len(self.layers)} layers, got {len(arrays)}")
        b = np.shape(arrays[0])[0]
        if start < 0 or start + b > self.n:
            raise InputError(f"rows {start}:{start + b} are outside the store's {self.n}")
        for mm, a, d in zip(self._maps, arrays, self.dims, strict=True):
            a = np.asarray(a)
            if a.shape != (b, d):
                raise InputError(f"a chunk of {b} rows of {d} features was expected, got "
                                 f"shape {a.shape}")
            if not np.all(np.isfinite(a)):
                raise InputError("embeddings hold NaN or infinite values")
            mm[start : start + b] = a
        self._filled[start : start + b] = True

    def close(self, hashes: Sequence[str] | None = None, **info) -> LayerStore:
        """Flush every layer and write ``meta.json`` (last): the store is then complete.

        Args:
            hashes: the rows' image hashes (recorded as a digest), if known.
            **info: JSON-able facts to record (encoder, manifest hash, ...).

        Raises:
            InputError: some rows were never written.
        """
        missing = int((~self._filled).sum())
        if missing:
            raise InputError(f"{missing} of the store's {self.n} rows were never written")
        for mm in self._maps:
            mm.flush()
        self._maps = []
        meta = {"format": STORE_FORMAT, "layers": self.layers, "dims": self.dims, "n": self.n,
                "dtype": self.dtype.str, **info}
        if hashes is not None:
            meta["hashes_sha256"] = hashes_digest(hashes)
        atomic_write_text(self.root / META_FILE, json.dumps(meta, indent=2) + "\n")
        return LayerStore(self.root, meta)


def write_store(root: str | os.PathLike, layers: Sequence[str], arrays: Sequence[np.ndarray],
                chunk_rows: int = 4096, **info) -> LayerStore:
    """A store holding ``arrays`` (one (n, D_l) per layer), written a chunk at a time."""
    n = int(np.shape(arrays[0])[0])
    w = StoreWriter(root, layers, [np.shape(a)[1] for a in arrays], n)
    for s in range(0, n, chunk_rows):
        w.write(s, [a[s : s + chunk_rows] for a in arrays])
    return w.close(**info)
