"""The second development set, peers, suspect-set size, calibration and post-processing.

Called by ``bench_attribution.py`` after its table, on the same baseline, the same
enrolled images and the same queries. Everything that depends only on set means runs on
per-image vectors (``per_image`` of a fingerprint, or a peer's per-image features), so a
set's vector is the mean of its rows and thousands of suspect sets cost seconds:

- **cross-code**: enrolled from the first code base (the protocol's curves), queried with
  every architecture of the second code base (``mnist_xcode_zoo.npz``, epochs 9 + 24,
  through ``forensics.compute_curve``); VAE and CVAE exist only there and must come out
  unknown;
- **peers**: Marra et al.'s noise residuals, ManiFPT's nearest-real residuals (pixels and
  early encoder layers), a CNN trained from scratch and linear probes on two frozen
  real-weight encoders, FID-Inception and EfficientNet-Lite0 (``peers.py``; Lite0's
  features cached in the work folder), on the protocol, re-drawn configurations and
  cross-code;
- **size**: top-1 and open-set AUROC of fp's default against suspect-set size;
- **calibration**: ``fp attribute``'s confidence (``forensics.stats.confidence``) against how
  often it is right, per size, with a reliability diagram;
- **post-processing**: JPEG 90/75/50, half-size and back, a 90% centre crop, mild noise
  (``fp synth``), queried against the clean bank.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import bench_attribution as B
import numpy as np
import peers

XARCHS = ("ACGAN", "BEGAN", "CGAN", "DRAGAN", "EBGAN", "GAN", "LSGAN", "WGAN", "WGAN_GP",
          "infoGAN")
XUNKNOWN = ("VAE", "CVAE")
XEPOCHS = ("e009", "e024")
SIZES = (8, 16, 32, 64, 128, 256, 512)
TRANSFORMS = (("jpeg", {"quality": 90}, "JPEG 90"), ("jpeg", {"quality": 75}, "JPEG 75"),
              ("jpeg", {"quality": 50}, "JPEG 50"), ("downup", {"factor": 2.0}, "half and back"),
              ("crop", {"fraction": 0.9}, "90% centre crop"), ("noise", {"sigma": 3.0}, "noise 3"))
#: Input size of the EfficientNet-Lite0 peer (MNIST digits are 28 px; 64 keeps 29,984 images
#: within about a quarter of an hour on 2 CPU cores).
LITE0_SIZE = 64
#: Query images per architecture for the post-processing table (fixed, seeded choice).
N_TRANSFORM = 128


def xcode_folder(zoo: Path, work: Path) -> Path:
    """The second code base's epochs 9 + 24, one folder per architecture (hard links)."""
    out = work / "xall"
    for a in XARCHS + XUNKNOWN:
        for e in XEPOCHS:
            src = zoo / "xgen" / a / e
            for f in sorted(os.listdir(src)):
                B._link(src / f, out / a / f"{e}_{f}")
    return out


# -- per-image rows ---------------------------------------------------------------------------


def per_image(loaded, fp_name: str, emb) -> np.ndarray:
    """A fingerprint's per-image vectors of every image of ``emb`` (its ``per_image``)."""
    from forensics.plugin import manager as plugins
    from forensics.stats import fingerprints as fpmod

    fp = plugins.get("fingerprints", fp_name)
    ctx = fpmod.FingerprintContext(list(loaded.row["layers"]), [], list(emb.arrays),
                                   loaded.engine, loaded.extras(fp) or {})
    return np.asarray(fp.per_image(ctx), dtype=np.float64)


class Grid:
    """Per-image rows of the zoo (arch x epoch 11..50 x position 0..63) and of xcode."""

    def __init__(self, rows: np.ndarray, index: dict, xrows: dict[str, np.ndarray]):
        self.X = rows
        self.index = index
        self.x = xrows

    def rows(self, arch: str, start: int, pos) -> np.ndarray:
        return np.array([self.index[(arch, e, p)] for e in range(start, start + B.WINDOW)
                         for p in B.positions(pos)])

    def bank(self, cfg) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Enrolled vectors, per-image variances and families of a configuration."""
        V, S, fam = [], [], []
        for a in B.ARCHS:
            for start, pos in cfg["enroll"]:
                r = self.X[self.rows(a, start, pos)]
                V.append(r.mean(axis=0))
                S.append(r.var(axis=0))
                fam.append(a)
        return np.array(V), np.array(S), fam


def by_arch(emb) -> dict[str, np.ndarray]:
    """Row indices of each architecture's images (the first folder of their paths)."""
    out: dict[str, list[int]] = {}
    for i, (rel, *_rest) in enumerate(emb.manifest.entries):
        out.setdefault(rel.split("/")[0], []).append(i)
    return {a: np.asarray(rows) for a, rows in out.items()}


