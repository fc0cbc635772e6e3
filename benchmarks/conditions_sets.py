"""Attribution under storage conditions on the three development sets, as fp attribute answers.

Called by ``bench_conditions.py --attribution``. Reuses the work folder of
``bench_attribution.py --belonging`` (``attribution_sets``: the sets' image folders, the two
baselines and the clean per-image rows) and, per condition of :data:`CONDITIONS`:

1. writes every image the benchmark uses under that condition as the file a user would
   have (JPEG files for ``jpegNN``, JPEG decoded and saved as PNG for ``jpeg75+png``, PNG
   otherwise; the transforms of :mod:`forensics.paper.synth`, seeded by relative path as
   ``fp enroll --conditions`` seeds them): the enrolled images (each model's curves under
   the condition, from the same images) and the queries (one suspect per query, its own
   size, at most :data:`MAX_SUSPECT` images);
2. embeds them through fp's embedding cache and caches their ``resid-early`` rows in the
   work folder (``rows-cond-<condition>.npz``): a second run costs seconds;
3. reads each suspect's storage from its files (``forensics.steps.storage.set_conditions``,
   cached as ``storage-<condition>.json``): the truth is never passed on;
4. answers every suspect twice with ``attribution_sets.Answerer`` (the MMD test with the
   score/margin rule as a gate, what fp attribute ships): **matched**, against a bank that
   holds each model's clean curves and its curves of the condition, compared with the
   curves :func:`forensics.steps.storage.select` picks from what the files read as (for
   the conditions that cannot be read from files, resizing, cropping and noise, the
   condition named as ``--condition`` names it); **without**, against the clean curves
   (``--condition clean``).

Measured before the rule of :data:`forensics.defaults.CONDITION_FIGURES` (the rule is made
from these figures): :func:`forensics.steps.storage.select` is called with
``apply_figures=False``.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import attribution_sets as S
import bench_attribution as B
import numpy as np

#: The conditions measured, in order (the names of ``forensics.defaults.CONDITIONS``, and
#: ``jpeg75+png``: JPEG 75 decoded and saved again as PNG).
CONDITIONS = ("clean", "jpeg90", "jpeg75", "jpeg50", "jpeg75+png", "half", "double", "crop90",
              "noise3")
#: Conditions whose decoded pixels are another's (same rows, other files).
SAME_PIXELS = {"jpeg75+png": "jpeg75"}
#: Images per suspect at most (one suspect per query: the query itself, or a seeded subset).
MAX_SUSPECT = 128
#: Conditions fp reads from the files (the others are named with ``--condition``).
READ = ("clean", "jpeg90", "jpeg75", "jpeg50", "jpeg75+png")


def _suffix(cond: str) -> str:
    return ".jpg" if cond.startswith("jpeg") and not cond.endswith("+png") else ".png"


def condition_bytes(cond: str, img, rel: str) -> bytes:
    """One image (PIL) under ``cond``, as the bytes of the file a user would have."""
    from PIL import Image

    from forensics import defaults
    from forensics.paper import synth

    if cond.endswith("+png"):
        with Image.open(io.BytesIO(synth.jpeg_bytes(img, int(cond[4:-4])))) as im:
            im.load()
            img = im.copy()
    elif cond.startswith("jpeg"):
        return synth.jpeg_bytes(img, int(cond[4:]))
    elif cond != "clean":
        kind, params = defaults.CONDITIONS[cond]
        img = synth.transform(kind, img, synth.image_rng(0, rel), **params)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _subset(names: list[str], seed: str) -> list[str]:
    """At most :data:`MAX_SUSPECT` of ``names`` (sorted), seeded by the query's name."""
    if len(names) <= MAX_SUSPECT:
        return names
    rng = np.random.default_rng(int.from_bytes(seed.encode()[:8].ljust(8, b"_"), "little"))
    return [names[i] for i in np.sort(rng.choice(len(names), MAX_SUSPECT, replace=False))]


def sources(work: Path) -> dict[str, dict[str, list[Path]]]:
    """``{"mnist"|"cifar": {group: [source file, ...]}}``: every image used, by group.

    Groups: ``p/<arch>/<enroll1|enroll2|query>`` (MNIST protocol), ``x/<arch>`` (second
    code base, at most :data:`MAX_SUSPECT`), ``c/<key>`` (CIFAR tiles in grid order).
    """
    import attribution_extra as X

    zoo = B.materialize(work)
    f = B.folders(zoo, work)
    proto = S.protocol_subset(work, f)
    xall = X.xcode_folder(zoo, work)
    cf, models = S.cifar_folders(work)
    out: dict[str, dict[str, list[Path]]] = {"mnist": {}, "cifar": {}}
    for a in B.ARCHS:
        for part in ("enroll1", "enroll2", "query"):
            out["mnist"][f"p/{a}/{part}"] = sorted((proto / a / part).glob("*.png"))
    for a in S.XARCHS:
        names = sorted(p.name for p in (xall / a).glob("*.png"))
        out["mnist"][f"x/{a}"] = [xall / a / n for n in _subset(names, a)]
    for m in models:
        out["cifar"][f"c/{m['key']}"] = sorted((cf["gen"] / m["key"]).glob("*.png"))
    return out


