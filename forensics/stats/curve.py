"""A curve: C_T per layer, and the provenance that makes it reproducible.

A :class:`Curve` is what ``fp curve`` prints, what ``fp enroll`` stores (one bank row per
curve, see :meth:`Curve.to_row`) and what ``fp attribute`` compares against the bank.
Its ``provenance`` (built by :func:`make_provenance`) records everything the value
depends on: the input images' manifest hash, the encoder and its weights' hash, the
baseline, every parameter, the tool version and the time.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from forensics.errors import InputError
from forensics.jsonable import jsonable

#: Parameters that have their own bank column; any others go to the row's ``params``.
PARAM_KEYS: tuple[str, ...] = ("partitioner", "distance", "tau", "pooling", "seed")


@dataclass
class Curve:
    """C_T values over named layers, with provenance.

    Attributes:
        layers: layer names, in order.
        values: C_T per layer, shape ``(len(layers),)``, float64.
        provenance: see :func:`make_provenance`.
    """

    layers: list[str]
    values: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [str(x) for x in self.layers]
        self.values = np.asarray(self.values, dtype=np.float64).reshape(-1)
        if self.values.shape[0] != len(self.layers):
            raise InputError(
                f"a curve needs one value per layer: got {self.values.shape[0]} values for "
                f"{len(self.layers)} layers"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; non-finite values become ``None``."""
        return {
            "layers": list(self.layers),
            "values": [float(v) if math.isfinite(v) else None for v in self.values],
            "provenance": jsonable(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Curve:
        """Inverse of :meth:`to_dict` (``None`` values come back as NaN).

        Raises:
            InputError: ``layers`` or ``values`` is missing.
        """
        try:
            layers, values = data["layers"], data["values"]
        except (KeyError, TypeError):
            raise InputError("a curve needs 'layers' and 'values'") from None
        vals = [np.nan if v is None else float(v) for v in values]
        return cls(list(layers), np.asarray(vals), dict(data.get("provenance") or {}))

    def to_row(self, *, model: str, family: str, checkpoint: str | None = None,
               source: str | None = None, notes: str | None = None,
               split: str = "enroll") -> dict[str, Any]:
        """A row for :meth:`refbank.Bank.add_curves`, filled from the provenance.

        Raises:
            InputError: the provenance lacks a field the bank needs.
        """
        p = self.provenance
        try:
            row = {
                "model": model,
                "family": family,
                "checkpoint": checkpoint,
                "source": source,
                "notes": notes,
                "split": split,
                "encoder": p["encoder"]["name"],
                "weights_sha256": p["encoder"]["weights_sha256"],
                "baseline_id": p["baseline"]["id"],
                "layers": list(self.layers),
                "values": self.values.tolist(),
                "n_images": p["inputs"]["n_images"],
                "manifest_sha256": p["inputs"]["manifest_sha256"],
                "params": dict(p.get("params") or {}),
                "tool_version": p.get("tool_version"),
            }
        except (KeyError, TypeError) as exc:
            raise InputError(
                f"the curve's provenance lacks {exc}; build it with "
                "forensics.stats.curve.make_provenance"
            ) from None
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Curve:
        """A curve from a bank row (as returned by :meth:`refbank.Bank.curves`)."""
        import json

        params = json.loads(row.get("params_json") or "{}")
        params.update({k: row[k] for k in PARAM_KEYS if row.get(k) is not None})
        created = row.get("created")
        prov = {
            "tool": "fp",
            "tool_version": row.get("tool_version"),
            "created": created.isoformat() if isinstance(created, datetime) else created,
            "inputs": {"manifest_sha256": row["manifest_sha256"], "n_images": row["n_images"]},
            "encoder": {"name": row["encoder"], "weights_sha256": row["weights_sha256"]},
            "baseline": {"id": row["baseline_id"]},
            "params": params,
            "curve_id": row.get("curve_id"),
        }
        return cls(list(row["layers"]), np.asarray(row["values"], dtype=np.float64), prov)


def make_provenance(
    *,
    manifest_sha256: str,
    n_images: int,
    encoder: str,
    weights_sha256: str,
    baseline_id: str,
    params: dict[str, Any],
    baseline_name: str | None = None,
    folder: str | None = None,
    image_sha256: list[str] | None = None,
    created: datetime | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Collect what a curve depends on into one JSON-ready dict.

    Args:
        manifest_sha256: SHA-256 of the suspect images' manifest.
        n_images: number of images behind the curve.
        encoder: encoder name (e.g. ``timm:vit_tiny_patch16_224``).
        weights_sha256: SHA-256 of the encoder weights.
        baseline_id: id of the baseline the curve was measured against.
        params: every parameter (``partitioner, distance, tau, pooling, seed`` and any
            other the engine used).
        baseline_name: the baseline's name in the bank, if any.
        folder: the input folder as given.
        image_sha256: optional per-image hashes, in the order used.
        created: time of the measurement (default: now, UTC).
        **extra: further JSON-ready facts, stored under their own keys.

    Returns:
        ``{"tool", "tool_version", "created", "python", "numpy", "inputs": {...},
        "encoder": {"name", "weights_sha256"}, "baseline": {"id", "name"}, "params",
        ...extra}``.
    """
    from forensics._version import __version__

    if not isinstance(params, dict):
        raise InputError(f"params must be a dict of parameters, got {type(params).__name__}")
    inputs: dict[str, Any] = {"manifest_sha256": manifest_sha256, "n_images": int(n_images)}
    if folder is not None:
        inputs["folder"] = str(folder)
    if image_sha256 is not None:
        inputs["image_sha256"] = list(image_sha256)
    prov = {
        "tool": "fp",
        "tool_version": __version__,
        "created": (created or datetime.now(UTC)).isoformat(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "inputs": inputs,
        "encoder": {"name": encoder, "weights_sha256": weights_sha256},
        "baseline": {"id": baseline_id, "name": baseline_name},
        "params": jsonable(params),
    }
    prov.update(jsonable(extra))
    return prov
