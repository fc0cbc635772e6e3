"""``fp evaluate``: how well the bank's curves name their generator family (Table 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from forensics import defaults
from forensics.cli.commands.bank import _print_table, bank_option, echo_json
from forensics.cli.commands.pipeline import parse_drop_layers

MATCHER_HELP = ("zscore, l2, cosine, combined, a plugin's, or all (every registered matcher, "
                "with the fingerprint's own rule where it has one); repeatable "
                "[default: l2, cosine and combined for paper, else the fingerprint's default].")
FINGERPRINT_HELP = ("What is matched: resid-early, resid-ct, proj-mean-ct, proj-mean-early, "
                    "proj-mean, paper (the C_T-layer curves, Table 1), setstats or a plugin's "
                    "[default: resid-early, fp's default].")


def _accuracy(m: dict[str, Any]) -> str:
    return f"{m['accuracy_3dp']:.3f} ({m['correct']}/{m['total']})"


def _ci(m: dict[str, Any]) -> str:
    ci = m.get("ci")
    return "-" if ci is None else f"[{ci['low']:.3f}, {ci['high']:.3f}]"


def _print_result(result: dict[str, Any]) -> None:
    base = result["baseline"]
    dropped = result["drop_layers"]
    typer.echo(
        f"Baseline {base['name']!r} ({base['encoder']}, {base['n_layers']} layers): "
        f"{result['n_vectors']} curves, fingerprint {result['fingerprint']}, "
        f"protocol {result['protocol']}, "
        f"{result['n_queries']} queries against {result['n_enrolled']} enrolled; "
        f"dropped layer indices: {', '.join(map(str, dropped)) or 'none'}."
    )
    setstats = result["comparison"][defaults.SETSTATS_FINGERPRINT]
    level = int(round(result["bootstrap"]["level"] * 100))
    paper = result["fingerprint"] == defaults.PAPER_FINGERPRINT
    what = "C_T-layer" if paper else result["fingerprint"]
    columns = ["matcher", f"{what} accuracy", f"{level}% CI"]
    if setstats["available"]:
        columns += ["mean/std/FID accuracy", f"{level}% CI"]
    rows = []
    for name, m in result["matchers"].items():
        row = [name, _accuracy(m), _ci(m)]
        if setstats["available"]:
            other = setstats["matchers"].get(name)
            row += [_accuracy(other), _ci(other)] if other else ["n/a", "-"]
        rows.append(row)
    _print_table(columns, rows, title="Family identification")
    if not setstats["available"]:
        typer.echo(f"Paper's mean/std/FID baseline: not available: {setstats['reason']}.")
    if result["unenrolled_query_families"]:
        typer.echo("Query families with no enrolled curve (always wrong): "
                   + ", ".join(result["unenrolled_query_families"]))
    for name, m in result["matchers"].items():
        conf = m["confusion"]
        _print_table(["true \\ predicted", *conf["labels"]],
                     [[label, *counts] for label, counts in zip(conf["labels"], conf["matrix"],
                                                                strict=True)],
                     title=f"Confusion matrix, {name}")


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        baseline: str | None = typer.Option(
            None, "--baseline",
            help="Evaluate the curves of this baseline (default: the only one with curves)."),
        protocol: str = typer.Option(
            "split", "--protocol",
            help="split: query-tagged curves against enroll-tagged ones (the paper's); "
                 "loo: leave-one-out over all curves."),
        fingerprint: str | None = typer.Option(None, "--fingerprint", help=FINGERPRINT_HELP),
        matcher: list[str] | None = typer.Option(None, "--matcher", help=MATCHER_HELP),
        drop_layers: str = typer.Option(
            ",".join(map(str, defaults.DROP_LAYERS)), "--drop-layers",
            help="Layer indices left out of matching, comma-separated, or 'none' "
                 "(default 0: the paper's rule)."),
        n_boot: int = typer.Option(defaults.EVALUATE_N_BOOT, "--n-boot",
                                   help="Bootstrap resamples (0: none)."),
        seed: int = typer.Option(defaults.SEED, "--seed", help="Seed of the bootstrap."),
        as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
        bank: Path | None = bank_option(),
    ) -> None:
        """Family-identification accuracy of the bank's curves, per matcher (Table 1).

        Each query curve's fingerprint is matched to its nearest enrolled curve's; reported
        per matcher: accuracy, a bootstrap confidence interval and a confusion matrix, side
        by side with the paper's mean/std/FID baseline method where the curves carry it.
        """
        from forensics.steps.bank_access import open_bank
        from forensics.steps.evaluate import evaluate_bank

        result = evaluate_bank(
            open_bank(bank), baseline, fingerprint=fingerprint, matchers=matcher or None,
            protocol=protocol, drop_layers=parse_drop_layers(drop_layers), n_boot=n_boot,
            seed=seed,
        )
        if as_json:
            echo_json(result)
            return
        _print_result(result)
