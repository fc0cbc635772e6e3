"""Scale benchmark: a baseline built from an on-disk store, T = 10k, 100k, 1M.

Synthetic per-layer embeddings shaped like benchmarks/bench_ct.py (per layer: 10 Gaussian
clusters in a random 32-dim subspace plus isotropic noise, D = 768, float32), written to a
layer-major store (forensics.data.store) a chunk of rows at a time, so that the generator
never holds more than one chunk. P = T/4; Q = 500, half near-copies of training rows.

For every size it prints the streamed build (wall and CPU time, peak RSS, bytes on disk),
the time of one suspect set's query, C_T per layer, and the log-log slope of build time
over T; where T fits in memory (sizes up to --in-memory-max) the same build from in-memory
arrays with the distance's exact search (no FAISS), whose C_T must be identical. At the
largest size both can run (100k by default) it also builds with FAISS's KMeans instead of
scikit-learn's and prints what that does to C_T.

The last line is ``T=<n>: peak RSS <x> GB, build <s> s, query <s> s/layer, slope <s>``.

Run: ``python benchmarks/bench_scale.py [--quick] [--sizes 10000 100000 1000000]
[--dir DIR]``. T = 1M needs about 16 GB of free disk (``df -h``) and takes a while.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ct import PeakRSS  # noqa: E402

GEN_CHUNK = 50_000
SUBSPACE = 32


def layer_model(layer: int, dim: int, seed: int):
    rng = np.random.default_rng([seed, layer])
    basis = rng.normal(size=(SUBSPACE, dim)) / np.sqrt(SUBSPACE)
    centers = rng.normal(scale=4.0, size=(10, SUBSPACE))
    return basis, centers


def draw(rng, n, basis, centers):
    z = centers[rng.integers(0, 10, n)] + rng.normal(size=(n, SUBSPACE))
    return (z @ basis + 0.3 * rng.normal(size=(n, basis.shape[1]))).astype(np.float32)


def write_set(root: Path, n: int, dim: int, layers: int, seed: int, tag: int):
    """A store of ``n`` rows per layer, generated and written a chunk at a time."""
    from forensics.data.store import StoreWriter

    models = [layer_model(i, dim, seed) for i in range(layers)]
    w = StoreWriter(root, [f"layer{i}" for i in range(layers)], [dim] * layers, n)
    for c, s in enumerate(range(0, n, GEN_CHUNK)):
        b = min(GEN_CHUNK, n - s)
        w.write(s, [draw(np.random.default_rng([seed, tag, i, c]), b, *models[i])
                    for i in range(layers)])
    return w.close()


def suspects(T_store, m: int, dim: int, layers: int, seed: int):
    """Q per layer: half near-copies of T's rows, half fresh draws."""
    rng = np.random.default_rng([seed, 99])
    picks = np.sort(rng.choice(len(T_store), m // 2, replace=False))
    out = []
    for i in range(layers):
        copies = T_store.layer(i)[picks]
        copies = copies + 0.01 * rng.normal(size=copies.shape).astype(np.float32)
        fresh = draw(np.random.default_rng([seed, 98, i]), m - m // 2, *layer_model(i, dim, seed))
        out.append(np.concatenate([copies, fresh]).astype(np.float32))
    return out


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_build(T, P, names, **kw):
    from forensics.steps.engine import build_engine

    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        base = build_engine(T, P, names, seed=0, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return base, wall, cpu, mem.peak


def timed_query(base, Q):
    t0 = time.perf_counter()
    res = base.query(Q)
    return res, time.perf_counter() - t0


def warm_up(args) -> None:
    """One small untimed build first, so that no size pays for first-call costs (imports,
    FAISS and torch thread pools) in its timing."""
    models = [layer_model(i, args.dim, args.seed) for i in range(args.layers)]
    T = [draw(np.random.default_rng([args.seed, 7, i]), 2000, *models[i])
         for i in range(args.layers)]
    P = [t[:500] + np.float32(0.01) for t in T]
    timed_build(T, P, [f"layer{i}" for i in range(args.layers)])


def run_size(n: int, args, root: Path) -> dict:
    from forensics.data.store import LayerStore
    from forensics.steps.baseline_files import load_engine, save_engine

    names = [f"layer{i}" for i in range(args.layers)]
    folder = root / f"T{n}"
    t0 = time.perf_counter()
    T = write_set(folder / "T", n, args.dim, args.layers, args.seed, 1)
    P = write_set(folder / "P", n // 4, args.dim, args.layers, args.seed, 2)
    Q = suspects(T, args.n_gen, args.dim, args.layers, args.seed)
    t_gen = time.perf_counter() - t0
    T, P = LayerStore.open(T.root), LayerStore.open(P.root)
    base, wall, cpu, peak = timed_build(T.arrays, P.arrays, names, search=args.search)
    save_engine(base, folder / "baseline")
    on_disk = du(folder)
    loaded = load_engine(folder / "baseline")
    res, t_query = timed_query(loaded, Q)
    _res2, t_query2 = timed_query(loaded, Q)
    cts = [r.ct for r in res]
    print(f"T={n}: data written in {t_gen:.1f} s; build {wall:.1f} s wall, {cpu:.1f} s CPU, "
          f"peak RSS {peak / 2**30:.2f} GB; on disk {on_disk / 2**30:.2f} GB "
          f"(store {du(folder / 'T') / 2**30 + du(folder / 'P') / 2**30:.2f}, baseline "
          f"{du(folder / 'baseline') / 2**30:.2f}); query {t_query:.2f} s first, "
          f"{t_query2:.2f} s again ({t_query / args.layers:.2f} s/layer first)", flush=True)
    print(f"  C_T per layer: {' '.join(f'{c:.4f}' for c in cts)}", flush=True)
    out = {"n": n, "wall": wall, "cpu": cpu, "peak": peak, "query": t_query / args.layers,
           "cts": cts}
    if n <= args.in_memory_max:
        Tm = [np.asarray(a) for a in T.arrays]
        Pm = [np.asarray(a) for a in P.arrays]
        mem, w2, c2, p2 = timed_build(Tm, Pm, names, search="never", chunk_rows=n)
        cts_m = [r.ct for r in mem.query(Q)]
        same = mem.id == base.id and np.array_equal(np.asarray(cts_m, float),
                                                    np.asarray(cts, float), equal_nan=True)
        print(f"  in memory (arrays, one chunk, exact search): build {w2:.1f} s wall, "
              f"{c2:.1f} s CPU, peak RSS {p2 / 2**30:.2f} GB (arrays held: "
              f"{sum(a.nbytes for a in Tm + Pm) / 2**30:.2f} GB); same id and C_T: {same}",
              flush=True)
        out["same"] = same
        del Tm, Pm, mem
    if n == args.kmeans_compare:
        fa, w3, _c3, _p3 = timed_build(T.arrays, P.arrays, names,
                                       partitioner_params={"kmeans": "faiss"})
        cts_f = [r.ct for r in fa.query(Q)]
        diff = max(abs(a - b) for a, b in zip(cts, cts_f, strict=True))
        print(f"  FAISS KMeans instead of scikit-learn's: build {w3:.1f} s, C_T per layer "
              f"{' '.join(f'{c:.4f}' for c in cts_f)}; max |diff| {diff:.4f}", flush=True)
    if args.approximate:
        approximate(args.approximate, base, T, P, Q, names, wall, cts)
    if not args.keep:
        shutil.rmtree(folder)
    return out


def approximate(spec: str, base, T, P, Q, names, wall: float, cts) -> None:
    """The approximate search against the exact build: time, recall of Q's nearest
    training rows, P's distances and C_T per layer."""
    ap_base, w, _c, peak = timed_build(T.arrays, P.arrays, names, search=spec)
    exact_q = base.query(Q, details=True)
    approx_q = ap_base.query(Q, details=True)
    recall = [float(np.mean(a.details["nn_index"] == e.details["nn_index"]))
              for a, e in zip(approx_q, exact_q, strict=True)]
    excess = [float(np.nanmean(a.p_dist / np.where(e.p_dist > 0, e.p_dist, np.nan)) - 1.0)
              for a, e in zip(ap_base.layers, base.layers, strict=True)]
    cts_a = [r.ct for r in approx_q]
    diff = max(abs(a - b) for a, b in zip(cts, cts_a, strict=True))
    print(f"  approximate search {ap_base.meta.get('search')}: build {w:.1f} s (exact "
          f"{wall:.1f} s), peak RSS {peak / 2**30:.2f} GB; recall@1 of Q per layer "
          f"{' '.join(f'{r:.3f}' for r in recall)}; P's sorted distances above exact by "
          f"{' '.join(f'{100 * x:.2f}%' for x in excess)}; C_T per layer "
          f"{' '.join(f'{c:.4f}' for c in cts_a)}; max |diff| {diff:.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--quick", action="store_true", help="T = 10k only")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--n-gen", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-memory-max", type=int, default=100_000)
    ap.add_argument("--kmeans-compare", type=int, default=100_000,
                    help="size at which FAISS's KMeans is compared with scikit-learn's")
    ap.add_argument("--search", default="auto",
                    help="the stores' build's search (auto: exact; ivf[:...]: approximate)")
    ap.add_argument("--approximate", default=None, metavar="SPEC",
                    help="also build with this approximate search (e.g. ivf:nprobe=16) and "
                         "measure it against the exact one")
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the stores and baselines")
    args = ap.parse_args(argv)
    sizes = [10_000] if args.quick else sorted(args.sizes)
    import faiss
    import torch

    print(f"setting: sizes={sizes} D={args.dim} layers={args.layers} Q={args.n_gen} P=T/4 "
          f"search={args.search} "
          f"cpu_threads={torch.get_num_threads()} faiss_threads={faiss.omp_get_max_threads()} "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="fp-bench-scale-", dir=args.dir))
    try:
        warm_up(args)
        rows = [run_size(n, args, root) for n in sizes]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    slope = float("nan")
    for a, b in zip(rows, rows[1:], strict=False):
        slope = math.log(b["wall"] / a["wall"]) / math.log(b["n"] / a["n"])
        print(f"slope of build time, T={a['n']} -> {b['n']}: {slope:.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    last = rows[-1]
    print(f"T={last['n']}: peak RSS {last['peak'] / 2**30:.2f} GB, build {last['wall']:.1f} s, "
          f"query {last['query']:.2f} s/layer, slope {slope:.2f}")


if __name__ == "__main__":
    main()
