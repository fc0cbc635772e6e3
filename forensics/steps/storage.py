"""Like with like: which enrolled curves a suspect set is compared with, by storage condition.

A model can be enrolled from its own images and, from the same images, under named storage
conditions (``fp enroll --conditions jpeg75,...``, :data:`forensics.defaults.CONDITIONS`);
each such curve records its ``condition``. A suspect set is compared with the curves of the
condition read from its files (:mod:`forensics.data.conditions`: JPEG files by their
quality, lossless files with an earlier JPEG's lattice by the quality its steps imply), or
of the condition the user names. Where the bank has no curves of that condition, or the
files were stored in several ways, the answer is inconclusive, with the reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forensics import defaults
from forensics.errors import InputError

#: Lossless images read for the JPEG-history test of a set (the first in path order).
LATTICE_IMAGES = 64


@dataclass(frozen=True)
class Selection:
    """The enrolled curves a suspect set is compared with.

    Attributes:
        rows: those curves.
        condition: their condition (``clean``, ``jpeg75``, ...).
        read: the condition read from the suspect files, in words (None: not read).
        inconclusive: why no like-with-like comparison is possible (None: it is).
        notes: what the user should know about the choice.
    """

    rows: list[dict[str, Any]]
    condition: str
    read: str | None
    inconclusive: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (without the rows)."""
        return {"condition": self.condition, "read": self.read,
                "inconclusive": self.inconclusive, "notes": list(self.notes),
                "n_curves": len(self.rows)}


def check_condition(name: str | None) -> str | None:
    """A condition name given by the user, checked (None: read it from the files).

    Raises:
        InputError: not ``clean`` nor one of :data:`forensics.defaults.CONDITIONS`.
    """
    if name is None:
        return None
    known = [defaults.CLEAN_CONDITION, *defaults.CONDITIONS]
    if name not in known:
        raise InputError(f"unknown condition {name!r}; choose one of: {', '.join(known)}")
    return name


def curve_condition(row: dict[str, Any]) -> str:
    """The storage condition an enrolled curve was measured under."""
    from refbank.bank import curve_params

    return str(curve_params(row).get("condition") or defaults.CLEAN_CONDITION)


def jpeg_quality_of(suspect: dict[str, Any]) -> int | None:
    """The JPEG quality a set was stored at: its files' tables, or its pixels' lattice
    (None: neither)."""
    from forensics.data.conditions import quality_from_steps
    from forensics.stats.conditions import LATTICE_FREQUENCIES

    if suspect.get("jpeg"):
        return int(suspect["jpeg"]["qualities"][1])
    history = suspect.get("jpeg_history") or {}
    if history.get("detected") and history.get("steps"):
        return quality_from_steps(history["steps"], LATTICE_FREQUENCIES)
    return None


def select(rows: list[dict[str, Any]], suspect: dict[str, Any] | None,
           condition: str | None = None, *, apply_figures: bool = True) -> Selection:
    """The curves of ``rows`` to compare a suspect set with (see the module docstring).

    Args:
        rows: the enrolled curves of the baseline.
        suspect: :func:`forensics.data.conditions.set_conditions` of the suspect files (None:
            embeddings given, nothing read).
        condition: the condition to compare under, as the user named it (None: read it).
        apply_figures: make the answer inconclusive under a condition the development
            sets measured as not attributable, or never measured (:func:`attributable`);
            False only to measure them.
    """
    chosen = _select(rows, suspect, condition)
    if not apply_figures or chosen.inconclusive:
        return chosen
    why = attributable(chosen.condition)
    if why is None:
        return chosen
    return Selection(chosen.rows, chosen.condition, chosen.read, inconclusive=why,
                     notes=chosen.notes)


