"""``fp memorize``: run one memorization measure, write its scores, judge it on members.

Any measure registered through ``register_memorization_measures`` runs here: the step
lists the images, validates ``--members`` before any model is loaded, calls the measure
(its ``run`` when it has one, for provenance and evidence, else ``score``), and writes
``scores.csv``, ``report.json``, ``scores.png`` (the score histogram, always) and, with
members, the AUROC and ``members.png`` (histograms by membership and the ROC). A measure
says which end of its score means "more memorized" with ``more_memorized = "lower"``
(default) or ``"higher"``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forensics.data.atomic import atomic_write_bytes, atomic_write_text
from forensics.data.images import list_image_files
from forensics.errors import InputError
from forensics.jsonable import jsonable

SCORES_CSV = "scores.csv"
REPORT_JSON = "report.json"
MEMBERS_PNG = "members.png"
SCORES_PNG = "scores.png"


def image_list(path: Path) -> list[Path]:
    """One image file, or every image under a folder (sorted, as ``fp`` lists images)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such image folder or file")
    files = [path / rel for rel in list_image_files(path)]
    if not files:
        raise InputError(f"{path} holds no images")
    return files


def read_members(file: Path, images: Sequence[Path]) -> list[bool]:
    """Which ``images`` are training members, from a file naming one member per line.

    A line names an image by its path, file name or stem; blank lines and lines starting
    with ``#`` are ignored.

    Raises:
        InputError: the file cannot be read, names no image, or names an unknown image.
    """
    try:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--members {file}: cannot read it ({exc})") from exc
    names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    keys: dict[str, int] = {}
    for i, img in enumerate(images):
        for key in (str(img), img.name, img.stem):
            keys.setdefault(key, i)
    unknown = [n for n in names if n not in keys and Path(n).name not in keys]
    if unknown:
        raise InputError(f"--members {file} names images that are not being scored: "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    chosen = {keys.get(n, keys.get(Path(n).name)) for n in names}
    flags = [i in chosen for i in range(len(images))]
    if not any(flags) or all(flags):
        raise InputError(f"--members {file}: need both members and non-members among the "
                         f"{len(images)} images, got {sum(flags)} members")
    return flags


def _lower_is_more(members: Sequence[float], others: Sequence[float], more_memorized: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Both score lists as float64, negated where a higher score is more memorized."""
    a = np.asarray(members, dtype=np.float64)
    b = np.asarray(others, dtype=np.float64)
    if more_memorized == "higher":
        return -a, -b
    if more_memorized != "lower":
        raise InputError(f"more_memorized must be 'lower' or 'higher', got {more_memorized!r}")
    return a, b


def auroc(members: Sequence[float], others: Sequence[float], more_memorized: str = "lower"
          ) -> float:
    """P(a member looks more memorized than a non-member), ties counting one half.

    ``inf`` scores compare as the largest values (InvMM's "never reconstructed").
    """
    a, b = _lower_is_more(members, others, more_memorized)
    less = (a[:, None] < b[None, :]).sum()
    ties = (a[:, None] == b[None, :]).sum()
    return float((less + 0.5 * ties) / (a.size * b.size))


def tpr_at_fpr(members: Sequence[float], others: Sequence[float],
               more_memorized: str = "lower", fpr: float = 0.01) -> float:
    """Share of members flagged at the most permissive threshold that flags at most ``fpr``
    of the non-members (the ROC's highest point with FPR <= ``fpr``).

    Flagging is "at least as memorized as the threshold"; a threshold is any observed
    score, so tied scores are flagged together. With fewer than ``1 / fpr`` non-members
    this is the TPR at no false positive. ``inf`` scores compare as the largest values.
    """
    a, b = _lower_is_more(members, others, more_memorized)
    thresholds = np.unique(np.concatenate([a, b]))
    tp = np.searchsorted(np.sort(a), thresholds, side="right") / a.size
    fp = np.searchsorted(np.sort(b), thresholds, side="right") / b.size
    ok = fp <= fpr + 1e-12
    return float(tp[ok].max()) if ok.any() else 0.0


def _ordered(results: list[dict[str, Any]], ranking: list[int] | None,
             more_memorized: str) -> list[int]:
    if ranking is not None:
        return list(ranking)
    sign = 1.0 if more_memorized == "lower" else -1.0
    return sorted(range(len(results)), key=lambda i: (sign * float(results[i]["score"]), i))


def _rank_strength(order: list[int]) -> list[float]:
    """Rank position per image (0 = most memorized): breaks ``inf`` ties as the measure does."""
    pos = [0.0] * len(order)
    for r, i in enumerate(order):
        pos[i] = float(r)
    return pos


def members_summary(results: list[dict[str, Any]], members: list[bool],
                    ranking: list[int], more_memorized: str) -> dict[str, Any]:
    """Members vs non-members: AUROC and TPR at 1 % FPR, on the scores and on the ranking.

    ``auroc`` and ``tpr_at_1pct_fpr`` use the scores alone (ties, e.g. InvMM's ``inf``,
    count half); ``auroc_ranking`` and ``tpr_at_1pct_fpr_ranking`` use the measure's
    ranking, which may break score ties (InvMM orders ``inf`` by best similarity).
    """
    scores = [float(r["score"]) for r in results]
    pos = _rank_strength(ranking)
    m = [s for s, f in zip(scores, members, strict=True) if f]
    o = [s for s, f in zip(scores, members, strict=True) if not f]
    pm = [p for p, f in zip(pos, members, strict=True) if f]
    po = [p for p, f in zip(pos, members, strict=True) if not f]
    return {
        "members": len(m), "non_members": len(o),
        "auroc": auroc(m, o, more_memorized),
        "auroc_ranking": auroc(pm, po),
        "tpr_at_1pct_fpr": tpr_at_fpr(m, o, more_memorized),
        "tpr_at_1pct_fpr_ranking": tpr_at_fpr(pm, po),
        "members_in_top": sum(members[i] for i in ranking[: len(m)]),
    }


def _csv(results: list[dict[str, Any]], ranking: list[int],
         members: list[bool] | None) -> str:
    keys = [k for k in results[0] if not isinstance(results[0][k], (list, dict))]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", *keys, *(["member"] if members is not None else [])])
    rank_of = {i: r for r, i in enumerate(ranking, 1)}
    for i, r in enumerate(results):
        w.writerow([rank_of[i], *[r.get(k) for k in keys],
                    *([int(members[i])] if members is not None else [])])
    return buf.getvalue()


def _histogram(ax: Any, results: list[dict[str, Any]], members: list[bool] | None,
               measure: str, direction: str) -> None:
    scores = np.array([float(r["score"]) for r in results])
    finite = np.isfinite(scores)
    lo, hi = (scores[finite].min(), scores[finite].max()) if finite.any() else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 21)
    if members is None:
        ax.hist(scores[finite], bins=bins, alpha=0.8, label="all images")
    else:
        flags = np.array(members)
        for flag, label in ((True, "members"), (False, "non-members")):
            ax.hist(scores[(flags == flag) & finite], bins=bins, alpha=0.6, label=label)
    n_inf = int((~finite).sum())
    ax.set_title(f"{measure} scores, {len(scores)} images"
                 + (f" ({n_inf} inf not shown)" if n_inf else ""))
    ax.set_xlabel(f"score ({direction} = more memorized)")
    ax.legend()


def _png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plot_scores(path: Path, results: list[dict[str, Any]], members: list[bool] | None,
                 measure: str, direction: str) -> None:
    """The score histogram (split by membership when known), written whatever the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(4.8, 3.6))
    _histogram(ax, results, members, measure, direction)
    _png(fig, path)


def _plot(path: Path, results: list[dict[str, Any]], members: list[bool], ranking: list[int],
          measure: str, summary: dict[str, Any], direction: str = "lower") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flags = np.array(members)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    _histogram(ax1, results, members, measure, direction)
    # ROC over the measure's ranking, most memorized first
    tp = np.cumsum([flags[i] for i in ranking]) / flags.sum()
    fp = np.cumsum([not flags[i] for i in ranking]) / (~flags).sum()
    ax2.plot(np.r_[0, fp], np.r_[0, tp], marker=".")
    ax2.plot([0, 1], [0, 1], ls=":", c="grey")
    ax2.set_xlabel("non-members flagged")
    ax2.set_ylabel("members flagged")
    ax2.set_title(f"ROC of the ranking, auroc_ranking {summary['auroc_ranking']:.3f}")
    _png(fig, path)


def _takes_out(fn: Any) -> bool:
    import inspect

    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def run_measure(name: str, images: Path, model: str, *, members: Path | None = None,
                out: Path | None = None, options: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Run memorization measure ``name`` on the images under ``images``; write ``out``.

    Args:
        name: a registered memorization measure (``invmm``, ``wen``, ``extraction``...).
        images: an image file or folder.
        model: what the measure scores against (a diffusers folder for the built-ins).
        members: a file naming the training members among the images (AUROC).
        out: a folder for ``scores.csv``, ``report.json``, ``members.png`` and the
            measure's per-image evidence.
        options: keyword arguments of the measure.

    Returns:
        The JSON-safe report: ``measure, results, ranking, provenance`` and, with members,
        ``members`` (AUROC, counts).

    Raises:
        UnknownNameError: no such measure (the message lists the registered ones).
        InputError: bad images, members file or options.
    """
    from forensics.plugin.manager import get

    measure = get("memorization_measures", name)
    files = image_list(images)
    flags = read_members(members, files) if members is not None else None
    direction = getattr(measure, "more_memorized", "lower")
    options = dict(options or {})
    if hasattr(measure, "run"):
        if out is not None and _takes_out(measure.run) and "out" not in options:
            Path(out).mkdir(parents=True, exist_ok=True)
            options["out"] = out  # results written as each image finishes; reruns resume
        report = measure.run(files, model, **options)
        results, ranking = report.results, list(report.ranking)
        body = report.to_json()
    else:
        results = list(measure.score(files, model, **options))
        ranking = _ordered(results, None, direction)
        body = {"measure": name, "results": results,
                "ranking": [results[i]["image"] for i in ranking],
                "provenance": {"measure": name, "options": {k: str(v) for k, v in
                                                            options.items()}}}
        report = None
    if len(results) != len(files):
        raise InputError(f"measure {name} returned {len(results)} results for "
                         f"{len(files)} images")
    body["measure"] = name
    body["more_memorized"] = direction
    if flags is not None:
        body["members"] = members_summary(results, flags, ranking, direction)
        body["members"]["file"] = str(members)
    body = jsonable(body)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / SCORES_CSV, _csv(results, ranking, flags))
        if report is not None and hasattr(report, "write_evidence"):
            report.write_evidence(out)
        _plot_scores(out / SCORES_PNG, results, flags, name, direction)
        if flags is not None:
            _plot(out / MEMBERS_PNG, results, flags, ranking, name, body["members"], direction)
        atomic_write_text(out / REPORT_JSON, json.dumps(body, indent=2) + "\n")
    return body
