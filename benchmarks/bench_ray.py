"""Embedding throughput through a Ray cluster against the local path, on the same images.

Writes N PNG images (as ``bench_embed.py`` does), starts one local Ray cluster (or joins
``--address``), then times :func:`forensics.data.embed.embed_folder` with the cache off,
locally and with ``ray=``, alternating the two, best of ``--repeat``. Each path is timed on
N images and on ``--n-small`` images, so that ``t(n) = fixed + n / rate`` gives its fixed
cost (model load; for Ray also starting the encoder actor and the Ray Data job) and its
steady rate apart. The last lines are the overheads of the Ray path: in steady rate, and
end to end on N images, and the load average before and after. Examples::

    python benchmarks/bench_ray.py                               # vit-tiny-demo, 2 CPUs
    python benchmarks/bench_ray.py --encoder deit-tiny@32 --n 4000
    python benchmarks/bench_ray.py --encoder vit-b16 --device cuda --n 100000 \\
        --batch-size 512 --address auto                         # a GPU cluster
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_embed import make_images


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit-tiny-demo")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--n", type=int, default=4000, help="number of images")
    parser.add_argument("--n-small", type=int, default=256,
                        help="images of the short runs that measure the fixed cost")
    parser.add_argument("--size", type=int, default=32, help="image size on disk (pixels)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--address", default="local",
                        help="the --ray value: local (a new cluster), auto, or HOST:PORT")
    parser.add_argument("--cpus", type=int, default=None,
                        help="CPUs of a new local cluster [default: all usable]")
    args = parser.parse_args()

    import torch

    from forensics.data import ray_embed
    from forensics.data.embed import embed_folder
    from forensics.data.images import Manifest, scan_folder

    load_before = os.getloadavg()
    ray = ray_embed.connect(args.address, num_cpus=args.cpus)
    resources = ray.cluster_resources()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_images(folder, args.n, args.size)
        full = scan_folder(folder)
        small = Manifest(full.root, full.entries[:args.n_small])
        kw = dict(weights=args.weights, device=args.device, batch_size=args.batch_size,
                  cache_dir=None, progress=False)
        out = {}

        def run(manifest, how):
            def go():
                out[how, len(manifest)] = embed_folder(manifest, args.encoder, ray=how, **kw)
            return go

        runs = {(how, m): run(manifest, how) for how in (None, args.address)
                for m, manifest in (("small", small), ("full", full))}
        best = {key: float("inf") for key in runs}
        for _ in range(args.repeat):
            for key, fn in runs.items():
                best[key] = min(best[key], timed(fn))
    load_after = os.getloadavg()

    def model(how):
        t_small, t_full = best[how, "small"], best[how, "full"]
        rate = (args.n - args.n_small) / max(t_full - t_small, 1e-9)
        return t_full - args.n / rate, rate, t_full

    local, distributed = model(None), model(args.address)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(
        out[None, args.n].arrays, out[args.address, args.n].arrays, strict=True))
    info = out[None, args.n].encoder_info
    print(f"encoder: {info['name']} (weights {info['weights']}, {len(info['layers'])} "
          f"layers, {info['precision']}), device {args.device}, {args.n} images "
          f"{args.size}x{args.size}, batch {args.batch_size}; torch threads here "
          f"{torch.get_num_threads()}; Ray cluster: {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs")
    for name, (fixed, rate, total) in (("local", local), ("ray", distributed)):
        print(f"{name:5s}: fixed {fixed:5.1f} s, steady {rate:8,.1f} images/s, "
              f"{args.n} images in {total:6.1f} s ({args.n / total:,.1f} images/s)")
    print(f"largest difference between local and Ray embeddings: {diff:.3g}")
    print(f"overhead (steady rate): {100 * (local[1] / distributed[1] - 1):.0f}%")
    print(f"overhead (end to end, {args.n} images): {100 * (distributed[2] / local[2] - 1):.0f}%")
    print("load average before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(
        *load_before, *load_after))


if __name__ == "__main__":
    main()
