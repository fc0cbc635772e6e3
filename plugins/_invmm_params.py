"""InvMM's constants, their per-family defaults, and the report of a run (no torch).

Shared by the measure (``fp_plugins.invmm``) and the engine (``fp_plugins._invmm_engine``),
which import this module and never each other at module level.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from forensics.errors import InputError
from forensics.jsonable import jsonable

#: Model families, each with the constants of its official script.
FAMILIES = ("pixel", "latent", "text-to-image")
#: The cfg scales the official Stable Diffusion scripts sample at every check.
GUIDANCE_SCALES = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)


@dataclass(frozen=True)
class InvMMParams:
    """Every constant of the algorithm.

    Attributes:
        steps: optimisation steps before giving up (score ``inf``).
        lr: Adam learning rate for ``mu``, ``log sigma^2`` (and the token logits).
        noises: noises ``x_T ~ N(mu, sigma^2)`` drawn per step (one random timestep each).
        check_every: C; the KL weight is adapted and samples are checked every C steps.
        window: the reconstruction loss is smoothed over this many last steps.
        xi: a smoothed-loss improvement below ``xi`` between checks halves the KL weight.
        delta: added to the KL weight at every other step (and at checks that improved).
        kl_weight: initial KL weight ``w``.
        samples: images sampled by deterministic DDIM at each check.
        ddim_steps: DDIM steps used for those samples.
        beta: success when the least similar sample has similarity ``>= beta`` to x0.
        tokens: text-to-image only: prompt tokens learned jointly (0 = none).
        tau: text-to-image only: Gumbel-softmax temperature of the learned tokens.
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
    tokens: int = 0
    tau: float = 2.0

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
        if self.steps < self.check_every:
            raise InputError(
                f"InvMM parameter steps ({self.steps}) is smaller than check_every "
                f"({self.check_every}): no check would ever run and every image would score "
                f"inf; raise --steps or lower --check-every")
        if self.tokens < 0:
            raise InputError(f"InvMM parameter tokens must be >= 0, got {self.tokens}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise InputError(f"InvMM parameter tau must be finite and > 0, got {self.tau}")
        return self


#: Defaults of the official code for pixel-space DDPMs (``ddpm/inverion.py``).
PIXEL_DEFAULTS = InvMMParams()
#: Defaults of the official code for unconditional latent diffusion
#: (``latent-diffusion/inversion.py``): C = 10, delta = 5e-4, 16 noises, 50 DDIM steps.
LATENT_DEFAULTS = InvMMParams(check_every=10, delta=5e-4, noises=16, ddim_steps=50)
#: Defaults of the official Stable Diffusion scripts (``stable-diffusion-v1/-v2/inversion.py``):
#: C = 50, delta = 1e-3, 16 noises, 50 DDIM steps, 75 learned tokens, Gumbel tau 2.
TEXT_DEFAULTS = InvMMParams(check_every=50, delta=1e-3, noises=16, ddim_steps=50, tokens=75)
DEFAULTS: dict[str, InvMMParams] = {
    "pixel": PIXEL_DEFAULTS, "latent": LATENT_DEFAULTS, "text-to-image": TEXT_DEFAULTS}
#: The side of the square SSCD input in each family's official script.
SSCD_SIZE: dict[str, int] = {"pixel": 32, "latent": 256, "text-to-image": 320}

PARAM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(InvMMParams))


def resolve_params(latent: bool | None = None, overrides: dict[str, Any] | None = None, *,
                   family: str | None = None) -> InvMMParams:
    """Defaults for the model family, with the non-``None`` ``overrides`` applied.

    Args:
        latent: shorthand for ``family="latent"`` (True) or ``"pixel"`` (False).
        overrides: constants to change; ``None`` values keep the default.
        family: ``pixel``, ``latent`` or ``text-to-image``; wins over ``latent``.

    Raises:
        InputError: an unknown family or parameter name, or an invalid value.
    """
    family = family or ("latent" if latent else "pixel")
    if family not in DEFAULTS:
        raise InputError(f"unknown InvMM model family {family!r}; valid: {', '.join(FAMILIES)}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(PARAM_NAMES))
    if unknown:
        raise InputError(
            f"unknown InvMM parameter(s) {', '.join(unknown)}; valid: {', '.join(PARAM_NAMES)}"
        )
    return replace(DEFAULTS[family], **overrides).validate()


def rank(results: list[dict[str, Any]]) -> list[int]:
    """Indices of ``results`` from most to least memorized.

    Lower score first; images that never succeeded (``inf``) come last, the ones whose
    samples came closest to them (highest ``best_similarity``) first; ties keep input order.
    """

    def key(i: int) -> tuple[float, float, int]:
        r = results[i]
        return (r["score"], -r["best_similarity"], i)

    return sorted(range(len(results)), key=key)


def params_dict(params: InvMMParams) -> dict[str, Any]:
    """The constants as a plain dict (for provenance)."""
    return asdict(params)


@dataclass
class InvMMReport:
    """Per-image results (input order), the ranking and the provenance of a run.

    ``evidence`` (not serialised by :meth:`to_json`) holds, per image, the arrays behind
    its score: ``mu``, ``logvar``, ``log_coeffs`` (text-to-image), ``checks`` (one dict per
    check) and ``samples`` (the images of the deciding check, ``(K, C, H, W)`` in [0, 1]).
    """

    results: list[dict[str, Any]]
    ranking: list[int]
    provenance: dict[str, Any]
    evidence: list[dict[str, Any]] | None = None
    #: The folder each image's evidence and result were written to as it finished (the
    #: run's ``out``); :meth:`write_evidence` to it writes nothing again.
    written_to: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict: ``inf`` scores become ``null`` (with ``"success": false``)."""

        return {
            "measure": "invmm",
            "more_memorized": "lower",
            "results": [jsonable(r) for r in self.results],
            "ranking": [self.results[i]["image"] for i in self.ranking],
            "provenance": self.provenance,
        }

    def write_evidence(self, out: Any) -> list[Any]:
        """Write each image's learned parameters, checks and samples under ``out/evidence``."""
        from pathlib import Path

        from fp_plugins._invmm_evidence import image_folder, write

        if self.written_to is not None and Path(self.written_to) == Path(out):
            return [image_folder(Path(out), i, r["image"]) for i, r in enumerate(self.results)]
        return write(self, out)