def _grid(emb, xemb, rows_all: np.ndarray, rows_x: np.ndarray) -> Grid:
    """Rows (features or images) of the zoo's and the second code base's images."""
    index = {}
    for i, (rel, *_rest) in enumerate(emb.manifest.entries):
        arch, name = rel.split("/")
        e, p = name[:-4].split("_")
        index[(arch, int(e[1:]), int(p))] = i
    xrows = {a: rows_x[r] for a, r in by_arch(xemb).items()}
    return Grid(rows_all, index, xrows)


# -- scoring ------------------------------------------------------------------------------------


def zscore(q: np.ndarray, R: np.ndarray) -> np.ndarray:
    from fp_plugins.matchers import ZScoreMatcher

    return ZScoreMatcher().score(q, R)


def nearest_family(score, q, V, fam) -> tuple[str, float]:
    from forensics.stats.confidence import family_scores, margin_of

    f, best, _ = margin_of(family_scores(score(q, V), fam))
    return f, best


def _query(g: Grid, arch: str, cfg, n=None, rng=None) -> np.ndarray:
    """The vector of a configuration's query of ``arch`` (``n`` of its images at random)."""
    r = g.rows(arch, *cfg["query"])
    if n is not None and n < len(r):
        r = rng.choice(r, n, replace=False)
    return g.X[r].mean(axis=0)


def top1_grid(g: Grid, score, cfgs, n=None, rng=None) -> float:
    ok = []
    for cfg in cfgs:
        V, _, fam = g.bank(cfg)
        for a in B.ARCHS:
            ok.append(nearest_family(score, _query(g, a, cfg, n, rng), V, fam)[0] == a)
    return float(np.mean(ok))


def open_set_grid(g: Grid, score, cfgs, n=None, rng=None) -> float:
    """AUROC of -best score: each family left out in turn, its query against the others'."""
    vals = []
    for cfg in cfgs:
        V, _, fam = g.bank(cfg)
        fam = np.array(fam)
        qs = [_query(g, a, cfg, n, rng) for a in B.ARCHS]
        pos, neg = [], []
        for out in B.ARCHS:
            keep = fam != out
            for a, q in zip(B.ARCHS, qs, strict=True):
                (pos if a == out else neg).append(-float(np.max(score(q, V[keep]))))
        vals.append(B.auroc(np.array(pos), np.array(neg)))
    return float(np.mean(vals))


def xcode_grid(g: Grid, score, n=None, rng=None) -> tuple[float, list[str]]:
    V, _, fam = g.bank(B.PROTOCOL)
    ok, got = [], []
    for a in XARCHS:
        r = g.x[a]
        if n is not None and n < len(r):
            r = r[rng.choice(len(r), n, replace=False)]
        f = nearest_family(score, r.mean(axis=0), V, fam)[0]
        ok.append(f == a)
        got.append(f)
    return float(np.mean(ok)), got


def xcode_unknown_auroc(g: Grid, score) -> float:
    """AUROC of -best score: VAE and CVAE (never enrolled) against the 10 shared ones."""
    V, _, fam = g.bank(B.PROTOCOL)
    best = {a: float(np.max(score(g.x[a].mean(axis=0), V))) for a in XARCHS + XUNKNOWN}
    return B.auroc(np.array([-best[a] for a in XUNKNOWN]), np.array([-best[a] for a in XARCHS]))


def rule_shortfall(V, S, fam, queries: list[np.ndarray], n: int) -> np.ndarray:
    """fp's unknown rule on ``queries`` (suspects of ``n`` images) against a bank.

    The rule's score (:func:`forensics.stats.confidence.shortfall`) minus its threshold, both
    from the bank's own simulated genuine suspects of ``n`` images, as ``fp attribute``
    fits them: above 0, the suspect is called unknown.
    """
    from forensics import defaults
    from forensics.stats import confidence as C

    sim = C.simulate(V, S, [512] * len(V), fam, zscore, sizes=(n,), seed=0)
    zstar = C.shortfall_cutoff(sim.best, sim.margin, defaults.QUANTILE)
    bm = np.array([C.margin_of(C.family_scores(zscore(q, V), fam))[1:] for q in queries])
    return C.shortfall(bm[:, 0], bm[:, 1], sim.best, sim.margin) - zstar


