"""Enrol a generator: its images cut into curves of N, each measured and stored in the bank."""

from __future__ import annotations

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
from forensics.steps.curve import _check_tau, _embed_suspect, _fingerprint_objects, _measure
from forensics.threads import _one_thread


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
            f"lower --per-curve (C_T needs more than 20 images in a cell with the default tau)"
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
    return b.add_curves(rows, allow_duplicate=allow_duplicate)


def _refuse_enrolled(b: Any, loaded: LoadedBaseline, manifest: Any, k: int, per: int,
                     folder: PathLike) -> None:
    """Refuse, before embedding, images enrolled against this baseline already."""
    from forensics.data.images import Manifest
    from refbank.bank import duplicate_message

    bid = loaded.row["baseline_id"]
    rows = [{"baseline_id": bid,
             "manifest_sha256": Manifest(manifest.root, manifest.entries[c * per:(c + 1) * per]
                                         ).sha256,
             "params": {"folder_manifest_sha256": manifest.sha256}} for c in range(k)]
    found = b.find_duplicates(rows)
    if found:
        i, hit = found[0]
        raise BankError(duplicate_message(f"{folder} (curve {i + 1} of {k})", hit, loaded.name))


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
        spreads=True,
    )
    row = res.curve.to_row(**labels)
    if res.curve.provenance.get("skipped"):  # the folder's files left out with skip_bad
        row["params"]["skipped"] = res.curve.provenance["skipped"]
    row["params"]["folder_manifest_sha256"] = folder_sha  # the folder the curve was cut from
    row["fingerprints"] = {name: vec.tolist() for name, vec in res.fingerprints.items()}
    row["fingerprints"].update({var_key(name): var.tolist()
                                for name, var in res.spreads.items()})
    row["fingerprints"].update({rows_key(name): pack_rows(r)
                                for name, r in res.image_rows.items()})
    return row
