"""``fp demo``: the main job end to end on bundled real images, offline, on CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from forensics import defaults


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(None, "--out",
                                 help="Folder for the images and the bank (new or empty) "
                                      "[default: a new temporary folder]."),
        bank: Path = typer.Option(None, "--bank",
                                  help="Bank folder [default: OUT/bank; never the user's "
                                       "default bank unless given here]."),
        encoder: str = typer.Option(defaults.DEMO_ENCODER, "--encoder", "-e",
                                    help="Encoder name."),
        weights: str = typer.Option(defaults.DEMO_WEIGHTS, "--weights",
                                    help="Encoder weights spec."),
        quick: bool = typer.Option(False, "--quick",
                                   help="Two generator families and fewer images (seconds)."),
        seed: int = typer.Option(defaults.SEED, "--seed",
                                 help="Seed of the split, sampling, generators."),
        fingerprint: str = typer.Option(defaults.DEMO_FINGERPRINT, "--fingerprint",
                                        help="What attribution matches on (fp list "
                                             "fingerprints)."),
        device: str = typer.Option("cpu", "--device", help="cpu, auto, cuda or cuda:N."),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No step-by-step messages."),
    ) -> None:
        """Enroll pathological generators of real digits, then attribute fresh samples."""
        from forensics.cli.commands.bank import _print_table, echo_json
        from forensics.paper.demo import run_demo

        def say(msg: str) -> None:
            if not (quiet or as_json):
                typer.echo(msg, err=True)

        result = run_demo(out, bank=bank, encoder=encoder, weights=weights, quick=quick,
                          seed=seed, fingerprint=fingerprint, device=device, echo=say)
        if as_json:
            echo_json(result.to_dict())
            return
        _print_table(
            ["generator", "true family", "decided family", "model", "unknown", "confidence",
             "stability", "correct?"],
            [[r.generator + ("" if r.enrolled else " (never enrolled)"), r.true_family,
              r.decided_family or "-", r.decided_model or "-", "yes" if r.unknown else "no",
              "-" if r.confidence is None else f"{r.confidence:.2f}",
              "-" if r.stability is None else f"{r.stability:.2f}",
              "yes" if r.correct else "NO"] for r in result.rows],
            title=f"fp demo: attribution of fresh samples ({result.encoder}, "
                  f"weights {result.weights}, fingerprint {result.fingerprint})",
        )
        typer.echo(result.summary())
        typer.echo(f"Bank: {result.bank}   images: {result.out}/data")
