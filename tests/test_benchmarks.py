"""The benchmark scripts run end to end at tiny sizes and print their figures.

Their measurements are not asserted (timings belong to the benchmark runs in docs/), but
a script that no longer runs against the current library, or no longer prints its last
line, fails here. ``bench_ct.py`` has its own test (tests/test_bench_ct.py);
``bench_attribution.py``, ``bench_baseline.py`` and ``bench_memorization.py`` embed or
train on thousands of images and are run as documented in docs/.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, timeout: int = 600) -> list[str]:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_bench_scale_builds_from_stores_and_matches_the_in_memory_path(tmp_path):
    lines = _run("bench_scale.py", "--sizes", "2000", "4000", "--dim", "32", "--layers", "2",
                 "--n-gen", "500", "--in-memory-max", "4000", "--kmeans-compare", "2000",
                 "--dir", str(tmp_path))
    text = "\n".join(lines)
    # both sizes are built from the store and again in memory: same id and C_T
    assert text.count("same id and C_T: True") == 2, text
    assert "FAISS KMeans instead of scikit-learn's" in text
    cts = re.findall(r"C_T per layer: (.+)", text)
    assert len(cts) == 2 and all(len(c.split()) == 2 for c in cts)
    assert all(float(v) < 0 for c in cts for v in c.split())  # Q holds near-copies of T
    assert re.fullmatch(r"T=4000: peak RSS \d+\.\d\d GB, build \d+\.\d s, query \d+\.\d\d "
                        r"s/layer, slope -?\d+\.\d\d", lines[-1]), lines[-1]
    assert not any(tmp_path.iterdir())  # the stores are removed without --keep


def test_bench_embed_prints_both_paths_and_the_overhead():
    lines = _run("bench_embed.py", "--n", "48", "--repeat", "1", "--batch-size", "16",
                 "--device", "cpu")
    assert any(line.startswith("bare forward (all layers):") for line in lines)
    assert any(line.startswith("fp embed end to end:") for line in lines)
    assert re.fullmatch(r"overhead: -?\d+%", lines[-1]), lines[-1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the scale extra")
def test_bench_ray_embeds_the_same_as_the_local_path():
    lines = _run("bench_ray.py", "--n", "96", "--repeat", "2", "--batch-size", "32",
                 "--cpus", "2", "--block-rows", "32")
    diff = next(line for line in lines if line.startswith("largest difference"))
    assert float(diff.rsplit(":", 1)[1]) <= 1e-5, diff
    assert any(re.fullmatch(r"overhead \(end to end, 96 images\): -?\d+%", line)
               for line in lines), lines
    steady = next(line for line in lines if line.startswith("overhead (steady rate)"))
    assert re.fullmatch(r"overhead \(steady rate\): -?\d+% \(paired by repeat: median "
                        r"-?\d+%\)", steady), steady
    assert sum(line.startswith("repeat ") for line in lines) == 4, lines
    assert lines[-1].startswith("load average before:"), lines[-1]


def test_attribution_selection_counts_chance_as_chance():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_attribution as B
    finally:
        sys.path.remove(str(BENCH))

    class M:
        def __init__(self, label):
            self.label = label

    def row(label, protocol, redrawn):
        return (M(label), protocol, 0, 0, redrawn)

    rows = [row("strong", 0.9, 0.96), row("weak", 0.3, 0.47)]
    # 2 of 10 across code against 1 of 10 is chance for both (1 in 11): within code decides
    assert not B.above_chance(0.2, 10) and not B.above_chance(0.1, 10)
    cross = {"strong": (0.1,), "weak": (0.2,)}
    assert B.select_best(rows, cross, 1386, 10)[0].label == "strong"
    # a real cross-code result (8 of 10) is evidence, and then the worst of the two decides
    assert B.above_chance(0.8, 10)
    cross = {"strong": (0.1,), "weak": (0.8,)}
    assert B.select_best(rows, cross, 1386, 10)[0].label == "weak"
    cross = {"strong": (0.6,), "weak": (0.8,)}
    assert B.select_best(rows, cross, 1386, 10)[0].label == "strong"  # worst 0.6 > 0.47


def test_the_belonging_benchmark_answers_every_method_on_a_small_bank():
    """Every method of ``attribution_sets`` answers the same suspects, one way, and the
    method fp attribute ships is among them."""
    sys.path.insert(0, str(BENCH))
    try:
        import attribution_sets as S
    finally:
        sys.path.remove(str(BENCH))
    import numpy as np

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 40)) * 0.6

    def rows(i, n):
        return (rng.standard_normal((n, 40)) + centres[i]).astype(np.float32)

    bank = {f"m{i}": (f"m{i}", [rows(i, 24), rows(i, 24)]) for i in range(3)}
    queries = [(f"m{i}", rows(i, 20), f"m{i}", "new latents") for i in range(3)]
    queries.append(("x", rows(3, 20), None, "another code base"))
    answers = S.run_problem(S.Problem("mnist", bank, queries), np.ones(40, bool),
                            list(S.METHODS), reps=1)
    labels = [m.label for m in S.METHODS]
    assert len(set(labels)) == len(labels)
    assert {a["method"] for a in answers} == set(labels)
    assert len(answers) == len(labels) * 4 * 2  # 4 queries at 16 and at their own 20
    from forensics import defaults

    shipped = S.Method(defaults.BELONG_KIND, defaults.BELONG_GATE,
                       order=defaults.BELONG_ORDER).label
    assert shipped == "probe test + rule gate" and shipped in labels
    # the shipped answer's confidence is simulated with the attributor's choice
    assert all(a["confidence"] is not None for a in answers if a["method"] == shipped)
    for a in answers:
        assert a["unknown"] == (a["family"] is None)
        assert a["confidence"] is None or 0.0 <= a["confidence"] <= 1.0
    lines, summary = S.tables(answers, labels)
    assert set(summary["worst"]) == set(labels) and len(lines) == 2 + 2 * len(labels)
    assert set(summary["pooled"]) == set(labels)
    cond = S.condition_table(answers, shipped)
    assert len(cond) == 2 + 2 and cond[2].startswith("| mnist protocol | new latents | 6 |")
    # peers: the same suspects, read by each peer's own features; well apart, all right
    feats = {kind: {f"m{i}/{part}": rows(i, 24 if part != "query" else 20)
                    for i in range(3) for part in ("enroll1", "enroll2", "query")}
             for kind in ("marra", "pixels", "pool", "lite0")}
    # the CNN reads images: each model's a bar of its own place on noise
    rng = np.random.default_rng(5)

    def images(i: int, n: int) -> np.ndarray:
        x = rng.integers(0, 40, size=(n, 12, 12)).astype(np.uint8)
        x[:, 4 * i:4 * i + 4, :] = 255
        return x

    feats["images"] = {f"m{i}/{part}": images(i, 24 if part != "query" else 20)
                       for i in range(3) for part in ("enroll1", "enroll2", "query")}

    def problem_of(d):
        return S.Problem("mnist", {f"m{i}": (f"m{i}", [d[f"m{i}/enroll1"], d[f"m{i}/enroll2"]])
                                   for i in range(3)},
                         [(f"m{i}", d[f"m{i}/query"], f"m{i}", "new latents") for i in range(3)])

    got = S.peer_readers(problem_of, feats, reps=1)
    assert list(got) == list(S.PEERS) and all(v == 1.0 for v in got.values())
