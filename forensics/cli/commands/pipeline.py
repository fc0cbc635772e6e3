"""Investigator commands: ``fp baseline build``, ``fp curve``, ``fp enroll``, ``fp attribute``.

Each one is a thin shell around one step of :mod:`forensics.steps`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from forensics import defaults
from forensics.cli.commands.bank import _print_table, bank_option, echo_json, printable
from forensics.cli.commands.baseline import baseline_app
from forensics.cli.commands.embed import (
    Pool,
    check_ray,
    echo_skipped,
    ray_option,
    skip_bad_option,
)

#: ``--drop-layers`` as typed: the default layer indices, comma-separated.
_DROP_LAYERS = ",".join(map(str, defaults.DROP_LAYERS))


def _device() -> Any:
    return typer.Option(defaults.DEVICE, "--device", help="auto, cpu, cuda or cuda:N.")


def _batch() -> Any:
    return typer.Option(defaults.BATCH_SIZE, "--batch-size", min=1,
                        help="Images per forward pass.")


def _no_cache() -> Any:
    return typer.Option(False, "--no-cache", help="Do not use the embedding cache.")


def _quiet() -> Any:
    return typer.Option(False, "--quiet", "-q", help="No progress bars.")


def _weights() -> Any:
    return typer.Option(None, "--weights",
                        help="Where the baseline's encoder weights are now, if they moved "
                             "(their SHA-256 must match) [default: as at build time].")


def _tau() -> Any:
    return typer.Option(None, "--tau", min=0.0,
                        help="Cell threshold on the set's share [default: 20/m].")


def _common(device: str, batch_size: int, no_cache: bool, quiet: bool,
            as_json: bool = False, skip_bad: bool = False) -> dict[str, Any]:
    from forensics.data.embed import DEFAULT_CACHE

    return {"device": device, "batch_size": batch_size,
            "cache_dir": None if no_cache else DEFAULT_CACHE,
            "progress": not (quiet or as_json), "skip_bad": skip_bad}


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def parse_drop_layers(text: str) -> tuple[int, ...]:
    """``"0"``, ``"0,3"``, ``""`` or ``"none"`` -> layer indices.

    Raises:
        InputError: an entry is not an integer.
    """
    from forensics.errors import InputError

    text = text.strip().lower()
    if text in ("", "none"):
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--drop-layers {text!r}: give layer indices like 0 or 0,3, "
                         f"or none") from None


def build_cmd(
    name: str = typer.Argument(..., help="Name of the new baseline."),
    train: Path = typer.Option(..., "--train", help="Folder of training images T."),
    heldout: Path = typer.Option(..., "--heldout",
                                 help="Folder of held-out images P (same distribution as T)."),
    encoder: str = typer.Option(..., "--encoder", "-e", help="Encoder name (fp list encoders)."),
    weights: str = typer.Option(None, "--weights",
                                help="hub, a local file, or random:SEED [default: the "
                                     "encoder's]."),
    pool: Pool = typer.Option(Pool(defaults.POOL), "--pool",
                              help="Transformer layers: cls or mean."),
    distance: str = typer.Option(defaults.DISTANCE, "--distance",
                                 help="Distance (fp list distances)."),
    partitioner: str = typer.Option(defaults.PARTITIONER, "--partitioner", help="Partitioner."),
    n_cells: int = typer.Option(defaults.N_CELLS, "--n-cells", min=1, help="Cells per layer."),
    pca_dim: int = typer.Option(defaults.PCA_DIM, "--pca-dim", min=1,
                                help="PCA dimensions before KMeans."),
    n_init: int = typer.Option(defaults.N_INIT, "--n-init", min=1, help="KMeans restarts."),
    seed: int = typer.Option(defaults.SEED, "--seed", help="Seed of every random step."),
    notes: str = typer.Option(None, "--notes", help="Free text stored with the baseline."),
    device: str = _device(),
    batch_size: int = _batch(),
    no_cache: bool = _no_cache(),
    quiet: bool = _quiet(),
    skip_bad: bool = skip_bad_option(),
    ray: str = ray_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the stored row as JSON."),
    bank: Path | None = bank_option(),
    store: Path = typer.Option(None, "--store",
                               help="Folder for T's and P's embeddings on disk (layer-major "
                                    "stores): memory stays bounded for large training sets."),
    search: str = typer.Option(defaults.SEARCH, "--search",
                               help="Nearest-neighbour search of the cells: auto (exact), or "
                                    "the approximate ivf[:nlist=N,nprobe=P,min_rows=R] for "
                                    "very large training sets (recorded in the baseline)."),
) -> None:
    """Embed T and P, build the baseline once (PCA, cells, P->T distances) and store it."""
    import json

    from forensics.steps.build_baseline import build_baseline

    check_ray(ray)
    row = build_baseline(
        name, train, heldout, encoder=encoder, weights=weights, pool=pool.value,
        distance=distance, partitioner=partitioner, seed=seed, n_cells=n_cells,
        pca_dim=pca_dim, n_init=n_init, bank=bank, notes=notes, ray=ray, store=store,
        search=search,
        **_common(device, batch_size, no_cache, quiet, as_json, skip_bad))
    for which, skipped in json.loads(row.get("params_json") or "{}").get("skipped", {}).items():
        for relpath, reason in skipped:
            _err(f"skipped {which} {printable(relpath, 1000)}: {reason}")
    if as_json:
        echo_json(row)
        return
    typer.echo(f"Baseline {row['name']!r} ({row['baseline_id']}): {row['n_train']} training and "
               f"{row['n_heldout']} held-out images, {len(row['layers'])} layers of "
               f"{row['encoder']}.")


def curve_cmd(
    folder: Path = typer.Argument(..., help="Folder of images."),
    baseline: str = typer.Option(None, "--baseline", "-b",
                                 help="Baseline name [default: the bank's only one]."),
    tau: float = _tau(),
    details: bool = typer.Option(False, "--details",
                                 help="With --json: per-image cell, distance, nearest T index."),
    plot: Path = typer.Option(None, "--plot", help="Also save the curve as a PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    weights: str = _weights(),
    device: str = _device(),
    batch_size: int = _batch(),
    no_cache: bool = _no_cache(),
    quiet: bool = _quiet(),
    skip_bad: bool = skip_bad_option(),
    bank: Path | None = bank_option(),
) -> None:
    """The C_T-layer curve of a folder against a stored baseline."""
    from forensics.steps.curve import compute_curve

    if plot is not None:
        from forensics.data.atomic import check_output_file

        check_output_file(plot, "--plot")  # before any work
    res = compute_curve(folder, baseline=baseline, bank=bank, tau=tau, details=details,
                        weights=weights,
                        **_common(device, batch_size, no_cache, quiet, as_json, skip_bad))
    echo_skipped(res.embeddings.manifest)
    curve = res.curve
    if plot is not None:
        from forensics.steps.reports import plot_curves

        plot_curves(curve.layers, curve.values, [], plot,
                    title=f"{folder} vs baseline {res.baseline.name} ({len(res.rows)} images)")
    if as_json:
        echo_json(res.to_dict(details=details))
        return
    _print_table(["layer", "C_T", "cells kept", "status"],
                 [[r.layer, "-" if r.ct != r.ct else f"{r.ct:.4f}",
                   sum(c.kept for c in r.cells), r.status] for r in res.results],
                 title=f"C_T of {folder} ({len(res.rows)} images) vs baseline {res.baseline.name}")
    if plot is not None:
        typer.echo(f"Plot: {plot}")


def enroll_cmd(
    folder: Path = typer.Argument(..., help="Folder of one generator's images."),
    baseline: str = typer.Option(None, "--baseline", "-b",
                                 help="Baseline name [default: the bank's only one]."),
    model: str = typer.Option(..., "--model", "-m", help="Generator name."),
    family: str = typer.Option(..., "--family", "-f", help="Architecture family."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="Checkpoint or release."),
    per_curve: int = typer.Option(defaults.PER_CURVE, "--per-curve", min=2,
                                  help="Images per curve (the paper: 500); the folder is split."),
    split: str = typer.Option("enroll", "--split", help="Split tag stored with the curves."),
    source: str = typer.Option(None, "--source", help="Where the images came from."),
    notes: str = typer.Option(None, "--notes", help="Free text."),
    tau: float = _tau(),
    allow_duplicate: bool = typer.Option(
        False, "--allow-duplicate",
        help="Enroll images that are enrolled against this baseline already (refused "
             "otherwise); the new curves record which ones they repeat."),
    as_json: bool = typer.Option(False, "--json", help="Print the new rows as JSON."),
    weights: str = _weights(),
    device: str = _device(),
    batch_size: int = _batch(),
    no_cache: bool = _no_cache(),
    quiet: bool = _quiet(),
    skip_bad: bool = skip_bad_option(),
    ray: str = ray_option(),
    conditions: str = typer.Option(
        None, "--conditions",
        help="Also enroll the same images under these storage conditions, comma-separated: "
             + ", ".join(defaults.CONDITIONS) + " (each a curve of the same model, marked "
             "with its condition; suspects stored that way are compared with them)."),
    only_conditions: bool = typer.Option(
        False, "--only-conditions",
        help="Enroll only the --conditions curves (the model's clean curves are enrolled "
             "already)."),
    bank: Path | None = bank_option(),
) -> None:
    """Split a generator's images into curves of --per-curve images; store each with provenance."""
    from forensics.errors import InputError
    from forensics.paper.conditions import enroll_conditions, parse_conditions
    from forensics.steps.bank_access import open_bank
    from forensics.steps.enroll import enroll

    check_ray(ray)
    names = parse_conditions(conditions)  # checked before any work
    if only_conditions and not names:
        raise InputError("--only-conditions needs --conditions, e.g. --conditions jpeg75")
    b = open_bank(bank)
    kw = dict(baseline=baseline, model=model, family=family, checkpoint=checkpoint,
              per_curve=per_curve, split=split, bank=b, tau=tau, notes=notes, weights=weights,
              allow_duplicate=allow_duplicate, ray=ray,
              **_common(device, batch_size, no_cache, quiet, as_json, skip_bad))
    ids = [] if only_conditions else enroll(folder, source=source, echo=_err, **kw)
    if names:
        more = enroll_conditions(folder, names, echo=_err, source=source, **kw)
        ids += [i for name in names for i in more[name]]
    if as_json:
        echo_json(b.curves(curve_id=ids))
        return
    typer.echo(f"Enrolled {len(ids)} curve(s) of {printable(model)} ({printable(family)}) in "
               f"{b.path}: {', '.join(ids)}")


