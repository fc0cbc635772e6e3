"""The C_T engine on arrays, its plugins named: build a baseline, reuse a cached one, score a layer.

:mod:`forensics.stats.baseline` takes the distance and the partitioner as objects; these
take their names (defaults in :mod:`forensics.defaults`), look them up and call it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forensics import defaults
from forensics.errors import InputError
from forensics.plugin.manager import get
from forensics.stats import baseline as engine
from forensics.stats.baseline import META_FILE, Baseline, baseline_key
from forensics.stats.ct import CTResult
from forensics.steps.baseline_files import load_engine, save_engine


def build_engine(
    T_layers: Sequence[np.ndarray],
    P_layers: Sequence[np.ndarray],
    layer_names: Sequence[str],
    *,
    distance: str = defaults.DISTANCE,
    partitioner: str = defaults.PARTITIONER,
    **build_kwargs: Any,
) -> Baseline:
    """:meth:`Baseline.build` with the distance and partitioner given by name."""
    return Baseline.build(T_layers, P_layers, layer_names, distance=get("distances", distance),
                          partitioner=get("partitioners", partitioner), **build_kwargs)


def ct_score(
    T: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    *,
    distance: str = defaults.DISTANCE,
    partitioner: str | None = None,
    **kwargs: Any,
) -> CTResult:
    """:func:`forensics.stats.baseline.ct_score` with the plugins given by name.

    ``partitioner`` None is ``given`` when cell labels are passed (``T_cells``, ...), else
    the default (``kmeans``).
    """
    if partitioner is None:
        cells = any(kwargs.get(k) is not None for k in ("T_cells", "P_cells", "Q_cells"))
        partitioner = defaults.GIVEN_PARTITIONER if cells else defaults.PARTITIONER
    return engine.ct_score(T, P, Q, distance=get("distances", distance),
                           partitioner=get("partitioners", partitioner), **kwargs)


def load_or_build(
    cache_dir: str | os.PathLike,
    T_layers: Sequence[np.ndarray],
    P_layers: Sequence[np.ndarray],
    layer_names: Sequence[str],
    *,
    distance: str = defaults.DISTANCE,
    partitioner: str = defaults.PARTITIONER,
    **build_kwargs: Any,
) -> Baseline:
    """Load the baseline of these inputs from ``cache_dir/<id>``, building and saving it if absent.

    ``distance`` and ``partitioner`` are plugin names; ``build_kwargs`` are the other
    arguments of :meth:`Baseline.build`. Concurrent callers wait for one build (a file lock
    per id); a stored baseline that fails its integrity check is rebuilt.
    """
    from filelock import FileLock

    device = build_kwargs.get("device", "cpu")
    key_kwargs = {k: build_kwargs[k] for k in ("seed", "partitioner_params", "T_cells",
                  "P_cells", "search") if k in build_kwargs}
    if key_kwargs.get("partitioner_params") is None:
        key_kwargs.pop("partitioner_params", None)
    key_kwargs.update(distance=distance, partitioner=partitioner)
    key = baseline_key(T_layers, P_layers, layer_names, **key_kwargs)
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / key[0]
    with FileLock(str(root / f"{key[0]}.lock")):
        if (target / META_FILE).exists():
            try:
                return load_engine(target, device=device)
            except InputError:
                pass  # corrupt or stale: rebuild below
        baseline = build_engine(T_layers, P_layers, layer_names, distance=distance,
                                partitioner=partitioner, _key=key, **build_kwargs)
        save_engine(baseline, target)
        return baseline