def open_set_rule(g: Grid, cfgs, n=None, rng=None) -> tuple[float, float, float]:
    """fp's unknown rule, each family left out in turn: (AUROC, left-out flagged, false
    unknown of enrolled families against the whole bank)."""
    aucs, flag_out, flag_in = [], [], []
    for cfg in cfgs:
        V, S, fam = g.bank(cfg)
        fam = np.array(fam)
        qs = [_query(g, a, cfg, n, rng) for a in B.ARCHS]
        size = n or len(g.rows(B.ARCHS[0], *cfg["query"]))
        flag_in += list(rule_shortfall(V, S, list(fam), qs, size) > 0)
        pos, neg = [], []
        for out in B.ARCHS:
            keep = fam != out
            z = rule_shortfall(V[keep], S[keep], list(fam[keep]), qs, size)
            for a, u in zip(B.ARCHS, z, strict=True):
                (pos if a == out else neg).append(u)
                if a == out:
                    flag_out.append(u > 0)
        aucs.append(B.auroc(np.array(pos), np.array(neg)))
    return float(np.mean(aucs)), float(np.mean(flag_out)), float(np.mean(flag_in))


def xcode_rule(g: Grid) -> tuple[float, int, int]:
    """fp's unknown rule across code: (AUROC of VAE + CVAE against the 10 shared
    architectures, VAE/CVAE flagged, shared ones flagged), each at its own size."""
    V, S, fam = g.bank(B.PROTOCOL)
    z = {a: float(rule_shortfall(V, S, fam, [g.x[a].mean(axis=0)], len(g.x[a]))[0])
         for a in XARCHS + XUNKNOWN}
    return (B.auroc(np.array([z[a] for a in XUNKNOWN]), np.array([z[a] for a in XARCHS])),
            sum(z[a] > 0 for a in XUNKNOWN), sum(z[a] > 0 for a in XARCHS))


def open_set_table(g: Grid, cfgs) -> tuple[list[str], dict]:
    """fp's default: the shipped unknown rule beside the best score alone."""
    rp, rr = open_set_rule(g, [B.PROTOCOL]), open_set_rule(g, cfgs)
    xa, xu, xs = xcode_rule(g)
    bp, br = open_set_grid(g, zscore, [B.PROTOCOL]), open_set_grid(g, zscore, cfgs)
    lines = ["| unknown score | AUROC protocol | AUROC re-drawn | left-out family flagged "
             "(protocol / re-drawn) | false unknown, enrolled (protocol / re-drawn) | "
             "cross-code AUROC, VAE+CVAE vs the 10 | VAE / CVAE flagged | shared ones flagged |",
             "|---|---|---|---|---|---|---|---|",
             f"| best score alone | {bp:.3f} | {br:.3f} | - | - | "
             f"{xcode_unknown_auroc(g, zscore):.2f} | - | - |",
             f"| fp's rule: best score or margin, against the bank's simulated genuine suspects | "
             f"{rp[0]:.3f} | {rr[0]:.3f} | {rp[1]:.2f} / {rr[1]:.2f} | {rp[2]:.2f} / "
             f"{rr[2]:.2f} | {xa:.2f} | {xu} of 2 | {xs} of 10 |"]
    return lines, {"rule": (rp[0], rr[0]), "best": (bp, br)}


# -- the stages -----------------------------------------------------------------------------


