"""The three development sets as per-image rows, and the belonging test measured on them.

Called by ``bench_attribution.py --belonging`` (and after its tables). Each set is turned
into image folders once (work folder), embedded with the FID InceptionV3 encoder through
fp's embedding cache, and read back as ``resid-early``'s per-image rows against the set's
own baseline (T = 3,000 and P = 1,000 of its reference images, seeded). The rows are cached
in the work folder (``rows-<set>.npz``), so a second run costs seconds.

- **mnist**: the protocol of ``../shared/data/README.md`` at a quarter of its size: per
  architecture two enrolled curves (epochs 11-26 at grid positions 0-7, epochs 27-42 at
  8-15: one model, disjoint latents, see :data:`MNIST_POSITIONS`) and a query (epochs
  35-50 at positions 32-39, latents never enrolled), 128 images each;
- **mnist-xcode**: the same bank; queries are the second code base's epochs 9 + 24 (another
  trained model of every variant, and VAE / CVAE): all must come out unknown;
- **mnist-512**, **mnist-512-xcode**: the same at the protocol's own size, 512-image curves
  (the two enrolled curves at the same grid positions, so the same latent codes at two
  checkpoints, as the data README states the protocol; queries at positions 32-63);
- **cifar**: the CIFAR-10 zoo's protocol: per model_id, curve 1 = the first third of its
  tiles, curve 2 = the second third, query = the last third; closed set against the bank of
  all 26, and the open set: the ``history`` runs' queries against a bank of the ``current``
  runs, and each code base's queries against a bank of the other two.

Every figure is computed from the rows by ``forensics.stats.belonging`` (the test fp
attribute runs), ``forensics.stats.probe`` (the per-image attributor, on the rows as the
bank stores them: every entry, float16), ``forensics.stats.attribution.rank`` and
``forensics.stats.confidence``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import bench_attribution as B
import numpy as np
import peers

#: Suspect sizes measured (each a seeded subset of a query; the query's own size at most).
SIZES = (16, 32, 64, 128, 256, 512)
XARCHS = ("ACGAN", "BEGAN", "CGAN", "DRAGAN", "EBGAN", "GAN", "LSGAN", "WGAN", "WGAN_GP",
          "infoGAN", "VAE", "CVAE")


def _save_pngs(images: np.ndarray, folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for im, n in zip(images, names, strict=True):
        p = folder / n
        if not p.exists():
            Image.fromarray(im).save(p)


def cifar_folders(work: Path) -> tuple[dict[str, Path], list[dict]]:
    """T, P and one folder per CIFAR model (tiles ``NNN.png`` in grid order)."""
    z = np.load(B.DATA / "cifar_dev_zoo.npz")
    models = [json.loads(s) for s in z["models_json"]]
    root = work / "cifar"
    rng = np.random.default_rng(0)
    order = rng.permutation(len(z["reference"]))
    t, p = np.sort(order[:3000]), np.sort(order[3000:4000])
    ref = z["reference"]
    _save_pngs(ref[t], root / "T", [f"{i:05d}.png" for i in t])
    _save_pngs(ref[p], root / "P", [f"{i:05d}.png" for i in p])
    for m in models:
        imgs = z[m["key"]]
        _save_pngs(imgs, root / "gen" / m["key"], [f"{i:03d}.png" for i in range(len(imgs))])
    return {"T": root / "T", "P": root / "P", "gen": root / "gen"}, models


def _rows_of(loaded, emb) -> np.ndarray:
    import attribution_extra as X

    return X.per_image(loaded, "resid-early", emb).astype(np.float32)


#: Grid positions per protocol curve used here (curves of 16 epochs x 8 positions = 128
#: images; the protocol's 512 cost four times the embedding time). The two enrolled curves
#: take different positions of the enrolled block (0-7 and 8-15): the zoo samples one
#: fixed noise per position at every epoch, so curves at the same positions would share
#: their latent codes, and a null drawn from one curve against the other would measure two
#: checkpoints of the *same* latents, far tighter than a new set of the model is.
MNIST_POSITIONS = 8


def protocol_subset(work: Path, f: dict[str, Path]) -> Path:
    """The protocol's folders, :data:`MNIST_POSITIONS` positions per curve, the enrolled
    curves at disjoint positions (hard links)."""
    out = work / f"protocol-{MNIST_POSITIONS}-disjoint"
    for a in B.ARCHS:
        for name, (start, (lo, _hi)), shift in (("enroll1", B.PROTOCOL["enroll"][0], 0),
                                                ("enroll2", B.PROTOCOL["enroll"][1],
                                                 MNIST_POSITIONS),
                                                ("query", B.PROTOCOL["query"], 0)):
            for e in range(start, start + B.WINDOW):
                for pos in range(lo + shift, lo + shift + MNIST_POSITIONS):
                    n = f"e{e:02d}_{pos:03d}.png"
                    B._link(f["protocol"] / a / name / n, out / a / name / n)
    return out


def mnist_rows(work: Path, encoder: str, cache: Path, bank) -> dict:
    """Per-image rows of the MNIST protocol's folders and of the second code base."""
    out = work / "rows-mnist.npz"
    if out.is_file():
        return dict(np.load(out))
    import attribution_extra as X

    import forensics
    from forensics.data.embed import embed_folder

    zoo = B.materialize(work)
    f = B.folders(zoo, work)
    common = {"bank": bank, "cache_dir": cache, "device": "cpu", "progress": False}
    if not any(b["name"] == B.BASELINE for b in bank.baselines()):
        forensics.build_baseline(B.BASELINE, f["T"], f["P"], encoder=encoder, seed=0, **common)
    loaded = forensics.load_baseline(B.BASELINE, bank=bank)
    emb = embed_folder(protocol_subset(work, f), encoder, cache_dir=cache, device="cpu",
                       progress=False)
    rows = _rows_of(loaded, emb)
    data: dict[str, np.ndarray] = {}
    groups: dict[str, list[int]] = {}
    for i, (rel, *_r) in enumerate(emb.manifest.entries):
        arch, part, _name = rel.split("/")
        groups.setdefault(f"{arch}/{part}", []).append(i)
    for k, idx in groups.items():
        data[k] = rows[np.asarray(idx)]
    xemb = embed_folder(X.xcode_folder(zoo, work), encoder, cache_dir=cache, device="cpu",
                        progress=False)
    xrows = _rows_of(loaded, xemb)
    for a, idx in X.by_arch(xemb).items():
        data[f"x/{a}"] = xrows[idx]
    np.savez(out, **data)
    return data