def attributable(condition: str,
                 figures: dict[str, dict[str, Any]] | None = None) -> str | None:
    """Why suspects compared with curves of ``condition`` get no answer (None: they do).

    Clean curves always answer. Any other condition answers only where its development-set
    figures (``figures``, default :data:`forensics.defaults.CONDITION_FIGURES`) show no
    wrong answer with confidence above 0.5, a top-1 of at least
    :data:`forensics.defaults.CONDITION_MIN_TOP1` on the worst set and at most
    :data:`forensics.defaults.CONDITION_MAX_DROP` below clean suspects' on every set: an
    inconclusive answer carries no family and no confidence, so no suspect stored under a
    condition gets a confidence above 0.5 unless the figures of that condition support it.
    """
    if condition == defaults.CLEAN_CONDITION:
        return None
    table = defaults.CONDITION_FIGURES if figures is None else figures
    f = table.get(condition)
    if f is None:
        return (f"attribution under {condition!r} was not measured on the development sets "
                f"(docs/conditions.md), so no answer under it can be given a confidence; "
                f"compare anyway with --condition clean (no confidence)")
    wrong, drop, top1 = int(f["wrong_above_half"]), float(f["drop"]), float(f["top1"])
    if wrong == 0 and drop <= defaults.CONDITION_MAX_DROP and \
            top1 >= defaults.CONDITION_MIN_TOP1:
        return None
    return (f"the development sets measured {condition!r} as not attributable: top-1 "
            f"{top1:.2f} on the {f['set']} set, {drop:.2f} below clean suspects on the "
            f"{f.get('drop_set', f['set'])} set, {wrong} of {int(f['answers'])} answers "
            f"naming a wrong family with confidence above 0.5 (docs/conditions.md, measured "
            f"{f['measured']}; needed: top-1 >= {defaults.CONDITION_MIN_TOP1:g}, at most "
            f"{defaults.CONDITION_MAX_DROP:g} below clean, none wrong above 0.5); compare "
            f"anyway with --condition clean (no confidence)")


def _select(rows: list[dict[str, Any]], suspect: dict[str, Any] | None,
            condition: str | None) -> Selection:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(curve_condition(r), []).append(r)
    clean = defaults.CLEAN_CONDITION
    held = ", ".join(sorted(by)) or "none"
    read = None if suspect is None else suspect.get("label")
    if condition is not None:
        if condition in by:
            return Selection(by[condition], condition, read, notes=[f"compared with the "
                             f"{condition} curves, as asked (--condition)"])
        return Selection(by.get(clean, rows), condition, read, inconclusive=(
            f"the bank holds no curves enrolled under {condition!r} (it holds: {held}); "
            f"enroll them with fp enroll --conditions {condition}"))
    if suspect is None:
        return Selection(by.get(clean, rows), clean, None,
                         notes=["the suspects were given as embeddings: their storage was not "
                                "read, and the clean curves are used"])
    label = str(suspect.get("label", ""))
    if label.startswith("mixed"):
        return Selection(by.get(clean, rows), clean, read, inconclusive=(
            f"the suspect files were stored in several ways ({label}); attribute each kind "
            f"of file apart, or name one with --condition"))
    quality = jpeg_quality_of(suspect)
    unread = ("resizing, cropping and noise are not read from the files: name such a "
              "condition with --condition")
    if quality is None:
        if clean in by:
            return Selection(by[clean], clean, read, notes=[unread])
        return Selection(rows, clean, read, inconclusive=(
            f"the suspects are stored {label}, and the bank holds no clean curves (it holds: "
            f"{held})"))
    jpegs = {name: int(params["quality"]) for name, (kind, params) in defaults.CONDITIONS.items()
             if kind == "jpeg" and name in by}
    near = sorted(jpegs, key=lambda n: (abs(jpegs[n] - quality), -jpegs[n]))
    if near and abs(jpegs[near[0]] - quality) <= defaults.JPEG_MATCH:
        return Selection(by[near[0]], near[0], read, notes=[
            f"the suspects are {label} (JPEG quality about {quality}): compared with the "
            f"{near[0]} curves"])
    return Selection(by.get(clean, rows), clean, read, inconclusive=(
        f"the suspects are {label} (JPEG quality about {quality}), and the bank holds no "
        f"curves of a JPEG quality within {defaults.JPEG_MATCH} of it (it holds: {held}). "
        f"JPEG changes the traits fp compares: against clean curves such suspects were "
        f"named right 0.09 of the time at JPEG 75 (docs/attribution.md). Enroll the models "
        f"with --conditions jpeg{_nearest_offered(quality)}, or compare anyway with "
        f"--condition clean"))


def _nearest_offered(quality: int) -> int:
    offered = [int(p["quality"]) for k, p in defaults.CONDITIONS.values() if k == "jpeg"]
    return min(offered, key=lambda q: abs(q - quality))


