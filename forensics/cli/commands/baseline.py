"""``fp baseline list|show|remove``: baselines stored in the bank.

Commands that build baselines add themselves to :data:`baseline_app`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from forensics.cli.commands.bank import (
    _print_table,
    _short_time,
    bank_option,
    echo_json,
    printable,
)

baseline_app = typer.Typer(
    name="baseline",
    help="Baselines: reference (T) and held-out (P) embeddings that curves are measured against.",
    no_args_is_help=True,
)


@baseline_app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print full rows as JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """List the baselines in the bank."""
    from forensics.steps.bank_access import open_bank

    b = open_bank(bank)
    rows = b.baselines()
    if as_json:
        echo_json(rows)
        return
    if not rows:
        typer.echo(f"No baselines in the bank at {b.path}; build one with: fp baseline build "
                   f"NAME --train DIR --heldout DIR --encoder E")
        return
    counts: dict[str, int] = {}
    for c in b.curves():
        counts[c["baseline_id"]] = counts.get(c["baseline_id"], 0) + 1
    _print_table(
        ["name", "baseline_id", "encoder", "layers", "T", "P", "curves", "created"],
        [[r["name"], r["baseline_id"], r["encoder"], len(r["layers"]), r["n_train"],
          r["n_heldout"], counts.get(r["baseline_id"], 0), _short_time(r["created"])]
         for r in rows],
        title=f"{len(rows)} baseline(s) in {b.path}",
    )


@baseline_app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="Baseline name or id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """Show one baseline: every column and where its files are."""
    from forensics.steps.bank_access import open_bank

    b = open_bank(bank)
    row = b.get_baseline(name)
    row["folder"] = str(b.baseline_dir(row["baseline_id"]))
    if as_json:
        echo_json(row)
        return
    for key, value in row.items():
        if key == "params_json":
            value = json.dumps(json.loads(value), sort_keys=True)
        elif key == "layers":
            value = ", ".join(value)
        typer.echo(f"{key:24} {printable(value, 2000) if value is not None else '-'}")


@baseline_app.command("remove")
def remove_cmd(
    name: str = typer.Argument(..., help="Baseline name or id."),
    with_curves: bool = typer.Option(
        False, "--with-curves", help="Also remove the curves enrolled against it."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the removed baseline as JSON."),
    bank: Path | None = bank_option(),
) -> None:
    """Remove a baseline and its files (refused while curves use it, unless --with-curves)."""
    from forensics.steps.bank_access import open_bank

    b = open_bank(bank)
    before = len(b.curves())
    row = b.remove_baseline(name, with_curves=with_curves)
    if as_json:
        echo_json({"bank": str(b.path), "removed": {"name": row["name"],
                                                    "baseline_id": row["baseline_id"]},
                   "curves_removed": before - len(b.curves())})
        return
    typer.echo(f"Removed baseline {row['name']!r} ({row['baseline_id']}) from {b.path}.")


def register(app: typer.Typer) -> None:
    app.add_typer(baseline_app, name="baseline")
