"""InvMM: an inversion-based, per-image memorization score for diffusion models.

Follows the official code (github.com/Maryeon/InvMM) of Ma et al., "An Inversion-based
Measure of Memorization for Diffusion Models", ICCV 2025: for each image x0, learn a
Gaussian ``N(mu, sigma^2)`` over the model's starting noise x_T (and, for text-to-image
models, a soft prompt) such that the model, started from it, reconstructs x0. The KL
divergence of that Gaussian from ``N(0, I)`` at the moment samples drawn from it look like
x0 is the score: the lower, the more strongly x0 is memorized; ``inf`` when it never gets
there.

This module is light (no torch at import); the work happens in ``fp_plugins._invmm_engine``,
imported when a score is asked for. Constants and the report live in
``fp_plugins._invmm_params``, which both import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fp_plugins._invmm_params import (  # noqa: F401  (re-exported: the measure's API)
    DEFAULTS,
    LATENT_DEFAULTS,
    PARAM_NAMES,
    PIXEL_DEFAULTS,
    TEXT_DEFAULTS,
    InvMMParams,
    InvMMReport,
    params_dict,
    rank,
    resolve_params,
)

from forensics.plugin.hookspecs import hookimpl

#: The default similarity: SSCD, the official one (its TorchScript file must be present).
DEFAULT_SIMILARITY = "sscd"


class InvMM:
    """The ``invmm`` memorization measure (white-box: needs the diffusion model)."""

    name = "invmm"
    description = (
        "InvMM: per-image KL of the learned x_T distribution that makes a diffusers model "
        "regenerate the image (lower = more memorized)"
    )
    #: Which end of the score means "more memorized" (for AUROC and rankings).
    more_memorized = "lower"

    def run(
        self,
        images: Sequence[str | Path | Any],
        model: str | Path,
        *,
        similarity: str = DEFAULT_SIMILARITY,
        calibrate: Sequence[str | Path | Any] | None = None,
        device: str | None = None,
        seed: int = 0,
        batch_size: int | str | None = None,
        precision: str = "fp32",
        conditioning: str | Path | None = None,
        prompt: str | None = None,
        encoder_weights: str | None = None,
        encoder_pool: str | None = None,
        progress: Callable[[int], None] | None = None,
        out: str | Path | None = None,
        config: str | Path | None = None,
        official: str | Path | None = None,
        **params: Any,
    ) -> InvMMReport:
        """Score each image; return results, ranking, provenance and per-image evidence.

        Args:
            images: image files, or PIL images.
            model: a local diffusers folder (pipeline saved with ``save_pretrained``), a
                hub id, or a single-file checkpoint (``.safetensors``, ``.ckpt``, ``.pt``...:
                Stable Diffusion v1/v2 in ``ldm`` layout, or a diffusers-layout UNet state
                dict) with ``config``.
            similarity: ``sscd`` (default: the official SSCD descriptor, found through
                ``FP_SSCD`` or the documented file location), ``sscd:PATH``, ``ncc``,
                ``ssim``, ``torchscript:PATH`` or ``encoder:NAME``. Any similarity other
                than SSCD needs ``calibrate`` or an explicit ``beta``.
            calibrate: held-out images (not training members); ``beta`` becomes the
                highest similarity between two of them (see README "InvMM").
            device: ``cpu``, ``cuda``, ``cuda:1``...; default: CUDA when present.
            seed: base seed; each image's random stream is derived from it and from the
                image's content, so a score does not depend on the other images.
            batch_size: images that share one model call. Default 1: each image's score
                is bit-identical whatever the other images. ``"auto"`` (from free GPU memory
                on CUDA, 4 on CPU) or N > 1 is faster on a GPU, scores equal up to float
                round-off; halved automatically when CUDA runs out of memory.
            precision: ``fp32`` (default: the official code's), ``bf16`` (UNet under
                bf16 autocast) or ``fp16`` (fp16 autocast with dynamic loss scaling, a
                ``GradScaler`` per image); the faster modes move scores (README).
            conditioning: for a bare ``UNet2DConditionModel`` without text encoder: a
                ``.safetensors`` file holding ``encoder_hidden_states``.
            prompt: text-to-image pipelines: a fixed prompt, encoded by the pipeline's
                tokenizer and text encoder, instead of learning prompt tokens.
            encoder_weights: ``weights`` passed to the encoder's ``load`` (``encoder:``).
            encoder_pool: ``pool`` passed to the encoder's ``load`` (``encoder:``).
            progress: called with the number of optimisation steps done, as they happen.
            config: for a single-file ``model``: the folder of its diffusers configs
                (``model_index.json``, ``unet/``, ``scheduler/``...; no weights needed).
            official: the results folder of the official code
                (``<folder>/<image id>/params.pt``): each result gains ``official_score``
                and ``official_kl``, the provenance a comparison summary ``official``.
            out: a folder: each image's evidence and ``result.json`` are written there
                (atomically) as soon as it is scored, and images already scored there by
                a run with the same settings are read back instead of scored again, so
                a rerun after a crash resumes where it stopped.
            **params: any field of :class:`InvMMParams`; ``None`` keeps the default.

        Raises:
            InputError: bad images, parameters, model folder or similarity choice.
            OfflineError: a hub id could not be downloaded.
        """
        from fp_plugins import _invmm_engine

        from forensics.stats.ct import check_seed

        seed = check_seed(seed)
        found = None
        if official is not None:  # read and checked before any scoring
            from fp_plugins._invmm_official import read_folder

            found = read_folder(Path(official), list(images))
        report = _invmm_engine.run(
            images, model, similarity=similarity, calibrate=calibrate, device=device,
            seed=seed, batch_size=batch_size, precision=precision, conditioning=conditioning,
            prompt=prompt, encoder_weights=encoder_weights, encoder_pool=encoder_pool,
            progress=progress, params=params, out=out, config=config,
        )
        if found is not None:
            from fp_plugins._invmm_official import compare

            report.provenance["official"] = compare(report.results, found, Path(official))
        return report

    def score(self, images: Sequence[str | Path | Any], model: str | Path,
              **params: Any) -> list[dict[str, Any]]:
        """The measure protocol: one result dict per image, in input order.

        Each dict has ``image``, ``score`` (KL at success, ``inf`` if never),
        ``success`` (bool), ``success_step``, ``steps_run``, ``kl``, ``kl_weight``,
        ``similarity`` (the least similar sample at the last check) and
        ``best_similarity`` (the best such value over all checks). Keyword arguments are
        those of :meth:`run`.
        """
        return self.run(images, model, **params).results


@hookimpl
def register_memorization_measures(register):
    register(InvMM())
