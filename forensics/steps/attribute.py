"""Which enrolled generator made these images? Rank, calibrate, decide, bootstrap, report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forensics import defaults
from forensics.data.embed import DEFAULT_CACHE, Embeddings
from forensics.errors import BankError, InputError
from forensics.plugin import manager
from forensics.stats import fingerprints as fpmod
from forensics.stats.confidence import var_key
from forensics.steps.bank_access import (
    LoadedBaseline,
    PathLike,
    _absolute,
    _absolute_weights,
    load_baseline,
    open_bank,
)
from forensics.steps.curve import (
    _check_tau,
    _embed_suspect,
    _fingerprint_objects,
    _measure,
    _query,
    _vectors,
)
from forensics.threads import _one_thread

if TYPE_CHECKING:
    from forensics.stats.attribution import Attribution



def _pick_baseline(b: Any, rows: list[dict[str, Any]], baseline: str | None) -> str | None:
    """The baseline to attribute against: given, the bank's only one, or the curves' only one."""
    if baseline:
        return baseline
    used = sorted({r["baseline_id"] for r in rows})
    if len(b.baselines()) > 1 and len(used) == 1:
        return used[0]
    return None


def refuse_undefined_ct(fp: Any, rows: list[dict[str, Any]], where: str) -> None:
    """Refuse to match on a C_T fingerprint when enrolled curves have no C_T (small sets).

    Raises:
        BankError: naming the curves, why their C_T is undefined, and what to do.
    """
    from forensics.steps.enroll import CT_UNDEFINED
    from refbank.bank import curve_params

    if not fpmod.needs_ct(fp):
        return
    small = [(r, why) for r in rows if (why := curve_params(r).get(CT_UNDEFINED))]
    if small:
        shown = ", ".join(r["curve_id"] for r, _ in small[:5]) + (" ..." if len(small) > 5
                                                                 else "")
        raise BankError(
            f"{len(small)} enrolled curve(s){where} have no C_T, which {fp.name!r} matches on "
            f"({shown}): {small[0][1]['reason']}. Match on a fingerprint "
            f"that reads no C_T (the default, {defaults.FINGERPRINT}), or remove those curves "
            f"(fp bank remove) and enroll larger sets")


def _reference_vectors(fp: Any, same_rows: list[dict[str, Any]], refs: np.ndarray,
                       where: str, parsed: Any = None) -> np.ndarray:
    """The enrolled vectors of fingerprint ``fp`` (the paper's: the ``values`` column);
    ``parsed(row)`` reads a row's fingerprints (default: parsed afresh)."""
    from refbank.bank import curve_fingerprints

    refuse_undefined_ct(fp, same_rows, where)
    if fp.name == defaults.PAPER_FINGERPRINT:
        return refs
    vecs, lacking = [], []
    for r in same_rows:
        vec = (parsed or curve_fingerprints)(r).get(fp.name)
        if vec is None:
            lacking.append(r["curve_id"])
        vecs.append(vec)
    if lacking:
        shown = ", ".join(lacking[:5]) + (" ..." if len(lacking) > 5 else "")
        raise BankError(
            f"{len(lacking)} enrolled curve(s){where} have no {fp.name!r} fingerprint ({shown}): "
            f"they were enrolled before it existed or imported without images. Re-enroll "
            f"those generators (fp enroll), or match on --fingerprint paper"
        )
    sizes = {len(v) for v in vecs}
    if len(sizes) != 1:
        raise BankError(f"enrolled {fp.name!r} fingerprints{where} have different lengths "
                        f"{sorted(sizes)}; run fp bank verify")
    return np.asarray(vecs, dtype=np.float64)


def _conditions(suspect: dict[str, Any] | None, selection: Any,
                rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How the suspect images were stored, which curves they were compared with, and where
    their storage differs from those curves'."""
    from forensics.steps.storage import mismatch
    from refbank.bank import curve_params

    if suspect is None:
        return None
    return {"suspect": suspect, "compared_with": selection.to_dict(),
            "mismatch": mismatch(suspect, [curve_params(r).get("conditions") for r in rows])}


def _confidence_model(plan: _Plan, R: np.ndarray, mask: np.ndarray,
                      meta: list[dict[str, Any]], quantile: float,
                      seed: int) -> tuple[Any, dict[str, Any]]:
    """The bank's calibration of the rule's confidence (None: ``fp`` has no per-image
    variances), computed once per bank state (:mod:`forensics.steps.calibration`)."""
    from forensics.stats import confidence
    from forensics.steps.calibration import rows_digest

    fp, rows = plan.fp, plan.rows

    def compute() -> Any:
        variances = [plan.parsed(r).get(var_key(fp.name)) for r in rows]
        families = [m["family"] for m in meta]
        if any(v is None for v in variances) or len(set(families)) < 2:
            return None
        S = np.asarray(variances, dtype=np.float64)
        if S.shape[1] != mask.shape[0]:
            return None
        with _one_thread():  # loads scikit-learn for the fit, and limits it
            sim = confidence.simulate(R, S[:, mask], [int(r["n_images"]) for r in rows],
                                      families, plan.matcher.score, seed=seed)
            if sim.size.size == 0:
                return None
            return confidence.fit(sim, quantile=quantile, seed=seed)

    parts = {"rows": rows_digest(rows), "baseline": plan.loaded.row.get("row_sha256"),
             "fingerprint": fp.name, "matcher": plan.matcher_name,
             "entries": np.flatnonzero(mask).tolist(), "families": [m["family"] for m in meta],
             "quantile": float(quantile), "seed": int(seed)}
    return plan.store.get("confidence", parts, compute,
                          lambda m: None if m is None else m.to_dict(),
                          lambda d: None if d is None else confidence.ConfidenceModel.from_dict(d))


def attribute(
    folder: PathLike | Embeddings,
    *,
    baseline: str | None = None,
    matcher: str | None = None,
    fingerprint: str | None = None,
    top: int = defaults.TOP,
    drop_layers: Sequence[int] = defaults.DROP_LAYERS,
    n_boot: int = defaults.N_BOOT,
    seed: int = defaults.SEED,
    quantile: float = defaults.QUANTILE,
    bank: Any = None,
    report: PathLike | None = None,
    tau: float | None = None,
    weights: str | None = None,
    device: str = defaults.DEVICE,
    batch_size: int = defaults.BATCH_SIZE,
    cache_dir: Any = DEFAULT_CACHE,
    progress: bool = False,
    skip_bad: bool = False,
    allow_unverified: bool = False,
    force: bool = False,
    condition: str | None = None,
) -> Attribution:
    """Which enrolled generator made these images? Answered at two levels, with confidence.

    Model level: every enrolled model (its curves grouped by ``model``) is tested for
    belonging (:mod:`forensics.stats.belonging`); ``decision.consistent`` lists those the
    suspects are consistent with. Family level: the family of the most consistent model,
    or ``unknown`` with the nearest family as ``decision.closest``. ``decision.confidence``
    is the probability that this answer is right (:mod:`forensics.stats.answer_confidence`).

    Args:
        folder: the suspect images (or their embeddings).
        baseline: baseline name or id (None: the bank's only baseline, or the one every
            enrolled curve uses).
        matcher: ``zscore``, ``l2``, ``cosine``, ``combined`` or a plugin's (None: the
            fingerprint's default: ``zscore`` for ``resid-early`` and the other
            projected-mean fingerprints, ``combined`` for ``paper`` and ``setstats``).
        fingerprint: what is matched (None: ``resid-early``, the early layers' set means
            with the image content regressed out, matched by ``zscore``; ``paper``: the C_T-layer
            curve, with ``matcher="combined"`` the paper's method; ``setstats``: the
            paper's mean/std/FID baseline; or a plugin's).
        top: matches kept in the ranking.
        drop_layers: layer indices left out of matching (the paper drops layer 0).
        n_boot: bootstrap resamples of the suspect images behind ``stability`` (0: none).
        seed: seed of the resampling.
        quantile: share of genuine suspects accepted to be called unknown: the level of the
            belonging test of every enrolled model, and of the score/margin rule.
        bank: the bank.
        report: a folder to write ``attribution.json``, ``attribution.png`` and the
            case report ``report.html`` into; one that holds a report already is refused
            (before any work) unless ``force``.
        tau, weights, device, batch_size, cache_dir, progress, skip_bad: as for
            :func:`compute_curve`.
        allow_unverified: use bank rows and baseline files that fail their SHA-256
            (refused otherwise); they are listed in the answer's
            ``provenance.custody.unverified``.
        force: write ``report`` where a report is already; the old one is moved into
            ``<report>.replaced-<UTC time>/``, never deleted.
        condition: compare with the enrolled curves of this storage condition (``clean``,
            ``jpeg75``, ...; :data:`forensics.defaults.CONDITIONS`) instead of the one read
            from the suspect files (:mod:`forensics.steps.storage`).

    Returns:
        A :class:`forensics.stats.attribution.Attribution` (``to_dict()`` is the JSON answer; its
        ``provenance.custody`` is the chain of custody, see :mod:`forensics.steps.case`).

    Raises:
        BankError: empty bank, no curves for the baseline, or curves that do not match the
            suspect's encoder, weights or layers, or lack the fingerprint; rows or files
            that fail their hash.
        InsufficientDataError: too few suspect images for tau.
    """

    if report is not None:  # before any work
        _check_report(report, force, folder)
    run = _prepare(baseline=baseline, matcher=matcher, fingerprint=fingerprint, top=top,
                   drop_layers=drop_layers, n_boot=n_boot, seed=seed, quantile=quantile,
                   bank=bank, tau=tau, weights=weights, device=device, batch_size=batch_size,
                   cache_dir=cache_dir, progress=progress, skip_bad=skip_bad,
                   allow_unverified=allow_unverified, condition=condition)
    return run.answer(folder, report=report, force=force)


def _check_report(report: PathLike, force: bool, folder: Any) -> None:
    """Refuse a report folder that holds a report (unless ``force``) or lies in the suspects."""
    from forensics.data.atomic import check_report_folder
    from forensics.steps.reports import REPORT_FILES

    check_report_folder(report, REPORT_FILES, force=force,
                        inside=None if isinstance(folder, Embeddings) else folder)


def _prepare(*, baseline: str | None, matcher: str | None, fingerprint: str | None, top: int,
             drop_layers: Sequence[int], n_boot: int, seed: int, quantile: float, bank: Any,
             tau: float | None, weights: str | None, device: str, batch_size: int,
             cache_dir: Any, progress: bool, skip_bad: bool, allow_unverified: bool,
             condition: str | None) -> _Run:
    """Resolve everything once, before any image is embedded: the inputs, the bank, the
    baseline, the fingerprint, the matcher and the belonging test."""
    from forensics.plugin.encoders import check_device, resolve_device
    from forensics.stats.attribution import keep_mask
    from forensics.stats.ct import check_n_boot, check_seed
    from forensics.steps.storage import check_condition
    from refbank.bank import modified_rows, unverified_message

    seed = check_seed(seed)
    if int(top) < 1 or int(n_boot) < 0 or not 0.0 <= float(quantile) <= 1.0:
        raise InputError(f"need top >= 1, n_boot >= 0 and 0 <= quantile <= 1; got top {top}, "
                         f"n_boot {n_boot}, quantile {quantile}")
    condition = check_condition(condition)
    _check_tau(tau)
    n_boot = check_n_boot(n_boot)
    b = open_bank(bank)
    b.require()
    all_rows = b.curves()
    if not all_rows:
        raise BankError(f"the bank at {b.path} has no enrolled curves; enroll references "
                        f"first: fp enroll DIR --baseline NAME --model M --family F")
    fp = manager.get("fingerprints", fingerprint or defaults.FINGERPRINT)
    device = check_device(device)  # torch is imported only where something runs on it
    if device.startswith("cuda"):  # a GPU asked for: is it there? (before any work)
        device = resolve_device(device)
    # the suspects' C_T query is small work: with ``auto`` it runs on the CPU
    loaded = load_baseline(_pick_baseline(b, all_rows, baseline), bank=b,
                           device="cpu" if device == "auto" else device,
                           allow_unverified=allow_unverified)
    same = [r for r in all_rows if r["baseline_id"] == loaded.row["baseline_id"]]
    forged = modified_rows("curves", same)
    named = {p.id for p in forged}
    forged += [p for p in b.log_problems([r["curve_id"] for r in same]
                                         + [loaded.row["baseline_id"]]) if p.id not in named]
    if forged and not allow_unverified:
        raise BankError(unverified_message(forged, b.path))
    unverified = loaded.unverified + [dataclasses.asdict(p) for p in forged]
    _fingerprint_objects([fp.name], loaded, strict=True)
    belong_fps, _ = _fingerprint_objects([defaults.BELONG_FINGERPRINT], loaded, strict=False)
    drop = tuple(int(i) for i in drop_layers)
    keep = keep_mask(len(loaded.row["layers"]), drop)
    mname, mobj = manager.resolve_matcher(
        fp, matcher, [d for d, k in zip(loaded.dims, keep, strict=True) if k])
    weights = _absolute_weights(weights)
    settings = {"tau": tau, "weights": weights, "device": device, "batch_size": int(batch_size),
                "skip_bad": bool(skip_bad), "allow_unverified": bool(allow_unverified)}
    from forensics.steps.calibration import CalibrationStore, rows_digest

    # the bank state the answer's calibrations belong to: the baseline's curves and its row
    state = rows_digest(same + [{"curve_id": loaded.row["baseline_id"],
                                 "row_sha256": loaded.row.get("row_sha256")}])[:32]
    plan = _Plan(b, all_rows, same, loaded, fp, mname, mobj, drop, keep,
                 belong_fps[0] if belong_fps else None,
                 CalibrationStore(b.path, scope=loaded.row["baseline_id"], state=state))
    return _Run(plan, settings, unverified, dict(
        top=top, n_boot=n_boot, seed=seed, quantile=quantile, tau=tau, condition=condition),
        dict(weights=weights, device=device, batch_size=batch_size, cache_dir=cache_dir,
             progress=progress, skip_bad=skip_bad))


@dataclasses.dataclass(frozen=True)
class _Run:
    """A resolved attribution, ready to answer any number of suspect sets."""

    plan: _Plan
    settings: dict[str, Any]
    unverified: list[dict[str, str]]
    options: dict[str, Any]  # top, n_boot, seed, quantile, tau, condition
    embedding: dict[str, Any]  # weights, device, batch_size, cache_dir, progress, skip_bad

    def answer(self, folder: PathLike | Embeddings, *, report: PathLike | None = None,
               force: bool = False) -> Attribution:
        """Embed one suspect set and answer it."""
        emb = _embed_suspect(self.plan.loaded, folder, **self.embedding)
        with _one_thread(load=False):  # calibrating loads (and limits) scikit-learn itself
            return _attribute(self.plan, emb, folder, report=report, settings=self.settings,
                              unverified=self.unverified, force=force,
                              cache_dir=self.embedding["cache_dir"], **self.options)


@dataclasses.dataclass(frozen=True)
class SetAnswer:
    """One suspect set of :func:`attribute_many`: its answer, or why it has none.

    Attributes:
        folder: the set (a folder, or ``<embeddings #i>``).
        result: the :class:`~forensics.stats.attribution.Attribution` (None: failed).
        error: the error's type and message (None: answered).
        report: where its case report was written (None: none asked).
    """

    folder: str
    result: Any = None
    error: dict[str, str] | None = None
    report: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """One JSON Lines record: ``{"folder", "answer"}`` or ``{"folder", "error"}``."""
        out: dict[str, Any] = {"folder": self.folder}
        if self.result is not None:
            out["answer"] = self.result.to_dict()
        else:
            out["error"] = self.error
        if self.report is not None:
            out["report"] = self.report
        return out


def suspect_sets(folders: Sequence[PathLike], each: bool = False) -> list[Path]:
    """The suspect sets of ``fp attribute DIR [DIR ...]``: the folders themselves, or with
    ``each`` every sub-folder of each (sorted, hidden ones left out).

    Raises:
        InputError: a folder is missing, or with ``each`` holds no sub-folder.
    """
    out: list[Path] = []
    for f in folders:
        path = Path(f)
        if not path.is_dir():
            raise InputError(f"{path} is not a folder of images")
        if not each:
            out.append(path)
            continue
        subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subs:
            raise InputError(f"--each: {path} holds no sub-folder (one suspect set per "
                             f"sub-folder); drop --each to attribute it as one set")
        out.extend(subs)
    return out


def attribute_many(
    folders: Sequence[PathLike | Embeddings],
    *,
    report: PathLike | None = None,
    force: bool = False,
    on_answer: Any = None,
    **kwargs: Any,
) -> list[SetAnswer]:
    """Answer several suspect sets against one bank: everything is resolved once.

    The bank, baseline, fingerprint, matcher and belonging test are loaded once; each set
    is then embedded and answered. A set that fails (no images, all unreadable, too few)
    is recorded with its error and the others go on.

    Args:
        folders: the suspect sets (folders or embeddings), in order.
        report: a folder for the case reports: one sub-folder per set (named after the set's
            folder, numbered where names repeat) and ``index.html`` linking them.
        force: as for :func:`attribute` (the old ``report`` folder is moved aside).
        on_answer: called with each :class:`SetAnswer` as it is ready.
        **kwargs: as for :func:`attribute` (baseline, fingerprint, matcher, bank, ...).

    Returns:
        One :class:`SetAnswer` per set, in order.

    Raises:
        FpError: what cannot be resolved before any set (bank, baseline, options, the
            report folder); errors of single sets are recorded instead.
    """
    from forensics.data.atomic import check_report_folder
    from forensics.errors import FpError
    from forensics.steps.reports import INDEX_NAME, REPORT_FILES

    names = _report_names(folders)
    if report is not None:  # every report folder checked before any work
        check_report_folder(report, (INDEX_NAME,), force=force)
        for f, name in zip(folders, names, strict=True):
            if not isinstance(f, Embeddings) and _inside(Path(report), Path(f)):
                raise InputError(f"--report {report} lies inside the suspect folder {f}; "
                                 f"write it elsewhere")
            check_report_folder(Path(report) / name, REPORT_FILES, force=force)
    run = _prepare(**_prepare_kwargs(kwargs))
    out = []
    for i, f in enumerate(folders):
        label = f"<embeddings #{i + 1}>" if isinstance(f, Embeddings) else str(f)
        where = None if report is None else Path(report) / names[i]
        try:
            result = run.answer(f, report=where, force=force)
            answer = SetAnswer(label, result, None, None if where is None else str(where))
        except FpError as exc:
            answer = SetAnswer(label, None, {"type": type(exc).__name__, "message": str(exc)})
        out.append(answer)
        if on_answer is not None:
            on_answer(answer)
    if report is not None:
        from forensics.steps.reports import write_index

        write_index(report, out, force=force)
    return out


def _inside(path: Path, folder: Path) -> bool:
    p, f = path.resolve(), folder.resolve()
    return p == f or f in p.parents


def _report_names(folders: Sequence[Any]) -> list[str]:
    """One report sub-folder name per set: its folder's name, numbered where names repeat."""
    import re

    base = [f"set-{i + 1}" if isinstance(f, Embeddings) else
            (re.sub(r"[^A-Za-z0-9._-]+", "_", Path(f).name) or f"set-{i + 1}")
            for i, f in enumerate(folders)]
    seen: dict[str, int] = {}
    out = []
    for name in base:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if base.count(name) == 1 else f"{name}-{seen[name]}")
    return out


def _prepare_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`attribute`'s keyword arguments (with its defaults) for :func:`_prepare`."""
    import inspect

    params = inspect.signature(attribute).parameters
    unknown = set(kwargs) - set(params) - {"folder", "report", "force"}
    if unknown:
        raise TypeError(f"attribute_many() got unexpected keyword argument(s) "
                        f"{', '.join(sorted(unknown))}")
    return {name: kwargs.get(name, p.default) for name, p in params.items()
            if name not in ("folder", "report", "force")}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one attribution was resolved to before any image is embedded."""

    bank: Any
    all_rows: list[dict[str, Any]]
    rows: list[dict[str, Any]]  # the curves of the suspect's baseline
    loaded: LoadedBaseline
    fp: Any
    matcher_name: str
    matcher: Any
    drop: tuple[int, ...]
    keep: np.ndarray
    belong_fp: Any  # whose per-image rows the belonging test reads (None: not available)
    store: Any  # the bank's stored calibrations (forensics.steps.calibration)
    _parsed: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def parsed(self, row: dict[str, Any]) -> dict[str, Any]:
        """The curve's stored fingerprints, parsed once (by curve id and row hash)."""
        from refbank.bank import curve_fingerprints

        key = f"{row['curve_id']}:{row.get('row_sha256')}"
        if key not in self._parsed:
            self._parsed[key] = curve_fingerprints(row)
        return self._parsed[key]

    def fingerprints(self, row: dict[str, Any]) -> dict[str, Any]:
        """What an answer reads of a curve of :attr:`rows`: its fingerprint vector, and of
        its per-image rows only their shape (``<rows key>#meta``: stored values, stored
        whole), from the bank's arrays: parsed from the rows' JSON once per bank state and
        stored beside the bank (:meth:`CalibrationStore.get_arrays`). The rows themselves
        are read only where a test or a fit reads them (:meth:`image_rows`)."""
        from forensics.steps.calibration import rows_digest

        if not any(r["curve_id"] == row["curve_id"] for r in self.rows):
            return self.parsed(row)
        rows_name = self._rows_name()

        def compute() -> dict[str, np.ndarray]:
            out = {}
            for r in self.rows:
                fps = self.parsed(r)
                if fps.get(self.fp.name) is not None:
                    out[f"{r['curve_id']}::{self.fp.name}"] = np.asarray(fps[self.fp.name],
                                                                         np.float64)
                value = fps.get(rows_name) if rows_name else None
                if value is not None:
                    n = len(value) if isinstance(value, list) else self.bank.rows_size(value)
                    out[f"{r['curve_id']}::{rows_name}{META}"] = np.array(
                        [n, int(isinstance(value, str))], dtype=np.int64)
            return out

        names = [self.fp.name] + ([rows_name] if rows_name else [])
        arrays = self.store.get_arrays("vectors", {"rows": rows_digest(self.rows),
                                                   "names": names, "meta": META}, compute)
        prefix = f"{row['curve_id']}::"
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    def _rows_name(self) -> str | None:
        from forensics.stats.belonging import rows_key

        return rows_key(self.belong_fp.name) if self.belong_fp is not None else None

    def image_rows(self, row: dict[str, Any]) -> np.ndarray:
        """The curve's stored per-image rows, flat float16 values as stored: read from the
        bank's file of them, whose hash is checked on every read (or decimals, from banks
        that stored 32 projected entries)."""
        value = self.parsed(row).get(self._rows_name() or "")
        if value is None:
            raise BankError(f"curve {row['curve_id']!r} stores no per-image rows")
        if isinstance(value, str):
            return self.bank.read_rows(value)
        return np.asarray(value, dtype=np.float16).ravel()


#: Suffix of a curve's stored shape of its per-image rows in :meth:`_Plan.fingerprints`.
META = "#meta"


@dataclasses.dataclass
class _Belong:
    """What the belonging step gives an answer."""

    tests: list[Any]  # one test per enrolled model
    calibration: Any  # the answer's confidence at the suspect's size (None: none)
    note: str
    records: list[dict[str, Any]]  # the stored calibrations read, for the chain of custody
    order: list[str] | None = None  # models, the attributor's highest score first
    attributor: dict[str, Any] | None = None  # its provenance


def _attributor(plan: _Plan, sizes: dict[str, list[int]],
                curves: Callable[[], dict[str, list[np.ndarray]]], family: dict[str, str],
                seed: int) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]] | None:
    """The per-image attributor of the bank's models that store every entry of their rows
    (:mod:`forensics.stats.probe`; ``curves()`` gives their rows, read only to fit), with
    its leave-one-curve-out refits: fitted once per bank state and stored beside the bank.
    None: fewer than two such models."""
    from forensics.stats import answer_confidence as acm
    from forensics.stats import probe
    from forensics.steps.calibration import rows_digest

    if len(sizes) < 2:
        return None
    simulated = acm.simulated_models([m for m, c in sizes.items() if len(c) >= 2], seed)
    parts = {"rows": rows_digest(plan.rows), "baseline": plan.loaded.row.get("row_sha256"),
             "fingerprint": plan.belong_fp.name, "drop_layers": list(plan.drop),
             "C": probe.C, "max_iter": probe.MAX_ITER, "seed": int(seed),
             "models": {m: sizes[m] for m in sorted(sizes)}, "simulated": simulated}

    def compute() -> dict[str, np.ndarray]:
        with _one_thread():  # loads scikit-learn for the fits, and limits it
            return probe.export(probe.ProbeBank(curves(), family, seed=seed), simulated)

    arrays, record = plan.store.get_arrays("attributor", parts, compute, with_record=True)
    fit = probe.stored_fit(arrays, {m: family[m] for m in sizes}, C=probe.C, seed=seed)
    return fit, arrays, record


