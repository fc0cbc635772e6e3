"""Embedding throughput: the bare model forward (all layers) versus ``fp embed`` end to end.

Writes N PNG images (real handwritten digits from scikit-learn, resized to SIZE x SIZE) to
a temporary folder, then measures on the same images:

- bare: ``encoder.forward`` over pre-transformed batches already in memory (every layer,
  pooled, copied back to numpy);
- end to end: :func:`forensics.data.embed.embed_folder` with the cache off — scanning, hashing
  and validating the folder, loading the model, decoding and transforming in DataLoader
  workers, the forward pass and assembling the output (what ``fp embed`` does, minus the
  interpreter start-up).

Each is the best of ``--repeat`` runs, in wall-clock time and in CPU time (this process
and its DataLoader workers; steadier than wall time on a shared machine). The last line is
``overhead: N%``: how much slower end to end is than the bare forward, in wall time.
Examples::

    python benchmarks/bench_embed.py                      # vit-tiny-demo on CPU
    python benchmarks/bench_embed.py --encoder fid-inception@96 --weights hub --size 28
    python benchmarks/bench_embed.py --encoder vit-b16 --weights random:0 --device cuda \\
        --n 20000 --size 32 --batch-size 512
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def make_images(folder: Path, n: int, size: int) -> None:
    """Write ``n`` digit images of ``size`` x ``size`` as PNG files."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = np.clip(load_digits().images * 16, 0, 255).astype(np.uint8)
    for i in range(n):
        im = Image.fromarray(digits[i % len(digits)]).resize((size, size), Image.BILINEAR)
        if i >= len(digits):  # make repeats distinct files
            im = im.rotate(90 * ((i // len(digits)) % 4))
        im.save(folder / f"{i:06d}.png")


def cpu_seconds() -> float:
    """CPU time used so far by this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def best_of(repeat: int, runs: list[Callable[[], None]], device: str) -> list[tuple[float, float]]:
    """Smallest wall and CPU seconds of each of ``runs``, called in turn ``repeat`` times.

    Alternating the runs exposes each to the same background load.
    """
    best = [(float("inf"), float("inf")) for _ in runs]
    for _ in range(repeat):
        for i, run in enumerate(runs):
            _sync(device)
            w0, c0 = time.perf_counter(), cpu_seconds()
            run()
            _sync(device)
            wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
            best[i] = (min(best[i][0], wall), min(best[i][1], cpu))
    return best


def bare_run(loaded, folder: Path, batch_size: int) -> Callable[[], None]:
    """A function running ``loaded.forward`` over in-memory, pre-transformed batches."""
    import torch

    from forensics.data.images import load_rgb

    files = sorted(folder.glob("*.png"))
    batches = [
        torch.stack([loaded.transform(load_rgb(p)) for p in files[i:i + batch_size]])
        for i in range(0, len(files), batch_size)
    ]
    if loaded.device.startswith("cuda"):
        batches = [b.pin_memory() for b in batches]
    loaded.forward(batches[0])  # warm-up

    def run() -> None:
        for batch in batches:
            loaded.forward(batch)

    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit-tiny-demo")
    parser.add_argument("--weights", default=None, help="default: the encoder's default")
    parser.add_argument("--n", type=int, default=2000, help="number of images")
    parser.add_argument("--size", type=int, default=32, help="image size on disk (pixels)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from forensics.data.embed import default_num_workers, embed_folder, get_encoder
    from forensics.plugin.encoders import resolve_device

    device = resolve_device(args.device)
    workers = default_num_workers(device) if args.num_workers is None else args.num_workers
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_images(folder, args.n, args.size)
        loaded = get_encoder(args.encoder).load(args.weights, device, "cls")
        result = {}

        def end_to_end() -> None:
            result["emb"] = embed_folder(
                folder, args.encoder, weights=args.weights, device=device,
                batch_size=args.batch_size, num_workers=workers, cache_dir=None,
                progress=False)

        bare, full = best_of(args.repeat, [bare_run(loaded, folder, args.batch_size),
                                           end_to_end], device)
    info = result["emb"].encoder_info
    print(f"encoder: {info['name']} (weights {info['weights']}, {len(info['layers'])} layers, "
          f"{info['precision']}), device {device}, {args.n} images {args.size}x{args.size}, "
          f"batch {args.batch_size}, workers {workers}")
    print(f"bare forward (all layers): {args.n / bare[0]:,.1f} images/s, "
          f"{args.n / bare[1]:,.1f} images per CPU second")
    print(f"fp embed end to end:       {args.n / full[0]:,.1f} images/s, "
          f"{args.n / full[1]:,.1f} images per CPU second (model load included)")
    print(f"overhead in CPU time: {100 * (full[1] / bare[1] - 1):.0f}%")
    print(f"overhead: {100 * (full[0] / bare[0] - 1):.0f}%")


if __name__ == "__main__":
    main()
