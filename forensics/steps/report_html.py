"""``report.html``: one self-contained case report of an attribution, to hand over.

Everything is in the one file: the decision with its confidence and ``unknown``
threshold, the ranking, the picture and the suspect images' thumbnails (inlined as
``data:`` URIs), every file's hash, the bank rows and the baseline used, and the answer's
whole provenance (rendered generically, as nested tables, so that any field it holds is
shown). No script, no external style sheet, font or image: it opens offline, in any
browser, and prints. Every text from the answer, the bank or file names is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forensics.data.atomic import atomic_write_text

#: Suspect images shown as thumbnails (all are listed with their hashes).
MAX_THUMBNAILS = 200
THUMBNAIL_PX = 64
#: Items of a list shown before the rest is folded away.
LIST_SHOWN = 12

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1180px;padding:0 1em;color:#1d1d1f;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.8em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
.muted{color:#666;font-size:.9em}
.decision{border:2px solid #2a7d2e;background:#f0f8f0;border-radius:8px;padding:.8em 1.2em}
.decision.unknown{border-color:#b3261e;background:#fdf0ef}
.decision .verdict{font-size:1.4em;font-weight:600}
table{border-collapse:collapse;margin:.4em 0;font-size:.86em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f5f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv>tbody>tr>th{width:14em;font-weight:600}
code,.hash{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em;
word-break:break-all}
tr.below td{color:#888}
img.picture{max-width:100%;border:1px solid #eee}
.sheet{display:flex;flex-wrap:wrap;gap:6px}
.sheet figure{margin:0;text-align:center;font-size:.7em;width:72px}
.sheet img{width:64px;height:64px;object-fit:contain;background:#eee;
image-rendering:pixelated}
details>summary{cursor:pointer;color:#0b57d0}
@media print{details{display:block}}
"""


def esc(value: Any) -> str:
    """``value`` as escaped HTML text (None as an empty string)."""
    return "" if value is None else html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return esc({True: "yes", False: "no", None: "-"}[value])
    if isinstance(value, float):
        return esc("-" if not math.isfinite(value) else f"{value:.6g}")
    return esc(value)


def nested(value: Any) -> str:
    """Any JSON-like value as HTML: mappings as key/value tables, lists as rows."""
    if isinstance(value, Mapping):
        if not value:
            return '<span class="muted">(empty)</span>'
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{nested(v)}</td></tr>"
                       for k, v in value.items())
        return f'<table class="kv"><tbody>{rows}</tbody></table>'
    if isinstance(value, list | tuple):
        if not value:
            return '<span class="muted">(none)</span>'
        if all(not isinstance(v, Mapping | list | tuple) for v in value):
            items = [_fmt(v) for v in value]
            text = ", ".join(items[:LIST_SHOWN])
            if len(items) > LIST_SHOWN:
                text += (f"<details><summary>{len(items) - LIST_SHOWN} more</summary>"
                         f"{', '.join(items[LIST_SHOWN:])}</details>")
            return f"<code>{text}</code>"
        rows = "".join(f"<tr><td class=num>{i}</td><td>{nested(v)}</td></tr>"
                       for i, v in enumerate(value))
        return f"<table><tbody>{rows}</tbody></table>"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f'<span class="hash">{esc(value)}</span>'
    return _fmt(value)