def cross_code_table(sets, xemb, methods) -> tuple[list[str], dict]:
    """Every fingerprint x matcher on the second code base, through compute_curve."""
    import forensics
    from forensics.data.embed import Embeddings
    from forensics.data.images import Manifest
    from forensics.errors import InsufficientDataError

    per_arch = {}
    for a, rows in by_arch(xemb).items():
        sub = Embeddings(list(xemb.layers), [x[rows] for x in xemb.arrays],
                         Manifest(xemb.manifest.root, [xemb.manifest.entries[i] for i in rows]),
                         xemb.encoder_info)
        vecs = {}
        for fp_name in sets.fps:  # one by one: a C_T fingerprint may refuse the set size
            try:
                vecs.update(forensics.compute_curve(sub, baseline=sets.baseline, cache_dir=None,
                                                    device="cpu",
                                                    fingerprints=[fp_name]).fingerprints)
            except InsufficientDataError:
                pass
        per_arch[a] = vecs
    enrolled, fams, _ = sets.config(B.PROTOCOL)
    out = {}
    for m in methods:
        R, meta = m.bank(enrolled), B._meta(fams)
        from forensics.stats.attribution import calibrate_unknown

        cal = calibrate_unknown(R, fams, m.matcher, ())
        right, refused, flagged = 0, 0, []
        for a in XARCHS + XUNKNOWN:
            if m.fp.name not in per_arch[a]:
                refused += a in XARCHS
                continue
            best = m.ranking(per_arch[a], R, meta)[0]
            unknown = cal.threshold is not None and best.score < cal.threshold
            if a in XARCHS:
                right += best.family == a and not unknown
            else:
                flagged.append(unknown)
        out[m.label] = (right / len(XARCHS), refused, sum(flagged))
    lines = ["| fingerprint | matcher | cross-code top-1 (10) | refused (C_T undefined) | "
             "VAE/CVAE flagged unknown |", "|---|---|---|---|---|"]
    for label, (t, ref, fl) in out.items():
        fp_name, mt = label.split(" | ")
        lines.append(f"| {fp_name} | {mt} | {t:.2f} | {ref} | {fl} / 2 |")
    return lines, out


def peer_rows(grid_default: Grid, pix: Grid, res: Grid, nnp: Grid, nnf: Grid,
              feats_pool: Grid, lite0: Grid, images: Grid, cfg_train,
              draws_train) -> list[tuple]:
    """(method, protocol, re-drawn, cross-code) of every peer and of fp's default."""
    cfgs = B.redraws()
    rows = []
    for name, g, score in (
            ("Marra et al. 2019: mean noise residual, correlation", res, peers.correlation),
            ("ManiFPT, training-free: pixel - nearest real, correlation", nnp, peers.correlation),
            ("ManiFPT, training-free: early layers - nearest real, zscore", nnf, zscore),
            ("mean pixels, zscore", pix, zscore),
            # the per-image rows hold every entry: layer 0 too, which fp attribute drops
            # (defaults.DROP_LAYERS), so this row can differ from the main table's default
            ("fp default: resid-early, zscore (every entry, layer 0 kept)", grid_default,
             zscore)):
        rows.append((name, top1_grid(g, score, [B.PROTOCOL]), top1_grid(g, score, cfgs),
                     xcode_grid(g, score)[0]))
    head = Grid(lite0.X[:, -peers.LITE0_HEAD:], lite0.index,
                {a: v[:, -peers.LITE0_HEAD:] for a, v in lite0.x.items()})
    for name, g in (("linear probe, FID-Inception pool (2048), majority vote", feats_pool),
                    ("linear probe, EfficientNet-Lite0 head (1280), majority vote", head),
                    ("linear probe, EfficientNet-Lite0 stages + head (2064), majority vote",
                     lite0),
                    ("linear probe, fp's resid-early rows, majority vote", grid_default)):
        rows.append((name, *trained(g, probe, cfg_train, draws_train)))
    rows.append(("small CNN from scratch, majority vote",
                 *trained(images, cnn, cfg_train, draws_train)))
    return rows


def _train(g: Grid, cfg) -> tuple[np.ndarray, np.ndarray]:
    X, y = [], []
    for i, a in enumerate(B.ARCHS):
        for start, pos in cfg["enroll"]:
            r = g.rows(a, start, pos)
            X.append(g.X[r])
            y += [i] * len(r)
    return np.concatenate(X), np.array(y)


def trained(g: Grid, train, cfg, draws) -> tuple[float, float, float]:
    """A per-image classifier trained on each configuration's enrolled images, majority vote.

    ``train(X, y)`` returns the classifier as a function of images' rows -> labels.
    Returns (protocol, re-drawn, cross-code) top-1; cross-code uses the protocol's model.
    """
    def run(c):
        label = train(*_train(g, c))
        return [peers.majority(label(g.X[g.rows(a, *c["query"])]))[0] == i
                for i, a in enumerate(B.ARCHS)], label

    proto, label = run(cfg)
    redrawn = [ok for c in draws for ok in run(c)[0]]
    xc = [B.ARCHS[peers.majority(label(g.x[a]))[0]] == a for a in XARCHS]
    return float(np.mean(proto)), float(np.mean(redrawn)), float(np.mean(xc))


