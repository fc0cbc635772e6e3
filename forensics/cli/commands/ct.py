"""``fp ct FILE.npz``: C_T of precomputed embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from forensics import defaults
from forensics.errors import InputError

CELL_ARRAYS = ("T_cells", "P_cells", "Q_cells")


def load_ct_file(path: Path) -> dict:
    """Read and check the arrays of an ``fp ct`` input file.

    Returns:
        ``{"T", "P", "Q"}`` (2-D, same feature count), the three cell label arrays when the
        file holds them, and ``"tau"`` when it holds a scalar ``tau``.

    Raises:
        InputError: the file is missing or unreadable, or an array is missing or misshapen;
            the message names the file and the array.
    """
    import numpy as np

    if not path.is_file():
        raise InputError(f"{path}: no such file (expected an .npz with arrays T, P and Q)")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise InputError(f"{path} is not an .npz file (no zip archive inside); write one "
                             f"with numpy.savez(path, T=..., P=..., Q=...)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # np.load raises several types for a bad file
        raise InputError(f"{path}: cannot read it as an .npz of plain arrays ({exc})") from None
    missing = [k for k in ("T", "P", "Q") if k not in arrays]
    if missing:
        raise InputError(f"{path} has no array {', '.join(missing)}: it needs T (training), "
                         f"P (held-out) and Q (generated); found: {', '.join(arrays) or 'none'}")
    out: dict = {}
    for k in ("T", "P", "Q"):
        a = arrays[k]
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
            raise InputError(f"{path}: array {k} must be 2-D (samples, features) and non-empty, "
                             f"got shape {a.shape}")
        if a.dtype.kind not in "fiu":
            raise InputError(f"{path}: array {k} must hold real numbers, got dtype {a.dtype}")
        out[k] = a
    dims = {k: out[k].shape[1] for k in ("T", "P", "Q")}
    if len(set(dims.values())) != 1:
        raise InputError(f"{path}: T, P and Q must have the same number of features, got "
                         + ", ".join(f"{k}: {v}" for k, v in dims.items()))
    present = [k for k in CELL_ARRAYS if k in arrays]
    if present and len(present) != 3:
        absent = [k for k in CELL_ARRAYS if k not in arrays]
        raise InputError(f"{path} holds {', '.join(present)} but not {', '.join(absent)}: give "
                         f"cell labels for all of T, P and Q, or none")
    for k in present:
        a, rows = arrays[k], out[k[0]].shape[0]
        if a.shape != (rows,) or a.dtype.kind not in "iu":
            raise InputError(f"{path}: array {k} must hold one integer label per row of "
                             f"{k[0]} ({rows}), got shape {a.shape} and dtype {a.dtype}")
        out[k] = a
    if "tau" in arrays:
        if arrays["tau"].size != 1:
            raise InputError(f"{path}: array tau must be a scalar, got shape {arrays['tau'].shape}")
        if arrays["tau"].dtype.kind not in "fiu":
            raise InputError(f"{path}: array tau must be a number, got dtype {arrays['tau'].dtype}")
        out["tau"] = float(arrays["tau"].reshape(()))
    return out


def register(app: typer.Typer) -> None:
    @app.command("ct")
    def ct_cmd(
        file: Path = typer.Argument(
            ..., help="An .npz with arrays T, P, Q (samples x features); optionally T_cells, "
            "P_cells, Q_cells (cell labels) and a scalar tau."),
        distance: str = typer.Option(defaults.DISTANCE, "--distance", help="Distance name."),
        partitioner: str = typer.Option(
            None, "--partitioner",
            help="Partitioner name (default: given when the file holds cell labels, else kmeans)."),
        tau: float = typer.Option(
            None, "--tau",
            help="Cell threshold on Q's share (default: the file's tau, else 20/m)."),
        seed: int = typer.Option(defaults.SEED, "--seed", help="Seed of every random step."),
        device: str = typer.Option("cpu", "--device", help="Torch device of the NN search."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """C_T of generated embeddings Q against training T and held-out P."""
        from forensics.steps.engine import ct_score

        data = load_ct_file(file)
        has_cells = "T_cells" in data
        if partitioner is None:
            partitioner = defaults.GIVEN_PARTITIONER if has_cells else defaults.PARTITIONER
        if partitioner == defaults.GIVEN_PARTITIONER and not has_cells:
            raise InputError(f"{file} holds no cell labels (T_cells, P_cells, Q_cells) for the "
                             f"'given' partitioner: add them, or use --partitioner kmeans")
        given = partitioner == defaults.GIVEN_PARTITIONER
        cells = {k: data[k] for k in CELL_ARRAYS} if given else {}
        result = ct_score(
            data["T"], data["P"], data["Q"], distance=distance, partitioner=partitioner,
            tau=tau if tau is not None else data.get("tau"), seed=seed, device=device, **cells)
        if as_json:
            out = {"file": str(file), "distance": distance, "partitioner": partitioner,
                   "seed": seed, **result.to_dict()}
            out.pop("layer", None)
            typer.echo(json.dumps(out, indent=2))
            return
        _print_result(result, distance, partitioner)


def _print_result(result, distance: str, partitioner: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("cell", "n_T", "n_P", "n_Q", "Z_U", "kept")
    for c in result.cells:
        z = "-" if c.z != c.z else f"{c.z:.4f}"
        table.add_row(str(c.cell), str(c.n_T), str(c.n_P), str(c.n_Q), z, "yes" if c.kept else "")
    if result.cells:
        console.print(table)
    value = f"{result.ct:.6f}" if result.status == "ok" else f"undefined ({result.status})"
    console.print(f"C_T = {value}   (distance {distance}, partitioner {partitioner}, "
                  f"tau {result.tau:.4g}, m {result.m})", highlight=False)
    if result.message:
        console.print(result.message, highlight=False, soft_wrap=True)