class _Raw(str):
    """Markup that :func:`_table` inserts as it is (a link the page built itself)."""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]],
           classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{esc(classes[i])}"' if classes and classes[i] else ""
        cells = "".join(
            f"<td>{c}</td>" if isinstance(c, _Raw) else
            f"<td class=num>{_fmt(c)}</td>" if isinstance(c, int | float) and
            not isinstance(c, bool) else f"<td>{nested(c)}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def data_uri(png: bytes, mime: str = "image/png") -> str:
    """``png`` (or any bytes of type ``mime``) as a ``data:`` URI."""
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def _thumbnail(path: Path) -> str | None:
    from forensics.data.images import load_rgb
    from forensics.errors import InputError

    try:
        im = load_rgb(path)
    except InputError:
        return None
    im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return data_uri(buf.getvalue())


def _decision(data: dict[str, Any]) -> str:
    d, cal = data["decision"], data.get("calibration") or {}
    att = (data.get("provenance") or {}).get("attribution") or {}
    if d.get("inconclusive"):
        verdict = "Decision: INCONCLUSIVE (no enrolled curves stored like these images)"
    elif d.get("unknown"):
        closest = d.get("closest") or d.get("nearest_family")
        verdict = f"Decision: UNKNOWN (closest family {closest}, not the decision)"
    else:
        verdict = f"Decision: family {d.get('family')}, model {d.get('model')}"
    consistent = d.get("consistent") or []
    facts = {
        "model level: consistent with": ", ".join(
            f"{c['model']} ({c['family']}, p {c['p_value']:.3g})" for c in consistent) or "none",
        "family level": "unknown" if d.get("unknown") else d.get("family"),
        "confidence (family)": d.get("confidence"),
        "confidence (model)": d.get("model_confidence"),
        "best score": d.get("score"),
        "unknown threshold": d.get("threshold"),
        "threshold from": cal.get("note") or None,
        "nearest": f"{d.get('nearest_model')} ({d.get('nearest_family')}), curve "
                   f"{d.get('nearest_curve_id')}",
        "fingerprint": att.get("fingerprint"),
        "matcher": att.get("matcher"),
        "why": d.get("reason"),
        "suspects stored as": ((data.get("conditions") or {}).get("suspect") or {}).get("label"),
        "compared with curves": ((data.get("conditions") or {}).get("compared_with")
                                 or {}).get("condition"),
        "storage differs": "; ".join((data.get("conditions") or {}).get("mismatch") or [])
                           or None,
    }
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in facts.items()
                   if v is not None)
    cls = "decision unknown" if d.get("unknown") else "decision"
    return (f'<div class="{cls}"><div class="verdict" id="decision">{esc(verdict)}</div>'
            f'<table class="kv"><tbody>{rows}</tbody></table></div>')


def _stability(boot: dict[str, Any] | None) -> str:
    """The bootstrap, named for what it is: stability, not a probability of being right."""
    if not boot:
        return '<p class="muted">Not measured (--n-boot 0).</p>'
    names = {"confidence": "stability (family)", "model_confidence": "stability (model)"}
    shown = {names.get(k, k): v for k, v in boot.items()}
    return ('<p class="muted">The share of resamples of the suspect images that give the '
            'same answer: how much the answer depends on which images were given. It is not '
            'the probability that the answer is right (that is the confidence above), and it '
            'can be 1.00 on a wrong answer.</p>' + nested(shown))


def _ranking(data: dict[str, Any], rows_by_id: dict[str, dict[str, Any]]) -> str:
    threshold = data["decision"].get("threshold")
    out, classes = [], []
    for m in data["ranking"]:
        r = rows_by_id.get(m["curve_id"], {})
        above = threshold is None or m["score"] >= threshold
        out.append([m["rank"], m["model"], m["family"], r.get("checkpoint"), m["score"],
                    "yes" if above else "no", m["curve_id"]])
        classes.append("" if above else "below")
    return _table(["rank", "model", "family", "checkpoint", "score", "at or above threshold",
                   "curve_id"], out, classes)


def _belonging(data: dict[str, Any]) -> str:
    tests = data.get("belonging") or []
    if not tests:
        return '<p class="muted">No belonging test (no enrolled model with two curves of rows).</p>'
    out = [[t["model"], t["family"], t["p_value"], "yes" if t["consistent"] else "no",
            t["statistic"], t["null_median"], t["n_images"], t["n_curves"], t["draws"]]
           for t in tests]
    # what the statistic is: the attributor's mean log-probability (higher: closer), or a
    # kernel distance (lower: closer)
    what = {"probe": "mean log-probability (higher: closer)", "mmd": "squared MMD (lower: "
            "closer)", "energy": "energy distance (lower: closer)"}
    kinds = sorted({t.get("kind", "mmd") for t in tests})
    stat = "statistic: " + "; ".join(what.get(k, k) for k in kinds)
    return _table(["model", "family", "p-value", "consistent", stat, "null median",
                   "images tested", "curves", "null draws"], out,
                  ["" if t["consistent"] else "below" for t in tests])


