"""``fp case verify REPORT_DIR``: re-check an attribution report against images and bank."""

from __future__ import annotations

from pathlib import Path

import typer

from forensics.cli.commands.bank import echo_json, printable

case_app = typer.Typer(
    name="case",
    help="Chain of custody: re-check attribution reports against the images and the bank.",
    no_args_is_help=True,
)


@case_app.command("verify")
def verify_cmd(
    report: Path = typer.Argument(..., help="A folder written by fp attribute --report DIR "
                                            "(or its attribution.json)."),
    images: Path = typer.Option(None, "--images",
                                help="Where the suspect images are now [default: the folder "
                                     "the report names]."),
    as_json: bool = typer.Option(False, "--json", help="Print the check as JSON."),
    bank: Path | None = typer.Option(None, "--bank",
                                     help="The bank [default: the one the report names]."),
) -> None:
    """Say what changed since the report: images, baseline files, enrolled curves.

    Exit status 0 when everything is as recorded, 1 when something changed.
    """
    from forensics.errors import FpError
    from forensics.steps.case import verify_case

    check = verify_case(report, bank=bank, images=images)
    if as_json:
        echo_json(check.to_dict())
    else:
        typer.echo(f"Report {check.report}: {check.n_images} image(s) in {check.images}, "
                   f"{check.n_curves} curve(s) and {check.n_baseline_files} baseline file(s) "
                   f"in {check.bank}.")
        for c in check.changes:
            detail = f" ({printable(c.detail)})" if c.detail else ""
            typer.echo(f"CHANGED {c.kind} {printable(c.id)}: {c.change}{detail}")
        if check.ok:
            typer.echo("OK: the images, the baseline and the curves are as the report "
                       "recorded them.")
    if not check.ok:
        raise FpError(f"{len(check.changes)} change(s) since the report was written; the "
                      f"answer may no longer hold: attribute again")


def register(app: typer.Typer) -> None:
    app.add_typer(case_app, name="case")