def write_condition(work: Path, cond: str, src: dict[str, dict[str, list[Path]]]
                    ) -> dict[str, Path]:
    """Every source image under ``cond`` in ``work/cond/<cond>/<set>/<group>/`` (once)."""
    from PIL import Image

    root = work / "cond" / cond
    for set_name, groups in src.items():
        done = root / set_name / ".complete"
        if done.is_file():
            continue
        for group, files in groups.items():
            folder = root / set_name / group
            folder.mkdir(parents=True, exist_ok=True)
            for p in files:
                dst = folder / (p.stem + _suffix(cond))
                if dst.exists():
                    continue
                if cond == "clean":  # the very files embedded before: the cache answers
                    B._link(p, dst)
                    continue
                with Image.open(p) as im:
                    im.load()
                    img = im.copy()
                dst.write_bytes(condition_bytes(cond, img, f"{group}/{p.name}"))
        done.write_text("ok\n")
    return {s: root / s for s in src}


#: The baseline each set's rows are read against.
BASELINES = {"mnist": B.BASELINE, "cifar": "cifar-zoo"}


def condition_rows(work: Path, cond: str, set_name: str, src, encoder: str,
                   cache: Path) -> dict[str, np.ndarray] | None:
    """Per-image ``resid-early`` rows of every group of one set under ``cond`` (cached in
    ``work``; None: not embedded yet and ``encoder`` is None)."""
    pixels = SAME_PIXELS.get(cond, cond)
    out = work / f"rows-cond-{pixels}-{set_name}.npz"
    if out.is_file():
        return dict(np.load(out))
    if encoder is None:
        return None
    import forensics
    from forensics.data.embed import embed_folder
    from refbank import Bank

    folder = write_condition(work, pixels, src)[set_name]
    loaded = forensics.load_baseline(BASELINES[set_name], bank=Bank(work / "bank-sets"))
    t0 = time.perf_counter()
    emb = embed_folder(folder, encoder, cache_dir=cache, device="cpu", progress=False)
    rows = S._rows_of(loaded, emb)
    groups: dict[str, list[int]] = {}
    for i, (rel, *_r) in enumerate(emb.manifest.entries):
        groups.setdefault(rel.rsplit("/", 1)[0], []).append(i)
    data = {g: rows[np.asarray(idx)] for g, idx in groups.items()}  # sorted, as the sources
    B.log(f"{cond} {set_name}: {len(emb)} images embedded ({time.perf_counter() - t0:.0f} s)")
    np.savez(out, **data)
    return data


def storage_of(work: Path, cond: str, src) -> dict[str, dict]:
    """Each query's storage as read from its files under ``cond`` (cached in ``work``)."""
    from forensics.steps.storage import set_conditions

    out = work / f"storage-{cond}.json"
    if out.is_file():
        return json.loads(out.read_text())
    folders = write_condition(work, cond, src)
    read = {}
    for set_name, groups in src.items():
        for g in groups:
            if g.startswith("p/") and not g.endswith("/query"):
                continue
            read[g] = set_conditions(sorted((folders[set_name] / g).iterdir()))
    out.write_text(json.dumps(read, indent=1))
    return read


def prepare(work: Path, encoder: str | None, cache: Path, conditions=CONDITIONS,
            sets=("cifar", "mnist")) -> tuple[dict, dict, dict]:
    """Rows and read storage of every condition and set, set by set (all of CIFAR's
    conditions first: it is the cheaper set). ``encoder`` None: only what is cached.

    Returns ``({cond: {set: rows}}, {cond: storage}, sources)``.
    """
    src = sources(work)
    rows: dict[str, dict] = {c: {} for c in conditions}
    read: dict[str, dict] = {}
    t0 = time.perf_counter()
    for set_name in sets:
        for cond in conditions:
            got = condition_rows(work, cond, set_name, src, encoder, cache)
            if got is not None:
                rows[cond][set_name] = got
                B.log(f"{cond} {set_name}: rows ready ({time.perf_counter() - t0:.0f} s)")
    for cond in conditions:
        if rows[cond]:
            read[cond] = storage_of(work, cond, src)
    return rows, read, src


# -- answering, as fp attribute does -----------------------------------------------------------


