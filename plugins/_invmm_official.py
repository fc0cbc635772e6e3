"""The official InvMM code's per-image results, read back to compare fp's scores with them.

The official scripts (Maryeon/InvMM, ``ddpm/inverion.py``, ``latent-diffusion/`` and
``stable-diffusion-v1/-v2/inversion.py``) save, per image, ``<results>/<image id>/params.pt``:
a ``torch.save`` of a dict with the tensors ``mu``, ``logvar`` and ``invmm`` (the score,
``inf`` when never reached) and, for Stable Diffusion, ``log_coeffs``, ``sim_scores`` and
the last ``step``. The image id is the file name up to its first dot. The files are read
with ``torch.load(weights_only=True)``: tensors and numbers only, nothing else unpickled.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forensics.errors import InputError

PARAMS_FILE = "params.pt"


def image_id(image: str) -> str:
    """The official scripts' id of an image file: its name up to the first dot."""
    return Path(image).name.split(".")[0]


def read_params(path: Path) -> dict[str, Any]:
    """One official ``params.pt`` as plain values: score, recomputed KL, step, shapes.

    Raises:
        InputError: unreadable, pickles more than tensors, or lacks ``mu``/``logvar``.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise InputError(f"--official: cannot read {path} with torch.load(weights_only=True) "
                         f"({str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})"
                         ) from exc
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), torch.Tensor)
                                            for k in ("mu", "logvar")):
        raise InputError(f"--official: {path} is not an official InvMM params.pt (a dict "
                         f"with tensors mu and logvar)")
    mu, logvar = obj["mu"].double(), obj["logvar"].double()
    kl = float(0.5 * torch.mean(mu**2 + logvar.exp() - logvar - 1))
    score = obj.get("invmm")
    score = float(score) if isinstance(score, (torch.Tensor, int, float)) else None
    step = obj.get("step")
    return {"score": score, "kl": kl, "step": int(step) if isinstance(step, int) else None,
            "shape": list(mu.shape), "tokens_learned": "log_coeffs" in obj}


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def read_folder(folder: Path, images: list[Any]) -> dict[str, dict[str, Any]]:
    """The official results for ``images`` (by image id), read before any scoring.

    Raises:
        InputError: ``folder`` is not a folder, holds no file for any image, or a file
            cannot be read safely.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--official {folder}: no such folder of the official code's "
                         f"results (<folder>/<image id>/params.pt)")
    found = {}
    for image in images:
        path = folder / image_id(str(image)) / PARAMS_FILE
        if path.is_file():
            found[image_id(str(image))] = read_params(path)
    if not found:
        raise InputError(f"--official {folder}: no <image id>/{PARAMS_FILE} for any of the "
                         f"{len(images)} images (ids are file names up to the first dot)")
    return found


def compare(results: list[dict[str, Any]], found: dict[str, dict[str, Any]],
            folder: Path) -> dict[str, Any]:
    """Add ``official_score`` and ``official_kl`` to each result (None where the folder has
    no file for the image); return the comparison's summary."""
    matched, missing, kl_gap = 0, [], 0.0
    pairs: list[tuple[float, float]] = []
    agree = 0
    for r in results:
        off = found.get(image_id(r["image"]))
        if off is None:
            r["official_score"] = r["official_kl"] = None
            missing.append(image_id(r["image"]))
            continue
        matched += 1
        official = math.inf if off["score"] is None else off["score"]
        r["official_score"], r["official_kl"] = official, off["kl"]
        if math.isfinite(official):
            kl_gap = max(kl_gap, abs(official - off["kl"]))
        ours = float(r["score"])
        agree += math.isfinite(ours) == math.isfinite(official)
        if math.isfinite(ours) and math.isfinite(official):
            pairs.append((ours, official))
    return {
        "folder": str(folder), "matched": matched, "missing": missing[:20],
        "success_agreement": agree / matched,
        "both_reached": len(pairs),
        "spearman": _spearman([p[0] for p in pairs], [p[1] for p in pairs]),
        "max_abs_difference": max((abs(a - b) for a, b in pairs), default=None),
        "official_kl_vs_stored_score": kl_gap,
    }
