"""The plugin manager: loading, registries, errors, limiting what loads."""

from __future__ import annotations

import types

import pytest

from forensics.errors import PluginConflictError, UnknownNameError
from forensics.plugin import hookspecs
from forensics.plugin import manager as plugins
from forensics.plugin.hookspecs import hookimpl


def _plugin_module(name: str, kind_hook: str, *objs) -> types.ModuleType:
    mod = types.ModuleType(name)

    def impl(register):
        for o in objs:
            register(o)

    impl.__name__ = kind_hook
    setattr(mod, kind_hook, hookimpl(impl))
    return mod


def test_builtin_matchers_are_registered():
    assert {"l2", "cosine", "combined"} <= set(plugins.names("matchers"))
    assert plugins.registry("matchers")["l2"].plugin == "fp_plugins.matchers"


def test_every_kind_has_a_hookspec():
    for hook in plugins.KINDS.values():
        assert hasattr(hookspecs, hook)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        plugins.get("matchers", "nope")
    msg = str(info.value)
    assert "'nope'" in msg and "combined" in msg and "cosine" in msg and "l2" in msg


def test_unknown_kind_is_an_error():
    with pytest.raises(UnknownNameError, match="encoders"):
        plugins.registry("gizmos")


def test_duplicate_names_name_both_plugins():
    pm = plugins.get_plugin_manager()
    dup = types.SimpleNamespace(name="l2", description="impostor")
    pm.register(_plugin_module("impostor", "register_matchers", dup), name="impostor")
    with pytest.raises(PluginConflictError) as info:
        plugins.registry("matchers")
    assert "fp_plugins.matchers" in str(info.value) and "impostor" in str(info.value)


def test_scheme_names_resolve_through_pattern_objects():
    class Pattern:
        name = "demo:*"

        def resolve(self, rest):
            return types.SimpleNamespace(name=f"demo:{rest}")

    pm = plugins.get_plugin_manager()
    pm.register(_plugin_module("pat", "register_matchers", Pattern()), name="pat")
    assert plugins.get("matchers", "demo:xyz").name == "demo:xyz"
    with pytest.raises(UnknownNameError):
        plugins.get("matchers", "other:xyz")


def test_plugin_info_reports_builtin_version():
    from forensics import __version__

    info = {p["name"]: p for p in plugins.plugin_info()}
    m = info["fp_plugins.matchers"]
    assert m["builtin"] and m["version"] == __version__
    assert m["registers"]["matchers"] == ["combined", "cosine", "l2", "zscore"]


def test_fp_load_plugins_empty_loads_no_entry_points(monkeypatch):
    calls = []

    class FakeEP:
        name = "thirdparty"
        value = "thirdparty_mod"
        dist = None

        def load(self):
            calls.append(1)
            return _plugin_module("thirdparty_mod", "register_matchers")

    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: [FakeEP()])
    monkeypatch.setenv("FP_LOAD_PLUGINS", "")
    plugins.reset()
    plugins.get_plugin_manager()
    assert calls == []
    monkeypatch.setenv("FP_LOAD_PLUGINS", "thirdparty")
    plugins.reset()
    pm = plugins.get_plugin_manager()
    assert calls == [1] and pm.get_plugin("thirdparty") is not None