def _kernel_tests(plan: _Plan, curves_of: dict[str, list[np.ndarray]],
                  family: dict[str, str], projected: np.ndarray, kind: str, alpha: float,
                  seed: int, order_fn: Any, attributor_sha: str | None
                  ) -> tuple[list[Any], Any, dict[str, Any]]:
    """The MMD (or energy) test of every model on projected rows, the answer's calibration
    at the suspect's size (``order_fn``: the attributor's scores of simulated suspects),
    and the record of what was stored."""
    from forensics.stats import belonging as bt
    from forensics.stats.answer_confidence import AnswerConfidence, calibrate
    from forensics.steps.calibration import rows_digest

    n = len(bt.subset(len(projected), seed))

    def compute() -> tuple[dict[str, np.ndarray], Any, dict[str, list[float]]]:
        models = {m: bt.ModelRows(c) for m, c in curves_of.items()}
        with _one_thread():  # loads scikit-learn for the fit, and limits it
            nulls = {m: bt.null(models[m], n, kind=kind, seed=seed) for m in models}
            cal = (calibrate(models, family, n, alpha=alpha, kind=kind, nulls=nulls,
                             seed=seed, order=order_fn)
                   if any(v.size for v in nulls.values()) else None)
        # what a test needs of each model besides its rows, so that it is not computed again
        kernel = {m: [mr.bandwidth2, mr.gram_mean(kind)] for m, mr in models.items()}
        return nulls, cal, kernel

    def to_json(value: tuple[dict[str, np.ndarray], Any, dict[str, list[float]]]
                ) -> dict[str, Any]:
        nulls, cal, kernel = value
        return {"nulls": {m: [float(x) for x in v] for m, v in nulls.items()},
                "answer": None if cal is None else cal.to_dict(),
                "kernel": {m: [float(x) for x in v] for m, v in kernel.items()}}

    def from_json(d: dict[str, Any]) -> tuple[dict[str, np.ndarray], Any,
                                              dict[str, list[float]]]:
        return ({m: np.asarray(v, dtype=np.float64) for m, v in d["nulls"].items()},
                None if d["answer"] is None else AnswerConfidence.from_dict(d["answer"]),
                d["kernel"])

    parts = {"rows": rows_digest(plan.rows), "baseline": plan.loaded.row.get("row_sha256"),
             "fingerprint": plan.belong_fp.name, "kind": kind, "alpha": float(alpha),
             "seed": int(seed), "n": int(n), "draws": bt.DRAWS, "dim": bt.DIM,
             "models": {m: [c.shape for c in curves_of[m]] for m in curves_of},
             "attributor": attributor_sha if order_fn is not None else None}
    (nulls, calibration, kernel), record = plan.store.get("belonging", parts, compute,
                                                          to_json, from_json)
    models = {m: bt.ModelRows(c, bandwidth2=kernel[m][0], gram_means={kind: kernel[m][1]})
              for m, c in curves_of.items()}
    tests = [bt.test(models[m], projected, name=m, family=family[m], alpha=alpha,
                     kind=kind, seed=seed, null_values=nulls[m]) for m in sorted(models)]
    return tests, calibration, record


