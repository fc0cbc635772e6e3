"""The plugin manager and the registries built from it.

Plugins come from three places, in this order:

1. ``DEFAULT_PLUGINS``: the built-in modules in ``fp_plugins`` (the ``plugins/`` folder),
   registered through the very hooks a third party uses.
2. Entry points in the group ``fp`` of installed distributions.
3. Nothing else: ``FP_LOAD_PLUGINS`` (a comma-separated list of entry-point names, or
   distribution names) limits which entry-point plugins load; set it to an empty string
   to load none. Built-ins always load.

A registry maps each kind (``encoders``, ``distances``, ...) to ``{name: object}``.
Names are unique per kind: two plugins registering one name is an error naming both.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from forensics import defaults
from forensics.errors import PluginConflictError, PluginError, UnknownNameError
from forensics.plugin import hookspecs
from forensics.plugin.protocols import CONTRACTS

GROUP = "fp"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "fp_plugins.distances",
    "fp_plugins.partitioners",
    "fp_plugins.matchers",
    "fp_plugins.encoders_timm",
    "fp_plugins.encoders_open_clip",
    "fp_plugins.encoders_fid",
    "fp_plugins.fingerprints",
    "fp_plugins.invmm",
    "fp_plugins.memorization_measures",
)

#: kind -> hook name, from the contracts. A new kind is a hook in :mod:`forensics.plugin.hookspecs`
#: and a contract in :mod:`forensics.plugin.protocols`.
KINDS: dict[str, str] = {kind: c.hook for kind, c in CONTRACTS.items()}

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_registries: dict[str, dict[str, Registered]] = {}


@dataclass(frozen=True)
class Registered:
    """One registered object and the plugin that provided it."""

    name: str
    obj: Any
    plugin: str


def _allowed_entry_points() -> set[str] | None:
    value = os.environ.get("FP_LOAD_PLUGINS")
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = _allowed_entry_points()
    for ep in metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else ""
        if allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise PluginError(
                f"plugin {ep.name!r} (from {dist or ep.value}) failed to load: {exc}. "
                f"Uninstall or fix it, or exclude it with FP_LOAD_PLUGINS."
            ) from exc
        pm.register(module, name=ep.name)
        pm._fp_dists[ep.name] = (dist, ep.dist.version if ep.dist else "")  # type: ignore[attr-defined]


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading plugins on first use."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(GROUP)
            pm.add_hookspecs(hookspecs)
            pm._fp_dists = {}  # type: ignore[attr-defined]
            for name in DEFAULT_PLUGINS:
                pm.register(importlib.import_module(name), name=name)
            _load_entry_points(pm)
            _pm = pm
        return _pm


def reset() -> None:
    """Forget loaded plugins and registries (tests, or after installing a plugin)."""
    global _pm
    with _lock:
        _pm = None
        _registries.clear()


def registry(kind: str) -> dict[str, Registered]:
    """Return ``{name: Registered}`` for one kind, built from every loaded plugin."""
    if kind not in KINDS:
        raise UnknownNameError(f"unknown plugin kind {kind!r}; choose one of: {', '.join(KINDS)}")
    with _lock:
        if kind in _registries:
            return _registries[kind]
        pm = get_plugin_manager()
        found: dict[str, Registered] = {}
        hook = getattr(pm.hook, KINDS[kind])
        for impl in reversed(hook.get_hookimpls()):  # call order: first registered first
            plugin_name = impl.plugin_name
            impl.function(**{a: _registrar(kind, found, plugin_name) for a in impl.argnames})
        _registries[kind] = found
        return found


def _registrar(kind: str, found: dict[str, Registered], plugin: str) -> Callable[[Any], None]:
    def register(obj: Any) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind[:-1]} without a string .name")
        if name in found:
            raise PluginConflictError(
                f"{kind[:-1]} {name!r} is registered twice: by plugin {found[name].plugin!r} "
                f"and by plugin {plugin!r}. Uninstall one of them, or limit third-party plugins "
                f"with FP_LOAD_PLUGINS."
            )
        found[name] = Registered(name=name, obj=obj, plugin=plugin)

    return register


def get(kind: str, name: str) -> Any:
    """Return the registered object of ``kind`` called ``name``.

    A name of the form ``scheme:rest`` that is not registered as such is resolved by the
    object registered as ``scheme:*`` (e.g. ``timm:*`` for ``timm:<any model>``), whose
    ``resolve(rest)`` returns the object.

    Raises:
        UnknownNameError: the name is unknown; the message lists the valid names.
    """
    entries = registry(kind)
    if name in entries:
        return entries[name].obj
    if ":" in name:
        scheme, rest = name.split(":", 1)
        pattern = entries.get(f"{scheme}:*")
        if pattern is not None:
            return pattern.obj.resolve(rest)
    valid = ", ".join(sorted(entries)) or "(none installed)"
    raise UnknownNameError(f"unknown {kind[:-1]} {name!r}; valid names: {valid}")


def names(kind: str) -> list[str]:
    """Sorted names registered for ``kind``."""
    return sorted(registry(kind))


def resolve_matcher(fp: Any, name: str | None, kept_dims: Sequence[int]) -> tuple[str, Any]:
    """``(name, matcher object)`` for matching ``fp``'s vectors of the kept layers.

    ``name`` None takes the fingerprint's ``default_matcher`` (else ``combined``). A
    fingerprint with its own rule for that name supplies the object; otherwise it is the
    matcher plugin of that name.
    """
    name = name or getattr(fp, "default_matcher", None) or defaults.MATCHER
    own = getattr(fp, "matcher", None)
    if callable(own):
        obj = own(name, [int(d) for d in kept_dims])
        if obj is not None:
            return name, obj
    return name, get("matchers", name)


def plugin_info() -> list[dict[str, Any]]:
    """Describe every loaded plugin: name, version, built-in or not, what it registers."""
    from forensics._version import __version__

    pm = get_plugin_manager()
    dists = pm._fp_dists  # type: ignore[attr-defined]
    provided: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        for entry in registry(kind).values():
            provided.setdefault(entry.plugin, {}).setdefault(kind, []).append(entry.name)
    info = []
    for name, _plugin in pm.list_name_plugin():
        builtin = name in DEFAULT_PLUGINS
        dist, version = ("fp-forensics", __version__) if builtin else dists.get(name, ("", ""))
        info.append(
            {
                "name": name,
                "distribution": dist,
                "version": version,
                "builtin": builtin,
                "registers": {k: sorted(v) for k, v in provided.get(name, {}).items()},
            }
        )
    return sorted(info, key=lambda d: (not d["builtin"], d["name"]))
