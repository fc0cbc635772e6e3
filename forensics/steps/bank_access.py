"""The bank and its baselines: open the bank, load a baseline (hash-checked), T's manifest."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forensics.errors import BankError, InputError
from forensics.stats import fingerprints as fpmod
from forensics.steps.baseline_files import load_engine, load_extras

PathLike = str | os.PathLike


#: T's manifest (relative paths and SHA-256 of the training images, in T's row order),
#: stored in each baseline's folder so reports can show the training image behind an index.
TRAIN_MANIFEST_FILE = "train_manifest.json"


def _absolute(path: PathLike) -> Path:
    """``path`` made absolute and resolved, so that a stored path works from any folder."""
    return Path(path).expanduser().resolve()


def _absolute_weights(weights: str | None) -> str | None:
    """A weights spec with a relative file path made absolute (``hub``, ``random:N`` as is)."""
    if weights is None or weights.strip() == "hub" or weights.strip().startswith("random:"):
        return weights
    path = Path(weights.strip()).expanduser()
    return str(path.resolve()) if path.is_file() else weights


def open_bank(bank: Any = None):
    """A :class:`refbank.Bank` from a Bank, a folder, or ``None`` (``FP_BANK`` or default)."""
    from refbank import Bank

    return bank if isinstance(bank, Bank) else Bank(bank)


@dataclass
class LoadedBaseline:
    """A baseline of the bank, loaded for querying.

    Attributes:
        row: its ``baselines`` row.
        engine: the :class:`~forensics.stats.baseline.Baseline` (stored state, never refitted).
        folder: the folder of its files in the bank.
        params: every parameter (columns and ``params_json`` together).
        files: ``{relative path: SHA-256}`` of its files, as checked when it was loaded.
        unverified: the problems of its row and files that ``allow_unverified`` let
            through (``[]``: every hash matched).
    """

    row: dict[str, Any]
    engine: Any
    folder: Path
    params: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    unverified: list[dict[str, str]] = field(default_factory=list)
    _extras: dict[str, dict[str, np.ndarray] | None] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The baseline's name in the bank."""
        return self.row["name"]

    @property
    def dims(self) -> list[int]:
        """Embedding size of each layer."""
        return [int(lb.dim) for lb in self.engine.layers]

    def extras(self, fp: Any) -> dict[str, np.ndarray] | None:
        """A fingerprint's stored arrays; ``{}`` if it needs none, None if they are missing."""
        if not fpmod.needs_extras(fp):
            return {}
        if fp.name not in self._extras:
            self._extras[fp.name] = load_extras(self.folder, fp.name)
        return self._extras[fp.name]


def load_baseline(name: str | None = None, *, bank: Any = None, device: str = "cpu",
                  allow_unverified: bool = False) -> LoadedBaseline:
    """Load a baseline of the bank by name or id (None: the bank's only baseline).

    Its row and every one of its files are checked against their SHA-256 first.

    Args:
        name: baseline name or id.
        bank: the bank (a :class:`refbank.Bank`, a folder, or None for the default).
        device: where the engine's arrays go.
        allow_unverified: load it even if its row or files fail their hash (the
            problems are kept in :attr:`LoadedBaseline.unverified`).

    Raises:
        BankError: no such baseline, none at all, or several and no name given; or its
            row or files fail their hash (without ``allow_unverified``).
        InputError: its files are missing or damaged.
    """

    from refbank.bank import modified_rows, unverified_message

    b = open_bank(bank)
    b.require()
    row = b.resolve_baseline(name)
    files, problem = b.baseline_files(row)
    problems = modified_rows("baselines", [row]) + ([problem] if problem else [])
    if problems and not allow_unverified:
        raise BankError(unverified_message(problems, b.path))
    folder = b.baseline_dir(row["baseline_id"])
    try:
        engine = load_engine(folder, device=device)
    except InputError as exc:
        raise BankError(f"baseline {row['name']!r} in {b.path} cannot be loaded ({exc}); run "
                        f"fp bank verify, or remove and rebuild it") from None
    if engine.id != row["baseline_id"]:
        raise BankError(f"the files of baseline {row['name']!r} belong to baseline "
                        f"{engine.id}, not {row['baseline_id']}; run fp bank verify")
    params = json.loads(row["params_json"] or "{}")
    params.update({k: row[k] for k in ("partitioner", "distance", "pooling", "seed")
                   if row.get(k) is not None})
    return LoadedBaseline(row, engine, folder, params, files,
                          [dataclasses.asdict(p) for p in problems])


def train_manifest(loaded: LoadedBaseline) -> Any:
    """T's :class:`~forensics.data.images.Manifest` for a baseline, or ``None`` if unknown.

    Read from the baseline's ``train_manifest.json``; for a baseline stored without it,
    T's folder (recorded at build time) is scanned again and used only if its manifest
    hash still equals the baseline's ``train_manifest_sha256``. Row ``i`` of T is entry
    ``i`` of the manifest.
    """
    from forensics.data.images import Manifest, scan_folder

    row = loaded.row
    path = loaded.folder / TRAIN_MANIFEST_FILE
    if path.is_file():
        try:
            manifest = Manifest.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    else:
        folder = loaded.params.get("train_folder")
        if not folder or not Path(folder).is_dir():
            return None
        try:
            manifest = scan_folder(folder, skip_bad=True)
        except InputError:
            return None
    return manifest if manifest.sha256 == row["train_manifest_sha256"] else None