def _probe_tests(plan: _Plan, att: tuple[Any, dict[str, np.ndarray], dict[str, Any]],
                 sizes: dict[str, list[int]], family: dict[str, str], x: np.ndarray,
                 alpha: float, seed: int) -> tuple[list[Any], Any, dict[str, Any]]:
    """The attributor's test of every model (:meth:`forensics.stats.probe.ProbeBank.tests`,
    from its stored refits), the answer's calibration at the suspect's size, and the record
    of what was stored."""
    from forensics.stats import probe
    from forensics.stats.answer_confidence import AnswerConfidence
    from forensics.steps.calibration import rows_digest

    pb = probe.ProbeBank.from_arrays(att[1], {m: family[m] for m in sizes}, sizes,
                                     C=probe.C, seed=seed)

    def compute() -> Any:
        return pb.calibrate(len(x), alpha)

    parts = {"rows": rows_digest(plan.rows), "baseline": plan.loaded.row.get("row_sha256"),
             "fingerprint": plan.belong_fp.name, "kind": "probe", "alpha": float(alpha),
             "seed": int(seed), "n": len(x), "draws": probe.DRAWS,
             "sim_draws": probe.SIM_DRAWS, "attributor": att[2]["sha256"]}
    calibration, record = plan.store.get(
        "belonging", parts, compute, lambda c: {"answer": c.to_dict()},
        lambda d: AnswerConfidence.from_dict(d["answer"]))
    tests = pb.tests(x, alpha)
    return tests, calibration, record


