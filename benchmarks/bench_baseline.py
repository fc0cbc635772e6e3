"""Baseline build from cached embeddings: time, bank size, and the same answers before/after.

The workload (what ``fp baseline build`` does on a rebuild): T = 400 and P = 400 of
scikit-learn's handwritten digits, embedded once with the real-weight FID InceptionV3
(``fid-inception@75``, 18 layers up to 2,048 wide) into an embedding cache; then
``forensics.build_baseline`` is timed on those cached embeddings (best of ``--repeat``
runs, each into a fresh bank) and the bank's size on disk is measured. To check that the
answers do not change, three generator families (the paper's noise, rotation and
shuffle transforms of other digits) are enrolled with two curves each, and a fresh set of
each family is measured and attributed with every fingerprint (no bootstrap): the
fingerprint vectors and the rankings are saved.

``--before SRC`` also runs the same measurement with the fp source tree ``SRC`` (e.g.
``git archive <commit> | tar -x -C SRC``) in a subprocess, and prints both side by side
with the largest difference between their fingerprint vectors and whether every ranking
and decision is the same.

Usage::

    python benchmarks/bench_baseline.py [--workdir DIR] [--repeat 2] [--before SRC]
                                        [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENCODER = "fid-inception@75"
N_T, N_P, PER_CURVE = 400, 400, 150
FAMILIES = (("noise", {"sigma": 24.0}), ("rotate", {"max_angle": 30.0}), ("shuffle", {"grid": 4}))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _module(*names: str):
    """The first of ``names`` that imports: this layout's module, then an older fp's."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {names} imports")


def folders(work: Path) -> dict[str, Path]:
    """T, P, and per family an enrolment folder (2 curves) and a query folder (written once)."""
    demo = _module("forensics.paper.demo", "forensics.demo")
    _write_pngs, digit_images = demo._write_pngs, demo.digit_images
    synth_folder = _module("forensics.paper.synth", "forensics.synth").synth_folder

    f = {"T": work / "T", "P": work / "P"}
    marker = work / ".complete"
    images = digit_images()
    order = np.random.default_rng(0).permutation(len(images))
    T, P, rest = order[:N_T], order[N_T:N_T + N_P], order[N_T + N_P:]
    for kind, _ in FAMILIES:
        f[f"enroll_{kind}"] = work / f"enroll_{kind}"
        f[f"query_{kind}"] = work / f"query_{kind}"
    if marker.is_file():
        return f
    _write_pngs(images, T, f["T"])
    _write_pngs(images, P, f["P"])
    _write_pngs(images, rest[:2 * PER_CURVE], work / "src_enroll")
    _write_pngs(images, rest[2 * PER_CURVE:3 * PER_CURVE], work / "src_query")
    for j, (kind, params) in enumerate(FAMILIES):
        synth_folder(kind, work / "src_enroll", f[f"enroll_{kind}"], seed=1 + j, **params)
        synth_folder(kind, work / "src_query", f[f"query_{kind}"], seed=11 + j, **params)
    marker.write_text("ok\n")
    return f