def attribute_cmd(
    folders: list[Path] = typer.Argument(
        ..., help="Folder(s) of suspect images, one suspect set each (with --each, every "
                  "sub-folder is one); the bank, baseline and encoder are loaded once."),
    each: bool = typer.Option(False, "--each",
                              help="One suspect set per sub-folder of each FOLDER (a case "
                                   "of many accounts, sites or seizures)."),
    baseline: str = typer.Option(None, "--baseline", "-b",
                                 help="Baseline name [default: the one the bank's curves use]."),
    matcher: str = typer.Option(None, "--matcher",
                                help="zscore, l2, cosine, combined or a plugin's [default: the "
                                     "fingerprint's: zscore for resid-* and proj-mean*, "
                                     "combined for paper and setstats]."),
    fingerprint: str = typer.Option(None, "--fingerprint",
                                    help="What is matched: resid-early (the early layers' "
                                         "set means with the image content regressed out, "
                                         "the default), resid-ct, proj-mean-ct, proj-mean-early, "
                                         "proj-mean, paper (the C_T curve; --fingerprint paper "
                                         "--matcher combined is the paper's method), setstats "
                                         "(mean/std/FID), or a plugin's (fp list fingerprints)."),
    top: int = typer.Option(defaults.TOP, "--top", min=1, help="Matches to list."),
    drop_layers: str = typer.Option(_DROP_LAYERS, "--drop-layers",
                                    help="Layer indices left out of matching, e.g. 0 or 0,3, "
                                         "or none."),
    n_boot: int = typer.Option(defaults.N_BOOT, "--n-boot", min=0,
                               help="Bootstrap resamples for the stability figure (0: none)."),
    seed: int = typer.Option(defaults.SEED, "--seed", help="Seed of the resampling."),
    quantile: float = typer.Option(defaults.QUANTILE, "--quantile", min=0.0, max=1.0,
                                   help="Share of genuine curves accepted to be called unknown."),
    tau: float = _tau(),
    report: Path = typer.Option(None, "--report",
                                help="Write attribution.json, attribution.png and "
                                     "report.html (a self-contained case report) here; "
                                     "re-check it later with fp case verify DIR. A folder "
                                     "holding a report is refused (see --force). Several "
                                     "sets: one sub-folder each and index.html."),
    force: bool = typer.Option(False, "--force",
                               help="Write --report where a report is already; the old one "
                                    "is moved to DIR.replaced-<time>/, never deleted."),
    allow_unverified: bool = typer.Option(
        False, "--allow-unverified",
        help="Use bank rows and baseline files that fail their SHA-256 (refused otherwise); "
             "they are listed in the answer."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    condition: str = typer.Option(
        None, "--condition",
        help="Compare with the enrolled curves of this storage condition (clean, "
             + ", ".join(defaults.CONDITIONS) + ") [default: the one read from the files]."),
    weights: str = _weights(),
    device: str = _device(),
    batch_size: int = _batch(),
    no_cache: bool = _no_cache(),
    quiet: bool = _quiet(),
    skip_bad: bool = skip_bad_option(),
    bank: Path | None = bank_option(),
) -> None:
    """Which enrolled generator made these images? Ranked matches, a decision, a confidence."""
    from forensics.steps.attribute import attribute, attribute_many, suspect_sets

    kw = dict(baseline=baseline, matcher=matcher, fingerprint=fingerprint, top=top,
              drop_layers=parse_drop_layers(drop_layers), n_boot=n_boot, seed=seed,
              quantile=quantile, tau=tau, bank=bank, weights=weights,
              allow_unverified=allow_unverified, condition=condition,
              **_common(device, batch_size, no_cache, quiet, as_json, skip_bad))
    if each or len(folders) > 1:
        sets = suspect_sets(folders, each=each)
        answers = attribute_many(sets, report=report, force=force,
                                 on_answer=_echo_json_line if as_json else None, **kw)
        if not as_json:
            _print_many(answers, report)
        failed = [a for a in answers if a.result is None]
        if failed:
            raise typer.Exit(1)
        return
    folder = folders[0]
    result = attribute(folder, report=report, force=force, **kw)
    for relpath, reason in result.curve.provenance.get("skipped", []):
        _err(f"skipped {printable(relpath, 1000)}: {reason}")
    if as_json:
        echo_json(result.to_dict())
        return
    d = result.decision
    verdict = (f"UNKNOWN (closest family {printable(d.closest or d.nearest_family)}, not "
               f"the decision)" if d.unknown else
               f"family {printable(d.family)}, model {printable(d.model)}")
    if d.inconclusive:
        verdict = "INCONCLUSIVE (no enrolled curves stored like these images)"
    conf = "" if d.confidence is None else f"   confidence {d.confidence:.2f}"
    _print_table(["rank", "curve_id", "model", "family", "score"],
                 [[m.rank, m.curve_id, m.model, m.family, f"{m.score:.4f}"]
                  for m in result.ranking],
                 title=f"{folder}: nearest enrolled curves ({result.parameters['fingerprint']}, "
                       f"{result.parameters['matcher']})")
    if result.belonging:
        _print_table(["model", "family", "p-value", "consistent"],
                     [[t.model, t.family, "-" if t.p_value is None else f"{t.p_value:.3f}",
                       "yes" if t.consistent else "no"] for t in result.belonging[:top]],
                     title=f"Could the suspects have come from this model? (level "
                           f"{result.parameters['quantile']:g})")
    models = ", ".join(f"{printable(c['model'])} (p {c['p_value']:.3f})"
                       for c in d.consistent) or "none"
    typer.echo(f"Model level: consistent with {models}")
    typer.echo(f"Decision: {verdict}{conf}")
    typer.echo(f"  {printable(d.reason, 1000)}")
    if d.stability is not None and result.bootstrap is not None:
        typer.echo(f"  stability {d.stability:.2f}: share of {result.bootstrap.n_boot} "
                   f"resamples of these images giving the same answer. It says how much the "
                   f"answer depends on which images were given, not whether it is right "
                   f"(that is the confidence)")
    if result.conditions:
        used = result.conditions["compared_with"]
        typer.echo(f"  stored as: {result.conditions['suspect']['label']}; compared with the "
                   f"{used['condition']} curves ({used['n_curves']})")
        for line in [*used["notes"], *result.conditions["mismatch"]]:
            typer.echo(f"  note: {printable(line, 1000)}")
    if result.calibration.threshold is None:
        typer.echo(f"  note: {result.calibration.note}")
    for p in (result.custody or {}).get("unverified", []):
        typer.echo(f"  warning: used although it fails its hash (--allow-unverified): "
                   f"{p['table']} {printable(p['id'])}: {p['problem']}", err=True)
    if report is not None:
        typer.echo(f"Report: {report}")


def _echo_json_line(answer) -> None:
    """One suspect set's answer as one line of JSON (JSON Lines), as soon as it is ready."""
    import json

    from forensics.jsonable import jsonable

    typer.echo(json.dumps(jsonable(answer.to_dict()), allow_nan=False))


def _print_many(answers, report: Path | None) -> None:
    """One row per suspect set; the sets without an answer on stderr, with why."""
    rows = []
    for a in answers:
        if a.result is None:
            rows.append([a.folder, "-", "-", "FAILED", "-"])
            continue
        d = a.result.decision
        rows.append([a.folder, a.result.curve.provenance.get("inputs", {}).get("n_images"),
                     d.model_level(), d.family_level(),
                     "-" if d.confidence is None else f"{d.confidence:.2f}"])
    _print_table(["suspect set", "images", "model level", "family level", "confidence"], rows,
                 title=f"{len(answers)} suspect sets")
    for a in answers:
        if a.result is None:
            _err(f"Error: {printable(a.folder, 1000)}: {a.error['message']}")
    if report is not None:
        typer.echo(f"Reports: {report} (index.html)")


def register(app: typer.Typer) -> None:
    baseline_app.command("build")(build_cmd)
    app.command("curve")(curve_cmd)
    app.command("enroll")(enroll_cmd)
    app.command("attribute")(attribute_cmd)