def mnist_full_rows(work: Path, encoder: str, cache: Path, bank) -> dict:
    """Per-image rows of the MNIST protocol at its own size: 512-image curves, the two
    enrolled ones at the *same* grid positions (0-31, as the data README states it), the
    query at positions 32-63 (``arch/enroll1``, ``arch/enroll2``, ``arch/query``)."""
    out = work / "rows-mnist-512.npz"
    if out.is_file():
        return dict(np.load(out))
    import forensics
    from forensics.data.embed import embed_folder

    f = B.folders(B.materialize(work), work)
    loaded = forensics.load_baseline(B.BASELINE, bank=bank)
    emb = embed_folder(f["protocol"], encoder, cache_dir=cache, device="cpu", progress=False)
    rows = _rows_of(loaded, emb)
    groups: dict[str, list[int]] = {}
    for i, (rel, *_r) in enumerate(emb.manifest.entries):
        arch, part, _name = rel.split("/")
        groups.setdefault(f"{arch}/{part}", []).append(i)
    data = {k: rows[np.asarray(idx)] for k, idx in groups.items()}
    np.savez(out, **data)
    return data


def cifar_rows(work: Path, encoder: str, cache: Path, bank) -> tuple[dict, list[dict]]:
    """Per-image rows of every CIFAR model's tiles (in grid order), and the models' records."""
    f, models = cifar_folders(work)
    out = work / "rows-cifar.npz"
    if out.is_file():
        return dict(np.load(out)), models
    import forensics
    from forensics.data.embed import embed_folder

    common = {"bank": bank, "cache_dir": cache, "device": "cpu", "progress": False}
    if not any(b["name"] == "cifar-zoo" for b in bank.baselines()):
        forensics.build_baseline("cifar-zoo", f["T"], f["P"], encoder=encoder, seed=0, **common)
    loaded = forensics.load_baseline("cifar-zoo", bank=bank)
    emb = embed_folder(f["gen"], encoder, cache_dir=cache, device="cpu", progress=False)
    rows = _rows_of(loaded, emb)
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, (rel, *_r) in enumerate(emb.manifest.entries):
        key, name = rel.split("/")
        groups.setdefault(key, []).append((int(name[:-4]), i))
    data = {k: rows[np.asarray([i for _, i in sorted(v)])] for k, v in groups.items()}
    np.savez(out, **data)
    return data, models


def prepare(work: Path, encoder: str, cache: Path) -> tuple[dict, dict, list[dict]]:
    """Rows of both MNIST sets and of the CIFAR zoo (built and cached on first use)."""
    from refbank import Bank

    bank = Bank(work / "bank-sets")
    t0 = time.perf_counter()
    m = mnist_rows(work, encoder, cache, bank)
    m.update({f"512/{k}": v for k, v in mnist_full_rows(work, encoder, cache, bank).items()})
    B.log(f"MNIST rows ready ({time.perf_counter() - t0:.0f} s)")
    c, models = cifar_rows(work, encoder, cache, bank)
    B.log(f"CIFAR rows ready ({time.perf_counter() - t0:.0f} s)")
    return m, c, models


def sanitize(model_id: str) -> str:
    return "gen__" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id)


# -- the banks and queries of each set ------------------------------------------------------


class Problem:
    """One bank (model -> curves of rows, family) and its queries (rows, truth, condition).

    ``truth`` of a query is its model's family when that model is in the bank, else None
    (the right answer is unknown). ``cond`` names the condition it is reported under.
    """

    def __init__(self, name: str, bank: dict[str, tuple[str, list[np.ndarray]]],
                 queries: list[tuple[str, np.ndarray, str | None, str]]):
        self.name, self.bank, self.queries = name, bank, queries


def mnist_problems(m: dict, prefix: str = "") -> list[Problem]:
    """The MNIST bank and its two sets of queries (``prefix`` ``"512/"``: the protocol's
    512-image curves; problems ``mnist-512``, ``mnist-512-xcode``)."""
    bank = {a: (a, [m[f"{prefix}{a}/enroll1"], m[f"{prefix}{a}/enroll2"]]) for a in B.ARCHS}
    genuine = [(a, m[f"{prefix}{a}/query"], a, "new latents") for a in B.ARCHS]
    name = "mnist" + ("-" + prefix.strip("/") if prefix else "")
    if not all(f"x/{a}" in m for a in XARCHS):  # the first code base only
        return [Problem(name, bank, genuine)]
    xcode = [(f"x-{a}", m[f"x/{a}"], None, "another code base") for a in XARCHS]
    return [Problem(name, bank, genuine), Problem(f"{name}-xcode", bank, xcode)]


