"""Fingerprints: what a set of suspect images is matched on.

A fingerprint turns one image set's per-layer statistics into the vector that a matcher
compares with the enrolled vectors. Fingerprints are plugins (``register_fingerprints``);
their contract is :class:`forensics.plugin.protocols.Fingerprint` (with the optional
members of :class:`~forensics.plugin.protocols.FingerprintOptions`). This module holds what
the engine hands them (:class:`FingerprintContext`, :class:`PrepareContext`) and how it
uses their optional members.

Every registered fingerprint is computed and stored when a curve is enrolled, so a bank
can be matched on any of them later.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forensics.atomic import atomic_savez
from forensics.errors import InputError

#: The fingerprint used when none is named (measured best on real GAN samples,
#: docs/attribution.md); ``paper`` is the C_T-layer curve of He et al. (2024).
DEFAULT_FINGERPRINT = "resid-early"
#: The paper's fingerprint: the C_T-layer curve (the curves' ``values`` column).
PAPER_FINGERPRINT = "paper"
#: The matcher used when neither the user nor the fingerprint names one.
DEFAULT_MATCHER = "combined"

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class FingerprintContext:
    """What a fingerprint sees of one image set.

    Attributes:
        layers: layer names, in order.
        results: one :class:`~forensics.ct.CTResult` per layer (with ``details`` when the
            fingerprint asked for them).
        embeddings: the set's raw embeddings, one ``(m, D_l)`` array per layer.
        baseline: the :class:`~forensics.baseline.Baseline` the set was measured against.
        extras: the arrays this fingerprint's ``prepare`` stored with the baseline.
    """

    layers: list[str]
    results: list[Any]
    embeddings: list[np.ndarray]
    baseline: Any
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def values(self) -> np.ndarray:
        """C_T per layer (NaN where undefined): the paper's curve."""
        return np.array([r.ct for r in self.results], dtype=np.float64)


@dataclass
class PrepareContext:
    """What ``prepare`` sees when a baseline is built: T and P per layer, and the engine."""

    layers: list[str]
    train: list[np.ndarray]
    heldout: list[np.ndarray]
    baseline: Any


def get(name: str) -> Any:
    """The registered fingerprint called ``name`` (the error lists valid names)."""
    from forensics.plugins import get as get_plugin

    return get_plugin("fingerprints", name)


def names() -> list[str]:
    """Names of every registered fingerprint."""
    from forensics.plugins import names as plugin_names

    return plugin_names("fingerprints")


def extras_file(name: str) -> str:
    """File name of a fingerprint's stored baseline arrays."""
    return f"fingerprint-{_SAFE.sub('_', name)}.npz"


def save_extras(folder: str | os.PathLike, name: str, arrays: dict[str, np.ndarray]) -> Path:
    """Store a fingerprint's baseline arrays in ``folder`` atomically (plain ``.npz``)."""
    target = Path(folder) / extras_file(name)
    clean = {str(k): np.asarray(v).copy(order="C") for k, v in arrays.items()}
    for key, value in clean.items():
        if value.dtype == object:
            raise InputError(f"fingerprint {name!r}: array {key!r} is not numeric")
    atomic_savez(target, clean)
    return target


def load_extras(folder: str | os.PathLike, name: str) -> dict[str, np.ndarray] | None:
    """A fingerprint's stored baseline arrays, or ``None`` when the baseline has none."""
    path = Path(folder) / extras_file(name)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is unreadable ({exc}); rebuild the baseline") from None


def needs_ct(fp: Any) -> bool:
    """Whether ``fp`` reads C_T (default True: a fingerprint that says nothing may)."""
    return bool(getattr(fp, "needs_ct", True))


def per_image_variance(fp: Any, ctx: FingerprintContext) -> np.ndarray | None:
    """Per-entry variance of ``fp``'s per-image vectors (None: it has no ``per_image``)."""
    method = getattr(fp, "per_image", None)
    if not callable(method):
        return None
    rows = np.asarray(method(ctx), dtype=np.float64)
    return rows.var(axis=0)


def needs_extras(fp: Any) -> bool:
    """Whether ``fp`` stores arrays with each baseline."""
    return callable(getattr(fp, "prepare", None))


def entry_layers(fp: Any, dims: Sequence[int]) -> np.ndarray:
    """Layer index of each entry of ``fp``'s vector (-1: no layer)."""
    method = getattr(fp, "entry_layers", None)
    if method is None:
        return np.arange(len(dims), dtype=np.int64)
    return np.asarray(method([int(d) for d in dims]), dtype=np.int64).reshape(-1)


def entry_mask(fp: Any, dims: Sequence[int], keep: np.ndarray) -> np.ndarray:
    """Entries of ``fp``'s vector that belong to kept layers (or to no layer)."""
    layers = entry_layers(fp, dims)
    keep = np.asarray(keep, dtype=bool)
    return np.where(layers < 0, True, keep[np.clip(layers, 0, None)])


def resolve_matcher(fp: Any, name: str | None, kept_dims: Sequence[int]) -> tuple[str, Any]:
    """``(name, matcher object)`` for matching ``fp``'s vectors of the kept layers.

    ``name`` None takes the fingerprint's ``default_matcher`` (else ``combined``). A
    fingerprint with its own rule for that name supplies the object; otherwise it is the
    matcher plugin of that name.
    """
    from forensics.plugins import get as get_plugin

    name = name or getattr(fp, "default_matcher", None) or DEFAULT_MATCHER
    own = getattr(fp, "matcher", None)
    if callable(own):
        obj = own(name, [int(d) for d in kept_dims])
        if obj is not None:
            return name, obj
    return name, get_plugin("matchers", name)


def compute(fp: Any, ctx: FingerprintContext) -> np.ndarray:
    """Run ``fp.compute`` and check that it gives a 1-D float vector."""
    vec = np.asarray(fp.compute(ctx), dtype=np.float64)
    if vec.ndim != 1 or vec.size == 0:
        raise InputError(f"fingerprint {fp.name!r} must give a non-empty 1-D vector, "
                         f"got shape {vec.shape}")
    return vec
