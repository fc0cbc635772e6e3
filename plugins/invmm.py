"""InvMM: an inversion-based, per-image memorization score for diffusion models.

Follows the official code of "An Inversion-based Measure of Memorization for Diffusion
Models" (2024): for each image x0, learn a Gaussian ``N(mu, sigma^2)`` over the model's
starting noise x_T such that the model, started from it, reconstructs x0. The KL divergence
of that Gaussian from ``N(0, I)`` at the moment samples drawn from it look like x0 is the
score: the lower, the more strongly x0 is memorized; ``inf`` when it never gets there.

This module is light (no torch at import); the work happens in ``fp_plugins._invmm_engine``
and ``fp_plugins._invmm_similarity``, imported when a score is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from forensics.errors import InputError
from forensics.hookspecs import hookimpl

#: The default similarity: works offline, on any image size (see README "InvMM").
DEFAULT_SIMILARITY = "ncc"


@dataclass(frozen=True)
class InvMMParams:
    """Every constant of the algorithm.

    Attributes:
        steps: optimisation steps before giving up (score ``inf``).
        lr: Adam learning rate for ``mu`` and ``log sigma^2``.
        noises: noises ``x_T ~ N(mu, sigma^2)`` drawn per step (one random timestep each).
        check_every: C; the KL weight is adapted and samples are checked every C steps.
        window: the reconstruction loss is smoothed over this many last steps.
        xi: a smoothed-loss improvement below ``xi`` between checks halves the KL weight.
        delta: added to the KL weight at every other step (and at checks that improved).
        kl_weight: initial KL weight ``w``.
        samples: images sampled by deterministic DDIM at each check.
        ddim_steps: DDIM steps used for those samples.
        beta: success when the least similar sample has similarity ``>= beta`` to x0.
    """

    steps: int = 2000
    lr: float = 0.1
    noises: int = 32
    check_every: int = 50
    window: int = 100
    xi: float = 1e-3
    delta: float = 1e-4
    kl_weight: float = 1.0
    samples: int = 8
    ddim_steps: int = 200
    beta: float = 0.5

    def validate(self) -> InvMMParams:
        """Raise :class:`InputError` naming the first invalid constant; return self."""
        for name in ("steps", "noises", "check_every", "window", "samples", "ddim_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"InvMM parameter {name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "xi", "delta", "kl_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"InvMM parameter {name} must be finite and >= 0, got {value}")
        if not -1.0 <= self.beta <= 1.0:
            raise InputError(f"InvMM parameter beta must be in [-1, 1], got {self.beta}")
        return self


#: Defaults of the official code for pixel-space DDPMs (``ddpm/inverion.py``).
PIXEL_DEFAULTS = InvMMParams()
#: Defaults of the official code for unconditional latent diffusion
#: (``latent-diffusion/inversion.py``): C = 10, delta = 5e-4, 16 noises, 50 DDIM steps.
LATENT_DEFAULTS = InvMMParams(check_every=10, delta=5e-4, noises=16, ddim_steps=50)

PARAM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(InvMMParams))


def resolve_params(latent: bool, overrides: dict[str, Any] | None = None) -> InvMMParams:
    """Defaults for the model kind, with the non-``None`` ``overrides`` applied.

    Raises:
        InputError: an unknown parameter name, or an invalid value.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(PARAM_NAMES))
    if unknown:
        raise InputError(
            f"unknown InvMM parameter(s) {', '.join(unknown)}; valid: {', '.join(PARAM_NAMES)}"
        )
    base = LATENT_DEFAULTS if latent else PIXEL_DEFAULTS
    return replace(base, **overrides).validate()


def rank(results: list[dict[str, Any]]) -> list[int]:
    """Indices of ``results`` from most to least memorized.

    Lower score first; images that never succeeded (``inf``) come last, the ones whose
    samples came closest to them (highest ``best_similarity``) first; ties keep input order.
    """

    def key(i: int) -> tuple[float, float, int]:
        r = results[i]
        return (r["score"], -r["best_similarity"], i)

    return sorted(range(len(results)), key=key)


@dataclass
class InvMMReport:
    """Per-image results (input order), the ranking and the provenance of a run."""

    results: list[dict[str, Any]]
    ranking: list[int]
    provenance: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict: ``inf`` scores become ``null`` (with ``"success": false``)."""

        def clean(r: dict[str, Any]) -> dict[str, Any]:
            return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in r.items()}

        return {
            "measure": "invmm",
            "results": [clean(r) for r in self.results],
            "ranking": [self.results[i]["image"] for i in self.ranking],
            "provenance": self.provenance,
        }


class InvMM:
    """The ``invmm`` memorization measure (white-box: needs the diffusion model)."""

    name = "invmm"
    description = (
        "InvMM: per-image KL of the learned x_T distribution that makes a diffusers model "
        "regenerate the image (lower = more memorized)"
    )

    def run(
        self,
        images: Sequence[str | Path | Any],
        model: str | Path,
        *,
        similarity: str = DEFAULT_SIMILARITY,
        device: str | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        conditioning: str | Path | None = None,
        encoder_weights: str | None = None,
        encoder_pool: str | None = None,
        progress: Callable[[int], None] | None = None,
        **params: Any,
    ) -> InvMMReport:
        """Score each image; return results, ranking and provenance.

        Args:
            images: image files, or PIL images.
            model: a local diffusers folder (pipeline saved with ``save_pretrained``) or
                a hub id.
            similarity: ``ncc`` (default), ``ssim``, ``torchscript:PATH`` (e.g. an SSCD
                TorchScript file) or ``encoder:NAME`` (an ``fp`` encoder's last layer).
            device: ``cpu``, ``cuda``, ``cuda:1``...; default: CUDA when present.
            seed: base seed; each image's random stream is derived from it and from the
                image's content, so a score does not depend on the other images.
            batch_size: images optimised in parallel (default 16 on CUDA, 4 on CPU).
            conditioning: for a ``UNet2DConditionModel``: a ``.safetensors`` file holding
                ``encoder_hidden_states`` (e.g. the empty-prompt text embedding).
            encoder_weights: ``weights`` passed to the encoder's ``load`` (``encoder:``).
            encoder_pool: ``pool`` passed to the encoder's ``load`` (``encoder:``).
            progress: called with the number of optimisation steps done, as they happen.
            **params: any field of :class:`InvMMParams`; ``None`` keeps the default.

        Raises:
            InputError: bad images, parameters, model folder or similarity choice.
            OfflineError: a hub id could not be downloaded.
        """
        from fp_plugins import _invmm_engine

        from forensics.ct import check_seed

        seed = check_seed(seed)
        return _invmm_engine.run(
            images, model, similarity=similarity, device=device, seed=seed,
            batch_size=batch_size, conditioning=conditioning,
            encoder_weights=encoder_weights, encoder_pool=encoder_pool,
            progress=progress, params=params,
        )

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


def params_dict(params: InvMMParams) -> dict[str, Any]:
    """The constants as a plain dict (for provenance)."""
    return asdict(params)


@hookimpl
def register_memorization_measures(register):
    register(InvMM())
