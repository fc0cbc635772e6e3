"""Write Fashion-MNIST image folders for the memorization check of docs/sec4.md.

Reads the IDX files of Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist``; MIT-licensed, Zalando SE) and writes 28x28
greyscale PNGs:

    OUT/T      the first --train training images          (the generator's training set)
    OUT/P      the first --heldout test images             (held-out images, never seen)
    OUT/src    the first --source images of T              (what the pathological
                                                             generators transform)
    OUT/fresh  the next --fresh test images after P        (a control: new real images)

Usage: python examples/fashion_mnist_folders.py OUT [--train 3000 --heldout 1000
       --source 500 --fresh 500] [--data /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path("/usr/share/datasets/fashion-mnist")


def read_idx_images(path: Path) -> np.ndarray:
    """uint8 (N, 28, 28) images of an IDX3 file (gzipped)."""
    raw = gzip.decompress(path.read_bytes())
    magic, n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051:
        raise SystemExit(f"{path} is not an IDX image file (magic {magic})")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def write(images: np.ndarray, folder: Path, prefix: str, start: int) -> None:
    folder.mkdir(parents=True, exist_ok=False)
    for i, image in enumerate(images, start=start):
        Image.fromarray(image, mode="L").save(folder / f"{prefix}-{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--source", type=int, default=500)
    parser.add_argument("--fresh", type=int, default=500)
    args = parser.parse_args()
    train = read_idx_images(args.data / "train-images-idx3-ubyte.gz")
    test = read_idx_images(args.data / "t10k-images-idx3-ubyte.gz")
    write(train[: args.train], args.out / "T", "train", 0)
    write(test[: args.heldout], args.out / "P", "test", 0)
    write(train[: args.source], args.out / "src", "train", 0)
    fresh = test[args.heldout : args.heldout + args.fresh]
    write(fresh, args.out / "fresh", "test", args.heldout)
    print(f"Wrote T ({args.train}), P ({args.heldout}), src ({args.source}) and fresh "
          f"({len(fresh)}) under {args.out}")


if __name__ == "__main__":
    main()
