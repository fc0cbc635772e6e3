"""A baseline's files: the engine's arrays and meta, and the fingerprints' prepared arrays.

The engine (:class:`forensics.stats.baseline.Baseline`) is stored as ``arrays.npz`` and
``meta.json`` (no pickle, checked against a digest on reading); its distance and
partitioner are looked up by the names its meta records. The arrays each fingerprint's
``prepare`` computed are stored beside it, each distinct array once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from forensics.data.atomic import atomic_savez, atomic_write_text
from forensics.errors import InputError
from forensics.plugin.manager import get
from forensics.stats.baseline import (
    ARRAYS_FILE,
    FORMAT,
    META_FILE,
    Baseline,
    LayerBaseline,
    _digest_of,
    array_digest,
)
from forensics.stats.ct import STATUS_OK

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


# -- the engine ------------------------------------------------------------------------------


def save_engine(engine: Baseline, directory: str | os.PathLike) -> Path:
    """Store the baseline in ``directory`` (created): ``arrays.npz`` and ``meta.json``.

    Each file is written to a temporary name and renamed into place; ``meta.json`` comes
    last and records a digest of the arrays, so a reader never sees a partial baseline.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {f"{i}.{k}": np.ascontiguousarray(v) for i, lb in enumerate(engine.layers)
              for k, v in lb.arrays().items()}
    digest = _digest_of({k: array_digest(v) for k, v in arrays.items()})
    atomic_savez(d / ARRAYS_FILE, arrays)
    atomic_write_text(d / META_FILE, json.dumps(dict(engine.meta, arrays=digest), indent=2))
    return d


def load_engine(directory: str | os.PathLike, device: str = "cpu") -> Baseline:
    """Reload a baseline stored with :func:`save_engine` (no pickle), checking its integrity.

    Raises:
        InputError: the folder holds no baseline, a corrupt one, or one of another format.
    """
    d = Path(directory)
    fix = "the baseline's files are damaged or were written by another version of fp"
    try:
        meta = json.loads((d / META_FILE).read_text())
    except FileNotFoundError:
        raise InputError(f"{d} holds no baseline (no {META_FILE})") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{d / META_FILE} is unreadable ({exc}): {fix}") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{d} holds a baseline of format {meta.get('format')!r}; this fp "
                         f"reads format {FORMAT}: {fix}")
    try:
        with np.load(d / ARRAYS_FILE, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{d / ARRAYS_FILE} is unreadable ({exc}): {fix}") from None
    if _digest_of({k: array_digest(v) for k, v in arrays.items()}) != meta.get("arrays"):
        raise InputError(f"{d / ARRAYS_FILE} does not match {META_FILE}: {fix}")
    part = get("partitioners", meta["partitioner"])
    dist = get("distances", meta["distance"])
    layers = []
    for i, lm in enumerate(meta["layers"]):
        if lm["status"] != STATUS_OK:
            layers.append(LayerBaseline(lm["name"], lm["status"], lm["message"], lm["dim"]))
            continue
        pre = f"{i}.partition."
        partition = part.from_arrays(
            {k[len(pre):]: v for k, v in arrays.items() if k.startswith(pre)},
            lm["partition"])
        ivf = f"{i}.ivf."
        layers.append(LayerBaseline(
            lm["name"], lm["status"], lm["message"], lm["dim"], partition,
            *(arrays[f"{i}.{k}"] for k in
              ("t_points", "t_index", "t_offsets", "p_dist", "p_offsets")),
            ivf_centroids={int(k[len(ivf):]): v for k, v in arrays.items()
                           if k.startswith(ivf)}))
    return Baseline(layers, meta, device, dist)


# -- the fingerprints' prepared arrays --------------------------------------------------------


def extras_file(name: str) -> str:
    """File name of one fingerprint's baseline arrays in the per-fingerprint layout."""
    return f"fingerprint-{_SAFE.sub('_', name)}.npz"


#: Every fingerprint's baseline arrays, each distinct array once (keys: content hashes).
SHARED_ARRAYS_FILE = "fingerprint-arrays.npz"
#: ``{fingerprint: {key: content hash}}``: which stored array each fingerprint gets.
SHARED_INDEX_FILE = "fingerprint-arrays.json"


def _clean(name: str, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    clean = {str(k): np.asarray(v).copy(order="C") for k, v in arrays.items()}
    for key, value in clean.items():
        if value.dtype == object:
            raise InputError(f"fingerprint {name!r}: array {key!r} is not numeric")
    return clean


def save_extras(folder: str | os.PathLike, name: str, arrays: dict[str, np.ndarray]) -> Path:
    """Store one fingerprint's baseline arrays in ``folder`` atomically (plain ``.npz``)."""
    target = Path(folder) / extras_file(name)
    atomic_savez(target, _clean(name, arrays))
    return target


def save_all_extras(folder: str | os.PathLike,
                    extras: Mapping[str, Mapping[str, np.ndarray]]) -> list[Path]:
    """Store every fingerprint's baseline arrays in ``folder``, each distinct array once.

    Fingerprints that share an array (the same PCA of T, the same regression) store it
    once: ``fingerprint-arrays.npz`` holds the arrays by content hash and
    ``fingerprint-arrays.json`` says which fingerprint gets which, under which key.
    """
    store: dict[str, np.ndarray] = {}
    index: dict[str, dict[str, str]] = {}
    for name, arrays in extras.items():
        index[name] = {}
        for key, value in _clean(name, arrays).items():
            digest = array_digest(value)
            store.setdefault(digest, value)
            index[name][key] = digest
    folder = Path(folder)
    atomic_savez(folder / SHARED_ARRAYS_FILE, store)
    atomic_write_text(folder / SHARED_INDEX_FILE,
                      json.dumps({"format": 1, "fingerprints": index}, sort_keys=True) + "\n")
    return [folder / SHARED_ARRAYS_FILE, folder / SHARED_INDEX_FILE]


def _unreadable(path: Path, exc: Exception) -> InputError:
    return InputError(f"{path} is unreadable ({exc}); rebuild the baseline")


def load_extras(folder: str | os.PathLike, name: str) -> dict[str, np.ndarray] | None:
    """A fingerprint's stored baseline arrays, or ``None`` when the baseline has none.

    Reads the shared layout (:func:`save_all_extras`), else the per-fingerprint file of
    baselines built before it.
    """
    folder = Path(folder)
    index_path = folder / SHARED_INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())["fingerprints"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _unreadable(index_path, exc) from None
        if name in index:
            path = folder / SHARED_ARRAYS_FILE
            try:
                with np.load(path, allow_pickle=False) as npz:
                    return {k: npz[digest] for k, digest in index[name].items()}
            except (OSError, ValueError, KeyError) as exc:
                raise _unreadable(path, exc) from None
    path = folder / extras_file(name)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