def lite0_rows(work: Path, tag: str, names: list[str], images: np.ndarray,
               size: int = LITE0_SIZE) -> np.ndarray:
    """EfficientNet-Lite0 features of ``images`` (``peers.Lite0Features``), cached in ``work``.

    The cache (``lite0-<size>-<tag>.npz``) holds the image names and the weights' SHA-256;
    it is used only when both match, so a changed folder or weights file recomputes.
    """
    import hashlib

    weights = peers.lite0_weights()
    sha = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    path = work / f"lite0-{size}-{tag}.npz"
    if path.is_file():
        with np.load(path) as z:
            if str(z["sha256"]) == sha and list(z["names"]) == list(names):
                return z["features"].astype(np.float64)
    feats = peers.Lite0Features(size=size, weights=weights)(images)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=feats, names=np.array(names), sha256=np.array(sha))
    os.replace(tmp, path)
    return feats.astype(np.float64)


def probe(X: np.ndarray, y: np.ndarray):
    """A linear probe's labelling function."""
    return peers.linear_probe(X, y).predict


def cnn(X: np.ndarray, y: np.ndarray):
    """The small CNN's labelling function (2 epochs from scratch)."""
    model = peers.CNNAttributor(len(B.ARCHS), epochs=2, seed=0).fit(X, y)
    return lambda images: model.proba(images).argmax(1)


def size_table(g: Grid, cfgs, reps: int = 3) -> list[str]:
    rng = np.random.default_rng(0)
    rule_rng = np.random.default_rng(1)  # its own draws: the other columns stay as they were
    lines = ["| images per suspect set | within-code re-drawn top-1 | open-set AUROC, best score "
             "(re-drawn) | open-set AUROC, fp's rule (re-drawn) | cross-code top-1 (10) |",
             "|---|---|---|---|---|"]
    for n in SIZES:
        t = np.mean([top1_grid(g, zscore, cfgs, n, rng) for _ in range(reps)])
        o = np.mean([open_set_grid(g, zscore, cfgs[::3], n, rng) for _ in range(reps)])
        r = np.mean([open_set_rule(g, cfgs[::3], n, rule_rng)[0] for _ in range(reps)])
        x = np.mean([xcode_grid(g, zscore, n, rng)[0] for _ in range(reps)])
        lines.append(f"| {n} | {t:.3f} | {o:.3f} | {r:.3f} | {x:.2f} |")
    return lines


