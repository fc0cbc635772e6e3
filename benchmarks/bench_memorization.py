"""Memorization measures side by side on a tiny text-to-image model that memorized digits.

Trains (seeded, CPU) a 16x16 pixel ``UNet2DConditionModel`` conditioned by a small random
CLIP text encoder on four scikit-learn digits with captions ("a zero" ... "a three"; 10 %
empty captions, for guidance), saves it as a Stable-Diffusion-shaped folder, then scores
the four members and four held-out digits (captioned "a four", ...) with ``invmm``
(learned prompt tokens, guidance 1..7, pixel NCC calibrated on ten other digits),
``wen`` (on the captions) and ``extraction`` (from the empty prompt), and prints each
measure's scores and members-vs-held-out AUROC::

    python benchmarks/bench_memorization.py --out /tmp/bench-mem
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def tiny_clip_pipeline_parts(folder: Path, max_length: int = 12, hidden: int = 6,
                             seed: int = 0) -> int:
    """Save a byte-level CLIP tokenizer (no merges) and a random CLIPTextModel under
    ``folder/tokenizer`` and ``folder/text_encoder``; return the hidden size."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte alphabet
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"),
                  model_max_length=max_length).save_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=max_length,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])).save_pretrained(folder / "text_encoder")
    return hidden


def _digits(indices, size=16):
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    return [np.asarray(Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BILINEAR)) for i in indices]


def _write(folder: Path, arrays, captions=None) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"img{i:02d}.png")
        if captions is not None:
            (folder / f"img{i:02d}.txt").write_text(captions[i])
    return folder


def train(folder: Path, images, captions, iterations: int) -> None:
    import diffusers
    import torch
    from fp_plugins._invmm_text import TextConditioner

    hidden = tiny_clip_pipeline_parts(folder, hidden=16)
    text = TextConditioner(folder, torch.device("cpu"))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=hidden,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, beta_start=1e-3, beta_end=0.08)
    x = torch.from_numpy(np.stack(images)).float().div(127.5).sub(1)[:, None]
    conds = torch.cat([text.encode(c) for c in captions])
    empty = text.encode("")
    abar = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(iterations):
        idx = torch.randint(0, len(x), (32,), generator=g)
        x0, c = x[idx], conds[idx].clone()
        drop = torch.rand(32, generator=g) < 0.1
        c[drop] = empty[0]
        t = torch.randint(0, 100, (32,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=c).sample
        loss = ((pred - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval().save_pretrained(folder / "unet")
    sched.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iterations", type=int, default=800)
    args = ap.parse_args()
    import torch
    from sklearn.datasets import load_digits

    from forensics.steps.memorize import run_measure

    torch.set_num_threads(1)
    labels = load_digits().target
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
    seconds = [int(np.flatnonzero(labels == c)[1]) for c in range(10)]
    members, held = firsts[:4], firsts[4:8]
    captions = [f"a {WORDS[labels[i]]}" for i in members + held]
    out = args.out
    t0 = time.perf_counter()
    train(out / "model", _digits(members), captions[:4], args.iterations)
    print(f"training {time.perf_counter() - t0:.0f}s")
    images = _write(out / "images", _digits(members + held), captions)
    _write(out / "calibration", _digits(seconds))
    (out / "members.txt").write_text("".join(f"img{i:02d}.png\n" for i in range(4)))
    runs = {
        "invmm": dict(similarity="ncc", calibrate=out / "calibration", device="cpu",
                      steps=300, check_every=20, noises=8, samples=8, ddim_steps=10,
                      batch_size=8, tokens=4),
        "wen": dict(generations=2, ddim_steps=10, device="cpu"),
        "extraction": dict(samples=64, ddim_steps=10, device="cpu"),
    }
    table = {}
    for name, options in runs.items():
        t0 = time.perf_counter()
        body = run_measure(name, images, str(out / "model"), members=out / "members.txt",
                           out=out / name, options=options)
        scores = [r["score"] for r in body["results"]]
        table[name] = {"scores": scores, "auroc": body["members"]["auroc_ranking"],
                       "seconds": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(table[name]))
    (out / "summary.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
