"""Enrol a generator: its images cut into curves of N, each measured and stored in the bank."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from forensics import defaults
from forensics.data.embed import DEFAULT_CACHE, Embeddings
from forensics.errors import BankError, InputError, InsufficientDataError
from forensics.stats.belonging import pack_rows, rows_key
from forensics.stats.confidence import var_key
from forensics.steps.bank_access import (
    LoadedBaseline,
    PathLike,
    _absolute,
    load_baseline,
    open_bank,
)
from forensics.steps.curve import (
    _check_tau,
    _embed_suspect,
    _fingerprint_objects,
    _measure,
    undefined_layers,
)
from forensics.threads import _one_thread

#: Key in a curve's ``params`` naming the layers where its C_T is undefined, and why.
CT_UNDEFINED = "ct_undefined"


def enroll(
    folder: PathLike,
    *,
    baseline: str | None,
    model: str,
    family: str,
    checkpoint: str | None = None,
    per_curve: int = defaults.PER_CURVE,
    split: str = "enroll",
    bank: Any = None,
    tau: float | None = None,
    source: str | None = None,
    notes: str | None = None,
    weights: str | None = None,
    device: str = defaults.DEVICE,
    batch_size: int = defaults.BATCH_SIZE,
    cache_dir: Any = DEFAULT_CACHE,
    progress: bool = False,
    skip_bad: bool = False,
    allow_duplicate: bool = False,
    echo: Callable[[str], None] | None = None,
    ray: str | None = None,
    condition: str | None = None,
) -> list[str]:
    """Split a generator's images into curves of ``per_curve`` images and store each.

    The images are taken in manifest order (sorted relative paths): curve k uses images
    ``k*N .. (k+1)*N - 1``; a remainder smaller than N is left out (``echo`` says so).
    Every registered fingerprint is computed and stored with each curve.

    Args:
        folder: the generator's images.
        baseline: baseline name or id (None: the bank's only baseline).
        model, family: the generator and its family.
        checkpoint: checkpoint or release of the generator.
        per_curve: images per curve (the paper: 500).
        split: split tag stored with the rows.
        bank: the bank.
        tau: cell threshold; default 20/N.
        source, notes: stored with the rows.
        weights, device, batch_size, cache_dir, progress, skip_bad: as for
            :func:`compute_curve`.
        allow_duplicate: enroll images that are enrolled against this baseline already
            (refused otherwise, before embedding); the new rows record the curves they
            repeat (``duplicate_of`` in their parameters).
        echo: called with messages for the user (e.g. images left out).
        ray: embed on a Ray cluster (``auto``, ``local`` or an address; see
            :func:`~forensics.data.embed.embed_folder`); None: in this process.
        condition: the storage condition the images were put under (one of
            :data:`forensics.defaults.CONDITIONS`; None: as the generator wrote them),
            stored as the curves' ``params.condition`` (see :mod:`forensics.steps.storage`).

    Returns:
        The new curve ids, in order.

    Raises:
        InsufficientDataError: fewer images than ``per_curve``, or too few for tau.
        BankError: the images are enrolled already, the bank is read-only, or see
            :func:`compute_curve`.
        InputError: see :func:`compute_curve`; labels with control characters.
    """
    from forensics.data.images import scan_folder
    from forensics.plugin.encoders import resolve_device
    from refbank.bank import check_labels

    say = echo or (lambda _msg: None)
    if int(per_curve) < 2:
        raise InputError(f"--per-curve must be at least 2 images, got {per_curve}")
    for what, value in (("model", model), ("family", family)):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"--{what} must be a non-empty name")
    _check_tau(tau)
    from forensics.steps.storage import check_condition

    if check_condition(condition) == defaults.CLEAN_CONDITION:
        condition = None
    check_labels({"model": model, "family": family, "checkpoint": checkpoint, "split": split,
                  "source": source, "notes": notes})
    b = open_bank(bank)
    b.check_writable()
    embed_device = device if ray is not None else None  # Ray actors: the cluster's devices
    device = resolve_device(device)
    loaded = load_baseline(baseline, bank=b, device=device)
    manifest = scan_folder(folder, skip_bad=skip_bad)
    for s in manifest.skipped:
        say(f"skipped {s.relpath}: {s.reason}")
    n, per = len(manifest), int(per_curve)
    if n < per:
        raise InsufficientDataError(
            f"{folder} holds {n} image(s), fewer than --per-curve {per}; add images or "
            f"lower --per-curve (--per-curve {n} enrolls them as one curve)"
        )
    k, rest = divmod(n, per)
    if not allow_duplicate:
        _refuse_enrolled(b, loaded, manifest, k, per, folder)
    if rest:
        say(f"{folder}: {k} curve(s) of {per} images; the last {rest} image(s) in path order "
            f"are left out (fewer than --per-curve {per})")
    emb = _embed_suspect(loaded, manifest, weights=weights, device=embed_device or device,
                         batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                         skip_bad=skip_bad, ray=ray)
    fps, missing = _fingerprint_objects(None, loaded, strict=False)
    for msg in missing:
        say(msg + "; curves are stored without it")
    labels = dict(model=model, family=family, checkpoint=checkpoint, source=source,
                  notes=notes, split=split)
    with _one_thread():
        rows = [_enroll_chunk(loaded, emb, c, k, per, fps, folder, tau, manifest.sha256, labels)
                for c in range(k)]
    for c, row in enumerate(rows):  # what the duplicate check compares, per image
        row["params"]["image_sha256"] = _chunk_hashes(emb.manifest or manifest, c, per)
        if condition is not None:
            row["params"]["condition"] = condition
    note = _undefined_note(rows, fps)
    if note:
        say(note)
    return b.add_curves(rows, allow_duplicate=allow_duplicate)


def _undefined_note(rows: list[dict[str, Any]], fps: Sequence[Any]) -> str | None:
    """One message for the curves whose C_T is undefined at some layer (None: no such)."""
    from forensics.stats import fingerprints as fpmod

    small = [r for r in rows if r["params"].get(CT_UNDEFINED)]
    if not small:
        return None
    layers = sorted({x for r in small for x in r["params"][CT_UNDEFINED]["layers"]})
    reading = sorted(fp.name for fp in fps if fpmod.needs_ct(fp))
    return (f"C_T is undefined for {len(small)} of {len(rows)} curve(s) at {len(layers)} "
            f"layer(s): {small[0]['params'][CT_UNDEFINED]['reason']}. They are stored "
            f"without the fingerprints that read C_T "
            f"({', '.join(reading) or 'none'}); fp attribute's default fingerprint "
            f"({defaults.FINGERPRINT}) reads no C_T and matches them")


def _refuse_enrolled(b: Any, loaded: LoadedBaseline, manifest: Any, k: int, per: int,
                     folder: PathLike) -> None:
    """Refuse, before embedding, images enrolled against this baseline already."""
    from forensics.data.images import Manifest
    from refbank.bank import duplicate_message

    bid = loaded.row["baseline_id"]
    rows = [{"baseline_id": bid,
             "manifest_sha256": Manifest(manifest.root, manifest.entries[c * per:(c + 1) * per]
                                         ).sha256,
             "params": {"folder_manifest_sha256": manifest.sha256,
                        "image_sha256": _chunk_hashes(manifest, c, per)}} for c in range(k)]
    found = b.find_duplicates(rows)
    if found:
        i, hit = found[0]
        msg = duplicate_message(f"{folder} (curve {i + 1} of {k})", hit, loaded.name)
        if hit.get("shared_images"):
            enrolled = {sha for r in b.curves(baseline_id=bid)
                        for sha in json.loads(r["params_json"]).get("image_sha256", [])}
            files = [e.relpath for e in manifest.entries[i * per:(i + 1) * per]
                     if e.sha256 in enrolled]
            more = f" and {len(files) - 5} more" if len(files) > 5 else ""
            msg += f". The files: {', '.join(repr(f) for f in files[:5])}{more}"
        raise BankError(msg)


def _chunk_hashes(manifest: Any, c: int, per: int) -> list[str]:
    """The SHA-256 of each image of chunk ``c`` (the images of one curve), in order."""
    return [e.sha256 for e in manifest.entries[c * per:(c + 1) * per]]


def _enroll_chunk(loaded: LoadedBaseline, emb: Embeddings, c: int, k: int, per: int,
                  fps: Sequence[Any], folder: PathLike, tau: float | None,
                  folder_sha: str, labels: dict[str, Any]) -> dict[str, Any]:
    """The bank row of chunk ``c`` of ``k`` (``labels``: model, family, ...)."""
    idx = np.arange(c * per, (c + 1) * per)
    res = _measure(
        loaded, emb, idx, tau=tau, details=False, fps=fps, folder=str(_absolute(folder)),
        what=f"{folder} (curve {c + 1} of {k}: images {c * per}..{(c + 1) * per - 1})",
        extra={"chunk": {"index": c, "of": k, "start": c * per, "stop": (c + 1) * per,
                         "folder_manifest_sha256": folder_sha}},
        spreads=True, undefined_ok=True,
    )
    row = res.curve.to_row(**labels)
    undefined = undefined_layers(res.results)
    if undefined:  # too few images for C_T there: said once by enroll, refused by C_T matching
        from forensics.stats.ct import needed_count

        r = next(r for r in res.results if r.layer == undefined[0])
        need = needed_count(r.tau, r.m)
        row["params"][CT_UNDEFINED] = {
            "layers": undefined,
            "reason": (f"no cell holds {need} of the curve's {per} images (C_T needs about "
                       f"{need * len(r.cells)} spread over {len(r.cells)} cells)")}
    if res.curve.provenance.get("skipped"):  # the folder's files left out with skip_bad
        row["params"]["skipped"] = res.curve.provenance["skipped"]
    row["params"]["folder_manifest_sha256"] = folder_sha  # the folder the curve was cut from
    if emb.manifest is not None:  # how the curve's images were stored
        from forensics.steps.storage import manifest_conditions

        row["params"]["conditions"] = manifest_conditions(emb.manifest, idx)
    row["fingerprints"] = {name: vec.tolist() for name, vec in res.fingerprints.items()}
    row["fingerprints"].update({var_key(name): var.tolist()
                                for name, var in res.spreads.items()})
    row["fingerprints"].update({rows_key(name): pack_rows(r)
                                for name, r in res.image_rows.items()})
    return row