def tree_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _time_stages() -> dict[str, float]:
    """Seconds of the last build's stages: the engine (partition, P distances) and the
    fingerprints' arrays; wraps the two functions every fp version builds them with."""
    Baseline = _module("forensics.stats.baseline", "forensics.baseline").Baseline
    pipeline = _module("forensics.steps.build_baseline", "forensics.steps.pipeline",
                       "forensics.pipeline")

    stages: dict[str, float] = {}

    def timed(name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[name] = round(time.perf_counter() - t0, 2)
        return run

    pipeline._prepare_fingerprints = timed("fingerprint arrays", pipeline._prepare_fingerprints)
    Baseline.build = classmethod(timed("engine", Baseline.build.__func__))
    return stages


def measure(work: Path, repeat: int, out: Path) -> dict:
    """Build from cache ``repeat`` times, measure the bank, save vectors and rankings."""
    import forensics

    embed_folder = _module("forensics.data.embed", "forensics.embed").embed_folder
    manager = _module("forensics.plugin.manager", "forensics.plugins")

    f = folders(work)
    cache = work / "cache"
    common = dict(encoder=ENCODER, weights="hub", device="cpu", cache_dir=cache, progress=False)
    log("embedding T and P into the cache (first run only)")
    for folder in (f["T"], f["P"]):
        embed_folder(folder, ENCODER, weights="hub", device="cpu", cache_dir=cache,
                     progress=False)
    stages = _time_stages()
    times = []
    for r in range(repeat):
        bank = Path(tempfile.mkdtemp(prefix="bank-", dir=work))
        stages.clear()
        t0 = time.perf_counter()
        forensics.build_baseline("digits", f["T"], f["P"], bank=bank, **common)
        times.append(time.perf_counter() - t0)
        log(f"build from cache {r + 1}/{repeat}: {times[-1]:.1f} s ({stages})")
    size = tree_bytes(bank)
    baseline_files = {p.name: p.stat().st_size
                      for p in next((bank / "baselines").iterdir()).iterdir()}
    kw = dict(bank=bank, device="cpu", cache_dir=cache, progress=False)
    for kind, _ in FAMILIES:
        forensics.enroll(f[f"enroll_{kind}"], baseline="digits", model=f"{kind}-m",
                         family=kind, per_curve=PER_CURVE, **kw)
    vectors, answers = {}, {}
    for kind, _ in FAMILIES:
        res = forensics.compute_curve(f[f"query_{kind}"], baseline="digits", **kw)
        for name, vec in res.fingerprints.items():
            vectors[f"{kind}/{name}"] = vec
        for name in manager.names("fingerprints"):
            a = forensics.attribute(f[f"query_{kind}"], fingerprint=name, n_boot=0, **kw)
            d = a.decision
            answers[f"{kind}/{name}"] = {
                "decision": [d.family, d.model, d.unknown],
                "ranking": [[m.curve_id, m.model, m.score] for m in a.ranking],
                "threshold": a.calibration.threshold,
            }
    np.savez(out.with_suffix(".npz"), **vectors)
    result = {"build_s": min(times), "build_runs_s": times, "stages_s": dict(stages),
              "bank_bytes": size,
              "baseline_files": baseline_files, "answers": answers,
              "fp": str(Path(forensics.__file__).parent.parent)}
    out.write_text(json.dumps(result, indent=1))
    return result


def run(work: Path, repeat: int, src: Path | None, tag: str) -> tuple[dict, dict]:
    """:func:`measure` in a subprocess, with fp from ``src`` (None: this checkout)."""
    out = work / f"result-{tag}.json"
    env = dict(os.environ)
    if src is not None:
        alias = work / f"alias-{tag}"
        alias.mkdir(exist_ok=True)
        link = alias / "fp_plugins"
        if not link.exists():
            link.symlink_to(Path(src).resolve() / "plugins")
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), str(alias)])
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--workdir", str(work),
                    "--repeat", str(repeat), "--measure", str(out)], check=True, env=env)
    with np.load(out.with_suffix(".npz")) as npz:
        vectors = {k: npz[k] for k in npz.files}
    return json.loads(out.read_text()), vectors


def compare(before: tuple[dict, dict], after: tuple[dict, dict]) -> list[str]:
    """Lines saying how far the after-vectors are from the before-vectors, per fingerprint."""
    (rb, vb), (ra, va) = before, after
    lines = []
    for name in sorted({k.split("/", 1)[1] for k in vb}):
        keys = [k for k in vb if k.endswith("/" + name)]
        diffs = [float(np.max(np.abs(va[k] - vb[k])) / max(np.max(np.abs(vb[k])), 1e-300))
                 for k in keys]
        lines.append(f"  {name:<16} max |after - before| / max |before| = {max(diffs):.2e}"
                     f"{'  (bit-identical)' if max(diffs) == 0 else ''}")
    # Curve ids differ between banks (they hold the time of enrolment): compare the
    # decisions, the ranked models and their scores.
    same = all(ra["answers"][k]["decision"] == rb["answers"][k]["decision"]
               and [m[1] for m in ra["answers"][k]["ranking"]]
               == [m[1] for m in rb["answers"][k]["ranking"]] for k in rb["answers"])
    score = max(abs(x[2] - y[2]) for k in rb["answers"]
                for x, y in zip(ra["answers"][k]["ranking"], rb["answers"][k]["ranking"],
                                strict=True))
    lines.append(f"  decisions and ranked models of {len(rb['answers'])} attributions "
                 f"identical: {'yes' if same else 'NO'}; largest score difference {score:.1e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--before", type=Path, default=None,
                    help="fp source tree to compare with (e.g. an earlier commit)")
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS/OpenMP threads of both runs (default: the libraries' own)")
    ap.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fp-bench-baseline-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.measure is not None:
        measure(work, args.repeat, args.measure)
        return 0
    load = os.getloadavg()[0]
    print(f"setting: T={N_T} P={N_P} encoder={ENCODER} cpu_threads={os.cpu_count()} "
          f"blas_threads={args.threads or 'default'} load average {load:.1f}")
    rows = []
    before = run(work, args.repeat, args.before, "before") if args.before else None
    after = run(work, args.repeat, None, "after")
    for tag, res in (("before", before), ("after", after)):
        if res is None:
            continue
        r = res[0]
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in r["stages_s"].items())
        rows.append(f"{tag:<7} build from cache {r['build_s']:7.1f} s "
                    f"(runs: {', '.join(f'{t:.1f}' for t in r['build_runs_s'])}; last run: "
                    f"{parts})   bank {r['bank_bytes'] / 2**20:7.1f} MiB")
    print("\n".join(rows))
    for name, size in sorted(after[0]["baseline_files"].items()):
        print(f"  after: {name:<26} {size / 2**20:8.2f} MiB")
    if before is not None:
        b, a = before[0], after[0]
        print(f"speedup {b['build_s'] / a['build_s']:.1f}x, bank "
              f"{b['bank_bytes'] / a['bank_bytes']:.1f}x smaller")
        print("\n".join(compare(before, after)))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
