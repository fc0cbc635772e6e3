"""The contract checks: every registered object keeps its contract; broken ones are named."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_test_plugin
from test_plugins import _plugin_module
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.errors import PluginError
from forensics.plugin import checks, protocols
from forensics.plugin import manager as plugins

KINDS_CALLED = ["distances", "partitioners", "matchers", "fingerprints", "memorization_measures"]


def _problems(kind: str, obj, **kw) -> str:
    return " | ".join(checks.contract_problems(kind, obj, **kw))


# -- everything registered keeps the contract --------------------------------------------


def test_contracts_cover_every_hook():
    from forensics.plugin import hookspecs

    hooks = sorted(n for n in vars(hookspecs) if n.startswith("register_"))
    assert sorted(c.hook for c in protocols.CONTRACTS.values()) == hooks
    assert all(c.hook == f"register_{kind}" for kind, c in protocols.CONTRACTS.items())


def test_the_engines_fingerprint_contexts_have_the_contracts_members():
    from dataclasses import fields

    from forensics.stats.fingerprints import FingerprintContext, PrepareContext

    for engine, protocol in ((FingerprintContext, protocols.SetContext),
                             (PrepareContext, protocols.BuildContext)):
        have = {f.name for f in fields(engine)} | set(dir(engine))
        assert {n for n, _ in protocols.members(protocol)} <= have, protocol.__name__


@pytest.mark.parametrize("kind", KINDS_CALLED)
def test_every_registered_object_keeps_its_contract(kind):
    results = checks.check_registered([kind])
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


def test_every_registered_encoder_has_the_contracts_members():
    for entry in plugins.registry("encoders").values():
        assert checks.structure_problems("encoders", entry.obj) == [], entry.name


def test_the_demo_encoder_loads_and_embeds_to_its_contract():
    [result] = checks.check_registered(["encoders"], names=["vit-tiny-demo"], load=True)
    assert result.ok, result.problems


@pytest.mark.slow
def test_every_registered_encoder_lists_its_layers_without_weights():
    results = checks.check_registered(["encoders"])
    assert all(r.ok for r in results), [r for r in results if not r.ok]


# -- broken objects are found, each problem named ----------------------------------------


class GoodDistance:
    name = "good"
    description = "brute force"

    def nn(self, query, ref, *, device="cpu", return_index=False):
        d = np.sqrt(((query[:, None] - ref[None]) ** 2).sum(-1))
        i = d.argmin(1)
        return (d[np.arange(len(d)), i], i) if return_index else d[np.arange(len(d)), i]


def test_a_good_distance_passes():
    assert checks.contract_problems("distances", GoodDistance()) == []


def test_missing_members_and_wrong_types_are_named():
    class NoDescription:
        name = 3

        def nn(self, query, ref):
            return query[:, 0]

    text = _problems("distances", NoDescription())
    assert "'name' must be str, got int" in text
    assert "it has no 'description'" in text
    assert "cannot be called as nn(_, _, device=..., return_index=...)" in text


def test_a_distance_that_is_not_the_nearest_is_caught():
    class Farthest(GoodDistance):
        def nn(self, query, ref, *, device="cpu", return_index=False):
            d = np.sqrt(((query[:, None] - ref[None]) ** 2).sum(-1))
            i = d.argmax(1)
            return (d[np.arange(len(d)), i], i) if return_index else d[np.arange(len(d)), i]

    assert "not the smallest over the rows of ref" in _problems("distances", Farthest())


def test_a_prepared_distance_must_take_prepared_and_agree():
    class HalfPrepared(GoodDistance):
        def prepare_reference(self, ref):
            return ref

    assert "prepared=..." in _problems("distances", HalfPrepared())

    class WrongPrepared(GoodDistance):
        def prepare_reference(self, ref):
            return ref * 2.0

        def nn(self, query, ref, *, device="cpu", return_index=False, prepared=False):
            return super().nn(query, ref, device=device, return_index=return_index)

    assert "prepared reference differs" in _problems("distances", WrongPrepared())


def test_an_exception_inside_a_plugin_is_a_problem_not_a_crash():
    class Raising(GoodDistance):
        def nn(self, query, ref, *, device="cpu", return_index=False):
            raise RuntimeError("boom")

    assert "raised RuntimeError: boom" in _problems("distances", Raising())


def test_a_matcher_that_scores_distance_as_similarity_is_caught():
    class Backwards:
        name, description = "backwards", "L2, higher = farther"

        def score(self, query, refs):
            return np.sqrt(((np.asarray(refs) - query) ** 2).sum(1))

    assert "score at least as high" in _problems("matchers", Backwards())


def test_a_partitioner_that_forgets_its_state_is_caught():
    part = load_test_plugin("spec_partitioner")

    class Forgetful(part.HalvesPartitioner):
        def from_arrays(self, arrays, params):
            return part.HalvesPartition(np.ones_like(arrays["centre"]), params)

    assert "rebuilt with from_arrays" in _problems("partitioners", Forgetful())


def test_a_fingerprint_whose_layer_map_is_off_is_caught():
    fp = load_test_plugin("spec_fingerprint")

    class OffByOne(fp.CentreDistance):
        def entry_layers(self, dims):
            return np.arange(len(dims) + 1)

    assert "entry_layers" in _problems("fingerprints", OffByOne())


def test_an_encoder_giving_float64_is_caught_when_loaded():
    enc = load_test_plugin("spec_encoder")

    class Loaded64(enc.Loaded):
        def forward(self, batch):
            return [a.astype(np.float64) for a in super().forward(batch)]

    class Encoder64(enc.BlockEncoder):
        def load(self, weights, device, pool):
            return Loaded64()

    assert _problems("encoders", Encoder64()) == ""  # without load, nothing is run
    assert "must be float32 (2, D)" in _problems("encoders", Encoder64(), load=True)


def test_pattern_objects_are_checked_as_patterns():
    class Pat:
        name, description = "demo:*", "any demo"

    assert "it has no 'resolve'" in _problems("matchers", Pat())


def test_check_object_names_the_plugin():
    class Bad:
        name, description = "bad", "no score"

    with pytest.raises(PluginError, match=r"plugin 'thirdparty': matcher 'bad' breaks the "
                                          r"plugin contract: it has no 'score'"):
        checks.check_object("matchers", Bad(), plugin="thirdparty")


# -- fp plugins --check ------------------------------------------------------------------


def test_fp_plugins_check_passes_on_the_builtins():
    result = CliRunner().invoke(app, ["plugins", "--check", "--kind", "matchers", "--json"])
    assert result.exit_code == 0, result.output
    assert "combined" in result.output and '"ok": true' in result.output


def test_fp_plugins_check_names_a_broken_plugin_without_a_traceback():
    class Bad:
        name, description = "bad", "scores nothing"

        def score(self, query):
            return query

    plugins.get_plugin_manager().register(
        _plugin_module("broken_plugin", "register_matchers", Bad()), name="broken_plugin")
    result = CliRunner().invoke(app, ["plugins", "--check", "--kind", "matchers"])
    assert result.exit_code == 1
    assert "Error: plugin 'broken_plugin': matcher 'bad' breaks the plugin contract" in (
        result.stderr)
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # the CLI's clean exit, nothing raised
