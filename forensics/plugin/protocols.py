"""The plugin contract: one :class:`typing.Protocol` per plugin kind.

This module is THE contract. Each kind a plugin registers (through the hook
``register_<kind>(register)``) has a Protocol of the members the engine uses; members that a
plugin may leave out are in a second Protocol (``<Kind>Options``, or for distances the
capability :class:`PreparedDistance`), and the engine uses them only when present. Objects
the plugin returns (an encoder's loaded model, a partitioner's fitted partition) and the
contexts the engine hands a fingerprint have Protocols of their own. Every registered
object has a ``name``, unique within its kind, and a one-line ``description``.

Conventions for every method: data arguments are passed positionally, options by keyword;
arrays are numpy arrays; errors a user can fix are raised as
:class:`forensics.errors.FpError` subclasses (usually ``InputError``) with a message that says
what to do. New optional keyword arguments may be added to a method later; the engine
passes them only to objects that declare them (as with ``prepared`` below).

:data:`CONTRACTS` maps each kind to its Protocols; :mod:`forensics.plugin.checks` runs an
object through them, and the README's "Writing a plugin" tables are generated from here
(``python -m forensics.plugin.tables``).

This module imports nothing heavy: numpy appears in annotations only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np


@runtime_checkable
class Named(Protocol):
    """What every registered object has."""

    @property
    def name(self) -> str:
        """Unique within its kind; ``scheme:*`` for a pattern object (see :class:`Pattern`)."""

    @property
    def description(self) -> str:
        """One line, shown by ``fp list KIND``."""


@runtime_checkable
class Pattern(Named, Protocol):
    """An object registered as ``scheme:*``: it stands for every name ``scheme:<rest>``."""

    def resolve(self, rest: str) -> Any:
        """The object named ``scheme:<rest>``, which keeps the contract of the kind."""


# -- encoders ---------------------------------------------------------------------------


@runtime_checkable
class LoadedEncoder(Protocol):
    """An encoder with its weights on a device: what :meth:`Encoder.load` returns."""

    @property
    def layer_names(self) -> list[str]:
        """The layers :meth:`forward` returns, in order."""

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the weights (recorded; embeddings of other weights are refused)."""

    @property
    def preprocess(self) -> dict[str, Any]:
        """JSON-ready description of the preprocessing, for provenance."""

    def transform(self, image: Any) -> Any:
        """One PIL RGB image -> one input tensor; runs in DataLoader workers (picklable)."""

    def forward(self, batch: Any) -> list[np.ndarray]:
        """A batch of transformed images -> one float32 ``(B, D_l)`` array per layer."""


class LoadedEncoderOptions(Protocol):
    """Members of a loaded encoder the engine uses when present."""

    @property
    def precision(self) -> str:
        """The arithmetic used, recorded in provenance (default ``float32``)."""


@runtime_checkable
class Encoder(Named, Protocol):
    """Turns images into per-layer embeddings (``register_encoders``).

    Heavy imports (torch, timm, ...) belong inside :meth:`load`, never at module top level.
    """

    @property
    def family(self) -> str:
        """The model family (``vit``, ``clip``, ...), shown by ``fp encoders list``."""

    def layer_names(self, pool: str = "cls") -> list[str] | None:
        """The layer names without loading weights; ``None`` if unknown until loaded."""

    def load(self, weights: str, device: str, pool: str) -> LoadedEncoder:
        """The encoder ready to embed.

        ``weights`` is a spec (``hub``, a file path, ``random:SEED``; parse it with
        ``forensics.plugin.encoders.parse_weights``), ``device`` a torch device string, ``pool``
        ``cls`` or ``mean``.
        """


class EncoderOptions(Protocol):
    """Members of an encoder the engine uses when present."""

    @property
    def default_weights(self) -> str:
        """The weights spec used when none is given (default ``hub``)."""

    def layer_dims(self, pool: str = "cls") -> list[int] | None:
        """The size of each layer without loading weights; ``None`` if unknown."""

    def with_input_size(self, size: int) -> Encoder:
        """The same encoder for ``size`` x ``size`` inputs; makes ``NAME@SIZE`` valid."""


# -- distances --------------------------------------------------------------------------


