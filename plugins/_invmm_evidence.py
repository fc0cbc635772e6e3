"""InvMM's evidence per image, written to disk (imported only when a report is saved).

Under ``OUT/evidence/<NNN>_<image stem>/``:

- ``params.safetensors``: the learned ``mu`` and ``logvar`` (and ``log_coeffs``, the token
  logits of text-to-image models), the arrays whose KL is the score;
- ``checks.csv``: one row per check: step, KL, KL weight, smoothed reconstruction loss,
  the least similar sample's similarity (per guidance scale for text-to-image), success;
- ``samples.png``: the image itself, then the samples of the check that decided the score
  (the successful one, else the one whose least similar sample came closest).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from forensics.data.atomic import atomic_write, atomic_write_bytes, atomic_write_text

EVIDENCE_DIR = "evidence"


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


def write(report: Any, out: Path) -> list[Path]:
    """Write every image's evidence under ``out/evidence``; return the folders."""
    from safetensors.torch import save_file

    folders = []
    for i, (result, ev) in enumerate(zip(report.results, report.evidence or [], strict=True)):
        folder = Path(out) / EVIDENCE_DIR / _folder_name(i, result["image"])
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: ev[k].contiguous() for k in ("mu", "logvar", "log_coeffs")
                   if ev.get(k) is not None}
        meta = {"image": str(result["image"]), "score": repr(result["score"]),
                "success": str(result["success"]), "samples_scale": str(ev["samples_scale"])}
        atomic_write(folder / "params.safetensors",
                     lambda tmp, t=tensors, m=meta: save_file(t, str(tmp), metadata=m))
        atomic_write_text(folder / "checks.csv", _checks_csv(ev["checks"]))
        atomic_write_bytes(folder / "samples.png", grid_png(ev["reference"], ev["samples"]))
        folders.append(folder)
    return folders