def _belonging(plan: _Plan, suspect_rows: np.ndarray | None, alpha: float,
               seed: int) -> _Belong:
    """One belonging test per enrolled model (curves grouped by model), the per-image
    attributor's order of the models, the calibration of the answer's confidence at the
    suspect's size, a note, and the records of what was read from the store.

    The models' nulls, the attributor and the answer's calibration depend on the bank and
    the suspect's size only: computed once per bank state and size
    (:mod:`forensics.steps.calibration`)."""
    from forensics.stats import belonging as bt
    from forensics.stats import probe

    if plan.belong_fp is None or suspect_rows is None:
        return _Belong([], None, (f"the baseline has no {defaults.BELONG_FINGERPRINT!r} arrays: "
                                  f"no belonging test (rebuild the baseline to enable it)"), [])
    key = bt.rows_key(plan.belong_fp.name)
    width = suspect_rows.shape[1]
    # each curve's stored rows: their shape now, their values (float16 as stored) only where
    # a test or a fit reads them; stored whole (every entry), or projected (enrolled before
    # rows were stored whole)
    by_model: dict[str, list[tuple[dict[str, Any], bool]]] = {}
    family: dict[str, str] = {}
    lacking = 0
    for r in plan.rows:
        family.setdefault(r["model"], r["family"])
        by_model.setdefault(r["model"], [])
        meta = plan.fingerprints(r).get(key + META)
        if meta is None:
            lacking += 1
            continue
        n_values, is_whole = int(meta[0]), bool(meta[1])
        if n_values == int(r["n_images"]) * (width if is_whole else bt.DIM):
            by_model[r["model"]].append((r, is_whole))
    by_model = {m: c for m, c in sorted(by_model.items()) if c}
    mask = fpmod.entry_mask(plan.belong_fp, plan.loaded.dims, plan.keep)
    sizes = {m: [int(r["n_images"]) for r, _w in by_model[m]] for m in by_model
             if all(w for _r, w in by_model[m])}

    def stored(r: dict[str, Any]) -> np.ndarray:
        return plan.image_rows(r).reshape(int(r["n_images"]), -1)

    def projected_curves() -> dict[str, list[np.ndarray]]:
        """What the kernel tests read: whole rows projected here, projected ones as stored."""
        return {m: [bt.project(stored(r)) if w else stored(r).astype(np.float64)
                    for r, w in by_model[m]] for m in by_model}

    def whole() -> dict[str, list[np.ndarray]]:
        return {m: [np.asarray(stored(r)[:, mask], dtype=np.float64) for r, _w in by_model[m]]
                for m in sizes}

    wants = "probe" in (defaults.BELONG_ORDER, defaults.BELONG_KIND)
    att = (_attributor(plan, sizes, whole, family, seed)
           if wants and len(sizes) == len(by_model) else None)
    suspect_whole = np.asarray(suspect_rows[:, mask], dtype=np.float64)
    if defaults.BELONG_KIND == "probe" and att is not None:
        tests, calibration, record = _probe_tests(plan, att, sizes, family, suspect_whole,
                                                  alpha, seed)
        note = (f"belonging: the per-image attributor's test of the suspect's "
                f"{plan.belong_fp.name} per-image rows against each enrolled model (the mean "
                f"log-probability of the model over the images, null from the attributor "
                f"refitted without each of the model's curves, at the suspect's size), level "
                f"{alpha:g}")
    else:  # a kernel test (and banks enrolled before rows were stored whole)
        kind = "mmd" if defaults.BELONG_KIND == "probe" else defaults.BELONG_KIND
        tests, calibration, record = _kernel_tests(
            plan, projected_curves(), family, bt.project(suspect_rows), kind, alpha, seed,
            probe.simulated_scores(att[1], att[0].models, sizes)
            if att is not None and defaults.BELONG_ORDER == "probe" else None,
            None if att is None else att[2]["sha256"])
        note = (f"belonging: {kind} two-sample test of the suspect's "
                f"{plan.belong_fp.name} per-image rows against each enrolled model's, null "
                f"from its own curves (leave-one-curve-out) at the suspect's size, level "
                f"{alpha:g}")
    # highest p first, whichever test gave them
    tests.sort(key=lambda t: (-(t.p_value if t.p_value is not None else -1.0), t.model))
    order = attributor = None
    records = [record]
    if att is not None:
        fit, _arrays, att_record = att
        scores = fit.scores(suspect_whole)
        order = [fit.models[j] for j in np.argsort(-scores, kind="stable")]
        attributor = {**fit.to_dict(), "entries": int(mask.sum()),
                      "scores": {k: float(v) for k, v in zip(fit.models, scores, strict=True)}}
        records.insert(0, att_record)
        if defaults.BELONG_ORDER == "probe":
            note += ("; among the consistent models, the per-image attributor (a logistic "
                     "regression on the enrolled images' rows) chooses")
        else:
            order = None
    else:
        note += ("; among the consistent models, the fingerprint ranking chooses"
                 + (" (the per-image attributor needs every model enrolled with whole rows: "
                    "re-enroll them)" if defaults.BELONG_ORDER == "probe"
                    and len(by_model) >= 2 else ""))
    if lacking:
        note += (f"; {lacking} curve(s) enrolled without per-image rows are left out of it "
                 f"(re-enroll them)")
    if not any(t.p_value is not None for t in tests):
        note += "; no model has two curves with rows (enroll --per-curve to split a folder)"
    return _Belong(tests, calibration, note, records, order, attributor)


