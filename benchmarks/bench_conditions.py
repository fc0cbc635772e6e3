"""The storage-condition detector on the three development sets.

Reads ``../shared/data`` (the MNIST GAN zoo, its cross-code set and the CIFAR-10 zoo) and
measures, on the generators' own (lossless) samples:

- **JPEG quality**: every quality 1..100 written by Pillow, on 4 images of each set, read
  back from the file's tables (:func:`forensics.data.conditions.file_condition`); the
  share within 5 of the truth and the share exact.
- **JPEG history of lossless files** (:func:`forensics.stats.conditions.jpeg_lattice`):
  sets of 64 images (fewer where a generator has fewer), clean, and JPEG at q 95 / 90 / 75 /
  50 then PNG; the share of sets flagged (false alarms on clean sets, detections on the
  others). The CIFAR-10 reference images, which were JPEG q75 at source, are tested too.

Prints one table per set, then one summary line per set and a last line over all three::

    python benchmarks/bench_conditions.py [--sets-per-generator 2] [--seed 0]

With ``--attribution`` it measures attribution instead (``conditions_sets.py``): per
condition, on all three sets, top-1, share inconclusive, wrong answers with confidence
above 0.5 and other models called unknown, with curves enrolled under the condition and
without; then the table of :data:`forensics.defaults.CONDITION_FIGURES`::

    python benchmarks/bench_conditions.py --attribution --workdir DIR [--conditions a,b]

``DIR`` is the work folder of ``bench_attribution.py --belonging`` (built there if absent).
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QUALITIES = (95, 90, 75, 50)
LUMA = np.array([0.299, 0.587, 0.114])


def _jpeg_bytes(im: np.ndarray, q: int) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(im).save(b, "JPEG", quality=q)
    return b.getvalue()


def _luma(im: np.ndarray) -> np.ndarray:
    a = np.asarray(im, dtype=np.float64)
    return a if a.ndim == 2 else a @ LUMA


def _decoded(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def generator_sets(seed: int, per_generator: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """``{dev set: [(generator, images of one set), ...]}``: 64 images a set, seeded."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, np.ndarray]]] = {"mnist": [], "mnist-xcode": [], "cifar": []}
    with np.load(DATA / "mnist_gan_zoo.npz") as z:
        for key in sorted(k for k in z.files if k.startswith("gen_")):
            g = z[key].reshape(-1, 28, 28)
            for _ in range(per_generator):
                out["mnist"].append((key[4:], g[rng.choice(len(g), 64, replace=False)]))
    with np.load(DATA / "mnist_xcode_zoo.npz") as z:
        for key in sorted(k for k in z.files if k.startswith("xgen_")):
            g = z[key].reshape(-1, 28, 28)
            for _ in range(per_generator):
                out["mnist-xcode"].append((key[5:], g[rng.choice(len(g), 64, replace=False)]))
    with np.load(DATA / "cifar_dev_zoo.npz") as z:
        for key in sorted(k for k in z.files if k.startswith("gen_")):
            g = z[key]
            for _ in range(per_generator):
                n = min(64, len(g))
                out["cifar"].append((key[4:], g[rng.choice(len(g), n, replace=False)]))
    return out


def quality_check(sets: dict[str, list[tuple[str, np.ndarray]]]) -> dict[str, tuple[int, int, int]]:
    """Per dev set: (files, within 5 of the truth, exact)."""
    from forensics.data.conditions import file_condition

    out = {}
    for name, items in sets.items():
        images = np.concatenate([imgs[:1] for _, imgs in items[:4]])
        n = near = exact = 0
        for im in images:
            for q in range(1, 101):
                c = file_condition(_jpeg_bytes(im, q))
                est = c.jpeg_quality if c.jpeg_quality is not None else -100
                n += 1
                near += abs(est - q) <= 5
                exact += est == q or (q >= 98 and est == 100)  # q 98-100: one table
        out[name] = (n, near, exact)
    return out


def history_check(sets: dict[str, list[tuple[str, np.ndarray]]]) -> dict[str, dict[str, list]]:
    """Per dev set and condition: the list of (detected, score) over its sets."""
    from forensics.stats.conditions import jpeg_lattice

    out: dict[str, dict[str, list]] = {}
    for name, items in sets.items():
        rows: dict[str, list] = {"clean": [], **{f"jpeg{q}+png": [] for q in QUALITIES}}
        for _, imgs in items:
            lat = jpeg_lattice([_luma(im) for im in imgs])
            rows["clean"].append((lat.detected, lat.score))
            for q in QUALITIES:
                again = [_luma(_decoded(_jpeg_bytes(im, q))) for im in imgs]
                lat = jpeg_lattice(again)
                rows[f"jpeg{q}+png"].append((lat.detected, lat.score))
        out[name] = rows
    return out


def reference_check(seed: int, n_sets: int) -> list[tuple[bool, float]]:
    """The CIFAR-10 reference images (JPEG q75 at source, stored lossless): sets of 64."""
    from forensics.stats.conditions import jpeg_lattice

    rng = np.random.default_rng(seed + 1)
    with np.load(DATA / "cifar_dev_zoo.npz") as z:
        ref = z["reference"]
    out = []
    for _ in range(n_sets):
        lat = jpeg_lattice([_luma(im) for im in ref[rng.choice(len(ref), 64, replace=False)]])
        out.append((lat.detected, lat.score))
    return out