@runtime_checkable
class Distance(Named, Protocol):
    """Nearest-neighbour distance between embedding sets (``register_distances``)."""

    def nn(self, query: np.ndarray, ref: np.ndarray, *, device: str = "cpu",
           return_index: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Distance from each row of ``query`` (m, D) to its nearest row of ``ref`` (n, D).

        Returns (m,) float64 distances (smaller is nearer), and with ``return_index`` also
        the (m,) int64 index in ``ref`` of each nearest row. ``device`` is a torch device
        string; a distance that runs on CPU only may ignore it.
        """


@runtime_checkable
class PreparedDistance(Distance, Protocol):
    """A distance that prepares a reference set once for many searches (optional).

    The engine searches the same training rows for every query set; a distance that has
    :meth:`prepare_reference` gets those rows prepared once and ``prepared=True`` in
    :meth:`nn`. A distance without it is called without ``prepared``.
    """

    def prepare_reference(self, ref: np.ndarray) -> np.ndarray:
        """``ref`` (n, D) in the form :meth:`nn` searches with ``prepared=True``."""

    def nn(self, query: np.ndarray, ref: np.ndarray, *, device: str = "cpu",
           return_index: bool = False, prepared: bool = False
           ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """As :meth:`Distance.nn`; ``prepared``: ``ref`` came from :meth:`prepare_reference`.

        The results must equal those of ``nn(query, ref)`` on the unprepared rows.
        """


# -- partitioners -----------------------------------------------------------------------


@runtime_checkable
class FittedPartition(Protocol):
    """Cells of embedding space fitted on T: what :meth:`Partitioner.fit` returns."""

    @property
    def n_cells(self) -> int:
        """Number of cells; labels are ``0 .. n_cells - 1``."""

    @property
    def params(self) -> dict[str, Any]:
        """JSON-able parameters; with :meth:`to_arrays` enough to rebuild the partition."""

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Raw samples (len, D) -> (len, d) float64: the space of cells and distances."""

    def cells(self, Z: np.ndarray) -> np.ndarray:
        """Cell labels (len,) int64 of transformed samples (may raise ``InputError``)."""

    def assign(self, X: np.ndarray) -> np.ndarray:
        """Cell labels (len,) int64 of raw samples: ``cells(transform(X))``."""

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Numeric state, stored without pickle (``{}`` if none)."""


@runtime_checkable
class Partitioner(Named, Protocol):
    """Splits embedding space into cells (``register_partitioners``).

    A partitioner that takes the caller's cells declares a ``labels`` keyword in
    :meth:`fit`: it is then given T's labels (n_T,) int64 and ``n_cells``. One that
    declares ``chunk_rows`` reads T itself a chunk of rows at a time: it is given T (and
    its partition later P) as stored (an array, a memory map or a store's rows, each with
    ``shape``, ``dtype`` and row slicing) and the chunk size; one that also declares
    ``eigen`` is given T's covariance eigendecomposition when the engine has it. Any
    other partitioner gets T as one float64 array.
    """

    def fit(self, T: np.ndarray, *, seed: int = 0, **params: Any) -> FittedPartition:
        """Fit the cells on training embeddings ``T`` (n_T, D); every random step seeded.

        ``params`` are the partitioner's own (e.g. ``n_cells``), from the user.
        """

    def from_arrays(self, arrays: dict[str, np.ndarray], params: dict[str, Any]
                    ) -> FittedPartition:
        """Rebuild a fitted partition from its :meth:`~FittedPartition.to_arrays` and params."""


# -- matchers ---------------------------------------------------------------------------


@runtime_checkable
class Matcher(Named, Protocol):
    """Scores a suspect vector against enrolled vectors (``register_matchers``)."""

    def score(self, query: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Score (N,) of ``query`` (L,) against each row of ``refs`` (N, L); higher = closer.

        A row equal to ``query`` scores at least as high as any other row.
        """


# -- fingerprints -----------------------------------------------------------------------


class SetContext(Protocol):
    """What :meth:`Fingerprint.compute` sees of one image set.

    The engine passes a ``forensics.stats.fingerprints.FingerprintContext``.
    """

    @property
    def layers(self) -> list[str]:
        """Layer names, in order."""

    @property
    def results(self) -> list[Any]:
        """One ``CTResult`` per layer (with per-sample ``details`` if ``needs_details``)."""

    @property
    def embeddings(self) -> list[np.ndarray]:
        """The set's embeddings, one ``(m, D_l)`` array per layer."""

    @property
    def baseline(self) -> Any:
        """The ``forensics.stats.baseline.Baseline`` the set was measured against."""

    @property
    def extras(self) -> dict[str, np.ndarray]:
        """The arrays this fingerprint's ``prepare`` stored with the baseline."""

    @property
    def values(self) -> np.ndarray:
        """C_T per layer (NaN where undefined): the paper's curve."""


class BuildContext(Protocol):
    """What ``FingerprintOptions.prepare`` sees when a baseline is built.

    The engine passes a ``forensics.stats.fingerprints.PrepareContext``.
    """

    @property
    def layers(self) -> list[str]:
        """Layer names, in order."""

    @property
    def train(self) -> list[np.ndarray]:
        """T, one ``(n_T, D_l)`` array per layer; for a large T a store's rows (with
        ``shape``, ``dtype`` and row slicing): read them a chunk at a time with
        ``forensics.stats.streaming.row_chunks`` rather than whole."""

    @property
    def heldout(self) -> list[np.ndarray]:
        """P, one ``(n_P, D_l)`` array per layer."""

    @property
    def baseline(self) -> Any:
        """The ``forensics.stats.baseline.Baseline`` just built from them."""

    def pca(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """T's mean and ``k`` leading principal axes ``(k, D)`` of layer ``i``, exactly;
        computed once per baseline for every fingerprint that asks."""

    def covariance(self, i: int) -> Any:
        """T's mean and covariance eigendecomposition of layer ``i``, computed once."""

    def shared(self, key: Any, compute: Any) -> Any:
        """``compute()``, run once per ``key`` for this baseline and reused by every
        fingerprint (an array several fingerprints return is also stored once)."""


@runtime_checkable
class Fingerprint(Named, Protocol):
    """What a suspect set is matched on (``register_fingerprints``).

    Every registered fingerprint is computed when a curve is enrolled and stored with it.
    """

    def compute(self, ctx: SetContext) -> np.ndarray:
        """The set's 1-D vector (K,) from ``ctx`` (:class:`SetContext`)."""


class FingerprintOptions(Protocol):
    """Members of a fingerprint the engine uses when present."""

    @property
    def needs_ct(self) -> bool:
        """Whether ``compute`` reads C_T (``ctx.values`` / ``ctx.results``); default True.
        One that does not works from a handful of suspect images (C_T needs about 210)."""

    def per_image(self, ctx: SetContext) -> np.ndarray:
        """Each image's vector ``(m, K)``, when the set's vector is their mean: enrolment
        stores their per-entry variance, and attribution calibrates its confidence and
        a size-aware unknown threshold on the bank with it."""

    @property
    def needs_details(self) -> bool:
        """``ctx.results`` then carry per-sample cells, distances and nearest T indices."""

    def prepare(self, ctx: BuildContext) -> dict[str, np.ndarray]:
        """Arrays computed once from T and P when a baseline is built, stored with it
        (no pickle) and handed back as ``ctx.extras``."""

    def entry_layers(self, dims: list[int]) -> np.ndarray:
        """Layer index of each vector entry for layers of sizes ``dims`` (-1: none);
        default one entry per layer. Dropping a layer from matching drops its entries."""

    def matcher(self, name: str, dims: list[int]) -> Matcher | None:
        """A rule of its own for matcher ``name`` on the kept layers' sizes ``dims``
        (``None``: the matcher plugin of that name)."""

    @property
    def default_matcher(self) -> str:
        """The matcher used when none is named (default ``combined``)."""


# -- memorization measures --------------------------------------------------------------


@runtime_checkable
class MemorizationMeasure(Named, Protocol):
    """Scores how strongly a model memorized given images (``register_memorization_measures``).
    """

    def score(self, images: Sequence[str | Path | Any], model: str | Path,
              **params: Any) -> list[dict[str, Any]]:
        """One dict per image, in input order, with at least ``image`` and ``score``.

        ``images`` are files or PIL images, ``model`` a local folder or hub id; ``params``
        the measure's own options.
        """


# -- the table of kinds -----------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """One plugin kind: its hook and its Protocols.

    Attributes:
        kind: the registry's name of the kind (``fp list KIND``).
        noun: one object of the kind, in words.
        hook: the hook a plugin implements to register such objects.
        protocol: the members every object must have.
        options: the members it may have (``None``: no optional members).
        parts: Protocols of what its methods take or return, with their own options:
            ``(what, protocol, options)``.
    """

    kind: str
    noun: str
    hook: str
    protocol: type
    options: type | None = None
    parts: tuple[tuple[str, type, type | None], ...] = ()


CONTRACTS: dict[str, Contract] = {
    c.kind: c
    for c in (
        Contract("encoders", "encoder", "register_encoders", Encoder, EncoderOptions,
                 (("loaded encoder", LoadedEncoder, LoadedEncoderOptions),)),
        Contract("distances", "distance", "register_distances", Distance, PreparedDistance),
        Contract("partitioners", "partitioner", "register_partitioners", Partitioner, None,
                 (("fitted partition", FittedPartition, None),)),
        Contract("matchers", "matcher", "register_matchers", Matcher),
        Contract("fingerprints", "fingerprint", "register_fingerprints", Fingerprint,
                 FingerprintOptions, (("context of compute", SetContext, None),
                                      ("context of prepare", BuildContext, None))),
        Contract("memorization_measures", "memorization measure",
                 "register_memorization_measures", MemorizationMeasure),
    )
}


def is_pattern(obj: Any) -> bool:
    """Whether ``obj`` is a pattern object (named ``scheme:*``) rather than a plugin object."""
    name = getattr(obj, "name", None)
    return isinstance(name, str) and name.endswith(":*")


def prepares_reference(distance: Any) -> bool:
    """Whether the engine hands ``distance`` prepared reference rows (see
    :class:`PreparedDistance`)."""
    return callable(getattr(distance, "prepare_reference", None))


def members(protocol: type, own: bool = False) -> list[tuple[str, Any]]:
    """``(name, attribute)`` of a Protocol's members in definition order, bases first.

    With ``own``, only those the Protocol itself defines (not its bases').
    """
    classes = [protocol] if own else [c for c in reversed(protocol.__mro__)
                                      if getattr(c, "_is_protocol", False)
                                      and c.__module__ == __name__]
    out: dict[str, Any] = {}
    for cls in classes:
        for name, value in vars(cls).items():
            if not name.startswith("_") and (isinstance(value, property) or callable(value)):
                out[name] = value
    return list(out.items())