def _attribute(plan: _Plan, emb: Embeddings, folder: Any, *, top: int, n_boot: int,
               seed: int, quantile: float, report: PathLike | None, tau: float | None,
               settings: dict[str, Any], unverified: list[dict[str, str]],
               force: bool = False, condition: str | None = None,
               cache_dir: Any = None) -> Attribution:
    """Answer one embedded suspect set (the steps after embedding, each once)."""
    from forensics.stats.attribution import (
        Attribution,
        bootstrap_confidence,
        calibrate_unknown,
        comparable_references,
        decide,
        decide_belonging,
        rank,
    )
    from forensics.steps import storage
    from forensics.steps.case import custody_record

    b, loaded, fp, mobj = plan.bank, plan.loaded, plan.fp, plan.matcher
    where = f" in the bank at {b.path}"
    folder_str = None if isinstance(folder, Embeddings) else str(_absolute(folder))
    # like with like: the enrolled curves stored as the suspect files read
    suspect = None if emb.manifest is None else storage.manifest_conditions(
        emb.manifest, cache_dir=cache_dir)
    selection = storage.select(plan.all_rows, suspect, condition)
    chosen = {id(r) for r in selection.rows}
    pool, plan = plan.all_rows, dataclasses.replace(
        plan, all_rows=selection.rows, rows=[r for r in plan.rows if id(r) in chosen])
    # 3. vectors: the suspect's fingerprint and per-image rows, the bank's vectors
    fps = [fp] + ([plan.belong_fp] if plan.belong_fp is not None
                  and plan.belong_fp.name != fp.name else [])
    res = _measure(loaded, emb, np.arange(len(emb)), tau=tau, details=False, fps=fps,
                   what=folder_str or "the embeddings", folder=folder_str, spreads=True)
    names = {r["baseline_id"]: r["name"] for r in b.baselines()}
    refs, meta = comparable_references(res.curve, plan.all_rows, bank=str(b.path),
                                       baseline_names=names)
    ref_vecs = _reference_vectors(fp, plan.rows, refs, where, plan.fingerprints)
    dims = loaded.dims
    mask = fpmod.entry_mask(fp, dims, plan.keep)
    if mask.shape[0] != ref_vecs.shape[1]:
        raise BankError(f"enrolled {fp.name!r} fingerprints have {ref_vecs.shape[1]} values "
                        f"but the suspect's has {mask.shape[0]}; re-enroll them with this fp")
    query, R = res.fingerprints[fp.name][mask], ref_vecs[:, mask]
    # 4. belonging: one calibrated test per enrolled model
    suspect_rows = (res.image_rows.get(plan.belong_fp.name)
                    if plan.belong_fp is not None else None)
    belong = _belonging(plan, suspect_rows, quantile, seed)
    tests, answer_cal, belong_note = belong.tests, belong.calibration, belong.note
    # 5. ranking, and the score/margin rule
    ranking = rank(query, R, meta, mobj, drop_layers=())
    calibration = calibrate_unknown(R, [m["family"] for m in meta], mobj, (), quantile)
    calibration = dataclasses.replace(calibration, matcher=plan.matcher_name,
                                      drop_layers=plan.drop)
    model, model_record = _confidence_model(plan, R, mask, meta, quantile, seed)
    if model is not None:
        calibration = dataclasses.replace(
            calibration, threshold=model.threshold(len(emb)), confidence=model.to_dict(),
            margin_threshold=model.margin_threshold(len(emb)),
            note=(f"threshold = {quantile:g}-quantile of the best scores of suspects of "
                  f"{len(emb)} images simulated from the bank ({model.note})"))
    # 6. decision: model level (belonging), family level, confidence
    rule = decide(ranking, calibration)
    testable = any(t.p_value is not None for t in tests)
    if testable:
        decision = decide_belonging(ranking, tests, quantile,
                                    gate=rule if defaults.BELONG_GATE else None,
                                    order=belong.order)
    else:
        decision = dataclasses.replace(rule, closest=rule.nearest_family if rule.unknown
                                       else None, reason=f"{rule.reason} ({belong_note})")
    if answer_cal is not None:  # the two-level answer: calibrated on the bank's models
        chosen = next((c["p_value"] for c in decision.consistent
                       if c["model"] == decision.model), None)
        decision = dataclasses.replace(decision, confidence=answer_cal.probability(
            decision.unknown, chosen, len({c["family"] for c in decision.consistent})))
        calibration = dataclasses.replace(calibration, answer=answer_cal.to_dict())
    elif model is not None and not decision.unknown:
        from forensics.stats.confidence import family_scores, margin_of

        _, best, margin = margin_of(family_scores([m.score for m in ranking],
                                                  [m.family for m in ranking]))
        decision = dataclasses.replace(decision,
                                       confidence=model.probability(margin, best, len(emb)))
    if selection.inconclusive:  # no like-with-like comparison: no family, no confidence
        decision = dataclasses.replace(
            decision, family=None, model=None, unknown=True, confidence=None,
            model_confidence=None, inconclusive=True, consistent=[],
            closest=decision.closest or decision.nearest_family,
            reason=f"inconclusive: {selection.inconclusive}")
    elif condition is not None and suspect is not None and (
            (read := storage.select(pool, suspect, apply_figures=False)).inconclusive
            or read.condition != condition):  # named otherwise than the files read
        decision = dataclasses.replace(decision, confidence=None, model_confidence=None)
        selection.notes.append("no confidence: the suspects read as stored otherwise than "
                               "the curves they were compared with, and confidence is "
                               "calibrated like with like only")
    boot = None
    if n_boot > 0 and not selection.inconclusive:  # no answer: nothing to be stable about
        reads_ct = fpmod.needs_ct(fp) or getattr(fp, "needs_details", False)

        def curve_fn(indices: np.ndarray) -> np.ndarray:
            if reads_ct:
                results, Q = _query(loaded, emb, np.asarray(indices), tau,
                                    getattr(fp, "needs_details", False))
            else:  # the fingerprint reads no C_T: skip the query
                results, Q = res.results, [np.asarray(a)[indices] for a in emb.arrays]
            vec = _vectors([fp], loaded, results, Q)[fp.name]
            return np.nan_to_num(vec, nan=0.0)[mask]  # the authors' rule: NaN counts as 0

        boot = bootstrap_confidence(curve_fn, len(emb), n_boot, seed, bank_vectors=R,
                                    meta=meta, matcher=mobj, drop_layers=(),
                                    calibration=calibration, decision=rule)
        decision = dataclasses.replace(decision, stability=boot.confidence,
                                       model_stability=boot.model_confidence)
    # 7. report
    parameters = {
        "fingerprint": fp.name, "matcher": plan.matcher_name, "drop_layers": list(plan.drop),
        "top": int(top), "quantile": quantile, "n_boot": n_boot if boot is not None else 0,
        "seed": int(seed), "bank": str(b.path), "baseline": loaded.name,
        "n_references": len(meta), "belonging": belong_note, "attributor": belong.attributor,
        "condition": selection.condition, **settings,
    }
    custody = custody_record(bank=b, loaded=loaded, manifest=emb.manifest, folder=folder_str,
                             rows=plan.rows, unverified=unverified)
    custody["calibrations"] = [r for r in (model_record, *belong.records) if r is not None]
    result = Attribution(decision, ranking[: max(int(top), 1)], calibration, res.curve, boot,
                         parameters, custody, belonging=tests,
                         conditions=_conditions(suspect, selection, plan.rows))
    if report is not None:
        from forensics.steps.reports import Evidence, write_report

        evidence = Evidence(vector=query, bank_vectors=R,
                            bank_ids=[str(m["curve_id"]) for m in meta],
                            entry_layers=fpmod.entry_layers(fp, dims)[mask],
                            manifest=emb.manifest, baseline=loaded.row)
        write_report(report, result, plan.rows, evidence=evidence, force=force)
    return result
