"""The ``fp`` command line.

This module builds the Typer app and nothing else: each command lives in a module of
:mod:`forensics.cli.commands` and imports its heavy dependencies inside the command body, so
``fp --help`` and ``fp --version`` import no torch, sklearn, scipy or pyarrow.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import click
import typer
from typer.core import TyperGroup

from forensics._version import __version__
from forensics.cli.output import json_error, keep_help_literal, walk
from forensics.errors import FpError, FpWarning

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT = 130
#: What Ctrl-C prints: a change to the bank is all or nothing, so what was reported done
#: (e.g. "Enrolled ...") is kept.
INTERRUPTED = ("Interrupted (Ctrl-C); stopped before finishing. Bank changes are all or "
               "nothing: one already reported (e.g. Enrolled ...) is committed, one not yet "
               "reported was not made.")

#: Modules under ``forensics.cli.commands`` whose ``register(app)`` adds commands.
COMMAND_MODULES: tuple[str, ...] = (
    "forensics.cli.commands.plugins",
    "forensics.cli.commands.synth",
    "forensics.cli.commands.bank",
    "forensics.cli.commands.baseline",
    "forensics.cli.commands.ct",
    "forensics.cli.commands.encoders",
    "forensics.cli.commands.embed",
    "forensics.cli.commands.pipeline",
    "forensics.cli.commands.demo",
    "forensics.cli.commands.invmm",
    "forensics.cli.commands.evaluate",
    "forensics.cli.commands.memorization",
    "forensics.cli.commands.cache",
    "forensics.cli.commands.case",
)


#: The top-level commands as users meet them: ``fp --help`` shows one panel each, in this
#: order, with the commands in the order given.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Investigate", ("attribute", "case")),
    ("Build the bank", ("baseline", "enroll", "bank")),
    ("Memorization", ("memorization", "memorize", "invmm")),
    ("Research", ("curve", "ct", "evaluate", "synth", "embed")),
    ("Set-up", ("encoders", "plugins", "list", "cache", "demo")),
)


def _debug_enabled(ctx: click.Context | None) -> bool:
    if os.environ.get("FP_DEBUG"):
        return True
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and isinstance(root.obj, dict) and root.obj.get("debug"))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"Warning: {message}", err=True)


class FpGroup(TyperGroup):
    """A Typer group that turns :class:`FpError` into ``Error: ...`` and exit status 1.

    Ctrl-C prints one line and exits with status 130. :class:`FpWarning` is printed as
    ``Warning: ...``; other libraries' warnings (Pillow, torch) are hidden unless
    ``--debug``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for command in walk(self):
            keep_help_literal(command)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The top-level commands in :data:`PANELS` order (Typer lists groups last)."""
        names = super().list_commands(ctx)
        if ctx.parent is not None:
            return names
        rank = {name: i for i, name in enumerate(n for _, ns in PANELS for n in ns)}
        return sorted(names, key=lambda n: rank.get(n, len(rank)))

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:  # noqa: D102
        words = args[: args.index("--")] if "--" in args else args
        ctx.meta["fp.json"] = "--json" in words
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):  # noqa: D102
        debug = bool(os.environ.get("FP_DEBUG") or ctx.params.get("debug"))
        if not debug:  # e.g. matplotlib's notice of a temporary cache with a read-only home
            import logging

            logging.getLogger("matplotlib").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
                warnings.simplefilter("always", FpWarning)
                warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except FpError as exc:
                if debug or _debug_enabled(ctx):
                    raise
                if not json_error(ctx, exc, exc.exit_code):
                    click.echo(f"Error: {exc}", err=True)
                ctx.exit(exc.exit_code)
            except KeyboardInterrupt:
                if debug:
                    raise
                if not json_error(ctx, KeyboardInterrupt(INTERRUPTED), INTERRUPTED_EXIT):
                    click.echo(INTERRUPTED, err=True)
                ctx.exit(INTERRUPTED_EXIT)
            except Exception as exc:
                # Typer may use its own copy of click: recognise a usage error by class name.
                if any(c.__name__ == "UsageError" for c in type(exc).__mro__):
                    code = getattr(exc, "exit_code", 2)
                    if json_error(ctx, exc, code):
                        ctx.exit(code)
                raise


app = typer.Typer(
    cls=FpGroup,
    name="fp",
    help="Forensics for generative image models: C_T-layer curves, attribution, memorization.",
    no_args_is_help=True,
    add_completion=True,
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


def _arrange_panels(app: typer.Typer) -> None:
    """Put every top-level command in its :data:`PANELS` panel."""
    panel_of = {name: title for title, names in PANELS for name in names}

    def name_of(info) -> str:
        return info.name or info.typer_instance.info.name

    for infos in (app.registered_commands, app.registered_groups):
        for info in infos:
            name = name_of(info)
            if name not in panel_of:
                raise RuntimeError(f"command {name!r} has no panel in forensics.cli.app.PANELS")
            info.rich_help_panel = panel_of[name]


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)
_arrange_panels(app)


def main() -> None:
    """Console-script entry point."""
    # Idle OpenMP threads that spin steal the CPU from the next small fit (KMeans, PCA);
    # on a shared or small machine that made fits tens of times slower. Users may override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app(prog_name="fp")
    except SystemExit as exc:
        _exit(exc.code)
    _exit(0)


def _exit(code: object) -> None:
    """End the process with ``code`` once the command is done.

    With pyarrow loaded, the interpreter's own exit runs pyarrow's native teardown, which
    can abort the process after the work is done and reported ("terminate called without
    an active exception", apache/arrow#34314, open upstream: 2 of 87 ``fp bank import``
    runs). So Python's exit handlers run, the output is flushed, and the process ends
    without the native libraries' teardown.
    """
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    status = 0 if code is None else int(code)  # type: ignore[call-overload]
    if "pyarrow" not in sys.modules:
        sys.exit(status)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