def problems(rows: dict[str, dict[str, np.ndarray]], models: list[dict]) -> list:
    """``attribution_sets``' problems (banks and queries) from one condition's rows of each
    set embedded under it."""
    out = []
    if "mnist" in rows:
        r = rows["mnist"]
        m = {f"{a}/{part}": r[f"p/{a}/{part}"] for a in B.ARCHS
             for part in ("enroll1", "enroll2", "query")}
        m.update({f"x/{a}": r[f"x/{a}"] for a in S.XARCHS})
        out += S.mnist_problems(m)
    if "cifar" in rows:
        out += S.cifar_problems({mm["key"]: rows["cifar"][f"c/{mm['key']}"] for mm in models},
                                models)
    return out


def _group(problem_name: str, query: str, keys: dict[str, str]) -> str:
    """The storage group of a query (where its files are)."""
    if problem_name == "mnist":
        return f"p/{query}/query"
    if problem_name == "mnist-xcode":
        return f"x/{query[2:]}"
    return f"c/{keys[query]}"


def _pool(models: list[str], curve_cond: str | None) -> list[dict]:
    """Curve records as storage.select reads them: each model's clean curves, and its
    curves of ``curve_cond`` (None: clean only)."""
    out = []
    for k in models:
        for i in range(2):
            out.append({"model": k, "i": i, "params": {}})
            if curve_cond is not None:
                out.append({"model": k, "i": i, "params": {"condition": curve_cond}})
    return out


class Answers:
    """Every suspect of every problem under every condition, matched and without."""

    def __init__(self, work: Path, rows: dict, read: dict, models: list[dict]):
        from forensics import defaults

        self.work, self.rows, self.read, self.models = work, rows, read, models
        self.keys = {m["model_id"]: m["key"] for m in models}
        self.masks = {"mnist": S.entry_mask(work, B.BASELINE),
                      "cifar": S.entry_mask(work, "cifar-zoo")}
        self.method = S.Method(defaults.BELONG_KIND, defaults.BELONG_GATE)
        self.answerers: dict = {}
        self.problems = {cond: {p.name: p for p in problems(r, models)}
                         for cond, r in rows.items()}

    def _answerer(self, name: str, curves: str):
        key = (name, SAME_PIXELS.get(curves, curves))
        if key not in self.answerers:
            p = self.problems[key[1]][name]
            mask = self.masks["mnist" if name.startswith("mnist") else "cifar"]
            self.answerers[key] = S.Answerer(S.Problem(name, p.bank, []), mask)
        return self.answerers[key]

    def one(self, name: str, cond: str, query: int, matched: bool) -> dict:
        """The answer to one suspect (query ``query`` of problem ``name``) under ``cond``."""
        from forensics.steps.storage import select

        p = self.problems[cond][name]
        qname, rows, truth, label = p.queries[query]
        suspect = self.read[cond][_group(name, qname, self.keys)]
        named = None if cond in READ else cond
        if matched:
            pool = _pool(sorted(p.bank), None if cond == "clean" else SAME_PIXELS.get(cond, cond))
        else:
            pool, named = _pool(sorted(p.bank), None), "clean"
        sel = select(pool, suspect, named, apply_figures=False)
        base = {"set": name, "query": qname, "truth": truth, "cond": label,
                "storage": cond, "matched": matched, "curves": sel.condition,
                "read": suspect.get("label"), "n": len(rows)}
        if sel.inconclusive:
            return {**base, "family": None, "unknown": True, "inconclusive": True,
                    "confidence": None, "right": truth is None}
        a = self._answerer(name, sel.condition).answer(rows, self.method)
        if named is not None and select(pool, suspect, apply_figures=False).condition != named:
            a["confidence"] = None  # as fp attribute: confidence is calibrated like with like
        right = a["family"] == truth if truth is not None else a["unknown"]
        return {**base, **{k: _plain(v) for k, v in a.items()}, "inconclusive": False,
                "right": bool(right)}

    def of(self, cond: str, name: str) -> list[dict]:
        """Every answer to problem ``name`` under ``cond`` (cached in the work folder)."""
        path = self.work / f"answers-cond-{cond}-{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        out = []
        for q in range(len(self.problems[cond][name].queries)):
            for matched in (True, False):
                if cond == "clean" and not matched:
                    continue  # the same answer
                out.append(self.one(name, cond, q, matched))
        path.write_text(json.dumps(out))
        return out

    def all(self, conditions=CONDITIONS) -> list[dict]:
        out = []
        t0 = time.perf_counter()
        for cond in conditions:
            for name in self.problems.get(cond, {}):
                out += self.of(cond, name)
                B.log(f"{cond}: answered ({len(out)} answers, "
                      f"{time.perf_counter() - t0:.0f} s)")
        return out


