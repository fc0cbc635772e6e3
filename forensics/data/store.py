"""An on-disk, layer-major store of one image set's embeddings: one ``.npy`` per layer.

::

    store/  meta.json            layers, dims, rows, dtype, image hashes' digest; last written
            layer-000.npy        (n, D_0) rows in the set's (manifest) order
            layer-001.npy        ...

Each layer is a plain ``.npy`` file. :meth:`LayerStore.layer` hands out its rows as
:class:`LayerRows`, which reads the rows asked for (``rows[s:e]``) from the file into a
fresh array: a statistic that reads one layer a chunk of rows at a time
(:mod:`forensics.stats.streaming`) holds one chunk in memory, whatever the set's size (a
memory map would keep every page it touched resident; :meth:`LayerStore.memmap` is there
for random access). A store is filled a chunk of images at a time (:class:`StoreWriter`);
``meta.json`` is written last, atomically, so a store whose filling was interrupted is
never opened as complete. The embedding cache stays the record of which images were
already embedded: a store is filled from it (and from the encoder for images it lacks,
which then go to the cache too; :func:`forensics.data.embed.embed_folder` with
``store=``) and can always be rebuilt from it.

Why ``.npy`` files rather than Arrow shards: every statistic reads a layer as float rows
(whole chunks of consecutive rows, or a cell's rows by index), which a ``.npy`` file
serves by offset arithmetic with no decoding, no per-shard bookkeeping and nothing but
numpy; Arrow's strengths (columns of mixed types, compression, zero-copy hand-over to
other engines) buy nothing for dense float matrices, and the bank already keeps the
tabular records in Parquet.
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


class LayerRows:
    """One stored layer's rows, read from its ``.npy`` file on demand (no mapping).

    Has ``shape``, ``dtype``, ``ndim`` and ``len``; ``rows[s:e]`` (a step of 1), ``rows[i]``
    and ``rows[index_array]`` return arrays; ``np.asarray(rows)`` reads every row.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            self._offset = fh.tell()
        if fortran or len(shape) != 2:
            raise InputError(f"{self.path} is not a C-ordered 2-D array: fill the store again")
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), 2
        self._row_bytes = self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        """Number of values (rows x features)."""
        return self.shape[0] * self.shape[1]

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(stop - start, 0), self.shape[1]), dtype=self.dtype)
        if out.size:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset + start * self._row_bytes)
                if fh.readinto(memoryview(out).cast("B")) != out.nbytes:
                    raise InputError(f"{self.path} is shorter than its header says: fill "
                                     f"the store again")
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                return self._read(start, stop)[::step]
            return self._read(start, stop)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"row {key} is outside the store's {self.shape[0]}")
            return self._read(i, i + 1)[0]
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.array(mm[idx])

    def __array__(self, dtype=None, copy=None):
        out = self._read(0, self.shape[0])
        return out if dtype is None else out.astype(dtype, copy=False)


class LayerStore:
    """A complete store, opened read-only: one memory map per layer.

    Attributes:
        root: the store's folder.
        meta: its ``meta.json``.
    """

    def __init__(self, root: str | os.PathLike, meta: dict):
        self.root = Path(root)
        self.meta = meta
        self._rows: dict[int, LayerRows] = {}

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

    def layer(self, i: int) -> LayerRows:
        """Layer ``i``'s (n, D_i) rows, read on demand.

        Raises:
            InputError: the layer's file is missing or of the wrong shape.
        """
        if i not in self._rows:
            path = self.root / layer_file(i)
            try:
                rows = LayerRows(path)
            except (OSError, ValueError) as exc:
                raise InputError(f"{path} is unreadable ({exc}); fill the store again") from None
            if rows.shape != (len(self), self.dims[i]):
                raise InputError(f"{path} holds shape {rows.shape}, the store says "
                                 f"{(len(self), self.dims[i])}: fill the store again")
            self._rows[i] = rows
        return self._rows[i]

    def memmap(self, i: int) -> np.ndarray:
        """Layer ``i`` as a read-only memory map (for random access)."""
        return np.load(self.layer(i).path, mmap_mode="r", allow_pickle=False)

    @property
    def arrays(self) -> list[LayerRows]:
        """Every layer's rows, in order (what a baseline is built from)."""
        return [self.layer(i) for i in range(len(self.layers))]

    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())


class StoreRows(LayerRows):
    """A layer of a store being filled: :class:`LayerRows` that also takes row writes.

    ``rows[index] = values`` (a slice or an index array, as ``numpy`` takes them) maps the
    file only for that write, so the rows written do not stay resident.
    """

    def __init__(self, path: str | os.PathLike, filled: np.ndarray):
        super().__init__(path)
        self._filled = filled

    def __setitem__(self, key, values) -> None:
        values = np.asarray(values)
        if not np.all(np.isfinite(values)):
            raise InputError("embeddings hold NaN or infinite values")
        mm = np.load(self.path, mmap_mode="r+", allow_pickle=False)
        try:
            mm[key] = values
            mm.flush()
        finally:
            del mm
        self._filled[key] = True


class StoreWriter:
    """Fills a new store; :meth:`close` makes it complete.

    Rows are written a chunk at a time with :meth:`write`, or through :attr:`arrays` (one
    :class:`StoreRows` per layer, which take ``rows[index] = values`` as arrays do).

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
        self._filled = [np.zeros(self.n, dtype=bool) for _ in self.dims]
        for i, d in enumerate(self.dims):  # sparse files of the right size, header first
            mm = np.lib.format.open_memmap(self.root / layer_file(i), mode="w+",
                                           dtype=self.dtype, shape=(self.n, d))
            del mm
        self.arrays = [StoreRows(self.root / layer_file(i), self._filled[i])
                       for i in range(len(self.dims))]

    def write(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Rows ``start : start + b`` of every layer, one (b, D_l) array per layer."""
        if len(arrays) != len(self.layers):
            raise InputError(f"expected {len(self.layers)} layers, got {len(arrays)}")
        b = np.shape(arrays[0])[0]
        if start < 0 or start + b > self.n:
            raise InputError(f"rows {start}:{start + b} are outside the store's {self.n}")
        for rows, a, d in zip(self.arrays, arrays, self.dims, strict=True):
            if np.shape(a) != (b, d):
                raise InputError(f"a chunk of {b} rows of {d} features was expected, got "
                                 f"shape {np.shape(a)}")
            rows[start : start + b] = a

    def close(self, hashes: Sequence[str] | None = None, **info) -> LayerStore:
        """Write ``meta.json`` (last): the store is then complete.

        Args:
            hashes: the rows' image hashes (recorded as a digest), if known.
            **info: JSON-able facts to record (encoder, manifest hash, ...).

        Raises:
            InputError: some rows were never written.
        """
        missing = max(int((~f).sum()) for f in self._filled)
        if missing:
            raise InputError(f"{missing} of the store's {self.n} rows were never written")
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