def attribution(work: Path, conditions: list[str], embed: bool = True) -> None:
    """Attribution under each condition on the three sets: tables, summary lines, and the
    measured figures as :data:`forensics.defaults.CONDITION_FIGURES` reads them."""
    import attribution_sets as S
    import conditions_sets as C

    t0 = time.perf_counter()
    encoder, cache = "fid-inception@128", work / "cache"
    S.prepare(work, encoder, cache)  # the clean sets, their baselines and rows
    rows, read, _src = C.prepare(work, encoder if embed else None, cache, conditions)
    _c, models = S.cifar_folders(work)
    answers = C.Answers(work, rows, read, models).all(conditions)
    per = C.per_set(answers)
    print(f"suspects: one per query, its own size (at most {C.MAX_SUSPECT} images); "
          f"fp attribute's answer (MMD test, score/margin rule as a gate)")
    for s in S.SETS:
        print(f"\n## {s}\n")
        print("\n".join(C.table(per, s)))
    print()
    for s in S.SETS:
        parts = []
        for cond in conditions:
            f, w = per.get((s, cond, True)), per.get((s, cond, False)) or per.get((s, cond, True))
            if f is None or w is None:
                continue
            key = "top1" if f["top1"] is not None else "others_unknown"
            parts.append(f"{cond} {S._f(f[key], '.2f')}/{S._f(w[key], '.2f')} "
                         f"({f['n_wrong_above_half']}/{w['n_wrong_above_half']} wrong > 0.5)")
        what = "top-1" if s != "mnist cross-code" else "called unknown"
        print(f"{s}: {what} matched/without: " + "; ".join(parts))
    def top1(s: str, cond: str) -> str:
        f = per.get((s, cond, True))
        return "not measured" if f is None else S._f(f["top1"], ".2f")

    wrong = sum(f["n_wrong_above_half"] for (_s, _c, m), f in per.items() if m)
    total = sum(f["n"] for (_s, _c, m), f in per.items() if m)
    print(f"targets (matched curves): top-1 at JPEG 75 on CIFAR {top1('cifar zoo', 'jpeg75')} "
          f"(>= 0.85); at JPEG 90 {top1('mnist protocol', 'jpeg90')} on MNIST, "
          f"{top1('cifar zoo', 'jpeg90')} on CIFAR (>= 0.90); wrong family above 0.5 "
          f"{wrong} of {total} answers (0)")
    date = time.strftime("%Y-%m-%d")
    figures = C.curve_figures(answers, date)
    print(f"\nCONDITION_FIGURES = {figures!r}")
    print(f"wall time {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets-per-generator", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attribution", action="store_true",
                    help="measure attribution under each condition (conditions_sets.py)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="--attribution: the work folder of bench_attribution.py --belonging "
                         "(an empty one: the sets are built there first)")
    ap.add_argument("--conditions", default=None,
                    help="--attribution: comma-separated conditions (default: all)")
    ap.add_argument("--no-embed", action="store_true",
                    help="--attribution: only the conditions and sets already embedded in "
                         "the work folder (the others print as not measured)")
    args = ap.parse_args(argv)
    if args.attribution:
        import conditions_sets as C

        if args.workdir is None:
            ap.error("--attribution needs --workdir DIR (the work folder of "
                     "bench_attribution.py --belonging, or an empty folder to build it in)")
        conds = C.CONDITIONS if args.conditions is None else args.conditions.split(",")
        attribution(args.workdir.resolve(), ["clean", *[c for c in conds if c != "clean"]],
                    embed=not args.no_embed)
        return
    t0 = time.perf_counter()
    sets = generator_sets(args.seed, args.sets_per_generator)
    quality = quality_check(sets)
    history = history_check(sets)
    ref = reference_check(args.seed, 20)
    print(f"load average {os.getloadavg()[0]:.1f}; seed {args.seed}")
    for name in sets:
        n, near, exact = quality[name]
        print(f"\n## {name}: {len(sets[name])} sets of up to 64 images")
        print(f"JPEG quality read back: {near}/{n} within 5, {exact}/{n} exact")
        print("| condition | sets flagged | share | median score |")
        print("|---|---|---|---|")
        for cond, res in history[name].items():
            flagged = sum(d for d, _ in res)
            print(f"| {cond} | {flagged}/{len(res)} | {flagged / len(res):.2f} | "
                  f"{np.median([s for _, s in res]):.1f} |")
    flagged = sum(d for d, _ in ref)
    print(f"\ncifar reference (JPEG q75 at source): {flagged}/{len(ref)} sets flagged, "
          f"median score {np.median([s for _, s in ref]):.1f}")
    print()
    worst_fa, worst_q75 = 0.0, 1.0
    for name in sets:
        n, near, _ = quality[name]
        rows = history[name]
        fa = np.mean([d for d, _ in rows["clean"]])
        q75 = np.mean([d for d, _ in rows["jpeg75+png"]])
        worst_fa, worst_q75 = max(worst_fa, fa), min(worst_q75, q75)
        print(f"{name}: quality within 5 {near / n:.3f}; JPEG-75-then-PNG detected {q75:.2f}; "
              f"false alarms on clean sets {fa:.2f}")
    print(f"summary: false alarms at most {worst_fa:.2f} (target <= 0.05), JPEG-75-then-PNG "
          f"detected at least {worst_q75:.2f} (target >= 0.90); "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
