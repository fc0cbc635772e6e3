"""InvMM's evidence per image, written to disk (imported only when a report is saved).

Under ``OUT/evidence/<NNN>_<image stem>/``:

- ``params.safetensors``: the learned ``mu`` and ``logvar`` (and ``log_coeffs``, the token
  logits of text-to-image models), the arrays whose KL is the score;
- ``checks.csv``: one row per check: step, KL, KL weight, smoothed reconstruction loss,
  the least similar sample's similarity (per guidance scale for text-to-image), success;
- ``samples.png``: the image itself, then the samples of the check that decided the score
  (the successful one, else the one whose least similar sample came closest);
- ``result.json``: the image's result and the key of the run's settings, written last, so
  its presence means the image is done: a rerun with the same ``--out`` and settings reads
  it back instead of scoring the image again (:func:`read_done`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from forensics.data.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from forensics.errors import InputError
from forensics.jsonable import jsonable

EVIDENCE_DIR = "evidence"
RESULT_JSON = "result.json"


def _folder_name(index: int, image: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(image).stem)[:60] or "image"
    return f"{index:03d}_{stem}"


def _checks_csv(checks: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    scales = next((len(c["similarity_per_scale"]) for c in checks
                   if c.get("similarity_per_scale")), 0)
    w.writerow(["step", "kl", "kl_weight", "loss", "similarity",
                *[f"similarity_scale_{i + 1}" for i in range(scales)], "success"])
    for c in checks:
        w.writerow([c["step"], repr(c["kl"]), repr(c["kl_weight"]), repr(c["loss"]),
                    repr(c["similarity"]), *[repr(v) for v in c.get("similarity_per_scale")
                                             or []], int(c["success"])])
    return buf.getvalue()


def grid_png(reference: Any, samples: Any) -> bytes:
    """PNG bytes of one row: the reference, a gap, then the samples ((C, H, W) in [0, 1])."""
    from PIL import Image

    tiles = [reference.numpy()] + ([] if samples is None else [s.numpy() for s in samples])
    tiles = [np.clip(t, 0, 1).transpose(1, 2, 0) for t in tiles]
    tiles = [np.repeat(t, 3, axis=2) if t.shape[2] == 1 else t for t in tiles]
    h, w = tiles[0].shape[:2]
    pad = max(1, w // 8)
    row = np.ones((h, w + pad + (len(tiles) - 1) * (w + 1), 3))
    row[:, :w] = tiles[0]
    for i, t in enumerate(tiles[1:]):
        x = w + pad + i * (w + 1)
        row[:, x : x + w] = t
    img = Image.fromarray((row * 255).round().astype(np.uint8))
    if h < 64:  # small images: enlarge without blurring, so a reader can see them
        f = -(-64 // h)
        img = img.resize((img.width * f, img.height * f), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_folder(out: Path, index: int, image: str) -> Path:
    """``out/evidence/NNN_<stem>``: where image ``index`` of the run keeps its evidence."""
    return Path(out) / EVIDENCE_DIR / _folder_name(index, image)


def write_image(out: Path, index: int, result: dict[str, Any], ev: dict[str, Any],
                run_key: str | None = None) -> Path:
    """Write one image's evidence, then its ``result.json`` (each file atomically)."""
    from safetensors.torch import save_file

    folder = image_folder(out, index, result["image"])
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: ev[k].contiguous() for k in ("mu", "logvar", "log_coeffs")
               if ev.get(k) is not None}
    meta = {"image": str(result["image"]), "score": repr(result["score"]),
            "success": str(result["success"]), "samples_scale": str(ev["samples_scale"])}
    atomic_write(folder / "params.safetensors",
                 lambda tmp, t=tensors, m=meta: save_file(t, str(tmp), metadata=m))
    atomic_write_text(folder / "checks.csv", _checks_csv(ev["checks"]))
    atomic_write_bytes(folder / "samples.png", grid_png(ev["reference"], ev["samples"]))
    if run_key is not None:
        atomic_write_text(folder / RESULT_JSON, json.dumps(
            {"run_key": run_key, "index": index, "result": jsonable(result)},
            indent=2, allow_nan=False) + "\n")
    return folder


def read_done(out: Path, index: int, image: str, sha256: str,
              run_key: str) -> dict[str, Any] | None:
    """The result a previous run with the same settings wrote for this image, or None.

    Raises:
        InputError: the folder holds a result of other settings or of another image (so
            a rerun never mixes two runs' results, nor overwrites one).
    """
    folder = image_folder(out, index, image)
    path = folder / RESULT_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        result = dict(record["result"])
        key = record["run_key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable result of an earlier run ({exc}); remove "
                         f"{folder} to score the image again") from exc
    if key != run_key:
        raise InputError(
            f"--out {out} holds results of a run with other settings ({path}); resume only "
            f"with the same model, images, options, seed, precision and device type, or "
            f"write to another --out")
    if result.get("sha256") != sha256:
        raise InputError(f"{path} holds the result of another image than {image} (the "
                         f"folder's images changed); write to another --out")
    if result.get("score") is None:
        result["score"] = math.inf  # JSON null: never reached
    result["image"] = image
    return result


def write(report: Any, out: Path) -> list[Path]:
    """Write every image's evidence under ``out/evidence`` (those not written already)."""
    folders = []
    for i, (result, ev) in enumerate(zip(report.results, report.evidence or [], strict=True)):
        if ev is None:  # read back from, or written to, ``out`` during the run
            folders.append(image_folder(out, i, result["image"]))
            continue
        folders.append(write_image(out, i, result, ev))
    return folders
