"""Attribution on real GAN samples: every fingerprint x matcher, through fp's public API.

Reads the development set from ``../shared/data`` (real samples of 11 GAN architectures
trained on MNIST, with the protocol in its README) and never copies it into the project:
the images are written to a work folder (``--workdir``, default a temporary one).

Steps, all through fp's public Python API:

1. materialize the zoo as image folders (the data's own ``materialize_mnist_zoo.py``);
2. T = 3,000 of ``reference/train``, P = 1,000 of ``reference/heldout`` (seeded choice);
   ``forensics.build_baseline`` with the FID InceptionV3 encoder (real weights, offline)
   at ``--size`` (128) pixels;
3. the protocol: per architecture ``forensics.enroll`` of epochs 11-26 and 27-42 at grid
   positions 0-31 (one 512-image curve each), and ``forensics.attribute`` of epochs 35-50
   at positions 32-63 with fp's default method (bootstrap confidence included);
4. the table: for every fingerprint x matcher, top-1 over the 11 protocol queries, a
   bootstrap interval (``--boot`` resamplings of each query's images), the mean top-1 over
   re-drawn queries (other epoch windows and grid-position splits, latents always
   disjoint), and the open set (each family left out of the bank in turn: how often its
   query is flagged unknown, and the AUROC of the unknown score). Vectors come from
   ``forensics.compute_curve`` on subsets of the embeddings; ranking, calibration and
   decisions from ``forensics.stats.attribution``'s own functions, exactly as ``fp attribute``.

5. the second stage (``attribution_extra.py``): the second development set (cross-code
   queries; VAE and CVAE never enrolled), published peers side by side (``peers.py``),
   top-1 and open-set AUROC against suspect-set size, the calibration of ``fp
   attribute``'s confidence (with ``docs/reliability.png``) and post-processed suspects.

Prints the tables (markdown), the wall time and load average, a SHA-256 of the tables (two
runs must print the same), and last the best method by the worst of within-code re-drawn
and cross-code top-1.

Usage::

    python benchmarks/bench_attribution.py [--workdir DIR] [--size 128] [--boot 50]
                                           [--redraw-step 1] [--open-step 3] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
DATA = HERE.parents[1].parent / "shared" / "data"
ARCHS = ("ACGAN", "BEGAN", "CGAN", "DRAGAN", "EBGAN", "GAN", "LSGAN", "WGAN", "WGAN_GP",
         "infoGAN", "infoGAN_cont")
FIRST, LAST = 11, 50  # epochs used by any configuration
N_POS = 64  # grid positions every architecture has
WINDOW = 16
POS_BLOCKS = ((0, 16), (16, 32), (32, 48), (48, 64))
PROTOCOL = {"enroll": [(11, (0, 32)), (27, (0, 32))], "query": (35, (32, 64))}
MATCHERS = ("l2", "cosine", "combined", "zscore")
BASELINE = "mnist-zoo"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- data ---------------------------------------------------------------------------------


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def materialize(work: Path) -> Path:
    """The zoo as image folders under ``work/zoo`` (written once; a marker says complete)."""
    out = work / "zoo"
    if not (out / ".complete").is_file():
        shutil.rmtree(out, ignore_errors=True)
        log(f"materializing {DATA / 'mnist_gan_zoo.npz'} into {out}")
        subprocess.run([sys.executable, str(DATA / "materialize_mnist_zoo.py"),
                        str(DATA / "mnist_gan_zoo.npz"), str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        (out / ".complete").write_text("ok\n")
    return out


def reference_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """T = 3,000 of t10k[0:7000] (``reference/train``), P = 1,000 of t10k[7000:]."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.choice(7000, 3000, replace=False))
    p = 7000 + np.sort(rng.choice(3000, 1000, replace=False))
    return t, p


