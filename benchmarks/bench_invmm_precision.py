"""InvMM scores at each precision on the tiny pixel DDPM that memorized four digits.

Trains (seeded, CPU, as the slow test in ``tests/test_invmm.py``) the 16x16 pixel
``UNet2DModel`` on four scikit-learn digits, then scores the four members and four held-out
digits with InvMM (the slow test's run: 300 steps, C = 20, 8 noises, 10 DDIM steps, NCC
calibrated on ten other digits) at each ``--precision``, and prints each image's score,
success step and the largest score change against fp32::

    python benchmarks/bench_invmm_precision.py --out /tmp/bench-precision
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _test_helpers():
    spec = importlib.util.spec_from_file_location("test_invmm", ROOT / "tests" / "test_invmm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch
    from sklearn.datasets import load_digits

    from forensics.steps.memorize import run_measure

    torch.set_num_threads(1)
    t = _test_helpers()
    labels = load_digits().target
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
    seconds = [int(np.flatnonzero(labels == c)[1]) for c in range(10)]
    train = t._digits(firsts[: t.TRAIN_DIGITS], 16)
    others = t._digits(firsts[t.TRAIN_DIGITS :], 16)
    held = [o for o in others if max(t._ncc(o, m) for m in train) < 0.8][: t.TRAIN_DIGITS]
    out = args.out
    if not (out / "model" / "unet").is_dir():
        t0 = time.perf_counter()
        t._train_memorizer(out / "model", train, iterations=600)
        print(f"training {time.perf_counter() - t0:.0f}s")
    images = t._write_images(out / "images", train + held)
    t._write_images(out / "calibration", t._digits(seconds, 16))
    (out / "members.txt").write_text("".join(f"img{i:02d}.png\n" for i in range(4)))
    table = {}
    for precision in args.precisions.split(","):
        t0 = time.perf_counter()
        body = run_measure("invmm", images, str(out / "model"), members=out / "members.txt",
                           options=dict(similarity="ncc", calibrate=out / "calibration",
                                        device=args.device, steps=300, check_every=20,
                                        noises=8, samples=8, ddim_steps=10,
                                        precision=precision))
        scores = [math.inf if r["score"] is None else r["score"] for r in body["results"]]
        table[precision] = {
            "scores": scores, "success_step": [r["success_step"] for r in body["results"]],
            "skipped_steps": [r["skipped_steps"] for r in body["results"]],
            "auroc": body["members"]["auroc"], "seconds": round(time.perf_counter() - t0, 1)}
        print(precision, json.dumps(table[precision]))
    ref = table.get("fp32")
    for precision, row in table.items():
        if ref is None or precision == "fp32":
            continue
        diffs = [abs(a - b) for a, b in zip(row["scores"], ref["scores"], strict=True)
                 if math.isfinite(a) and math.isfinite(b)]
        same = sum((math.isfinite(a) == math.isfinite(b)) for a, b in
                   zip(row["scores"], ref["scores"], strict=True))
        print(f"{precision} vs fp32: largest score change {max(diffs, default=0):.4g}, "
              f"{same}/{len(ref['scores'])} images with the same outcome")
    (out / "summary.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
