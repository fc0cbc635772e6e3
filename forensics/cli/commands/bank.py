"""``fp bank list|show|remove|export|import|import-curves|verify|info``: the reference bank.

:func:`bank_option` is how every command that uses the bank (``fp enroll``, ``fp attribute``,
``fp baseline ...``) takes ``--bank`` / ``FP_BANK``; each opens it with
:func:`forensics.steps.bank_access.open_bank`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from forensics.errors import SHOWN_MAX, printable  # noqa: F401 - used by other commands

BANK_HELP = (
    "Bank folder (default: $FP_BANK, else the user data folder, e.g. ~/.local/share/fp/bank)."
)

bank_app = typer.Typer(
    name="bank",
    help="Inspect, verify, export and import the reference bank of enrolled curves.",
    no_args_is_help=True,
)


def bank_option() -> Any:
    """The ``--bank`` option (also read from ``FP_BANK``) for any command's signature."""
    return typer.Option(None, "--bank", envvar="FP_BANK", help=BANK_HELP, show_envvar=False)


def echo_json(data: Any) -> None:
    """Print bank rows or reports as strict JSON."""
    from refbank.bank import rows_to_json

    typer.echo(rows_to_json(data))


def _short_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if hasattr(value, "strftime") else str(value or "")


def _print_table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not str: rich would read "[...]" in a model name as markup.
    table = Table(title=None if title is None else Text(printable(title, 400)))
    for c in columns:
        table.add_column(Text(printable(c)))
    for r in rows:
        table.add_row(*(Text("-" if v is None else printable(v)) for v in r))
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze ids into 80 columns
        console = Console(width=200)
    console.print(table)


