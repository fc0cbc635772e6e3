"""Every hook, end to end, through a plugin written from the README's contract alone.

Each ``test_hook_<hook>`` registers the spec-only plugin of ``tests/plugins/`` for that hook
and runs it through the engine as a user would (library calls and the ``fp`` commands). A
hook without such a test fails :func:`test_plugin_hooks_have_tests`.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_PLUGINS, load_test_plugin
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.paper.demo import _write_pngs, digit_images
from forensics.paper.synth import synth_folder
from forensics.plugin import checks, hookspecs
from forensics.plugin import manager as plugins
from forensics.steps.attribute import attribute
from forensics.steps.build_baseline import build_baseline
from forensics.steps.engine import build_engine, ct_score, load_or_build
from forensics.steps.enroll import enroll

GOLDEN = Path(__file__).parent / "data" / "golden" / "ct"
#: hook -> its spec-only plugin module in tests/plugins/.
SPEC_PLUGINS = {
    "register_encoders": "spec_encoder",
    "register_distances": "spec_distance",
    "register_partitioners": "spec_partitioner",
    "register_matchers": "spec_matcher",
    "register_fingerprints": "spec_fingerprint",
    "register_memorization_measures": "spec_measure",
}
N = 60  # images per curve: two cells of about 30 pass the default tau (20 / m)


def hook_names() -> list[str]:
    return sorted(n for n in vars(hookspecs) if n.startswith("register_"))


def _fp(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _register_all() -> None:
    for module in SPEC_PLUGINS.values():
        load_test_plugin(module)


# -- the meta tests ----------------------------------------------------------------------


def test_plugin_hooks_have_tests():
    missing = [h for h in hook_names() if f"test_hook_{h}" not in globals()]
    assert not missing, f"hooks without an end-to-end test here: {missing}"


def test_every_hook_has_a_spec_only_plugin_implementing_it():
    assert sorted(SPEC_PLUGINS) == hook_names()
    for hook, module in SPEC_PLUGINS.items():
        tree = ast.parse((TEST_PLUGINS / f"{module}.py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert hook in defined, f"tests/plugins/{module}.py must implement {hook}"


@pytest.mark.parametrize("hook", sorted(SPEC_PLUGINS))
def test_spec_only_plugins_keep_the_contract(hook):
    module = load_test_plugin(SPEC_PLUGINS[hook])
    kind = hook.removeprefix("register_")
    mine = [e.name for e in plugins.registry(kind).values() if e.plugin == module.__name__]
    results = checks.check_registered([kind], names=mine, load=True)
    assert len(results) == 1 and results[0].ok, results


# -- one world of digits for the pipeline hooks ------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A bank built with the spec encoder and fingerprint: a baseline, two families."""
    root = tmp_path_factory.mktemp("hooks")
    _register_all()
    images = digit_images()
    order = np.random.default_rng(3).permutation(len(images))
    folders = {}
    for name, ids in (("T", order[:240]), ("P", order[240:340]), ("src", order[340:470]),
                      ("query_src", order[470:470 + N])):
        _write_pngs(images, ids, root / name)
        folders[name] = root / name
    for kind, params in (("noise", {"sigma": 40.0}), ("shuffle", {"grid": 4})):
        folders[kind] = root / kind
        synth_folder(kind, folders["src"], folders[kind], seed=1, **params)
        folders[f"query_{kind}"] = root / f"query_{kind}"
        synth_folder(kind, folders["query_src"], folders[f"query_{kind}"], seed=2, **params)
    kw = {"bank": root / "bank", "cache_dir": None, "device": "cpu"}
    build_baseline("digits", folders["T"], folders["P"], encoder="spec-blocks",
                            n_cells=2, **kw)
    for kind in ("noise", "shuffle"):
        enroll(folders[kind], baseline="digits", model=f"{kind}-m", family=kind,
                        per_curve=N, **kw)
    return {"root": root, "folders": folders, "kw": kw}


@pytest.fixture
def spec_plugins():
    _register_all()


# -- one test per hook -------------------------------------------------------------------


