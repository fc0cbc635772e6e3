"""Two memorization measures to compare InvMM against (torch imported only when they run).

- ``wen``: Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion
  Models", ICLR 2024. For a text-to-image pipeline and an image's caption, the magnitude
  of the text-conditional noise prediction, ``||eps(x_t, prompt) - eps(x_t, "")||_2``,
  averaged over the DDIM steps of ``generations`` guided generations (guidance 7.5,
  50 steps). Memorized prompts drive generation much harder: higher = more memorized.
  The caption of ``img.png`` is read from ``img.txt`` beside it.
- ``extraction``: the generate-and-match test of Carlini et al., "Extracting Training Data
  from Diffusion Models", USENIX Security 2023. Sample ``samples`` images from the model
  (x_T ~ N(0, I), the family's DDIM), and give each input image the distance to its
  nearest sample: the root-mean-square pixel difference in [0, 1] (Carlini et al.'s l2,
  divided by sqrt(number of pixel values)). An image is ``flagged`` as extracted when that
  distance is below ``threshold`` (0.1). Lower = more memorized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forensics.errors import InputError
from forensics.plugin.hookspecs import hookimpl


def _caption(image: Any) -> str:
    path = Path(image).with_suffix(".txt")
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InputError(f"wen scores a caption: {image} has no {path.name} beside it "
                         f"holding its prompt (or pass a captions file)") from exc


def read_captions(file: str | Path, images: Sequence[Any]) -> list[str]:
    """Each image's caption from ``file``: one ``IMAGE<TAB>caption`` per line, IMAGE by
    path, file name or stem; blank lines and ``#`` comments are ignored.

    Raises:
        InputError: unreadable file, a line without a tab, an unknown image, or an image
            without a caption.
    """
    try:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--captions {file}: cannot read it ({exc})") from exc
    keys: dict[str, int] = {}
    for i, img in enumerate(images):
        for key in (str(img), Path(img).name, Path(img).stem):
            keys.setdefault(key, i)
    captions: list[str | None] = [None] * len(images)
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, tab, text = line.partition("\t")
        if not tab:
            raise InputError(f"--captions {file}, line {n}: write IMAGE<TAB>caption")
        i = keys.get(name.strip(), keys.get(Path(name.strip()).name))
        if i is None:
            raise InputError(f"--captions {file}, line {n}: {name.strip()!r} is not one of "
                             f"the images being scored")
        captions[i] = text.strip()
    missing = [str(img) for img, c in zip(images, captions, strict=True) if c is None]
    if missing:
        raise InputError(f"--captions {file} has no caption for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return [c for c in captions if c is not None]


class Wen:
    """Text-conditional noise-prediction magnitude (Wen et al., ICLR 2024)."""

    name = "wen"
    description = ("Wen et al. (ICLR 2024): magnitude of the text-conditional noise "
                   "prediction for each image's caption (higher = more memorized)")
    more_memorized = "higher"

    def score(self, images: Sequence[Any], model: str | Path, *, generations: int = 4,
              ddim_steps: int = 50, guidance: float = 7.5, seed: int = 0,
              device: str | None = None, config: str | None = None,
              captions: str | Path | None = None,
              **unused: Any) -> list[dict[str, Any]]:
        """One dict per image: ``image``, ``prompt``, ``score`` and ``per_generation``.

        The caption of each image comes from ``captions`` (a file, see
        :func:`read_captions`) or, without it, from ``img.txt`` beside ``img.png``.

        Raises:
            InputError: a missing caption, a model that is not text-to-image, bad options.
        """
        _no_unknown(unused, self.name)
        if generations < 1 or ddim_steps < 1:
            raise InputError("wen needs generations >= 1 and ddim_steps >= 1")
        prompts = (read_captions(captions, images) if captions is not None
                   else [_caption(img) for img in images])
        import torch
        from fp_plugins import _invmm_engine as eng

        dev = eng.device_of(device)
        dm = eng.load_model(model, dev, config=config)
        if dm.text is None:
            raise InputError(f"wen needs a text-to-image pipeline (tokenizer/, text_encoder/ "
                             f"and a UNet2DConditionModel); {model} has none")
        uncond = dm.text.encode("")
        T = dm.num_timesteps
        stride = max(T // ddim_steps, 1)
        ts = [min(t + 1, T - 1) for t in range(0, T, stride)]
        prev = [0, *ts[:-1]]
        shape = (dm.unet.config.in_channels, *([eng._square(dm.unet.config.sample_size)] * 2))
        out = []
        for img, prompt in zip(images, prompts, strict=True):
            cond = dm.text.encode(prompt)
            gen = eng.seeded_generator(seed, prompt, dev)
            mags = []
            with torch.inference_mode():
                for _ in range(generations):
                    x = torch.randn((1, *shape), generator=gen, device=dev)
                    steps = []
                    for t, tp in zip(reversed(ts), reversed(prev), strict=True):
                        tt = torch.full((1,), t, device=dev, dtype=torch.long)
                        both = dm.output(torch.cat([x, x]), torch.cat([tt, tt]),
                                         torch.cat([uncond, cond]))
                        u, c = both.chunk(2)
                        steps.append(float((c - u).flatten(1).norm(dim=1)[0]))
                        x0, eps = dm.x0_eps(x, tt, u + guidance * (c - u))
                        a = dm.alphas_cumprod[tp].float()
                        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
                    mags.append(sum(steps) / len(steps))
            out.append({"image": str(img), "prompt": prompt, "score": sum(mags) / len(mags),
                        "per_generation": mags})
        return out


class Extraction:
    """Generate-and-match extraction test (Carlini et al., USENIX Security 2023)."""

    name = "extraction"
    description = ("Carlini et al. (2023): RMS pixel distance from each image to its "
                   "nearest of N generated samples; flagged below a threshold "
                   "(lower = more memorized)")
    more_memorized = "lower"

    def score(self, images: Sequence[Any], model: str | Path, *, samples: int = 256,
              threshold: float = 0.1, ddim_steps: int | None = None, seed: int = 0,
              batch_size: int = 32, device: str | None = None, prompt: str | None = None,
              config: str | None = None, captions: str | Path | None = None,
              guidance: float = 7.5, **unused: Any) -> list[dict[str, Any]]:
        """One dict per image: ``image``, ``score`` (distance), ``flagged``, ``nearest``.

        Without ``captions`` every image is compared with the same ``samples`` images,
        sampled from x_T ~ N(0, I) (text-to-image: from the empty prompt, or ``prompt``).
        With ``captions`` (text-to-image only; a file, see :func:`read_captions`), as
        Carlini et al. generate from training captions: ``samples`` images are generated
        from each image's caption (classifier-free ``guidance`` against the empty prompt,
        a random stream seeded by ``seed`` and the caption), and each image is compared
        with its own caption's generations.

        Raises:
            InputError: bad options, model or captions.
        """
        _no_unknown(unused, self.name)
        if samples < 1 or batch_size < 1 or not (math.isfinite(threshold) and threshold > 0):
            raise InputError("extraction needs samples >= 1, batch_size >= 1 and a "
                             "threshold > 0")
        if captions is not None and prompt is not None:
            raise InputError("extraction: --captions and prompt both set the prompt; pass "
                             "one of them")
        texts = read_captions(captions, images) if captions is not None else None
        import torch
        from fp_plugins import _invmm_engine as eng
        from fp_plugins._invmm_params import DEFAULTS

        dev = eng.device_of(device)
        dm = eng.load_model(model, dev, prompt=prompt, config=config)
        if texts is not None and dm.text is None:
            raise InputError(f"extraction with captions needs a text-to-image pipeline "
                             f"(tokenizer/, text_encoder/ and a UNet2DConditionModel); "
                             f"{model} has none")
        if dm.conditional and dm.encoder_hidden_states is None and texts is None:
            dm.encoder_hidden_states = dm.text.encode("")  # unconditional generation
        steps = ddim_steps or DEFAULTS[dm.family].ddim_steps
        refs = torch.stack([
            torch.from_numpy(eng.load_image(img, dm.image_size, dm.image_channels)[0])
            .permute(2, 0, 1).float().div(255) for img in images]).flatten(1).double()
        x0_shape = tuple(dm.encode(torch.zeros(1, dm.image_channels, dm.image_size,
                                               dm.image_size, device=dev)).shape[1:])
        best = torch.full((len(images),), math.inf, dtype=torch.float64)
        nearest = torch.full((len(images),), -1, dtype=torch.long)
        groups: dict[str | None, list[int]] = {None: list(range(len(images)))}
        if texts is not None:  # one set of generations per distinct caption
            groups = {t: [i for i, c in enumerate(texts) if c == t] for t in dict.fromkeys(texts)}
        for caption, idx in groups.items():
            if caption is None:
                gen = torch.Generator(device=dev).manual_seed(seed)
                cond = uncond = None
            else:
                gen = eng.seeded_generator(seed, caption, dev)
                cond, uncond = dm.text.encode(caption), dm.text.encode("")
            sel = torch.tensor(idx)
            done = 0
            while done < samples:
                n = min(batch_size, samples - done)
                x_T = torch.randn((n, *x0_shape), generator=gen, device=dev)
                if cond is None:
                    gen_imgs = eng.ddim_sample(dm, x_T, steps)
                else:
                    gen_imgs = eng.ddim_sample(dm, x_T, steps, cond=cond.expand(n, -1, -1),
                                               uncond=uncond.expand(n, -1, -1), scale=guidance)
                flat = gen_imgs.flatten(1).double().cpu()
                d = torch.cdist(refs[sel], flat) / math.sqrt(refs.shape[1])
                m, j = d.min(dim=1)
                better = m < best[sel]
                best[sel] = torch.where(better, m, best[sel])
                nearest[sel] = torch.where(better, j + done, nearest[sel])
                done += n
        return [{"image": str(img), "score": float(best[i]),
                 "flagged": bool(best[i] < threshold), "nearest_sample": int(nearest[i]),
                 "caption": None if texts is None else texts[i],
                 "samples": samples, "threshold": threshold, "seed": seed}
                for i, img in enumerate(images)]


def _no_unknown(unused: dict[str, Any], measure: str) -> None:
    if unused:
        raise InputError(f"{measure} has no option(s) {', '.join(sorted(unused))}")


@hookimpl
def register_memorization_measures(register):
    register(Wen())
    register(Extraction())