# -- describing a set ------------------------------------------------------------------


def set_conditions(files: Sequence[bytes | str | Path] | Iterable[bytes | str | Path]
                   ) -> dict[str, Any]:
    """The storage conditions of an image set: a JSON-ready summary.

    ``files`` are image bytes or paths, in the set's order. The JPEG-history test reads the
    first :data:`LATTICE_IMAGES` lossless files.

    Returns:
        ``{"n_images", "formats" {name: count}, "sizes" {"WxH": count}, "modes", "bits",
        "jpeg": {"qualities": [min, median, max], "exact": share, "subsampling": {...}} or
        None, "jpeg_history": the lattice test (or None without lossless files), "label"}``;
        ``label`` names the condition in a few words (e.g. ``lossless``, ``JPEG q75``,
        ``lossless, earlier JPEG``).
    """
    from forensics.data.conditions import LOSSLESS, FileCondition, file_condition, luma
    from forensics.data.images import read_image_file
    from forensics.stats.conditions import jpeg_lattice

    conds: list[FileCondition] = []
    lumas: list[np.ndarray] = []
    for f in files:
        data = f if isinstance(f, bytes) else read_image_file(f)
        c = file_condition(data)
        conds.append(c)
        if c.format in LOSSLESS and len(lumas) < LATTICE_IMAGES:
            lumas.append(luma(data))
    if not conds:
        raise InputError("no images to describe")
    jpegs = [c for c in conds if c.jpeg_quality is not None]
    jpeg = None
    if jpegs:
        q = sorted(c.jpeg_quality for c in jpegs if c.jpeg_quality is not None)
        jpeg = {"qualities": [q[0], q[len(q) // 2], q[-1]],
                "exact": sum(bool(c.jpeg_quality_exact) for c in jpegs) / len(jpegs),
                "subsampling": dict(Counter(c.subsampling or "grey" for c in jpegs))}
    history = jpeg_lattice(lumas).to_dict() if lumas else None
    out = {
        "n_images": len(conds),
        "formats": dict(Counter(c.format for c in conds)),
        "sizes": dict(Counter(f"{c.width}x{c.height}" for c in conds).most_common(5)),
        "modes": dict(Counter(c.mode for c in conds)),
        "bits": sorted({c.bits for c in conds}),
        "jpeg": jpeg,
        "jpeg_history": history,
    }
    out["label"] = condition_label(out)
    return out


def condition_label(summary: dict[str, Any]) -> str:
    """A few words for a set's condition: ``lossless``, ``JPEG q75``, ``lossless, earlier
    JPEG``, or ``mixed: ...`` when the files differ."""
    formats = summary.get("formats") or {}
    n = max(int(summary.get("n_images") or 0), 1)
    jpeg = summary.get("jpeg")
    history = summary.get("jpeg_history") or {}
    parts = []
    n_jpeg = sum(v for k, v in formats.items() if k in ("JPEG", "MPO"))
    if jpeg:
        lo, mid, hi = jpeg["qualities"]
        parts.append(f"JPEG q{mid}" if lo == hi else f"JPEG q{lo}-{hi}")
    if n_jpeg < n:
        parts.append("lossless, earlier JPEG" if history.get("detected") else "lossless")
    return ("mixed: " + " + ".join(parts)) if len(parts) > 1 else (parts[0] if parts else "?")


def _kind(summary: dict[str, Any]) -> tuple[str, int | None]:
    """``("jpeg", quality)`` for JPEG files or lossless files with a JPEG history (the same
    pixels), ``("lossless", None)``, or ``("mixed", None)``."""
    if str(summary.get("label", "")).startswith("mixed"):
        return "mixed", None
    quality = jpeg_quality_of(summary)
    return ("jpeg", quality) if quality is not None else ("lossless", None)


def mismatch(suspect: dict[str, Any] | None, enrolled: Sequence[dict[str, Any] | None]
             ) -> list[str]:
    """Where the suspects' storage differs from the enrolled curves', in plain words.

    ``enrolled`` holds the conditions stored with each enrolled curve (None for curves
    enrolled before conditions were recorded; said once). A JPEG file and a JPEG saved again
    losslessly hold the same pixels and count as alike; JPEG qualities within
    :data:`forensics.defaults.JPEG_MATCH` too.
    """
    if not suspect:
        return []
    known = [e for e in enrolled if e]
    out = []
    if len(known) < len(enrolled):
        out.append(f"{len(enrolled) - len(known)} of {len(enrolled)} enrolled curve(s) were "
                   f"enrolled without a record of how their images were stored")
    if not known:
        return out
    kind, quality = _kind(suspect)

    def alike(e: dict[str, Any]) -> bool:
        k, q = _kind(e)
        return k == kind and (q is None or quality is None
                              or abs(q - quality) <= defaults.JPEG_MATCH)

    differ = Counter(e.get("label", "?") for e in known if not alike(e))
    if differ:
        theirs = ", ".join(f"{k} ({v} curve{'s' if v > 1 else ''})" for k, v in differ.items())
        out.append(f"the suspect images are stored as {suspect.get('label', '?')}, enrolled "
                   f"curves as {theirs}: storage changes the traits fp compares, so an answer "
                   f"against those curves may reflect the storage rather than the generator")
    sizes = set().union(*(e.get("sizes", {}) for e in known))
    mine_sizes = set(suspect.get("sizes") or {})
    if mine_sizes and sizes and not mine_sizes & sizes:
        out.append(f"the suspect images are {', '.join(sorted(mine_sizes))} px, the enrolled "
                   f"ones {', '.join(sorted(sizes))} px (resized or cropped?)")
    return out


#: Format of the stored descriptions of image sets (part of their key).
CONDITIONS_FORMAT = 2


def manifest_conditions(manifest: Any, rows: Sequence[int] | None = None,
                        cache_dir: Any = None) -> dict[str, Any]:
    """:func:`set_conditions` of a manifest's images (``rows``: which entries; None: all).

    Each file is read again and must still have its manifest hash. With ``cache_dir``
    (the embedding cache's folder) the description is stored beside it, in
    ``../conditions/``, keyed by the images' hashes in order and the detector's settings:
    a set described before is not read again.

    Raises:
        InputError: a file is gone or changed since it was listed (named).
    """
    import hashlib

    from forensics.data.images import read_image_file

    idx = list(range(len(manifest))) if rows is None else [int(i) for i in rows]
    stored = None if cache_dir is None else _stored_conditions(
        cache_dir, [manifest.entries[i].sha256 for i in idx])
    if stored is not None and stored.exists():
        try:
            found = json.loads(stored.read_text(encoding="utf-8"))
            if isinstance(found, dict) and found.get("n_images") == len(idx):
                return found
        except (OSError, ValueError):
            pass  # described again below

    def files() -> Iterable[bytes]:
        for i in range(len(manifest)) if rows is None else rows:
            path = manifest.path(int(i))
            try:
                data = read_image_file(path)
            except InputError as exc:
                raise InputError(f"{path}: {exc}") from None
            if hashlib.sha256(data).hexdigest() != manifest.entries[int(i)].sha256:
                raise InputError(f"{path} changed while fp was reading the set; run again")
            yield data

    out = json.loads(json.dumps(set_conditions(files())))  # as read back from the store
    if stored is not None:
        from forensics.data.atomic import atomic_write_text

        try:
            stored.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stored, json.dumps(out, sort_keys=True))
        except OSError:
            pass  # an unwritable cache: described again next time
    return out


def _stored_conditions(cache_dir: Any, hashes: list[str]) -> Path | None:
    """Where the description of the images ``hashes`` is stored (None: no cache)."""
    import hashlib

    from forensics.data.embed import DEFAULT_CACHE, default_cache_dir
    from forensics.stats import conditions as sc

    root = default_cache_dir() if cache_dir is DEFAULT_CACHE else Path(cache_dir)
    settings = {"format": CONDITIONS_FORMAT, "lattice_images": LATTICE_IMAGES,
                "threshold": sc.LATTICE_THRESHOLD, "steps": list(sc.LATTICE_STEPS),
                "frequencies": [list(f) for f in sc.LATTICE_FREQUENCIES],
                "min_block_range": sc.MIN_BLOCK_RANGE}
    key = hashlib.sha256(json.dumps({"settings": settings, "images": hashes},
                                    sort_keys=True).encode()).hexdigest()
    return root.parent / "conditions" / f"{key}.json"
