"""Read C_T-layer curves written by other tools.

``layerchoice`` is the text format of the authors of the C_T-layer paper (He et al. 2024,
repository ``JackHe313/LayerChoice``): one curve per line,

    NAME: [v0, v1, ..., vK]          (their ``F*_score.txt`` files)
    NAME [v0, v1, ..., vK]           (their ``model_ct_scores*.txt`` files)

where each ``v`` is a float or ``nan``. The family is the text of NAME before its first
``_``; the split comes from a ``train`` (enrolled) or ``test`` (query) word of NAME
(``ContraGAN_test_batch`` is a query curve of family ``ContraGAN``). Reading is strict:
any other line is an error naming the file and the line.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from forensics import defaults
from forensics.errors import InputError

#: Split tags used by ``fp``: enrolled (reference) curves and query (suspect) curves.
SPLITS = ("enroll", "query")

#: Words of a LayerChoice curve name that carry its split.
_SPLIT_WORDS = {"train": "enroll", "test": "query"}

#: How the authors computed the curves in their published files (paper, Sec. 3, and the
#: repository's ``ct_fingerprinting.py``). Recorded as provenance of every imported curve.
LAYERCHOICE_SETTINGS: dict[str, Any] = {
    "source": "github.com/JackHe313/LayerChoice (He et al. 2024, arXiv 2407.21159)",
    "encoder": "google/vit-base-patch16-224-in21k",
    "embedding": "CLS token of each hidden state",
    "projection": "PCA to 64 components fitted on T",
    "partitioner": defaults.PAPER_PARTITIONER,
    "n_cells": 10,
    "tau": "20/m",
    "distance": "1 - |cos|",
    "T": "CIFAR-10 train",
    "P": "CIFAR-10 test",
    "m": 500,
    "layers_note": "value i is the i-th C_T value in the authors' file; the file names no layers",
}

_LINE = re.compile(r"^(?P<name>[^\s:\[\],]+)(?::\s*|\s+)\[(?P<values>[^\[\]]*)\]$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _parse_value(token: str, where: str) -> float:
    token = token.strip()
    if token == "nan":
        return math.nan
    if not _NUMBER.match(token):
        raise InputError(f"{where}: {token!r} is not a number (expected a float or 'nan')")
    value = float(token)
    if not math.isfinite(value):  # 1e999 overflows to infinity
        raise InputError(f"{where}: {token} is beyond the range of a float (about 1.8e308); "
                         f"write the value as it was measured")
    return value


def _split_of(name: str, where: str, default_split: str | None) -> str:
    words = name.split("_")
    found = {_SPLIT_WORDS[w] for w in words[1:] if w in _SPLIT_WORDS}
    if len(found) > 1:
        raise InputError(f"{where}: curve name {name!r} has both 'train' and 'test' in it")
    if found:
        return found.pop()
    if default_split is None:
        raise InputError(
            f"{where}: curve name {name!r} has no '_train' or '_test' part, so its split is "
            f"unknown; rename it, or give a default split ({' or '.join(SPLITS)})"
        )
    return default_split


def read_layerchoice(path: str | Path, *, default_split: str | None = None) -> list[dict]:
    """Read a curve file in the authors' LayerChoice format.

    Args:
        path: the text file, e.g. ``Fsmall_score.txt``.
        default_split: split (``"enroll"`` or ``"query"``) of curves whose name has no
            ``train``/``test`` word; ``None`` makes such a curve an error.

    Returns:
        One dict per curve, in file order, with keys ``name`` (as written, without the
        colon), ``model`` (``name``, plus ``#k`` for its k-th repeat when a name occurs
        more than once), ``family`` (``name`` up to its first ``_``), ``split``
        (``"enroll"`` for ``train``, ``"query"`` for ``test``), ``values`` (float64 array,
        NaN where the file says ``nan``), ``layers`` (``hidden_0`` ...: the file names no
        layers), ``line`` and ``provenance`` (file, its SHA-256, line, and the authors'
        settings :data:`LAYERCHOICE_SETTINGS`).

    Raises:
        InputError: the file is missing or unreadable, a line is malformed, a value is
            not a number, the split is unknown, or curves differ in length.
    """
    if default_split is not None and default_split not in SPLITS:
        raise InputError(f"default split must be one of {', '.join(SPLITS)}, got {default_split!r}")
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"curve file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"curve file {path} is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise InputError(f"cannot read curve file {path}: {exc.strerror}") from None
    sha256 = hashlib.sha256(raw).hexdigest()

    curves: list[dict] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        match = _LINE.match(line)
        if match is None:
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise InputError(f"{where}: expected 'NAME: [v0, v1, ...]', got {shown!r}")
        name = match["name"]
        tokens = match["values"].split(",")
        if not match["values"].strip():
            raise InputError(f"{where}: curve {name!r} has no values")
        values = np.array([_parse_value(t, where) for t in tokens], dtype=np.float64)
        if curves and values.size != curves[0]["values"].size:
            raise InputError(
                f"{where}: curve {name!r} has {values.size} values but the curve on line "
                f"{curves[0]['line']} has {curves[0]['values'].size}; all curves of a file "
                f"must cover the same layers"
            )
        seen[name] = seen.get(name, 0) + 1
        curves.append(
            {
                "name": name,
                "model": name if seen[name] == 1 else f"{name}#{seen[name]}",
                "family": name.split("_", 1)[0],
                "split": _split_of(name, where, default_split),
                "values": values,
                "layers": [f"hidden_{i}" for i in range(values.size)],
                "line": lineno,
                "provenance": {
                    "format": "layerchoice",
                    "file": path.name,
                    "sha256": sha256,
                    "line": lineno,
                    **LAYERCHOICE_SETTINGS,
                },
            }
        )
    if not curves:
        raise InputError(f"curve file {path} holds no curves")
    return curves


# -- importing into the bank ------------------------------------------------------------

#: Formats :func:`import_curves` reads.
FORMATS = ("layerchoice",)

#: Baseline that imported LayerChoice curves are filed under unless told otherwise.
LAYERCHOICE_BASELINE = "layerchoice-vit-b16-cifar10"

#: The one file in a descriptive baseline's folder: the settings, as JSON.
DESCRIPTION_FILE = "external-curves.json"

#: Stands in for hashes the authors did not publish (weights, image manifests).
UNKNOWN = "unknown"

#: Bank parameter columns of the authors' settings (tau = 20/m with m = 500).
_LAYERCHOICE_COLUMNS: dict[str, Any] = {
    "partitioner": defaults.PAPER_PARTITIONER,
    "distance": defaults.PAPER_DISTANCE,
    "tau": 20 / LAYERCHOICE_SETTINGS["m"],
    "pooling": "cls",
}


def layerchoice_baseline_row(name: str, layers: list[str]) -> dict[str, Any]:
    """A descriptive bank baseline row for the authors' curves.

    It records how they were computed (:data:`LAYERCHOICE_SETTINGS`) but holds no engine
    files, so it can file and evaluate their curves and never measure new ones. Hashes
    the authors did not publish are :data:`UNKNOWN`.
    """
    return {
        "name": name,
        "encoder": LAYERCHOICE_SETTINGS["encoder"],
        "weights_sha256": UNKNOWN,
        "layers": list(layers),
        "train_manifest_sha256": UNKNOWN,
        "heldout_manifest_sha256": UNKNOWN,
        **_LAYERCHOICE_COLUMNS,
        "params": {"external": True, "pca_dim": 64, "n_cells": LAYERCHOICE_SETTINGS["n_cells"],
                   "settings": LAYERCHOICE_SETTINGS},
        "notes": (
            "curves computed by the authors of the C_T-layer paper with their own code; "
            "descriptive only: no engine files, so fp cannot measure new curves against it"
        ),
    }


def _free_model_name(name: str, taken: set[str]) -> str:
    """``name``, else ``name#2``, ``name#3``, ... whichever is free first."""
    k = 1
    while (label := name if k == 1 else f"{name}#{k}") in taken:
        k += 1
    return label