def _thirds(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(rows) // 3
    return rows[:n], rows[n:2 * n], rows[2 * n:]


def cifar_problems(c: dict, models: list[dict]) -> list[Problem]:
    parts = {m["model_id"]: _thirds(c[m["key"]]) for m in models}

    def bank_of(ms):
        return {m["model_id"]: (m["model_id"], list(parts[m["model_id"]][:2])) for m in ms}

    out = [Problem("cifar", bank_of(models),
                   [(m["model_id"], parts[m["model_id"]][2], m["model_id"], "new latents")
                    for m in models])]
    current = [m for m in models if m.get("run") != "history"]
    history = [m for m in models if m.get("run") == "history"]
    out.append(Problem("cifar-runs", bank_of(current),
                       [(m["model_id"], parts[m["model_id"]][2], m["model_id"], "new latents")
                        for m in current]
                       + [(m["model_id"], parts[m["model_id"]][2], None, "another run")
                          for m in history]))
    for base in sorted({m["code_base"] for m in models}):
        inside = [m for m in models if m["code_base"] != base]
        out.append(Problem(f"cifar-without-{base.split('/')[-1]}", bank_of(inside),
                           [(m["model_id"], parts[m["model_id"]][2], None, "another code base")
                            for m in models if m["code_base"] == base]))
    return out


# -- answering, as fp attribute does -----------------------------------------------------------


class Method:
    """How a suspect set is answered.

    ``kind``: the model-level test: ``None`` (the score/margin rule alone), ``"mmd"`` or
    ``"energy"`` (:mod:`forensics.stats.belonging`), or ``"probe"`` (the per-image
    attributor's held-out-curve calibrated p-values, :mod:`forensics.stats.probe`);
    ``gate``: the score/margin rule as a second gate; ``order``: ``"probe"`` chooses among
    the consistent models by the attributor's mean log-probability instead of the
    fingerprint ranking (what fp attribute does, ``defaults.BELONG_ORDER``); ``closed``:
    the attributor's top model, unknown only by the gate.
    """

    def __init__(self, kind: str | None, gate: bool, order: str | None = None,
                 closed: bool = False):
        self.kind, self.gate, self.closed = kind, gate, closed
        self.order = "probe" if kind == "probe" else order
        if closed:
            self.label = "probe, closed set" + (" + rule gate" if gate else "")
        else:
            self.label = (f"{kind} test" if kind else "score/margin rule") + \
                (", probe order" if order and kind != "probe" else "") + \
                (" + rule gate" if kind and gate else "")


def _f16(rows: np.ndarray) -> np.ndarray:
    """Rows as the bank stores them: every entry, float16."""
    return rows.astype(np.float16).astype(np.float64)


class Answerer:
    """Every query of a problem answered at every size, with the shared per-model nulls."""

    def __init__(self, problem: Problem, mask: np.ndarray, alpha: float = 0.05,
                 draws: int = 200, seed: int = 0):
        from forensics.stats import belonging as bt

        self.p, self.alpha, self.draws, self.seed = problem, alpha, draws, seed
        self.mask = mask
        self.models = sorted(problem.bank)
        self.family = {k: problem.bank[k][0] for k in self.models}
        # what the test reads: the stored rows (float16), projected as fp attribute does
        self.rows = {k: bt.ModelRows([bt.project(_f16(c)) for c in problem.bank[k][1]])
                     for k in self.models}
        # what the attributor reads: the stored rows' matched entries
        self.whole = {k: [np.nan_to_num(_f16(c)[:, mask]) for c in problem.bank[k][1]]
                      for k in self.models}
        self.nulls: dict = {}
        # fingerprint vectors of every curve (the mean of the unprojected rows)
        self.V, self.S, self.curve_model, self.sizes = [], [], [], []
        for k in self.models:
            for c in problem.bank[k][1]:
                self.V.append(c.mean(axis=0)[mask])
                self.S.append(c.var(axis=0)[mask])
                self.curve_model.append(k)
                self.sizes.append(len(c))
        self.V, self.S = np.asarray(self.V, np.float64), np.asarray(self.S, np.float64)
        self.conf = None
        self.acs: dict = {}
        self._probe = None
        self._order = None
        self.probe_acs: dict = {}

    def probe(self):
        """The per-image attributor of this bank (on the stored rows), with its refits."""
        if self._probe is None:
            from forensics.stats.probe import ProbeBank

            self._probe = ProbeBank(self.whole, self.family, seed=self.seed)
        return self._probe

    def order_scores(self):
        """The attributor's scores of simulated suspects, from the arrays fp stores."""
        if self._order is None:
            from forensics.stats import probe
            from forensics.stats.answer_confidence import simulated_models

            pb = self.probe()
            sim = simulated_models([k for k in self.models if pb.testable(k)], self.seed)
            self._order = probe.simulated_scores(
                probe.export(pb, sim), pb.fit.models,
                {k: [len(c) for c in v] for k, v in self.whole.items()})
        return self._order

    def full(self, rows: np.ndarray) -> np.ndarray:
        return np.nan_to_num(rows[:, self.mask].astype(np.float64))

    def probe_confidence(self, n: int):
        if n not in self.probe_acs:
            self.probe_acs[n] = self.probe().calibrate(n, self.alpha)
        return self.probe_acs[n]

    def null(self, model: str, n: int, kind: str) -> np.ndarray:
        from forensics.stats import belonging as bt

        key = (model, min(n, bt.MAX_TEST), kind)
        if key not in self.nulls:
            self.nulls[key] = bt.null(self.rows[model], n, kind=kind, draws=self.draws,
                                      seed=self.seed)
        return self.nulls[key]

    def answer_confidence(self, n: int, kind: str, order: str | None):
        """The two-level answer's confidence map at size ``n`` (simulated once)."""
        from forensics.stats import answer_confidence as ac
        from forensics.stats import belonging as bt

        key = (min(n, bt.MAX_TEST), kind, order)
        if key not in self.acs:
            nulls = {k: self.null(k, n, kind) for k in self.models}
            self.acs[key] = ac.calibrate(
                self.rows, self.family, n, alpha=self.alpha, kind=kind, nulls=nulls,
                seed=self.seed, order=self.order_scores() if order == "probe" else None)
        return self.acs[key]

    def confidence_model(self):
        """fp attribute's score/margin rule and confidence, fitted on this bank."""
        if self.conf is None:
            from fp_plugins.matchers import ZScoreMatcher

            from forensics.stats import confidence

            fam = [self.family[k] for k in self.curve_model]
            sim = confidence.simulate(self.V, self.S, self.sizes, fam, ZScoreMatcher().score,
                                      seed=self.seed)
            self.conf = confidence.fit(sim, quantile=self.alpha, seed=self.seed)
        return self.conf

    def answer(self, rows: np.ndarray, method: Method) -> dict:
        """The decision on the images ``rows`` (unprojected per-image rows)."""
        from dataclasses import replace

        from fp_plugins.matchers import ZScoreMatcher

        from forensics.stats import belonging as bt
        from forensics.stats.attribution import Calibration, decide, decide_belonging, rank
        from forensics.stats.confidence import family_scores, margin_of

        n = len(rows)
        meta = [{"curve_id": f"c{i:03d}", "model": k, "family": self.family[k]}
                for i, k in enumerate(self.curve_model)]
        q = rows.mean(axis=0)[self.mask].astype(np.float64)
        ranking = rank(q, self.V, meta, ZScoreMatcher(), drop_layers=())
        conf = self.confidence_model()
        cal = Calibration("zscore", (), self.alpha, conf.threshold(n), 0,
                          margin_threshold=conf.margin_threshold(n))
        rule = decide(ranking, cal)
        tests: list = []
        s = bt.project(rows)
        order = None
        if method.order == "probe" or method.closed:
            pb = self.probe()
            sc = pb.fit.scores(self.full(rows))
            order = [pb.fit.models[j] for j in np.argsort(-sc, kind="stable")]
        if method.closed:
            top = order[0]
            d = rule if method.gate and rule.unknown else replace(
                rule, family=self.family[top], model=top, unknown=False)
        elif method.kind == "probe":
            tests = self.probe().tests(self.full(rows), self.alpha)
        elif method.kind is not None:
            for k in self.models:
                tests.append(bt.test(self.rows[k], s, name=k, family=self.family[k],
                                     alpha=self.alpha, kind=method.kind, seed=self.seed,
                                     null_values=self.null(k, n, method.kind)))
        if method.kind is not None and not method.closed:
            d = decide_belonging(ranking, tests, self.alpha,
                                 gate=rule if method.gate else None, order=order)
        elif not method.closed:
            d = rule
        _, best, margin = margin_of(family_scores([m.score for m in ranking],
                                                  [m.family for m in ranking]))
        old = conf.probability(margin, best, n)
        chosen = next((c["p_value"] for c in d.consistent if c["model"] == d.model), None)
        nf = len({c["family"] for c in d.consistent})
        if method.closed:
            d = replace(d, confidence=None)
        elif method.kind is None:
            d = replace(d, confidence=None if d.unknown else old)
        elif method.kind == "probe":
            d = replace(d, confidence=self.probe_confidence(n).probability(d.unknown, chosen,
                                                                           nf))
        else:
            ac = self.answer_confidence(n, method.kind, method.order)
            d = replace(d, confidence=ac.probability(d.unknown, chosen, nf))
        ps = sorted((t.p_value for t in tests if t.p_value is not None), reverse=True)
        return {"family": d.family, "unknown": d.unknown, "nearest": d.nearest_family,
                "n_consistent": len(d.consistent), "p1": ps[0] if ps else None,
                "p2": ps[1] if len(ps) > 1 else 0.0, "best": best, "margin": margin,
                "old_conf": old, "confidence": d.confidence, "n": n}


def suspects(rows: np.ndarray, sizes=SIZES, reps: int = 3, seed: int = 0):
    """Seeded subsets of a query at each size (the whole query once at its own size)."""
    rng = np.random.default_rng(seed)
    for n in sizes:
        if n > len(rows):
            continue
        for _ in range(1 if n == len(rows) else reps):
            yield n, rows[np.sort(rng.choice(len(rows), n, replace=False))]
    if len(rows) not in sizes:
        yield len(rows), rows


def run_problem(problem: Problem, mask: np.ndarray, methods: list[Method],
                reps: int = 3, answerer: Answerer | None = None) -> list[dict]:
    """Every method's answer on every suspect of the problem (``answerer``: one built
    before for the same bank)."""
    ans = answerer if answerer is not None else Answerer(problem, mask)
    out = []
    for name, rows, truth, cond in problem.queries:
        for _n, sub in suspects(rows, reps=reps):
            for m in methods:
                a = ans.answer(sub, m)
                a.update(set=problem.name, query=name, truth=truth, cond=cond,
                         method=m.label, right=(a["family"] == truth if truth is not None
                                                else a["unknown"]))
                out.append(a)
    return out


# -- tables -----------------------------------------------------------------------------------

#: The development sets of the summary (MNIST twice: curves of 128 images at disjoint grid
#: positions, and the protocol's own 512-image curves at shared ones), and which problems
#: feed each.
SETS = {"mnist protocol": ("mnist",), "mnist cross-code": ("mnist-xcode",),
        "mnist protocol, 512-image curves": ("mnist-512",),
        "mnist cross-code, 512-image bank": ("mnist-512-xcode",),
        "cifar zoo": ("cifar", "cifar-runs", "cifar-without-")}


#: The problems pooled for the pooled figures: the three sets, MNIST with its 128-image curves.
POOLED = ("mnist", "mnist-xcode", "cifar", "cifar-runs", "cifar-without-")


def _in(a: dict, prefixes) -> bool:
    return any(a["set"] == p or (p.endswith("-") and a["set"].startswith(p)) for p in prefixes)


def figures(answers: list[dict], conf_key: str = "confidence") -> dict:
    """The summary figures of a list of answers (all sizes pooled)."""
    from forensics.stats.confidence import expected_calibration_error

    gen = [a for a in answers if a["truth"] is not None]
    unk = [a for a in answers if a["truth"] is None]
    out = {"n": len(answers)}
    out["named_right"] = float(np.mean([a["right"] for a in gen])) if gen else None
    out["genuine_unknown"] = float(np.mean([a["unknown"] for a in gen])) if gen else None
    out["unknown_right"] = float(np.mean([a["unknown"] for a in unk])) if unk else None
    parts = [x for x in (out["named_right"], out["unknown_right"]) if x is not None]
    out["balanced"] = float(np.mean(parts))
    # confidence: over the answers that have one (an unknown from the rule's gate has none
    # where the bank's simulation never answers unknown); "wrong above 0.5" as a share of
    # all answers, an answer without confidence never counting as above 0.5
    withc = [a for a in answers if a.get(conf_key) is not None]
    out["with_confidence"] = len(withc) / len(answers) if answers else None
    if withc:
        p = np.asarray([a[conf_key] for a in withc], dtype=np.float64)
        y = np.asarray([a["right"] for a in withc], dtype=bool)
        out["wrong_above_half"] = float(np.sum(~y & (p > 0.5)) / len(answers))
        out["ece"] = expected_calibration_error(p, y)
    return out


def _f(x, fmt=".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _row(label: str, method: str, f: dict) -> str:
    """One line of the per-set table: a set (or ``pooled``), a method, its figures."""
    return (f"| {label} | {method} | {f['n']} | {_f(f['named_right'])} | "
            f"{_f(f['genuine_unknown'])} | {_f(f['unknown_right'])} | {f['balanced']:.3f} | "
            f"{_conf(f)} | {_f(f.get('wrong_above_half'))} | {_f(f.get('ece'))} |")


def _conf(f: dict) -> str:
    """The share of answers with a confidence ("-": the method gives none)."""
    return "-" if not f.get("with_confidence") else f"{f['with_confidence']:.2f}"


def tables(answers: list[dict], methods: list[str], conf_key: str = "confidence") -> tuple[
        list[str], dict]:
    """Per-set tables (method x figure), a per-size table, and each method's worst set."""
    lines = ["| set | method | answers | new latents named right | genuine called unknown | "
             "other run / code base unknown | balanced | with a confidence | wrong above 0.5 | "
             "ECE |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    worst: dict[str, float] = {}
    per: dict[tuple[str, str], dict] = {}
    for s, prefixes in SETS.items():
        for m in methods:
            sel = [a for a in answers if a["method"] == m and _in(a, prefixes)]
            if not sel:
                continue
            f = figures(sel, conf_key)
            per[(s, m)] = f
            worst[m] = min(worst.get(m, 1.0), f["balanced"])
            lines.append(_row(s, m, f))
    pooled: dict[str, dict] = {}
    for m in methods:  # the three sets pooled (MNIST once: its 128-image curves)
        sel = [a for a in answers if a["method"] == m and _in(a, POOLED)]
        if not sel:
            continue
        f = pooled[m] = figures(sel, conf_key)
        lines.append(_row("pooled", m, f))
    return lines, {"worst": worst, "per": per, "pooled": pooled}


def _by_condition(answers: list[dict], method: str):
    """The method's answers of each set and condition, ``(set, condition, answers)``, in
    the tables' order (empty ones left out)."""
    for s, prefixes in SETS.items():
        for cond in ("new latents", "another run", "another code base"):
            sel = [a for a in answers if a["method"] == method and _in(a, prefixes)
                   and a["cond"] == cond]
            if sel:
                yield s, cond, sel


def condition_table(answers: list[dict], method: str) -> list[str]:
    """The method's confidence by set and condition: answers, share right, share with a
    confidence, mean confidence, wrong above 0.5 (share of the condition's answers), ECE."""
    from forensics.stats.confidence import expected_calibration_error

    lines = ["| set | condition | answers | right | with a confidence | mean confidence | "
             "wrong above 0.5 | ECE |", "|---|---|---|---|---|---|---|---|"]
    for s, cond, sel in _by_condition(answers, method):
        withc = [a for a in sel if a["confidence"] is not None]
        y = np.asarray([a["right"] for a in withc], dtype=bool)
        c = np.asarray([a["confidence"] for a in withc], dtype=np.float64)
        right = np.mean([a["right"] for a in sel])
        if withc:
            tail = (f"{c.mean():.3f} | {np.sum(~y & (c > 0.5)) / len(sel):.3f} | "
                    f"{expected_calibration_error(c, y):.3f}")
        else:
            tail = "- | - | -"
        lines.append(f"| {s} | {cond} | {len(sel)} | {right:.3f} | "
                     f"{len(withc) / len(sel):.2f} | {tail} |")
    return lines


def size_table(answers: list[dict], method: str) -> list[str]:
    """Genuine named right / called unknown, and other models called unknown, by size."""
    sizes = sorted({a["n"] for a in answers if a["method"] == method})
    lines = ["| set | condition | " + " | ".join(str(n) for n in sizes) + " |",
             "|---|---" + "|---" * len(sizes) + "|"]
    for s, cond, sel in _by_condition(answers, method):
        cells = []
        for n in sizes:
            at = [a for a in sel if a["n"] == n]
            if not at:
                cells.append("-")
            elif cond == "new latents":
                cells.append(f"{np.mean([a['right'] for a in at]):.2f} / "
                             f"{np.mean([a['unknown'] for a in at]):.2f}")
            else:
                cells.append(f"{np.mean([a['unknown'] for a in at]):.2f}")
        lines.append(f"| {s} | {cond} | " + " | ".join(cells) + " |")
    return lines


def entry_mask(work: Path, baseline: str) -> np.ndarray:
    """``resid-early``'s matched entries (layer 0 dropped, as fp attribute does)."""
    import forensics
    from forensics import defaults
    from forensics.plugin import manager as plugins
    from forensics.stats import fingerprints as fpmod
    from forensics.stats.attribution import keep_mask
    from refbank import Bank

    loaded = forensics.load_baseline(baseline, bank=Bank(work / "bank-sets"))
    fp = plugins.get("fingerprints", defaults.FINGERPRINT)
    return fpmod.entry_mask(fp, loaded.dims, keep_mask(len(loaded.dims), defaults.DROP_LAYERS))


METHODS = (Method(None, False), Method("mmd", False), Method("mmd", True),
           Method("energy", False), Method("energy", True), Method("probe", False),
           Method("probe", True), Method("mmd", False, order="probe"),
           Method("mmd", True, order="probe"), Method(None, False, closed=True),
           Method(None, True, closed=True))


def run(work: Path, encoder: str, cache: Path, quick: bool) -> tuple[list[str], dict]:
    """The three sets, every method; markdown lines and the summary (worst set per method)."""
    t0 = time.perf_counter()
    m, c, models = prepare(work, encoder, cache)
    mask_m, mask_c = entry_mask(work, B.BASELINE), entry_mask(work, "cifar-zoo")
    reps = 1 if quick else 3
    answers = []
    for prefix in ("", "512/"):
        mnist = mnist_problems(m, prefix)
        shared = Answerer(mnist[0], mask_m)  # one bank, two sets of queries
        for p in mnist:
            answers += run_problem(p, mask_m, list(METHODS), reps=reps, answerer=shared)
            B.log(f"{p.name}: {len(answers)} answers ({time.perf_counter() - t0:.0f} s)")
    for p in cifar_problems(c, models):
        answers += run_problem(p, mask_c, list(METHODS), reps=reps)
        B.log(f"{p.name}: {len(answers)} answers ({time.perf_counter() - t0:.0f} s)")
    labels = [x.label for x in METHODS]
    lines, summary = tables(answers, labels)
    summary["stored"] = labels  # the bank stores what every method reads
    summary["answers"] = answers
    keep = ("set", "query", "truth", "cond", "method", "n", "family", "unknown", "right",
            "confidence", "n_consistent", "p1", "p2", "best", "margin")
    (work / "belonging-answers.json").write_text(json.dumps(
        [{k: a.get(k) for k in keep} for a in answers], default=float))
    closed = [("mnist protocol", mnist_problems(m)[0], mask_m),
              ("mnist protocol, 512-image curves", mnist_problems(m, "512/")[0], mask_m),
              ("cifar zoo", cifar_problems(c, models)[0], mask_c)]
    pf = peer_features(work, encoder, cache, models)
    B.log(f"peers' features ready ({time.perf_counter() - t0:.0f} s)")
    peer_sets = {"mnist protocol": (lambda d: mnist_problems(d)[0], pf["mnist"]),
                 "mnist protocol, 512-image curves": (lambda d: mnist_problems(d)[0],
                                                      pf["mnist-512"]),
                 "cifar zoo": (lambda d: cifar_problems(d, models)[0], pf["cifar"])}
    lines += ["", "Closed set (every new-latents suspect named, never unknown; sizes pooled "
              "as above), by reader: fp's, then the peers' (which never say unknown: every "
              "suspect of another run or code base gets a name from them):", "",
              "| set | reader | top-1 |", "|---|---|---|"]
    summary["closed"] = {}
    for s, p, mask in closed:
        got = closed_readers(p, mask, reps=reps)
        got.update(peer_readers(*peer_sets[s], reps=reps))
        summary["closed"][s] = got
        for r, v in got.items():
            lines.append(f"| {s} | {r} | {v:.3f} |")
    fam_lines, summary["family_runs"] = family_across_runs(c, models, mask_c)
    B.log(f"family level across runs ({time.perf_counter() - t0:.0f} s)")
    summary["family_lines"] = fam_lines
    return lines, summary


# -- the family level across runs (CIFAR, leave-one-run-out) ---------------------------------


def run_family(m: dict) -> str:
    """A CIFAR model's family across runs: its code base, loss and architecture (the runs
    of one loss trained twice or three times in one code base share it)."""
    return f"{m['code_base'].split('/')[0]} {m['loss_or_arch']} ({m['architecture'].split()[0]})"


def family_across_runs(c: dict, models: list[dict], mask: np.ndarray) -> tuple[list[str], dict]:
    """Leave-one-run-out on CIFAR: every model whose family (:func:`run_family`) holds
    another run is left out of a bank of the other 25; its query third, and all its tiles,
    are placed at the family level by the attributor on the stored rows (the mean over
    images of the log summed probability of the family's models) and by the fingerprint
    ranking's nearest family (``zscore``). Top-1 against chance (one family in F, a
    one-sided binomial test)."""
    from fp_plugins.matchers import ZScoreMatcher
    from scipy.stats import binomtest

    from forensics.stats.attribution import rank
    from forensics.stats.probe import fit

    fam = {m["model_id"]: run_family(m) for m in models}
    parts = {m["model_id"]: _thirds(c[m["key"]]) for m in models}
    whole = {m["model_id"]: c[m["key"]] for m in models}
    runs: dict[str, list[str]] = {}
    for k, f in fam.items():
        runs.setdefault(f, []).append(k)
    left = sorted(k for k in fam if len(runs[fam[k]]) >= 2)

    def full(r):
        return np.nan_to_num(r[:, mask].astype(np.float64))

    readers = ("attributor, stored rows", "fingerprint ranking (zscore)")
    hits: dict[tuple[str, str], list[bool]] = {}
    detail = []
    for k in left:
        bank = [x for x in fam if x != k]
        F = len({fam[x] for x in bank})
        stored = fit({x: [full(_f16(p)) for p in parts[x][:2]] for x in bank},
                     {x: fam[x] for x in bank})
        V = np.asarray([p.mean(axis=0)[mask] for x in bank for p in parts[x][:2]], np.float64)
        meta = [{"curve_id": f"c{i:03d}", "model": x, "family": fam[x]}
                for i, x in enumerate(x for x in bank for _ in range(2))]
        for size, rows in (("query", parts[k][2]), ("all tiles", whole[k])):
            fs = stored.family_scores(full(rows))
            named = {
                readers[0]: max(fs, key=lambda f: (fs[f], f)),
                readers[1]: rank(rows.mean(axis=0)[mask].astype(np.float64), V, meta,
                                 ZScoreMatcher(), drop_layers=())[0].family,
            }
            for r, f in named.items():
                hits.setdefault((size, r), []).append(f == fam[k])
            detail.append((k, size, len(rows), F, named))
    F = len(set(fam.values()))
    lines = [f"Leave-one-run-out on CIFAR: {len(left)} runs whose family holds another run "
             f"(families: code base, loss, architecture; {F} in all, so chance is 1/{F} = "
             f"{1 / F:.3f}); each left out of a bank of the other {len(fam) - 1} models and "
             f"placed at the family level.", "",
             "| reader | suspect | images | family top-1 | right / runs | binomial p vs chance "
             "| beats chance (p < 0.05) |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for size in ("query", "all tiles"):
        ns = sorted({n for k, s, n, _F, _d in detail if s == size})
        for r in readers:
            h = hits[(size, r)]
            p = float(binomtest(sum(h), len(h), 1.0 / F, alternative="greater").pvalue)
            summary[(size, r)] = {"top1": float(np.mean(h)), "p": p, "n": len(h)}
            lines.append(f"| {r} | {size} | {ns[0]}-{ns[-1]} | {np.mean(h):.3f} | "
                         f"{sum(h)} / {len(h)} | {p:.2g} | {'yes' if p < 0.05 else 'no'} |")
    lines += ["", "| left-out run | family | " + " | ".join(
        f"{r} ({s})" for s in ("query", "all tiles") for r in readers[:2]) + " |",
        "|---|---|" + "---|" * 4]
    for k in left:
        cells = []
        for s in ("query", "all tiles"):
            d = next(x for x in detail if x[0] == k and x[1] == s)[4]
            for r in readers[:2]:
                cells.append("**right**" if d[r] == fam[k] else d[r])
        lines.append(f"| {k} | {fam[k]} | " + " | ".join(cells) + " |")
    return lines, summary


def closed_readers(problem: Problem, mask: np.ndarray, reps: int = 3) -> dict[str, float]:
    """Closed-set top-1 (every query named, never unknown) of three readers of one bank:
    the fingerprint ranking (``zscore``), the attributor on the stored rows (every matched
    entry, float16), and the attributor on 32 projected entries (what the bank stored
    before it stored rows whole)."""
    from fp_plugins.matchers import ZScoreMatcher

    from forensics.stats import belonging as bt
    from forensics.stats.attribution import rank
    from forensics.stats.probe import fit

    def full(r):
        return np.nan_to_num(r[:, mask].astype(np.float64))

    def narrow(r):
        return _f16(bt.project(r))

    ks = sorted(problem.bank)
    fam = {k: problem.bank[k][0] for k in ks}
    stored = fit({k: [full(_f16(c)) for c in problem.bank[k][1]] for k in ks}, fam)
    before = fit({k: [narrow(c) for c in problem.bank[k][1]] for k in ks}, fam)
    V = np.asarray([c.mean(axis=0)[mask] for k in ks for c in problem.bank[k][1]], np.float64)
    meta = [{"curve_id": f"c{i:03d}", "model": k, "family": fam[k]}
            for i, k in enumerate(k for k in ks for _ in problem.bank[k][1])]
    right: dict[str, list[bool]] = {"fingerprint ranking (zscore)": [],
                                    "attributor, stored rows": [],
                                    "attributor, 32 projected entries (stored before)": []}
    for _name, rows, truth, _cond in problem.queries:
        for _n, sub in suspects(rows, reps=reps):
            r = rank(sub.mean(axis=0)[mask].astype(np.float64), V, meta, ZScoreMatcher(),
                     drop_layers=())
            right["fingerprint ranking (zscore)"].append(r[0].family == truth)
            right["attributor, stored rows"].append(
                stored.families[int(np.argmax(stored.scores(full(sub))))] == truth)
            right["attributor, 32 projected entries (stored before)"].append(
                before.families[int(np.argmax(before.scores(bt.project(sub))))] == truth)
    return {k: float(np.mean(v)) for k, v in right.items()}


# -- peers, side by side on the three sets ----------------------------------------------------

#: The peers measured beside fp on every set (``peers.py``): how each reads a set.
PEERS = ("Marra et al. 2019: mean noise residual, correlation", "mean pixels, zscore",
         "linear probe, FID-Inception pool (2048), majority vote",
         "linear probe, EfficientNet-Lite0 stages + head (2064), majority vote",
         "small CNN from scratch (the images, 600 steps), majority vote")
#: The small CNN's training budget: Adam steps of 128 images (as many epochs as that takes;
#: with 4 epochs it did not fit the CIFAR bank's images: 0.14 of them right).
CNN_STEPS = 600
#: The feature each peer reads, in :data:`PEERS` order (``images``: the images themselves).
PEER_KINDS = ("marra", "pixels", "pool", "lite0", "images")


def _grouped_features(work: Path, folder: Path, tag: str, encoder: str, cache: Path,
                      group) -> dict[str, dict[str, np.ndarray]]:
    """Each peer's per-image features of the images under ``folder``, grouped by
    ``group(relative path)`` (in manifest order, as the rows are); cached in the work
    folder (``peers-<tag>.npz``)."""
    from PIL import Image

    from forensics.data.embed import embed_folder

    path = work / f"peers-{tag}.npz"
    out: dict[str, dict[str, np.ndarray]] = {}
    if path.is_file():
        with np.load(path) as z:
            for k in z.files:
                kind, key = k.split("::", 1)
                out.setdefault(kind, {})[key] = z[k]
        if set(PEER_KINDS) <= set(out):
            return out
    emb = embed_folder(folder, encoder, cache_dir=cache, device="cpu", progress=False)
    rels = [rel for rel, *_r in emb.manifest.entries]
    images = np.stack([np.asarray(Image.open(folder / rel)) for rel in rels])
    makers = {"pixels": lambda: peers.pixels(images),
              "marra": lambda: peers.noise_residuals(images),
              "pool": lambda: np.asarray(emb.arrays[-1], dtype=np.float32),
              "lite0": lambda: peers.Lite0Features(size=64)(images),
              "images": lambda: images}
    groups: dict[str, list[int]] = {}
    for i, rel in enumerate(rels):
        groups.setdefault(group(rel), []).append(i)
    for kind in PEER_KINDS:  # only what an earlier run did not store
        if kind not in out:
            f = makers[kind]()
            out[kind] = {k: f[np.asarray(idx)] for k, idx in groups.items()}
    np.savez(path, **{f"{kind}::{k}": v for kind, d in out.items() for k, v in d.items()})
    return out


def peer_features(work: Path, encoder: str, cache: Path, models: list[dict]) -> dict:
    """Peers' features of the MNIST protocol (both layouts) and of the CIFAR zoo, keyed as
    the rows are (``{set: {peer feature: {key: array}}}``)."""
    f = B.folders(B.materialize(work), work)

    def mnist_key(rel: str) -> str:
        arch, part, _name = rel.split("/")
        return f"{arch}/{part}"

    out = {"mnist": _grouped_features(work, protocol_subset(work, f), "mnist", encoder, cache,
                                      mnist_key),
           "mnist-512": _grouped_features(work, f["protocol"], "mnist-512", encoder, cache,
                                          mnist_key),
           "cifar": _grouped_features(work, cifar_folders(work)[0]["gen"], "cifar", encoder,
                                      cache, lambda rel: rel.split("/")[0])}
    return out


def _peer_family(kind: str, bank: dict, q: np.ndarray) -> str:
    """The family a peer names for the query images ``q`` against ``bank`` (model ->
    (family, curves of features))."""
    from fp_plugins.matchers import ZScoreMatcher

    from forensics.stats.attribution import rank

    ks = sorted(bank)
    if kind in ("marra", "pixels"):  # set level: each curve's mean
        V = np.asarray([c.mean(axis=0) for k in ks for c in bank[k][1]], np.float64)
        fams = [bank[k][0] for k in ks for _ in bank[k][1]]
        if kind == "marra":
            return fams[int(np.argmax(peers.correlation(q.mean(axis=0), V)))]
        meta = [{"curve_id": f"c{i:03d}", "model": f, "family": f} for i, f in enumerate(fams)]
        return rank(q.mean(axis=0).astype(np.float64), V, meta, ZScoreMatcher(),
                    drop_layers=())[0].family
    raise ValueError(kind)


def peer_readers(problem_of, feats: dict, reps: int = 3) -> dict[str, float]:
    """Closed-set top-1 of every peer on the new-latents queries of one set
    (``problem_of(features keyed as rows) -> Problem``); the same suspects (indices) as
    fp's answers."""
    out: dict[str, float] = {}
    for label, kind in zip(PEERS, PEER_KINDS, strict=True):
        p = problem_of(feats[kind])
        ks = sorted(p.bank)
        label_of = None
        if kind in ("pool", "lite0", "images"):
            X = np.concatenate([np.concatenate(p.bank[k][1]) for k in ks])
            y = np.concatenate([np.full(sum(len(c) for c in p.bank[k][1]), i)
                                for i, k in enumerate(ks)])
            if kind == "images":
                epochs = max(1, -(-CNN_STEPS // -(-len(X) // 128)))
                cnn = peers.CNNAttributor(len(ks), epochs=epochs, seed=0).fit(X, y)

                def label_of(images, cnn=cnn):
                    return cnn.proba(images).argmax(axis=1)
            else:
                label_of = peers.linear_probe(X, y).predict
        right = []
        for _name, q, truth, _cond in p.queries:
            for _n, idx in suspects(np.arange(len(q)), reps=reps):
                if label_of is not None:
                    fam = p.bank[ks[peers.majority(label_of(q[idx]))[0]]][0]
                else:
                    fam = _peer_family(kind, p.bank, q[idx])
                right.append(fam == truth)
        out[label] = float(np.mean(right))
    return out
