"""C_T engine benchmark: the paper's per-query pipeline against fp's cached baseline.

Synthetic embeddings shaped like He et al.'s setting (defaults: T = 20,000 training,
P = 5,000 held-out and Q = 500 generated samples, D = 768 features, 12 layers). One run
times

(a) the paper's pipeline as its code runs it for one query set: per layer, refit PCA to 64
    dimensions and KMeans(10 cells, n_init=10) on T, assign T, P and Q to cells, then in
    each cell the dense nearest-neighbour distances (1 - |cos|) of P and Q to T's members,
    scipy's Mann-Whitney U, the Z score and the weighted average;
(b) fp's per-query path against a baseline built once beforehand: project Q, assign cells,
    nearest neighbour among the cell's T samples, rank against the stored P distances,

checks that both give the same C_T per layer, and prints both times (wall clock and CPU),
the peak memory, and as its last line ``speedup: <a/b>x`` (wall clock; (b) is the median of
runs made before and after (a)). KMeans is seeded in (a) as in (b) (the paper's code
leaves it unseeded) so that the two can be compared value for value.

Run: ``python benchmarks/bench_ct.py [--layers 12 --n-train 20000 ...]``.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting make every parallel region crawl when the CPU is
# shared with other processes; sleeping waiters keep both paths' timings meaningful there.
# Set before numpy, scipy, sklearn and torch load their OpenMP runtimes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __init__(self):
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.005)

    def __enter__(self):
        self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def make_layers(n_train: int, n_held: int, n_gen: int, dim: int, layers: int, seed: int):
    """Per layer: a mixture of 10 Gaussians in a random 32-dim subspace plus isotropic noise.

    Half of Q are near-copies of training samples, half fresh draws, so C_T is negative
    and every cell is populated. float32, like encoder outputs.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        basis = rng.normal(size=(32, dim)) / np.sqrt(32)
        centers = rng.normal(scale=4.0, size=(10, 32))

        def draw(n, basis=basis, centers=centers):
            z = centers[rng.integers(0, 10, n)] + rng.normal(size=(n, 32))
            return (z @ basis + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)

        T, P = draw(n_train), draw(n_held)
        copies = T[rng.integers(0, n_train, n_gen // 2)]
        copies = copies + 0.01 * rng.normal(size=copies.shape).astype(np.float32)
        Q = np.concatenate([copies, draw(n_gen - n_gen // 2)]).astype(np.float32)
        out.append((T, P, Q))
    return out


def _abscos_nn(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Dense 1 - |cos| nearest-neighbour distance, as the paper's code computes it."""
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    B = B / np.linalg.norm(B, axis=1, keepdims=True)
    return np.min(1.0 - np.abs(A @ B.T), axis=1)


def paper_layer(T: np.ndarray, P: np.ndarray, Q: np.ndarray, seed: int) -> float:
    """One layer of the paper's pipeline, refitting everything for this query set."""
    from scipy.stats import mannwhitneyu
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    T, P, Q = T.astype(float), P.astype(float), Q.astype(float)
    pca = PCA(min(T.shape[0], T.shape[1], 64)).fit(T)
    Tp, Pp, Qp = pca.transform(T), pca.transform(P), pca.transform(Q)
    km = KMeans(10, n_init=10, random_state=seed).fit(Tp)
    Tc, Pc, Qc = km.predict(Tp), km.predict(Pp), km.predict(Qp)
    m, n, k = len(Qp), len(Pp), int(Tc.max()) + 1
    tau = 20 / m
    q_share = np.bincount(Qc, minlength=k) / m
    p_share = np.bincount(Pc, minlength=k) / n
    z = np.zeros(k)
    for c in range(k):
        Tcell, Pcell, Qcell = Tp[Tc == c], Pp[Pc == c], Qp[Qc == c]
        if len(Qcell) == 0:
            continue
        u, _ = mannwhitneyu(_abscos_nn(Qcell, Tcell), _abscos_nn(Pcell, Tcell),
                            alternative="less")
        mc, nc = len(Qcell), len(Pcell)
        z[c] = (u - (nc * mc / 2 - 0.5)) / np.sqrt(nc * mc * (nc + mc + 1) / 12)
    keep = q_share > tau
    return float(p_share[keep].dot(z[keep]) / np.sum(p_share[keep]))


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-held", type=int, default=5000)
    ap.add_argument("--n-gen", type=int, default=500)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the fp query path")
    ap.add_argument("--device", default="cpu", help="torch device of fp's NN search")
    args = ap.parse_args(argv)

    # Imported up front so that neither path's time includes loading a library.
    import scipy.stats  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import torch

    from forensics.steps.baseline_files import load_engine
    from forensics.steps.engine import load_or_build

    print(f"setting: T={args.n_train} P={args.n_held} Q={args.n_gen} D={args.dim} "
          f"layers={args.layers} seed={args.seed} cpu_threads={torch.get_num_threads()} "
          f"device={args.device} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"load average {os.getloadavg()[0]:.1f}")
    data = make_layers(args.n_train, args.n_held, args.n_gen, args.dim, args.layers, args.seed)
    T_layers, P_layers, Q_layers = (list(x) for x in zip(*data, strict=True))
    names = [f"layer{i}" for i in range(args.layers)]
    held = sum(a.nbytes for a in T_layers + P_layers + Q_layers)
    print(f"embeddings held in memory: {held / 2**20:.0f} MiB")

    with tempfile.TemporaryDirectory() as cache:
        with PeakRSS() as mem_build:
            t0, c0 = time.perf_counter(), time.process_time()
            base = load_or_build(cache, T_layers, P_layers, names, seed=args.seed,
                                 device=args.device)
            t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        base = load_engine(os.path.join(cache, base.id), device=args.device)
        t_load = time.perf_counter() - t0
    print(f"    fp baseline, built once: {t_build:.2f} s wall, {c_build:.2f} s CPU (peak RSS "
          f"{mem_build.peak / 2**20:.0f} MiB); reloaded from disk in {t_load:.3f} s")

    # (b) runs before and after (a), so that both see the same spread of machine load.
    wall, cpu = [], []

    def query_runs():
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            results = base.query(Q_layers)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return results

    with PeakRSS() as mem_b:
        ours = query_runs()
    with PeakRSS() as mem_a:
        t0, c0 = time.perf_counter(), time.process_time()
        paper = [paper_layer(T, P, Q, args.seed) for T, P, Q in data]
        t_paper, c_paper = time.perf_counter() - t0, time.process_time() - c0
    with PeakRSS() as mem_b2:
        ours = query_runs()
    t_fp, c_fp = statistics.median(wall), statistics.median(cpu)
    print(f"(a) paper pipeline, one query set: {t_paper:.2f} s wall "
          f"({t_paper / args.layers:.2f} s/layer), {c_paper:.2f} s CPU, "
          f"peak RSS {mem_a.peak / 2**20:.0f} MiB")
    print(f"(b) fp query path, one query set: {t_fp * 1000:.1f} ms wall (median of "
          f"{len(wall)}, half before and half after (a); min {min(wall) * 1000:.1f} ms, "
          f"max {max(wall) * 1000:.1f} ms), {c_fp * 1000:.1f} ms CPU, "
          f"peak RSS {max(mem_b.peak, mem_b2.peak) / 2**20:.0f} MiB")

    a_cts, b_cts = np.array(paper), np.array([r.ct for r in ours])
    same_nan = np.array_equal(np.isnan(a_cts), np.isnan(b_cts))
    diff = float(np.nanmax(np.abs(a_cts - b_cts), initial=0.0)) if same_nan else float("nan")
    print("C_T per layer (fp):", " ".join(f"{r.ct:.3f}" for r in ours))
    print(f"max |C_T(a) - C_T(b)| over layers: {diff:.3g}")
    print(f"load average after: {os.getloadavg()[0]:.1f}; speedup in CPU time: "
          f"{c_paper / c_fp:.1f}x")
    speedup = t_paper / t_fp
    print(f"speedup: {speedup:.1f}x")
    return speedup


if __name__ == "__main__":
    main()