def _plain(v):
    """JSON-ready numbers."""
    if isinstance(v, np.generic):
        return v.item()
    return v


# -- figures and tables -----------------------------------------------------------------------


def figures(answers: list[dict]) -> dict:
    """top-1 of new latents, inconclusive, wrong above 0.5, others not named."""
    gen = [a for a in answers if a["truth"] is not None]
    oth = [a for a in answers if a["truth"] is None]
    conf = [a.get("confidence") for a in answers]
    # a family named wrongly (or named at all where the right answer is unknown)
    wrong = [a["family"] is not None and a["family"] != a["truth"] and c is not None
             and c > 0.5 for a, c in zip(answers, conf, strict=True)]
    # any wrong answer, an unknown for a genuine suspect included (attribution_sets' figure)
    missed = [not a["right"] and c is not None and c > 0.5
              for a, c in zip(answers, conf, strict=True)]
    return {
        "n": len(answers),
        "top1": float(np.mean([a["right"] for a in gen])) if gen else None,
        "n_genuine": len(gen),
        "inconclusive": float(np.mean([a["inconclusive"] for a in answers])) if answers
        else None,
        "wrong_above_half": float(np.mean(wrong)) if answers else None,
        "n_wrong_above_half": int(np.sum(wrong)),
        "n_any_wrong_above_half": int(np.sum(missed)),
        "others_unknown": float(np.mean([a["unknown"] for a in oth])) if oth else None,
        "curves": sorted({a["curves"] for a in answers}),
        "read": sorted({str(a["read"]) for a in answers}),
    }


def per_set(answers: list[dict]) -> dict:
    """``{(set, condition, matched): figures}`` over the three sets of ``S.SETS``."""
    out = {}
    for s, prefixes in S.SETS.items():
        for cond in dict.fromkeys(a["storage"] for a in answers):
            for matched in (True, False):
                sel = [a for a in answers if S._in(a, prefixes) and a["storage"] == cond
                       and a["matched"] == matched]
                if sel:
                    out[(s, cond, matched)] = figures(sel)
    return out


def table(per: dict, set_name: str) -> list[str]:
    """One set's table: a row per condition, each cell ``matched / without``."""
    lines = ["| condition | read from the files as | curves compared (matched) | top-1 | "
             "inconclusive | wrong family, confidence > 0.5 | any wrong answer, confidence "
             "> 0.5 | others called unknown |", "|---" * 8 + "|"]
    for (s, cond, matched), f in per.items():
        if s != set_name or not matched:
            continue
        w = per.get((s, cond, False), f)  # clean: the same answers

        def both(key: str, fmt: str = ".2f") -> str:
            return f"{S._f(f[key], fmt)} / {S._f(w[key], fmt)}"  # noqa: B023

        lines.append(
            f"| {cond} | {', '.join(f['read'])} | {', '.join(f['curves'])} | {both('top1')} | "
            f"{both('inconclusive')} | {f['n_wrong_above_half']}/{f['n']} / "
            f"{w['n_wrong_above_half']}/{w['n']} | {f['n_any_wrong_above_half']} / "
            f"{w['n_any_wrong_above_half']} | {both('others_unknown')} |")
    return lines


def curve_figures(answers: list[dict], date: str) -> dict[str, dict]:
    """What :data:`forensics.defaults.CONDITION_FIGURES` holds: per condition of enrolled
    curves (other than clean), over the matched answers compared with those curves: the
    worst set's top-1, the largest fall of top-1 from the clean answers of the same set,
    and the wrong answers with confidence above 0.5 (all sets)."""
    out: dict[str, dict] = {}
    matched = [a for a in answers if a["matched"] and not a["inconclusive"]]
    clean = {s: figures([a for a in matched if a["storage"] == "clean" and S._in(a, pre)])
             for s, pre in S.SETS.items()}
    for curves in dict.fromkeys(a["curves"] for a in matched if a["curves"] != "clean"):
        worst, worst_set, drop, drop_set, wrong, n = 1.0, "", 0.0, "", 0, 0
        for s, prefixes in S.SETS.items():
            sel = [a for a in matched if a["curves"] == curves and S._in(a, prefixes)]
            if not sel:
                continue
            f = figures(sel)
            wrong += f["n_wrong_above_half"]
            n += f["n"]
            if f["top1"] is None:
                continue
            if f["top1"] < worst:
                worst, worst_set = f["top1"], s
            if clean[s]["top1"] is not None and clean[s]["top1"] - f["top1"] > drop:
                drop, drop_set = clean[s]["top1"] - f["top1"], s
        out[curves] = {"top1": round(worst, 3), "set": worst_set, "drop": round(drop, 3),
                       "drop_set": drop_set or worst_set, "wrong_above_half": wrong,
                       "answers": n, "measured": date}
    return out
