"""Enrol a model under named storage conditions: the same images, transformed, as curves of
the same model marked with their condition (``fp enroll --conditions``).

Each condition of :data:`forensics.defaults.CONDITIONS` is a :mod:`forensics.paper.synth`
transform (JPEG at a quality, half size and back, a centre crop, slight noise). Suspects
are then compared with the curves of the condition read from their files
(:mod:`forensics.steps.storage`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from forensics import defaults
from forensics.errors import InputError


def parse_conditions(text: str | Sequence[str] | None) -> list[str]:
    """``"jpeg90,jpeg75"`` (or a list) -> checked condition names, in order, once each.

    Raises:
        InputError: an unknown name (the message lists the known ones).
    """
    if text is None:
        return []
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    out = []
    for name in names:
        if not name:
            continue
        if name not in defaults.CONDITIONS:
            raise InputError(f"unknown condition {name!r} in --conditions; choose from: "
                             f"{', '.join(defaults.CONDITIONS)}")
        if name not in out:
            out.append(name)
    return out


def enroll_conditions(folder: str | Path, conditions: Sequence[str], *, seed: int = 0,
                      echo: Callable[[str], None] | None = None, **enroll_kw: Any
                      ) -> dict[str, list[str]]:
    """Enrol ``folder``'s images under each condition; ``{condition: new curve ids}``.

    ``enroll_kw`` goes to :func:`forensics.steps.enroll.enroll` (baseline, model, family,
    per_curve, bank, ...). The transformed images live in a temporary folder, removed
    afterwards; each curve records the condition, and its ``source`` the folder and
    transform it came from.
    """
    from forensics.paper.synth import synth_folder
    from forensics.steps.enroll import enroll

    say = echo or (lambda _msg: None)
    names = parse_conditions(list(conditions))
    out: dict[str, list[str]] = {}
    work = Path(tempfile.mkdtemp(prefix="fp-conditions-"))
    try:
        for name in names:
            kind, params = defaults.CONDITIONS[name]
            dst = work / name
            synth_folder(kind, folder, dst, seed=seed, **params)
            source = (f"{enroll_kw.pop('source', None) or folder} under condition {name} "
                      f"(fp synth {kind} {params}, seed {seed})")
            out[name] = enroll(dst, condition=name, source=source, echo=say, **enroll_kw)
            say(f"enrolled {len(out[name])} curve(s) under condition {name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