@bank_app.command("list")
def list_cmd(
    model: str | None = typer.Option(None, "--model", help="Only curves of this model."),
    family: str | None = typer.Option(None, "--family", help="Only curves of this family."),
    baseline: str | None = typer.Option(None, "--baseline", help="Only curves of this baseline."),
    as_json: bool = typer.Option(False, "--json", help="Print full rows as JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """List enrolled curves."""
    from forensics.steps.bank_access import open_bank

    b = open_bank(bank)
    b.require()  # a mistyped --bank is not an empty bank
    bid = b.get_baseline(baseline)["baseline_id"] if baseline else None
    rows = b.curves(model=model, family=family, baseline_id=bid)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        typer.echo(f"No curves in the bank at {b.path}" + (" match." if (model or family or
                   baseline) else "; enroll some with: fp enroll DIR --baseline NAME "
                   "--model M --family F"))
        return
    names = {r["baseline_id"]: r["name"] for r in b.baselines()}
    _print_table(
        ["curve_id", "model", "family", "checkpoint", "split", "baseline", "images", "created"],
        [[r["curve_id"], r["model"], r["family"], r["checkpoint"], r["split"],
          names.get(r["baseline_id"], r["baseline_id"]), r["n_images"], _short_time(r["created"])]
         for r in rows],
        title=f"{len(rows)} curve(s) in {b.path}",
    )


@bank_app.command("show")
def show_cmd(
    curve_id: str = typer.Argument(..., help="Curve id (see fp bank list)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """Show one curve: every column, and its values per layer."""
    from forensics.steps.bank_access import open_bank

    row = open_bank(bank).get_curve(curve_id)
    if as_json:
        echo_json(row)
        return
    for key, value in row.items():
        if key not in ("layers", "values"):
            limit = SHOWN_MAX if key in ("model", "family", "checkpoint", "split") else 20_000
            typer.echo(f"{key:16} {printable(value, limit) if value is not None else '-'}")
    _print_table(["layer", "C_T"], [[n, f"{v:.6g}"] for n, v in zip(row["layers"], row["values"],
                                                                  strict=True)])


@bank_app.command("remove")
def remove_cmd(
    curve_ids: list[str] = typer.Argument(..., help="Curve ids to remove."),
    as_json: bool = typer.Option(False, "--json", help="Print the removed ids as JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """Remove curves by id (all or none: an unknown id removes nothing)."""
    from forensics.steps.bank_access import open_bank

    b = open_bank(bank)
    removed = b.remove_curves(curve_ids)
    if as_json:
        echo_json({"bank": str(b.path), "removed": list(removed)})
        return
    typer.echo(f"Removed {len(removed)} curve(s) from {b.path}.")


@bank_app.command("export")
def export_cmd(
    file: Path = typer.Argument(..., help="New archive file (.tar, or .tar.gz / .tgz)."),
    as_json: bool = typer.Option(False, "--json", help="Print the archive's path, size "
                                                      "and SHA-256 as JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """Write the whole bank to one archive file (never overwrites)."""
    from forensics.steps.bank_access import open_bank

    b = open_bank(bank)
    target = b.export(file)
    if as_json:
        from refbank.hashing import file_sha256

        echo_json({"bank": str(b.path), "archive": str(target),
                   "bytes": target.stat().st_size, "sha256": file_sha256(target),
                   "n_curves": len(b.curves()), "n_baselines": len(b.baselines())})
        return
    typer.echo(f"Exported {b.path} to {target}.")


@bank_app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="An archive written by fp bank export."),
    max_size: float = typer.Option(None, "--max-size", min=0.0,
                                   help="Refuse archives that unpack to more than this many "
                                        "GB (checked before anything is unpacked) "
                                        "[default: 64]."),
    as_json: bool = typer.Option(False, "--json", help="Print what was imported as JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """Merge an exported bank into this one, after checking every hash."""
    from forensics import defaults
    from forensics.errors import InputError
    from forensics.steps.bank_access import open_bank

    if max_size is not None and not max_size <= defaults.MAX_IMPORT_GB:  # inf, nan, 1e308
        raise InputError(f"--max-size {max_size:g}: give a number of GB from 0 to "
                         f"{defaults.MAX_IMPORT_GB:,.0f}")
    b = open_bank(bank)
    report = b.import_(file, max_bytes=None if max_size is None else int(max_size * 1e9))
    if as_json:
        echo_json(report.to_dict())
        return
    typer.echo(
        f"Imported into {b.path}: {len(report.added_curves)} curve(s) and "
        f"{len(report.added_baselines)} baseline(s) added; {len(report.skipped_curves)} "
        f"curve(s) and {len(report.skipped_baselines)} baseline(s) already present."
    )


@bank_app.command("import-curves")
def import_curves_cmd(
    file: Path = typer.Argument(..., help="Curve file written by another tool."),
    fmt: str = typer.Option("layerchoice", "--format",
                            help="File format: layerchoice (the C_T-layer authors' files)."),
    baseline: str | None = typer.Option(
        None, "--baseline",
        help="Baseline to file the curves under (default layerchoice-vit-b16-cifar10; "
             "created if absent)."),
    split: str | None = typer.Option(
        None, "--split", help="Split (enroll or query) of curves whose name has no "
                              "_train/_test part; default: such a curve is an error."),
    as_json: bool = typer.Option(False, "--json", help="Print what was imported as JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """Import curves computed elsewhere (e.g. the paper's own curve files)."""
    from forensics.data.curvefiles import import_curves
    from forensics.steps.bank_access import open_bank

    b = open_bank(bank)
    report = import_curves(b, file, fmt=fmt, baseline=baseline, default_split=split)
    if as_json:
        echo_json(report)
        return
    made = " (created)" if report["created_baseline"] else ""
    typer.echo(
        f"Imported {len(report['curve_ids'])} curve(s) from {file} into {b.path} under "
        f"baseline {report['baseline']!r}{made}: {report['n_enroll']} enroll, "
        f"{report['n_query']} query.\nEvaluate them with: fp evaluate --fingerprint paper "
        f"--baseline {report['baseline']}"
    )


@bank_app.command("verify")
def verify_cmd(
    key: Path = typer.Option(None, "--key",
                             help="The curator's Ed25519 public key (PEM): every record of "
                                  "the bank's log must be signed by it."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """Check every row hash, baseline file and the bank's log; exit status 1 if anything fails.

    The log chains every change to the one before; rows are checked against it, so a row
    rewritten and re-hashed by another tool fails. With --key, every record must carry
    that key's signature.
    """
    from forensics.errors import BankError
    from forensics.steps.bank_access import open_bank

    b = open_bank(bank)
    report = b.verify(key=key)
    if as_json:
        echo_json(report.to_dict())
    else:
        typer.echo(f"Bank {report.path} (schema {report.schema_version}): "
                   f"{report.n_curves} curve(s), {report.n_baselines} baseline(s).")
        for p in report.problems:
            typer.echo(f"FAIL {p.table} {p.id}: {p.problem}")
        for w in report.warnings:
            typer.echo(f"warning: {w}")
        if report.log_head is not None:
            signed = f", every record signed by key {report.signed_by[:16]}..." \
                if report.signed_by and report.ok else ""
            typer.echo(f"Log: {report.log_records} record(s), head {report.log_head['seq']} "
                       f"{report.log_head['hash']}{signed}.")
        if report.ok:
            typer.echo("OK: every row and file matches its hash and the bank's log.")
    if not report.ok:
        raise BankError(
            f"{len(report.problems)} problem(s) in the bank at {b.path}; restore it from an "
            f"export (fp bank import) or remove the rows named above"
        )


@bank_app.command("info")
def info_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """Show where the bank is, its schema version and how much it holds."""
    from forensics.steps.bank_access import open_bank

    info = open_bank(bank).info()
    if as_json:
        echo_json(info)
        return
    for key, value in info.items():
        typer.echo(f"{key:15} {value}")


def register(app: typer.Typer) -> None:
    app.add_typer(bank_app, name="bank")
