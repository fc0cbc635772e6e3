"""The ``fp`` command line.

This module builds the Typer app and nothing else: each command lives in a module of
:mod:`forensics.commands` and imports its heavy dependencies inside the command body, so
``fp --help`` and ``fp --version`` import no torch, sklearn, scipy or pyarrow.
"""

from __future__ import annotations

import importlib
import os
import sys

import click
import typer
from typer.core import TyperGroup

from forensics._version import __version__
from forensics.errors import FpError

#: Modules under ``forensics.commands`` whose ``register(app)`` adds commands.
COMMAND_MODULES: tuple[str, ...] = (
    "forensics.commands.plugins",
    "forensics.commands.synth",
    "forensics.commands.bank",
    "forensics.commands.baseline",
    "forensics.commands.ct",
    "forensics.commands.encoders",
    "forensics.commands.embed",
    "forensics.commands.pipeline",
    "forensics.commands.demo",
    "forensics.commands.invmm",
    "forensics.commands.evaluate",
    "forensics.commands.memorization",
)


def _debug_enabled(ctx: click.Context | None) -> bool:
    if os.environ.get("FP_DEBUG"):
        return True
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and isinstance(root.obj, dict) and root.obj.get("debug"))


class FpGroup(TyperGroup):
    """A Typer group that turns :class:`FpError` into ``Error: ...`` and exit status 1."""

    def invoke(self, ctx: click.Context):  # noqa: D102
        try:
            return super().invoke(ctx)
        except FpError as exc:
            if _debug_enabled(ctx):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)


app = typer.Typer(
    cls=FpGroup,
    name="fp",
    help="Forensics for generative image models: C_T-layer curves, attribution, memorization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    ctx.obj = {"debug": debug}


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    """Console-script entry point."""
    # Idle OpenMP threads that spin steal the CPU from the next small fit (KMeans, PCA);
    # on a shared or small machine that made fits tens of times slower. Users may override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app(prog_name="fp")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