def folders(zoo: Path, work: Path) -> dict[str, Path]:
    """T, P, every generator image of epochs 11-50 at positions 0-63, protocol folders."""
    t, p = reference_split(0)
    f = {"T": work / "T", "P": work / "P", "all": work / "all", "protocol": work / "protocol"}
    for i in t:
        _link(zoo / "reference" / "train" / f"{i:05d}.png", f["T"] / f"{i:05d}.png")
    for i in p:
        _link(zoo / "reference" / "heldout" / f"{i:05d}.png", f["P"] / f"{i:05d}.png")
    for a in ARCHS:
        for e in range(FIRST, LAST + 1):
            for pos in range(N_POS):
                _link(zoo / "gen" / a / f"e{e:02d}" / f"{pos:03d}.png",
                      f["all"] / a / f"e{e:02d}_{pos:03d}.png")
        for name, (start, (lo, hi)) in (("enroll1", PROTOCOL["enroll"][0]),
                                        ("enroll2", PROTOCOL["enroll"][1]),
                                        ("query", PROTOCOL["query"])):
            for e in range(start, start + WINDOW):
                for pos in range(lo, hi):
                    _link(zoo / "gen" / a / f"e{e:02d}" / f"{pos:03d}.png",
                          f["protocol"] / a / name / f"e{e:02d}_{pos:03d}.png")
    return f


# -- configurations -------------------------------------------------------------------------


def positions(spec) -> list[int]:
    """Grid positions of ``(lo, hi)`` or of a tuple of such blocks."""
    if isinstance(spec[0], int):
        return list(range(spec[0], spec[1]))
    return [p for lo, hi in spec for p in range(lo, hi)]


def redraws() -> list[dict]:
    """Re-drawn configurations, latents always disjoint between enrolled and query sets.

    Positions in 4 blocks of 16: the enrolled curves use 2 blocks, the query the other 2
    (6 splits). Enrolled windows s..s+15 and s+16..s+31 for s in {11, 15, 19}; query
    windows of 16 epochs starting at 11, 15, ..., 35 (7). 6 x 3 x 7 = 126 draws.
    """
    out = []
    for pair in itertools.combinations(range(4), 2):
        ep = tuple(POS_BLOCKS[i] for i in pair)
        qp = tuple(POS_BLOCKS[i] for i in range(4) if i not in pair)
        for s in (11, 15, 19):
            for qs in range(11, 36, 4):
                out.append({"enroll": [(s, ep), (s + WINDOW, ep)], "query": (qs, qp)})
    return out


# -- vectors through the public API ------------------------------------------------------


