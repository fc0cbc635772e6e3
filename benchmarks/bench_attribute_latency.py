"""How long does ``fp attribute`` take when the suspects' embeddings are cached?

Reads the MNIST GAN zoo in ``../shared/data`` (never copied into the project: the images are
linked into a work folder, ``--workdir``) and builds, through fp's public API and the FID
InceptionV3 encoder at 128 px (real weights, offline):

- a bank of 22 curves: per architecture (11) one model of two 512-image curves (epochs 11-26
  and 27-42 at grid positions 0-31: the belonging test has a null), against a baseline of
  T = 3,000 and P = 1,000 reference digits;
- a suspect set of 512 images (an architecture's epochs 35-50 at positions 32-63);
- 100 suspect sets of 64 images each (sub-folders of one folder, for ``--each``).

Then it runs the command line as a user would, each run a fresh process, and prints:

1. **one cached set**: ``fp attribute SET --n-boot 0 --json`` after every embedding and the
   bank's calibration are stored: wall time (median of ``--repeat``) and peak RSS
   (``/usr/bin/time``'s maximum resident set size, else ``getrusage`` of the children);
2. **the first call after a bank change** (the calibration computed and stored), beside it;
3. **100 cached sets in one call** (``fp attribute DIR --each --n-boot 0 --json``): wall time;
4. **uncached**: the same 512-image set with ``--no-cache``: wall time, and the encoder's
   rate in images per second of that call;
5. **the belonging test's share** of one cached answer (in process, ``cProfile``: the
   share of :func:`forensics.steps.attribute._belonging` in :func:`forensics.attribute`);

with the load average before and after, and the targets beside the figures (a quiet 2-core
machine: a cached 512-image set <= 1.5 s wall and <= 400 MB; 100 cached sets <= 30 s).

Usage::

    python benchmarks/bench_attribute_latency.py [--workdir DIR] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_attribution as B

ENCODER = "fid-inception@128"
BASELINE = "mnist-latency"
TARGET_WALL_S = 1.5
TARGET_RSS_MB = 400
TARGET_SETS_S = 30.0
N_SETS = 100
SET_SIZE = 64
#: What a bank built by an earlier version lacks is rebuilt (curves whose rows are files).
BANK_FORMAT = "rows files"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup(work: Path) -> tuple[Path, Path, Path, Path]:
    """The bank, the 512-image suspect set, the folder of 100 sets and the cache folder."""
    import forensics
    from refbank import Bank

    zoo = B.materialize(work)
    f = B.folders(zoo, work)
    cache = work / "cache"
    bank_dir = work / "latency-bank"
    done = bank_dir / ".complete"
    if not done.is_file() or done.read_text().strip() != BANK_FORMAT:
        shutil.rmtree(bank_dir, ignore_errors=True)
        bank = Bank(bank_dir)
        common = {"bank": bank, "cache_dir": cache, "device": "cpu", "progress": False}
        log("building the baseline (T = 3,000, P = 1,000)")
        forensics.build_baseline(BASELINE, f["T"], f["P"], encoder=ENCODER, seed=0, **common)
        for a in B.ARCHS:
            for name, (start, _) in (("enroll1", B.PROTOCOL["enroll"][0]),
                                     ("enroll2", B.PROTOCOL["enroll"][1])):
                log(f"enrolling {a} {name}")
                forensics.enroll(f["protocol"] / a / name, baseline=BASELINE, model=a,
                                 family=a, checkpoint=f"e{start}", per_curve=512, **common)
        done.write_text(BANK_FORMAT + "\n")
    suspect = f["protocol"] / B.ARCHS[0] / "query"
    sets = work / "latency-sets"
    if not (sets / ".complete").is_file():
        shutil.rmtree(sets, ignore_errors=True)
        for i in range(N_SETS):  # 64 images of one architecture's query block each
            arch = B.ARCHS[i % len(B.ARCHS)]
            src = sorted((f["protocol"] / arch / "query").iterdir())
            start = (i // len(B.ARCHS)) * SET_SIZE % len(src)
            for p in (src + src)[start:start + SET_SIZE]:
                B._link(p, sets / f"set-{i:03d}" / p.name)
        (sets / ".complete").write_text("ok\n")
    return bank_dir, suspect, sets, cache


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one fresh process."""
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time")
                                     else None)
    full = ([timer, "-f", "%M"] if timer else []) + cmd
    t0 = time.perf_counter()
    proc = subprocess.run(full, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    if timer:
        rss_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024
    else:
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return wall, rss_mb, proc.stdout


def belonging_share(bank: Path, suspect: Path, cache: Path) -> tuple[float, float]:
    """Seconds of one cached answer in process, and the belonging test's share of them."""
    import cProfile
    import pstats

    import forensics

    forensics.attribute(suspect, bank=bank, cache_dir=cache, n_boot=0)  # imports, warm
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    forensics.attribute(suspect, bank=bank, cache_dir=cache, n_boot=0)
    total = time.perf_counter() - t0
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    belong = sum(v[3] for k, v in stats.items()
                 if k[2] == "_belonging" and k[0].endswith("attribute.py"))
    return total, belong / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="work folder (kept: a second run reuses its bank and cache)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each timed command")
    args = ap.parse_args(argv)
    work, tmp = B.work_folder(args.workdir, "fp-bench-latency-")
    bank, suspect, sets, cache = setup(work)
    fp = [str(Path(sys.executable).with_name("fp"))]
    # fp's cache root: its embeddings are the setup's cache
    home = work / "fp-home"
    home.mkdir(exist_ok=True)
    if not (home / "embeddings").exists():
        (home / "embeddings").symlink_to(cache, target_is_directory=True)
    env = {**os.environ, "FP_CACHE_DIR": str(home)}
    common = ["--bank", str(bank), "--n-boot", "0", "--json"]

    run(fp + ["attribute", str(suspect), *common], env)  # its images embedded, if not yet
    load0 = os.getloadavg()
    # the first call after a bank change: no stored calibration
    shutil.rmtree(bank / "calibration", ignore_errors=True)
    shutil.rmtree(home / "conditions", ignore_errors=True)
    first_wall, first_rss, out = run(fp + ["attribute", str(suspect), *common], env)
    answer = json.loads(out)
    walls, rss = [], []
    for _ in range(args.repeat):
        w, r, out2 = run(fp + ["attribute", str(suspect), *common], env)
        walls.append(w)
        rss.append(r)
    same = _strip(json.loads(out2)) == _strip(answer)
    # the first call describes each set's storage (64 files read each); later ones do not
    sets_first, _r, lines = run(fp + ["attribute", str(sets), "--each", *common], env)
    set_walls = []
    for _ in range(max(1, args.repeat // 2)):
        w, _r, lines = run(fp + ["attribute", str(sets), "--each", *common], env)
        set_walls.append(w)
    n_answered = sum(1 for line in lines.splitlines() if '"answer"' in line)
    un_wall, _r, _o = run(fp + ["attribute", str(suspect), "--bank", str(bank), "--n-boot",
                                "0", "--json", "--no-cache", "--device", "cpu"], env)
    in_total, share = belonging_share(bank, suspect, cache)
    load1 = os.getloadavg()

    wall = statistics.median(walls)
    sets_wall = statistics.median(set_walls)
    cached_ref = wall
    rate = 512 / max(un_wall - cached_ref, 1e-9)
    print(f"bank: 22 curves of 512 images ({ENCODER}); suspect: 512 images; "
          f"decision {answer['decision']['family'] or 'unknown'}")
    print("| measure | figure | target |")
    print("|---|---|---|")
    print(f"| one cached 512-image set, --n-boot 0 (median of {len(walls)}) | {wall:.2f} s wall "
          f"(min {min(walls):.2f}, max {max(walls):.2f}) | <= {TARGET_WALL_S} s |")
    print(f"| its peak RSS | {max(rss):.0f} MB | <= {TARGET_RSS_MB} MB |")
    print(f"| the first call after a bank change (calibration computed and stored) | "
          f"{first_wall:.2f} s wall, {first_rss:.0f} MB | - |")
    print(f"| {N_SETS} cached sets of {SET_SIZE} in one call (--each; median of "
          f"{len(set_walls)}) | {sets_wall:.2f} s wall, {n_answered} answered | "
          f"<= {TARGET_SETS_S:.0f} s |")
    print(f"| the same, the first time (each set's storage described: 64 files read) | "
          f"{sets_first:.2f} s wall | - |")
    print(f"| the 512-image set uncached (--no-cache, cpu) | {un_wall:.2f} s wall: "
          f"{rate:.1f} img/s beyond the cached call | encoder-bound |")
    print(f"| the belonging test's share of a cached answer (in process, {in_total:.2f} s) | "
          f"{100 * share:.1f} % | - |")
    print(f"stored answer identical to computed one: {same}")
    print(f"load average before {load0[0]:.2f} / after {load1[0]:.2f} "
          f"(on {os.cpu_count()} CPUs)")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _strip(answer: dict) -> dict:
    """An answer without its time stamp."""
    out = json.loads(json.dumps(answer))
    out.get("provenance", {}).pop("created", None)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