def calibration(g: Grid, cfgs, png: Path | None, reps: int = 3) -> tuple[list[str], dict]:
    """Confidence of fp attribute (fitted on each bank) against correctness."""
    from forensics.stats import confidence as C

    rng = np.random.default_rng(0)
    data = {"within": [], "cross": []}
    for cfg in cfgs + [B.PROTOCOL]:
        V, S, fam = g.bank(cfg)
        model = C.fit(C.simulate(V, S, [512] * len(V), fam, zscore, seed=0))
        sets = [(a, g.X[g.rows(a, *cfg["query"])], "within") for a in B.ARCHS]
        if cfg is B.PROTOCOL:
            sets += [(a, g.x[a], "cross") for a in XARCHS]
        for a, rows, kind in sets:
            for n in SIZES:
                for _ in range(reps if n < len(rows) else 1):
                    if n > len(rows):
                        continue
                    q = rows[rng.choice(len(rows), n, replace=False)].mean(axis=0)
                    f, best, margin = C.margin_of(C.family_scores(zscore(q, V), fam))
                    unknown = best < model.threshold(n) or margin < model.margin_threshold(n)
                    data[kind].append((n, model.probability(margin, best, n), f == a, unknown))
    lines = ["| queries | n | accuracy | mean confidence | ECE | wrong with confidence > 0.9 | "
             "called unknown |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for kind, label in (("within", "within-code re-drawn"), ("cross", "cross-code")):
        d = np.array(data[kind], dtype=float)
        for n in (None, *SIZES):
            k = np.ones(len(d), bool) if n is None else d[:, 0] == n
            if not k.any():
                continue
            p, y, u = d[k, 1], d[k, 2].astype(bool), d[k, 3].astype(bool)
            ece = C.expected_calibration_error(p, y)
            lines.append(f"| {label} | {'all' if n is None else n} | {y.mean():.3f} | "
                         f"{p.mean():.3f} | {ece:.3f} | {np.mean((p > 0.9) & ~y):.3f} | "
                         f"{u.mean():.3f} |")
            if n is None:
                summary[kind] = (ece, float(np.mean((p > 0.9) & ~y)))
    if png is not None:
        _reliability(data, png)
    return lines, summary


def _reliability(data, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for kind, label in (("within", "within-code re-drawn"), ("cross", "cross-code")):
        d = np.array(data[kind], dtype=float)
        which = np.minimum((d[:, 1] * 10).astype(int), 9)  # ten equal-width bins
        shown = [b for b in range(10) if (which == b).sum() >= 5]
        ax.plot([d[which == b, 1].mean() for b in shown], [d[which == b, 2].mean() for b in shown],
                "o-", label=f"{label} ({len(d)} suspects)")
    ax.set_xlabel("confidence (fp attribute)")
    ax.set_ylabel("share right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability of fp's confidence (resid-early, zscore)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def transform_table(work: Path, loaded, encoder: str, cache: Path, g: Grid) -> list[str]:
    """Protocol queries post-processed by ``fp synth``, against the clean bank."""
    from forensics.data.embed import embed_folder
    from forensics.paper.synth import synth_folder

    rng = np.random.default_rng(0)
    src = work / "transform-src"
    picks = {}
    start, pos = B.PROTOCOL["query"]
    names = [f"e{e:02d}_{p:03d}.png" for e in range(start, start + B.WINDOW)
             for p in B.positions(pos)]  # the order of Grid.rows
    for a in B.ARCHS:
        picks[a] = np.sort(rng.choice(len(names), N_TRANSFORM, replace=False))
        for i in picks[a]:
            B._link(work / "all" / a / names[i], src / a / names[i])
    V, _, fam = g.bank(B.PROTOCOL)
    lines = ["| suspects (protocol queries, 128 images each) | top-1 (11) | families named |",
             "|---|---|---|"]
    clean = [nearest_family(zscore, g.X[g.rows(a, *B.PROTOCOL["query"])[picks[a]]].mean(0),
                            V, fam)[0] for a in B.ARCHS]
    acc = np.mean([c == a for c, a in zip(clean, B.ARCHS, strict=True)])
    lines.append(f"| clean | {acc:.3f} | "
                 f"{', '.join(c[:6] for c in clean)} |")
    for kind, params, label in TRANSFORMS:
        out = work / f"transform-{kind}-{'-'.join(str(v) for v in params.values())}"
        if not (out / "fp-synth.json").is_file():
            synth_folder(kind, src, out, seed=0, force=True, **params)
        emb = embed_folder(out, encoder, cache_dir=cache, device="cpu", progress=False)
        rows = per_image(loaded, "resid-early", emb)
        arch_rows = by_arch(emb)
        got = [nearest_family(zscore, rows[arch_rows[a]].mean(axis=0), V, fam)[0]
               for a in B.ARCHS]
        acc = np.mean([x == a for x, a in zip(got, B.ARCHS, strict=True)])
        lines.append(f"| {label} | {acc:.3f} | {', '.join(x[:6] for x in got)} |")
    return lines


def run(work: Path, zoo: Path, emb, sets, methods, encoder: str, cache: Path,
        docs: Path | None, quick: bool) -> tuple[list[str], dict]:
    """Every stage; returns the markdown lines and a summary for the last line."""
    from forensics.data.embed import embed_folder

    t0 = time.perf_counter()
    loaded = sets.baseline
    xemb = embed_folder(xcode_folder(zoo, work), encoder, cache_dir=cache, device="cpu",
                        progress=False)
    B.log(f"second code base embedded ({time.perf_counter() - t0:.0f} s)")
    lines, summary = [], {}
    xlines, xc = cross_code_table(sets, xemb, methods)
    summary["cross"] = xc
    lines += ["", "Cross-code: enrolled from the first code base (protocol), queried with the "
                  "second (epochs 9 + 24; 128 or 200 images):", ""] + xlines
    B.log(f"cross-code table ({time.perf_counter() - t0:.0f} s)")

    default = _grid(emb, xemb, per_image(loaded, "resid-early", emb),
                    per_image(loaded, "resid-early", xemb))
    step = 21 if quick else 9
    cfgs = B.redraws()[::step]
    size = size_table(default, cfgs)
    lines += ["", f"fp's default (resid-early + zscore) against suspect-set size (re-drawn: "
                  f"{len(cfgs)} configurations; suspects drawn at random from each query, 3 "
                  f"draws per size):", ""] + size
    B.log(f"size table ({time.perf_counter() - t0:.0f} s)")
    ocfgs = B.redraws()[::21 if quick else 3]
    olines, summary["open"] = open_set_table(default, ocfgs)
    lines += ["", f"Open set of fp's default (each family left out in turn; protocol and "
                  f"{len(ocfgs)} re-drawn configurations; cross-code: the protocol's bank):",
              ""] + olines
    B.log(f"open-set table ({time.perf_counter() - t0:.0f} s)")
    cal, summary["calibration"] = calibration(
        default, cfgs, None if docs is None else docs / "reliability.png")
    lines += ["", "Confidence of fp attribute (fitted on each bank: leave-one-curve-out "
                  "suspects simulated from the per-image variances) against correctness:",
              ""] + cal
    B.log(f"calibration ({time.perf_counter() - t0:.0f} s)")

    # Peers on pixels (the zoo's images, read from the embedded folders' files).
    from PIL import Image

    def load(em):
        return np.stack([np.asarray(Image.open(Path(em.manifest.root) / e[0]).convert("L"))
                         for e in em.manifest.entries])

    imgs, ximgs = load(emb), load(xemb)
    T = np.stack([np.asarray(Image.open(p).convert("L")) for p in sorted((work / "T").iterdir())])
    pix_all, pix_x = peers.pixels(imgs), peers.pixels(ximgs)
    res = _grid(emb, xemb, peers.noise_residuals(imgs), peers.noise_residuals(ximgs))
    Tp = peers.pixels(T)
    nnp = _grid(emb, xemb, peers.nearest_real_residuals(pix_all, Tp),
                peers.nearest_real_residuals(pix_x, Tp))
    Temb = embed_folder(work / "T", encoder, cache_dir=cache, device="cpu", progress=False)
    Tf = per_image(loaded, "proj-mean-early", Temb)
    nnf = _grid(emb, xemb, peers.nearest_real_residuals(per_image(loaded, "proj-mean-early", emb),
                                                        Tf),
                peers.nearest_real_residuals(per_image(loaded, "proj-mean-early", xemb), Tf))
    pool = _grid(emb, xemb, np.asarray(emb.arrays[-1], np.float64),
                 np.asarray(xemb.arrays[-1], np.float64))
    pix = _grid(emb, xemb, pix_all, pix_x)
    lite0 = _grid(emb, xemb,
                  lite0_rows(work, "all", [e[0] for e in emb.manifest.entries], imgs),
                  lite0_rows(work, "xall", [e[0] for e in xemb.manifest.entries], ximgs))
    B.log(f"peer features ({time.perf_counter() - t0:.0f} s)")
    raw = _grid(emb, xemb, imgs, ximgs)  # the images themselves, for the CNN
    train_draws = B.redraws()[::126] if quick else B.redraws()[::63]
    prows = peer_rows(default, pix, res, nnp, nnf, pool, lite0, raw, B.PROTOCOL, train_draws)
    lines += ["", f"Peers, side by side (same enrolled images and queries; trained methods are "
                  f"trained on each configuration's enrolled images, re-drawn over "
                  f"{len(train_draws)} configurations, training-free ones over all 126):", "",
              "| method | protocol top-1 (11) | re-drawn top-1 | cross-code top-1 (10) | "
              "worst of re-drawn and cross-code |", "|---|---|---|---|---|"]
    for name, p, r, x in prows:
        lines.append(f"| {name} | {p:.3f} | {r:.3f} | {x:.2f} | {min(r, x):.3f} |")
    summary["peers"] = prows
    B.log(f"peers ({time.perf_counter() - t0:.0f} s)")
    lines += ["", "Post-processed suspects (fp synth), enrolled clean, fp's default:", ""]
    lines += transform_table(work, loaded, encoder, cache, default)
    B.log(f"post-processing ({time.perf_counter() - t0:.0f} s)")
    return lines, summary
