"""Embedding throughput through a Ray cluster against the local path, on the same images.

Writes N PNG images (as ``bench_embed.py`` does), starts one local Ray cluster (or joins
``--address``), then runs :func:`forensics.data.embed.embed_folder` with the cache off,
locally and with ``ray=``, ``--repeat`` times each, alternating which goes first. Every
run records when each batch of embeddings arrives (``on_batch``), which separates its
two costs without a model:

- **steady rate**: the slope of the images received so far against the time of each
  arrival (least squares over every arrival);
- **fixed**: where that line starts, at zero images (loading the model; for Ray also
  starting the encoder actor, which imports torch and loads the encoder, and the Ray
  Data job).

It prints every run, the median steady rate of each path, the steady-rate overhead of
the Ray path (from the medians, and the median of the runs paired by repeat), the
end-to-end overhead on N images (best runs), the largest difference between the two
paths' embeddings, and the load average before and after. Examples::

    python benchmarks/bench_ray.py                               # vit-tiny-demo, 2 CPUs
    python benchmarks/bench_ray.py --encoder deit-tiny@32 --n 4000
    python benchmarks/bench_ray.py --encoder vit-b16 --device cuda --n 100000 \\
        --batch-size 512 --address auto                         # a GPU cluster
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_embed import make_images


def timed_run(embed) -> dict:
    """Run ``embed(on_batch)``; its wall time, fixed cost, steady rate and result.

    The steady rate is the least-squares slope of the images received so far against the
    time of each arrival, and the fixed cost where that line starts (at zero images): a
    slope over every arrival, so that results which arrive together (Ray Data hands over
    an encoder task's blocks at once) neither inflate nor deflate it.
    """
    arrivals: list[tuple[float, int]] = []
    start = time.perf_counter()
    result = embed(lambda k: arrivals.append((time.perf_counter() - start, k)))
    wall = time.perf_counter() - start
    t = np.array([a for a, _ in arrivals])
    done = np.cumsum([k for _, k in arrivals])
    if np.ptp(t) > 0:
        rate, at_zero = np.polyfit(t, done, 1)
        fixed = -at_zero / rate
    else:  # everything arrived at once: no rate
        rate, fixed = float("nan"), float("nan")
    return {"wall": wall, "fixed": float(fixed), "rate": float(rate), "first": arrivals[0][1],
            "batches": len(arrivals), "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit-tiny-demo")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--n", type=int, default=6000, help="number of images")
    parser.add_argument("--size", type=int, default=32, help="image size on disk (pixels)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--address", default="local",
                        help="the --ray value: local (a new cluster), auto, or HOST:PORT")
    parser.add_argument("--cpus", type=int, default=None,
                        help="CPUs of a new local cluster [default: all usable]")
    parser.add_argument("--block-rows", type=int, default=None,
                        help="rows per block of the file list handed to Ray Data "
                             "[default: fp's, 1024]; the Ray path's results arrive a block "
                             "or more at a time, and its steady rate needs two arrivals")
    args = parser.parse_args()

    import torch

    from forensics.data import ray_embed
    from forensics.data.embed import embed_folder
    from forensics.data.images import scan_folder

    if args.block_rows:
        ray_embed.LIST_BLOCK_ROWS = args.block_rows
    load_before = os.getloadavg()
    ray = ray_embed.connect(args.address, num_cpus=args.cpus)
    resources = ray.cluster_resources()
    paths = {"local": None, "ray": args.address}
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_images(folder, args.n, args.size)
        manifest = scan_folder(folder)
        kw = dict(weights=args.weights, device=args.device, batch_size=args.batch_size,
                  cache_dir=None, progress=False)
        for rep in range(args.repeat):
            order = ("local", "ray") if rep % 2 == 0 else ("ray", "local")
            for name in order:
                run = timed_run(lambda on_batch, how=paths[name]: embed_folder(
                    manifest, args.encoder, ray=how, on_batch=on_batch, **kw))
                runs[name].append(run)
                print(f"repeat {rep + 1} {name:5s}: {run['wall']:6.1f} s; fixed cost "
                      f"{run['fixed']:5.1f} s, then {run['rate']:8,.1f} images/s "
                      f"({run['batches']} arrivals, the first of {run['first']} images)",
                      flush=True)
    load_after = os.getloadavg()

    local, distributed = runs["local"], runs["ray"]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(
        local[-1]["result"].arrays, distributed[-1]["result"].arrays, strict=True))
    info = local[-1]["result"].encoder_info
    print(f"encoder: {info['name']} (weights {info['weights']}, {len(info['layers'])} "
          f"layers, {info['precision']}), device {args.device}, {args.n} images "
          f"{args.size}x{args.size}, batch {args.batch_size}; torch threads here "
          f"{torch.get_num_threads()}; Ray cluster: {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs")
    med = {}
    for name, rs in runs.items():
        med[name] = statistics.median(r["rate"] for r in rs)
        best = min(r["wall"] for r in rs)
        each = ", ".join(f"{r['rate']:,.0f}" for r in rs)
        print(f"{name:5s}: fixed {statistics.median(r['fixed'] for r in rs):5.1f} s "
              f"(median), steady {med[name]:8,.1f} images/s (median of "
              f"{each}), {args.n} images in "
              f"{best:6.1f} s at best ({args.n / best:,.1f} images/s)")
    if any(r["batches"] < 2 for rs in runs.values() for r in rs):
        print("note: a run got all its embeddings back at once, so it has no steady rate "
              "(nan): raise --n or lower --block-rows")
    print(f"largest difference between local and Ray embeddings: {diff:.3g}")
    paired = statistics.median(a["rate"] / b["rate"] - 1 for a, b in zip(
        local, distributed, strict=True))
    print(f"overhead (steady rate): {100 * (med['local'] / med['ray'] - 1):.0f}% "
          f"(paired by repeat: median {100 * paired:.0f}%)")
    end = min(r["wall"] for r in distributed) / min(r["wall"] for r in local) - 1
    print(f"overhead (end to end, {args.n} images): {100 * end:.0f}%")
    print("load average before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(
        *load_before, *load_after))


if __name__ == "__main__":
    main()
