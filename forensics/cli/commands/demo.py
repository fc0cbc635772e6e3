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
        weights: str = typer.Option(None, "--weights",
                                    help="Encoder weights spec [default: the encoder's own]."),
        quick: bool = typer.Option(False, "--quick",
                                   help="Two generator families and fewer images (about 40 s)."),
        seed: int = typer.Option(defaults.SEED, "--seed",
                                 help="Seed of the split, sampling, generators."),
        fingerprint: str = typer.Option(defaults.FINGERPRINT, "--fingerprint",
                                        help="What attribution matches on (fp list "
                                             "fingerprints)."),
        compare: str = typer.Option(defaults.DEMO_COMPARE, "--compare",
                                    help="A second fingerprint attributed beside it (the "
                                         "paper's C_T curve by default), or none."),
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

        compare_fp = None if compare.strip().lower() in ("", "none") else compare
        result = run_demo(out, bank=bank, encoder=encoder, weights=weights, quick=quick,
                          seed=seed, fingerprint=fingerprint, compare=compare_fp,
                          device=device, echo=say)
        if as_json:
            echo_json(result.to_dict())
            return
        how = f"fp: {result.fingerprint}" + (f"; paper's method: {result.compare} curve"
                                             if result.compare else "")
        _print_table(*demo_table(result),
                     title=f"fp demo: attribution of fresh samples ({result.encoder}; {how})")
        typer.echo(result.summary())
        typer.echo(f"Bank: {result.bank}   images: {result.out}/data")


def demo_table(result) -> tuple[list[str], list[list[str]]]:
    """The demo's table: fp's answer and confidence, then the paper's answer, per generator."""
    def verdict(unknown: bool | None, family: str | None, closest: str | None = None) -> str:
        if unknown:
            return "unknown" + (f" (closest: {closest})" if closest else "")
        return family or "-"

    compared = result.compare is not None
    head = ["generator", "true family", "fp: model level", "fp: family level", "confidence",
            "right?"]
    if compared:
        head += ["paper's method", "right?"]
    rows = []
    for r in result.rows:
        models = ", ".join(f"{c['model']} (p {c['p_value']:.2f})" for c in r.consistent)
        row = [r.generator + ("" if r.enrolled else " (never enrolled)"),
               r.true_family,
               models or "none consistent",
               verdict(r.unknown, r.decided_family, r.closest_family),
               "-" if r.confidence is None else f"{r.confidence:.2f}",
               "yes" if r.correct else "NO"]
        if compared:
            row += [verdict(r.paper_unknown, r.paper_family),
                    "yes" if r.paper_correct else "NO"]
        rows.append(row)
    return head, rows