def import_curves(
    bank: Any,
    path: str | Path,
    *,
    fmt: str = "layerchoice",
    baseline: str | None = None,
    default_split: str | None = None,
) -> dict[str, Any]:
    """Add the curves of a file written by another tool to a bank.

    The curves are filed under a descriptive baseline (created on first use, see
    :func:`layerchoice_baseline_row`), so that they are never mixed with curves that
    ``fp`` measured. Model names stay unique within that baseline: a name already there
    gets the next free ``#k`` suffix. A file already imported into that baseline (same
    SHA-256) is refused.

    Args:
        bank: a :class:`refbank.Bank`.
        path: the curve file.
        fmt: its format (:data:`FORMATS`).
        baseline: the baseline to file them under (default :data:`LAYERCHOICE_BASELINE`).
        default_split: split of curves whose name carries none (see
            :func:`read_layerchoice`).

    Returns:
        ``{"baseline", "baseline_id", "created_baseline", "file", "curve_ids", "models",
        "n_enroll", "n_query"}``.

    Raises:
        InputError: unknown format, or an unreadable or malformed file.
        BankError: the file was imported before, or the baseline was built with another
            encoder or layers.
    """
    import json

    from forensics.errors import BankError

    if fmt not in FORMATS:
        raise InputError(f"unknown curve format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    bank.check_writable()
    curves = read_layerchoice(path, default_split=default_split)
    name = baseline or LAYERCHOICE_BASELINE
    layers = curves[0]["layers"]
    existing = {b["name"]: b for b in bank.baselines()}
    created = name not in existing
    if created:
        row = layerchoice_baseline_row(name, layers)
        text = json.dumps({"format": fmt, "settings": LAYERCHOICE_SETTINGS}, indent=2) + "\n"
        bid = bank.add_baseline(row, save=lambda d: (d / DESCRIPTION_FILE).write_text(text))
    else:
        bid = existing[name]["baseline_id"]
    sha256 = curves[0]["provenance"]["sha256"]
    rows_there = bank.curves(baseline_id=bid)
    for row in rows_there:
        if json.loads(row["params_json"]).get("file_sha256") == sha256:
            raise BankError(
                f"{Path(path).name} (SHA-256 {sha256[:12]}...) is already imported under "
                f"baseline {name!r} in {bank.path} (e.g. curve {row['curve_id']}); remove "
                f"those curves first (fp bank remove ID...) to import it again"
            )
    taken = {row["model"] for row in rows_there}
    rows = []
    for curve in curves:
        model = _free_model_name(curve["name"], taken)
        taken.add(model)
        prov = curve["provenance"]
        rows.append({
            "model": model,
            "family": curve["family"],
            "checkpoint": curve["name"],
            "source": f"{prov['file']}:{prov['line']} ({LAYERCHOICE_SETTINGS['source']})",
            "split": curve["split"],
            "encoder": LAYERCHOICE_SETTINGS["encoder"],
            "weights_sha256": UNKNOWN,
            "baseline_id": bid,
            "layers": curve["layers"],
            "values": curve["values"],
            "n_images": LAYERCHOICE_SETTINGS["m"],
            "manifest_sha256": UNKNOWN,
            **_LAYERCHOICE_COLUMNS,
            "params": {"format": fmt, "file": prov["file"], "file_sha256": sha256,
                       "line": prov["line"], "name": curve["name"]},
        })
    ids = bank.add_curves(rows)
    splits = [r["split"] for r in rows]
    return {
        "baseline": name,
        "baseline_id": bid,
        "created_baseline": created,
        "file": str(path),
        "curve_ids": ids,
        "models": [r["model"] for r in rows],
        "n_enroll": splits.count("enroll"),
        "n_query": splits.count("query"),
    }