def _images(evidence: Any) -> tuple[str, str]:
    manifest = getattr(evidence, "manifest", None)
    if manifest is None:
        note = ('<p class="muted">The suspect was given as embeddings, not image files: '
                'no thumbnails or file hashes.</p>')
        return note, note
    entries = list(manifest.entries)
    figures = []
    for i, e in enumerate(entries[:MAX_THUMBNAILS]):
        uri = _thumbnail(Path(manifest.root) / e.relpath)
        img = (f'<img src="{uri}" alt="{esc(e.relpath)}" title="{esc(e.relpath)}">' if uri
               else '<span class="muted">unreadable</span>')
        figures.append(f"<figure>{img}<figcaption>{i}</figcaption></figure>")
    shown = (f"all {len(entries)}" if len(entries) <= MAX_THUMBNAILS
             else f"the first {MAX_THUMBNAILS} of {len(entries)}")
    sheet = (f'<p class="muted">{esc(shown)} images of <code>{esc(manifest.root)}</code>, '
             f'in the order used (numbers index the table below).</p>'
             f'<div class="sheet">{"".join(figures)}</div>')
    hashes = _table(["#", "file", "bytes", "SHA-256"],
                    [[i, e.relpath, int(e.size), e.sha256] for i, e in enumerate(entries)])
    skipped = ""
    if manifest.skipped:
        skipped = "<h3>Left out (unreadable)</h3>" + _table(
            ["file", "reason"], [[s.relpath, s.reason] for s in manifest.skipped])
    total = (f'<p>{len(entries)} files; manifest SHA-256 '
             f'<span class="hash">{esc(manifest.sha256)}</span></p>')
    return sheet, total + hashes + skipped


_CURVE_COLUMNS = ("curve_id", "model", "family", "checkpoint", "split", "n_images",
                  "manifest_sha256", "source", "tool_version", "created", "row_sha256")


def _bank_rows(rows: Sequence[dict[str, Any]], ranked: set[str]) -> str:
    body = [[("ranked" if r["curve_id"] in ranked else ""), *(
        r.get(c).isoformat() if hasattr(r.get(c), "isoformat") else r.get(c)
        for c in _CURVE_COLUMNS)] for r in rows]
    return _table(["", *_CURVE_COLUMNS], body)


def _baseline(row: dict[str, Any] | None) -> str:
    if not row:
        return '<p class="muted">Not recorded.</p>'
    shown = {}
    for k, v in row.items():
        if k == "params_json":
            try:
                v = json.loads(v or "{}")
            except ValueError:
                pass
            k = "params"
        shown[k] = v.isoformat() if hasattr(v, "isoformat") else v
    return nested(shown)