class Sets:
    """Fingerprint vectors of image sets (subsets of the zoo's embeddings), memoised."""

    def __init__(self, emb, bank, fingerprints):
        import forensics
        from forensics.data.images import Manifest

        self.emb, self.fps = emb, list(fingerprints)
        self.baseline = forensics.load_baseline(BASELINE, bank=bank)  # loaded once
        self.Manifest = Manifest
        index = {e[0]: i for i, e in enumerate(emb.manifest.entries)}
        self.row = {(a, e, p): index[f"{a}/e{e:02d}_{p:03d}.png"]
                    for a in ARCHS for e in range(FIRST, LAST + 1) for p in range(N_POS)}
        self.memo: dict = {}

    def rows(self, arch: str, start: int, pos) -> np.ndarray:
        return np.array([self.row[(arch, e, p)] for e in range(start, start + WINDOW)
                         for p in positions(pos)])

    def vectors(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every fingerprint's vector of the images ``rows`` (``forensics.compute_curve``)."""
        import forensics
        from forensics.data.embed import Embeddings

        e = self.emb
        sub = Embeddings(list(e.layers), [a[rows] for a in e.arrays],
                         self.Manifest(e.manifest.root, [e.manifest.entries[i] for i in rows]),
                         e.encoder_info)
        res = forensics.compute_curve(sub, baseline=self.baseline, cache_dir=None,
                                      device="cpu", fingerprints=self.fps)
        return res.fingerprints

    def of(self, arch: str, start: int, pos) -> dict[str, np.ndarray]:
        key = (arch, start, str(pos))
        if key not in self.memo:
            self.memo[key] = self.vectors(self.rows(arch, start, pos))
        return self.memo[key]

    def config(self, cfg: dict) -> tuple[list[dict], list[str], list[dict]]:
        """Enrolled vectors, their families, and the 11 query vectors of a configuration."""
        enrolled, fams = [], []
        for a in ARCHS:
            for start, pos in cfg["enroll"]:
                enrolled.append(self.of(a, start, pos))
                fams.append(a)
        queries = [self.of(a, *cfg["query"]) for a in ARCHS]
        return enrolled, fams, queries


# -- matching, exactly as fp attribute does ---------------------------------------------------


class Method:
    """One fingerprint x matcher, with fp attribute's layer mask and matcher resolution."""

    def __init__(self, fp_name: str, matcher: str, dims: list[int], drop=(0,)):
        from forensics.plugin import manager as plugins
        from forensics.stats import fingerprints as fpmod
        from forensics.stats.attribution import keep_mask

        self.fp = plugins.get("fingerprints", fp_name)
        keep = keep_mask(len(dims), drop)
        self.mask = fpmod.entry_mask(self.fp, dims, keep)
        kept = [d for d, k in zip(dims, keep, strict=True) if k]
        self.matcher_name, self.matcher = plugins.resolve_matcher(self.fp, matcher, kept)
        self.label = f"{fp_name} | {matcher}"

    def vec(self, v: dict[str, np.ndarray]) -> np.ndarray:
        return np.nan_to_num(np.asarray(v[self.fp.name], dtype=np.float64), nan=0.0)[self.mask]

    def bank(self, enrolled: list[dict]) -> np.ndarray:
        return np.stack([self.vec(v) for v in enrolled])

    def ranking(self, q: dict, R: np.ndarray, meta: list[dict]):
        from forensics.stats.attribution import rank

        return rank(self.vec(q), R, meta, self.matcher, drop_layers=())

    def top1(self, enrolled, fams, queries) -> np.ndarray:
        R, meta = self.bank(enrolled), _meta(fams)
        return np.array([self.ranking(q, R, meta)[0].family == a
                         for a, q in zip(ARCHS, queries, strict=True)])

    def open_set(self, enrolled, fams, queries) -> tuple[float, float, float]:
        """(AUROC of the unknown score, left-out flagged, in-bank falsely flagged)."""
        from forensics.stats.attribution import calibrate_unknown

        R_all, meta_all = self.bank(enrolled), _meta(fams)
        pos, neg, flag_out, flag_in = [], [], [], []
        for out in ARCHS:
            keep = [i for i, f in enumerate(fams) if f != out]
            R, meta = R_all[keep], [meta_all[i] for i in keep]
            cal = calibrate_unknown(R, [m["family"] for m in meta], self.matcher, ())
            for a, q in zip(ARCHS, queries, strict=True):
                best = self.ranking(q, R, meta)[0].score
                flagged = cal.threshold is not None and best < cal.threshold
                (pos if a == out else neg).append(-best)  # higher = more unknown
                (flag_out if a == out else flag_in).append(flagged)
        return auroc(np.array(pos), np.array(neg)), float(np.mean(flag_out)), \
            float(np.mean(flag_in))


def _conf(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _meta(fams: list[str]) -> list[dict]:
    return [{"curve_id": f"c{i:03d}", "model": f, "family": f} for i, f in enumerate(fams)]


#: A set's top-1 counts as better than chance only below this one-sided binomial p-value.
CHANCE_P = 0.05


def above_chance(top1: float, n: int, classes: int = len(ARCHS)) -> bool:
    """Whether ``top1`` over ``n`` queries beats guessing among ``classes`` families
    (one-sided binomial test at :data:`CHANCE_P`)."""
    from scipy.stats import binomtest

    return bool(binomtest(round(top1 * n), n, 1.0 / classes, alternative="greater").pvalue
                < CHANCE_P)


def select_best(rows, cross: dict, n_redrawn: int, n_cross: int):
    """The method selection on both sets: the largest worst-of re-drawn and cross-code
    top-1, where a figure no better than chance counts as chance (on 10 cross-code queries,
    2 right against 1 is not evidence of anything); ties go to the better re-drawn top-1,
    then protocol top-1."""
    chance = 1.0 / len(ARCHS)

    def credited(top1: float, n: int) -> float:
        return top1 if above_chance(top1, n) else chance

    return max(rows, key=lambda r: (min(credited(r[4], n_redrawn),
                                        credited(cross[r[0].label][0], n_cross)), r[4], r[1]))


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


# -- the run ---------------------------------------------------------------------------------



def work_folder(workdir: Path | None, prefix: str):
    """The benchmark's work folder, created: ``workdir`` (kept), or a temporary one removed
    with the returned ``TemporaryDirectory`` (None for a given folder)."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        workdir = Path(tmp.name)
    work = workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    return work, tmp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where images, bank and embedding cache go (default: a temp dir)")
    ap.add_argument("--size", type=int, default=128, help="encoder input size (>= 75)")
    ap.add_argument("--boot", type=int, default=50, help="bootstrap resamplings per query")
    ap.add_argument("--redraw-step", type=int, default=1,
                    help="use every k-th of the 126 re-drawn configurations")
    ap.add_argument("--open-step", type=int, default=3,
                    help="open set on every k-th re-drawn configuration (and the protocol)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: --boot 5 --redraw-step 21 --open-step 1")
    ap.add_argument("--belonging", action="store_true",
                    help="only the belonging test on the three development sets "
                         "(attribution_sets.py)")
    args = ap.parse_args(argv)
    if args.quick:
        args.boot, args.redraw_step, args.open_step = 5, 21, 1
    t_start = time.perf_counter()
    work, tmp = work_folder(args.workdir, "fp-bench-attr-")

    import forensics
    from forensics import defaults
    from forensics.data.embed import embed_folder
    from refbank import Bank

    encoder = f"fid-inception@{args.size}"
    cache = work / "cache"
    if args.belonging:
        return belonging_stage(work, encoder, cache, args.quick, t_start, tmp)
    zoo = materialize(work)
    f = folders(zoo, work)
    t_data = time.perf_counter()
    log(f"data ready ({t_data - t_start:.0f} s)")

    shutil.rmtree(work / "bank", ignore_errors=True)  # a fresh bank every run
    bank = Bank(work / "bank")
    common = {"bank": bank, "cache_dir": cache, "device": "cpu", "progress": False}
    forensics.build_baseline(BASELINE, f["T"], f["P"], encoder=encoder, seed=0, **common)
    t_base = time.perf_counter()
    log(f"baseline built ({t_base - t_data:.0f} s)")
    emb = embed_folder(f["all"], encoder, cache_dir=cache, device="cpu", progress=False)
    t_emb = time.perf_counter()
    log(f"{len(emb)} generator images embedded ({t_emb - t_base:.0f} s)")

    # The protocol through enroll + attribute, with fp's default method.
    for a in ARCHS:
        for name, (start, _) in (("enroll1", PROTOCOL["enroll"][0]),
                                 ("enroll2", PROTOCOL["enroll"][1])):
            forensics.enroll(f["protocol"] / a / name, baseline=BASELINE, model=f"{a}-e{start}",
                             family=a, per_curve=512, **common)
    answers = {a: forensics.attribute(f["protocol"] / a / "query", n_boot=20, seed=0,
                                      **common) for a in ARCHS}
    t_proto = time.perf_counter()
    default_params = answers[ARCHS[0]].parameters
    default_top1 = np.mean([answers[a].decision.nearest_family == a for a in ARCHS])
    log(f"protocol enrolled and attributed ({t_proto - t_emb:.0f} s)")

    fp_names = ["paper", "setstats", "proj-mean", "proj-mean-early", "proj-mean-ct",
                "resid-early", "resid-ct"]
    sets = Sets(emb, bank, fp_names)
    dims = [int(a.shape[1]) for a in emb.arrays]
    methods = [Method(n, m, dims) for n in fp_names for m in MATCHERS]

    fixed = sets.config(PROTOCOL)
    configs = redraws()[:: args.redraw_step]
    draws = [sets.config(c) for c in configs]
    t_sets = time.perf_counter()
    log(f"{len(sets.memo)} set vectors ({t_sets - t_proto:.0f} s)")

    # Bootstrap: resample each protocol query's 512 images with replacement.
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(args.boot):
        boots.append([sets.vectors(rng.choice(q_rows, q_rows.size, replace=True))
                      for q_rows in (sets.rows(a, *PROTOCOL["query"]) for a in ARCHS)])
    t_boot = time.perf_counter()
    log(f"{args.boot} x 11 bootstrap sets ({t_boot - t_sets:.0f} s)")

    rows = []
    for m in methods:
        top = m.top1(*fixed).mean()
        if boots:
            bt = [m.top1(fixed[0], fixed[1], b).mean() for b in boots]
            lo, hi = np.percentile(bt, [2.5, 97.5])
        else:
            lo = hi = float("nan")
        per = np.array([m.top1(*d).mean() for d in draws])
        au_f, out_f, in_f = m.open_set(*fixed)
        opens = [m.open_set(*d) for d in draws[:: args.open_step]]
        au_r = float(np.mean([o[0] for o in opens]))
        out_r = float(np.mean([o[1] for o in opens]))
        in_r = float(np.mean([o[2] for o in opens]))
        rows.append((m, top, lo, hi, per.mean(), per.min(), au_f, au_r, out_f, out_r,
                     in_f, in_r))
    t_table = time.perf_counter()

    lines = [
        f"Encoder {encoder} (FID InceptionV3, real weights), {len(dims)} layers, layer 0 "
        f"dropped; baseline T=3000 P=1000, PCA 64, 10 cells, n_init 10, seed 0.",
        f"top-1 over the 11 protocol queries; {args.boot} bootstrap resamplings per query; "
        f"re-drawn: {len(draws)} configurations; open set: protocol / "
        f"{len(draws[:: args.open_step])} re-drawn configurations.",
        "",
        "| fingerprint | matcher | top-1 (11) | 95% boot. CI | re-drawn top-1 | min | "
        "AUROC fixed / re-drawn | unknown flagged (left out) | false unknown (in bank) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (m, top, lo, hi, rd, rmin, au_f, au_r, out_f, out_r, in_f, in_r) in rows:
        fp_name, mt = m.label.split(" | ")
        lines.append(f"| {fp_name} | {mt} | {top:.3f} | [{lo:.2f}, {hi:.2f}] | {rd:.3f} | "
                     f"{rmin:.2f} | {au_f:.3f} / {au_r:.3f} | {out_f:.2f} / {out_r:.2f} | "
                     f"{in_f:.2f} / {in_r:.2f} |")
    default = next(r[0] for r in rows if r[0].fp.name == defaults.FINGERPRINT
                   and r[0].matcher_name == "zscore")
    lines += ["", f"Confusions of {default.label} over the re-drawn queries (rows: truth):", "",
              "| | " + " | ".join(ARCHS) + " |", "|---" * (len(ARCHS) + 1) + "|"]
    counts = np.zeros((len(ARCHS), len(ARCHS)), dtype=int)
    for enrolled, fams, queries in draws:
        R, meta = default.bank(enrolled), _meta(fams)
        for i, q in enumerate(queries):
            counts[i, ARCHS.index(default.ranking(q, R, meta)[0].family)] += 1
    for i, a in enumerate(ARCHS):
        lines.append(f"| {a} | " + " | ".join(f"**{c}**" if j == i else str(c)
                                              for j, c in enumerate(counts[i])) + " |")
    import attribution_extra

    extra, summary = attribution_extra.run(work, zoo, emb, sets, methods, encoder, cache,
                                           None if args.quick else HERE.parents[1] / "docs",
                                           args.quick)
    lines += extra
    t_extra = time.perf_counter()
    table = "\n".join(lines)
    print(table)
    print()
    print(f"fp attribute's default ({default_params['fingerprint']} + "
          f"{default_params['matcher']}) on the 11 protocol folders through "
          f"forensics.enroll/attribute: nearest family right {default_top1:.3f}; decisions: "
          + ", ".join(f"{a}->{answers[a].decision.family or 'unknown'}"
                      f"({_conf(answers[a].decision.confidence)})" for a in ARCHS))
    print(f"wall time {time.perf_counter() - t_start:.0f} s (data {t_data - t_start:.0f}, "
          f"baseline {t_base - t_data:.0f}, embedding {t_emb - t_base:.0f}, protocol "
          f"{t_proto - t_emb:.0f}, {len(sets.memo)} sets {t_sets - t_proto:.0f}, bootstrap "
          f"{t_boot - t_sets:.0f}, table {t_table - t_boot:.0f}, second set, peers, size, "
          f"calibration and post-processing {t_extra - t_table:.0f}); load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"table sha256 {hashlib.sha256(table.encode()).hexdigest()}")
    cross = summary["cross"]
    best = select_best(rows, cross, len(draws) * len(ARCHS), 10)
    above = [r[0].label for r in rows if above_chance(cross[r[0].label][0], 10)]
    print(f"cross-code top-1 above chance (one-sided binomial test, p < {CHANCE_P}): "
          f"{', '.join(above) if above else 'none'}")
    print(f"best: {best[0].label} (worst of re-drawn {best[4]:.3f} and cross-code "
          f"{cross[best[0].label][0]:.2f}; protocol top-1 {best[1]:.3f}, open-set AUROC "
          f"{best[6]:.3f} / {best[7]:.3f} by best score, fp's unknown rule on the default "
          f"{summary['open']['rule'][0]:.3f} / {summary['open']['rule'][1]:.3f}); default "
          f"{defaults.FINGERPRINT}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def belonging_stage(work: Path, encoder: str, cache: Path, quick: bool, t_start: float,
                    tmp) -> int:
    """The three development sets: per-set tables, one summary line per set, the chosen
    method last (the largest worst-set balanced accuracy)."""
    import attribution_sets as S

    lines, summary = S.run(work, encoder, cache, quick)
    worst, per = summary["worst"], summary["per"]

    def mean(m: str) -> float:
        return float(np.mean([f["balanced"] for (_s, mm), f in per.items() if mm == m]))

    # the pool: what fp attribute can run from what the bank stores; ties: the mean
    best = max(summary["stored"], key=lambda m: (worst[m], mean(m), m))
    from forensics import defaults

    shipped = S.Method(defaults.BELONG_KIND, defaults.BELONG_GATE,
                       order=defaults.BELONG_ORDER).label
    for m in dict.fromkeys([best, shipped]):
        lines += ["", f"By suspect size ({m}{', fp attribute' if m == shipped else ''}; new "
                      f"latents: named right / called unknown; others: called unknown):", ""]
        lines += S.size_table(summary["answers"], m)
    lines += ["", f"Confidence by condition ({shipped}, fp attribute; all sizes pooled):", ""]
    lines += S.condition_table(summary["answers"], shipped)
    lines += ["", "The family level across runs (CIFAR, leave-one-run-out):", ""]
    lines += summary["family_lines"]
    table = "\n".join(lines)
    print(table)
    print()
    rows = [(s, summary["per"].get((s, shipped))) for s in S.SETS]
    rows.append(("pooled (the three sets)", summary["pooled"].get(shipped)))
    for s, f in rows:
        if f is not None:
            print(f"{s}: {shipped}: new latents named right {S._f(f['named_right'])}, genuine "
                  f"called unknown {S._f(f['genuine_unknown'])}, other run / code base unknown "
                  f"{S._f(f['unknown_right'])}, with a confidence {S._conf(f)}, wrong above "
                  f"0.5 {S._f(f.get('wrong_above_half'))}, ECE {S._f(f.get('ece'))}")
    print(f"wall time {time.perf_counter() - t_start:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f}; table sha256 "
          f"{hashlib.sha256(table.encode()).hexdigest()}")
    print(f"fp attribute: {shipped}")
    print("chosen: " + best + " (worst-set balanced accuracy, then the mean over the sets: "
          + "; ".join(f"{m} {v:.3f} / {mean(m):.3f}" for m, v in sorted(worst.items())
                      if m in summary["stored"]) + ")")
    outside = [m for m in sorted(worst) if m not in summary["stored"]]
    if outside:
        print("outside the selection (reads what the bank does not store): "
              + "; ".join(f"{m} {worst[m]:.3f} / {mean(m):.3f}" for m in outside))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