def test_hook_register_encoders(world, spec_plugins, tmp_path):
    from PIL import Image

    folder = world["folders"]["query_src"]
    out = tmp_path / "emb.npz"
    code, text = _fp("embed", str(folder), "--encoder", "spec-blocks", "--out", str(out),
                     "--no-cache", "--device", "cpu")
    assert code == 0, text
    loaded = load_test_plugin("spec_encoder").Loaded()
    with np.load(out, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        blocks, colour = npz["layer_000"], npz["layer_001"]
    assert meta["layers"] == ["blocks", "colour"]
    assert blocks.shape == (N, 16) and colour.shape == (N, 6)
    import torch

    first = sorted(folder.glob("*.png"))[0]
    direct = loaded.forward(torch.stack([loaded.transform(Image.open(first).convert("RGB"))]))
    np.testing.assert_array_equal(blocks[0], direct[0][0])
    np.testing.assert_array_equal(colour[0], direct[1][0])


def test_hook_register_distances(spec_plugins):
    case = json.loads((GOLDEN / "index.json").read_text())[0]
    path = GOLDEN / case["file"]
    with np.load(path, allow_pickle=False) as npz:
        d = {k: npz[k] for k in npz.files}
    cells = {k: d[k] for k in ("T_cells", "P_cells", "Q_cells")}
    ours = ct_score(d["T"], d["P"], d["Q"], distance="spec-euclidean", tau=float(d["tau"]),
                    **cells)
    np.testing.assert_allclose(ours.ct, case["expected"]["l2_meehan"], rtol=1e-9)
    # the engine's query path (a stored baseline searched per cell), unprepared
    rng = np.random.default_rng(0)
    T, P, Q = rng.normal(size=(80, 5)), rng.normal(size=(50, 5)), rng.normal(size=(60, 5))
    spec = build_engine([T], [P], ["x"], distance="spec-euclidean",
                          partitioner_params={"n_cells": 2}).query([Q])[0]
    builtin = build_engine([T], [P], ["x"], distance="euclidean",
                             partitioner_params={"n_cells": 2}).query([Q])[0]
    np.testing.assert_allclose(spec.ct, builtin.ct, rtol=1e-12)
    code, text = _fp("ct", str(path), "--distance", "spec-euclidean", "--json")
    assert code == 0, text
    np.testing.assert_allclose(json.loads(text)["ct"], case["expected"]["l2_meehan"], rtol=1e-9)


def test_hook_register_partitioners(spec_plugins, tmp_path, monkeypatch):
    cls = load_test_plugin("spec_partitioner").HalvesPartitioner
    rebuilt = []
    original = cls.from_arrays
    monkeypatch.setattr(cls, "from_arrays",
                        lambda self, a, p: rebuilt.append(p) or original(self, a, p))
    rng = np.random.default_rng(1)
    T, P = rng.normal(size=(80, 4)), rng.normal(size=(60, 4))
    Q = rng.normal(size=(60, 4)) * 0.5
    first = load_or_build(tmp_path, [T], [P], ["x"], partitioner="spec-halves")
    assert rebuilt == []
    again = load_or_build(tmp_path, [T], [P], ["x"], partitioner="spec-halves")
    assert rebuilt == [{"seed": 0}]  # stored, then rebuilt from its arrays and params
    a, b = first.query([Q])[0], again.query([Q])[0]
    assert a.status == "ok" and a.ct == b.ct
    assert [c.n_T for c in a.cells] == [40, 40]  # either side of T's median
    assert a.ct == ct_score(T, P, Q, partitioner="spec-halves").ct


def test_hook_register_matchers(world, spec_plugins):
    answer = attribute(world["folders"]["query_noise"], fingerprint="spec-centre",
                                matcher="spec-l1", n_boot=0, **world["kw"])
    assert answer.parameters["matcher"] == "spec-l1"
    assert answer.ranking[0].family == "noise"
    code, text = _fp("evaluate", "--bank", str(world["kw"]["bank"]), "--protocol", "loo",
                     "--matcher", "spec-l1", "--json")
    assert code == 0, text
    assert set(json.loads(text)["matchers"]) == {"spec-l1"}


def test_hook_register_fingerprints(world, spec_plugins):
    from refbank import Bank
    from refbank.bank import curve_fingerprints

    rows = Bank(world["kw"]["bank"]).curves()
    assert len(rows) == 4 and all(len(curve_fingerprints(r)["spec-centre"]) == 2 for r in rows)
    for kind in ("noise", "shuffle"):
        answer = attribute(world["folders"][f"query_{kind}"], fingerprint="spec-centre",
                                    n_boot=4, **world["kw"])
        assert answer.parameters["fingerprint"] == "spec-centre"
        assert answer.parameters["matcher"] == "l2"  # the fingerprint's default
        assert answer.ranking[0].family == kind


def test_hook_register_memorization_measures(spec_plugins, tmp_path):
    images = digit_images()
    _write_pngs(images, np.arange(20), tmp_path / "train")
    _write_pngs(images, np.arange(100, 103), tmp_path / "fresh")
    suspects = sorted((tmp_path / "train").glob("*.png"))[:2] + sorted(
        (tmp_path / "fresh").glob("*.png"))
    measure = plugins.get("memorization_measures", "spec-nearest-copy")
    results = measure.score(suspects, model=tmp_path / "train")
    assert [r["image"] for r in results] == [str(p) for p in suspects]
    assert [r["score"] for r in results[:2]] == [0.0, 0.0]
    assert [r["nearest"] for r in results[:2]] == [0, 1]
    assert all(r["score"] > 0.05 for r in results[2:])