def render(data: dict[str, Any], picture: bytes | None, rows: Sequence[dict[str, Any]],
           evidence: Any = None) -> str:
    """The HTML of a case report.

    Args:
        data: the answer (``Attribution.to_dict()``, the JSON of ``fp attribute``).
        picture: the PNG of the answer (inlined), or None.
        rows: the bank curve rows the suspect was compared with.
        evidence: a :class:`forensics.steps.reports.Evidence` (manifest, baseline row), or None.
    """
    from forensics._version import __version__

    prov = data.get("provenance") or {}
    att = prov.get("attribution") or {}
    inputs = prov.get("inputs") or {}
    rows_by_id = {r["curve_id"]: r for r in rows}
    ranked = {m["curve_id"] for m in data["ranking"]}
    sheet, hashes = _images(evidence)
    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    subject = inputs.get("folder") or "the suspect embeddings"
    pic = (f'<img class="picture" alt="attribution picture" src="{data_uri(picture)}">'
           if picture else '<p class="muted">No picture.</p>')
    summary = {
        "suspect": subject, "images": inputs.get("n_images"),
        "manifest SHA-256": inputs.get("manifest_sha256"),
        "baseline": f"{(prov.get('baseline') or {}).get('name')} "
                    f"({(prov.get('baseline') or {}).get('id')})",
        "encoder": (prov.get("encoder") or {}).get("name"),
        "encoder weights SHA-256": (prov.get("encoder") or {}).get("weights_sha256"),
        "bank": att.get("bank"), "references": att.get("n_references"),
        "measured": prov.get("created"), "fp": prov.get("tool_version"),
    }
    curve = data.get("curve") or {}
    curve_table = _table(["layer", "C_T"], list(zip(curve.get("layers", []),
                                                    curve.get("values", []), strict=False)))
    env = {"fp": __version__, "python": platform.python_version(),
           "platform": platform.platform(), "written": written}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fp attribution report: {esc(subject)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Attribution report</h1><p class=muted>{esc(subject)} &middot; written "
        f"{esc(written)} by fp {esc(__version__)}</p>",
        _decision(data),
        f"<h2>Case</h2>{nested(summary)}",
        f"<h2>Model level: could an enrolled model have made them?</h2>{_belonging(data)}",
        f"<h2>Ranking</h2>{_ranking(data, rows_by_id)}",
        f"<h2>Picture</h2>{pic}",
        f"<h2>Calibration of unknown</h2>{nested(data.get('calibration') or {})}",
        f"<h2>Stability under resampling</h2>{_stability(data.get('bootstrap'))}",
        f"<h2>Suspect images</h2>{sheet}",
        f"<h2>Files and hashes</h2>{hashes}",
        f"<h2>Bank rows used</h2><p class=muted>{len(rows)} enrolled curve(s) of the "
        f"baseline; the ranked ones are marked.</p>{_bank_rows(rows, ranked)}",
        f"<h2>Baseline</h2>{_baseline(getattr(evidence, 'baseline', None))}",
        f"<h2>Curve</h2>{curve_table}",
        f"<h2>Provenance</h2><p class=muted>Everything the answer records.</p>{nested(prov)}",
        f"<h2>Report</h2>{nested(env)}",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_html(path: str | os.PathLike, data: dict[str, Any], picture: bytes | None,
               rows: Sequence[dict[str, Any]], evidence: Any = None) -> Path:
    """Write :func:`render`'s report to ``path`` atomically; returns the path."""
    target = Path(path)
    atomic_write_text(target, render(data, picture, rows, evidence))
    return target


def render_index(answers: Sequence[Any]) -> str:
    """The index page of a batch of case reports: one row per suspect set, linking its
    report, or saying why it has none."""
    from forensics._version import __version__

    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    rows, classes = [], []
    for a in answers:
        if a.result is None:
            rows.append([a.folder, "-", "-", f"failed: {a.error['message']}", "-", "-"])
            classes.append("below")
            continue
        d = a.result.decision
        link = "-"
        if a.report is not None:
            rel = f"{Path(a.report).name}/report.html"
            link = f'<a href="{esc(rel)}">{esc(rel)}</a>'
        rows.append([a.folder, a.result.curve.provenance.get("inputs", {}).get("n_images"),
                     d.model_level(), d.family_level(),
                     "-" if d.confidence is None else f"{d.confidence:.2f}", _Raw(link)])
        classes.append("")
    failed = sum(a.result is None for a in answers)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>fp attribution reports</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Attribution reports</h1><p class=muted>{len(answers)} suspect set(s), "
        f"{failed} without an answer &middot; written {esc(written)} by fp "
        f"{esc(__version__)}</p>",
        _table(["suspect set", "images", "model level: consistent with", "family level",
                "confidence", "report"], rows, classes),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
