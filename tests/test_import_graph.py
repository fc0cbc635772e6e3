"""The import graph of forensics/, plugins/ and refbank/: no cycles, no forbidden edges.

Every ``import`` and ``from ... import`` is read from the source (top level, inside
functions and under ``TYPE_CHECKING`` alike: a lazy import is still a dependency), and so
is every ``importlib.import_module("literal")``. Nothing is imported to build the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Source folder -> the import name of its package.
ROOTS = {"forensics": "forensics", "plugins": "fp_plugins", "refbank": "refbank"}

#: Edges tolerated for now, each with the reason. Remove an entry once its edge is gone.
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = set()
#: Modules that may import the package root (none: they read forensics._version).
ALLOWED_ROOT_IMPORTS: set[str] = set()

#: What refbank may import of forensics: the errors, the version and the JSON cleaner, nothing
#: of the engine.
REFBANK_MAY_IMPORT = {"forensics.errors", "forensics._version", "forensics.jsonable"}
#: Third-party packages refbank never imports (the bank is pyarrow only).
REFBANK_NEVER = ("torch", "torchvision", "timm", "open_clip", "sklearn", "scipy")
#: What plugins never import: the steps and the command line sit above everything they may use.
PLUGINS_NEVER = ("forensics.steps", "forensics.cli", "forensics.paper")

#: The layers, lowest first, and what each may import (besides itself). Imports point down.
LAYERS = {
    "base": set(),  # errors, defaults, progress, _version, jsonable, threads
    "plugin": {"base"},  # hook specs, Protocols, the manager, contract checks
    "stats": {"base", "plugin"},  # arrays in, dataclasses out
    "checks": {"base", "plugin", "stats", "data"},  # plugin.checks: the contract, exercised
    "data": {"base", "plugin"},  # files and formats
    "refbank": {"base"},  # the Parquet bank
    "fp_plugins": {"base", "plugin", "stats", "data"},  # the built-in plugins
    "steps": {"base", "plugin", "checks", "stats", "data", "refbank"},  # the order of the steps
    # reproduction helpers, then the command line
    "paper": {"base", "plugin", "checks", "stats", "data", "refbank", "steps"},
    "cli": {"base", "plugin", "checks", "stats", "data", "refbank", "steps", "paper"},
    "root": {"base", "steps", "paper"},  # the lazy public API
}
BASE = {"forensics._version", "forensics.errors", "forensics.defaults", "forensics.progress",
        "forensics.jsonable", "forensics.threads"}
#: What stats may use of the plugin layer: the contract's types, never the registry.
STATS_MAY_USE_OF_PLUGIN = {"forensics.plugin.protocols"}
#: Forbidden edges tolerated for now, each with the reason. Remove an entry once it is gone.
ALLOWED_LAYER_EDGES: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> str:
    """The layer a module of ours belongs to."""
    if module in BASE:
        return "base"
    if module == "forensics":
        return "root"
    if module == "forensics.__main__":  # python -m forensics: the command line
        return "cli"
    if module == "forensics.plugin.checks":  # runs plugin objects through the engine
        return "checks"
    top, _, rest = module.partition(".")
    if top in ("refbank", "fp_plugins"):
        return top
    return rest.split(".")[0]


def modules() -> dict[str, Path]:
    """Import name -> source file of every module under the three roots."""
    found = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imported_names(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Absolute dotted names one module imports.

    ``from a import b`` gives ``a.b`` when that is a module of ours, else ``a`` (``b`` is a
    name defined in ``a``).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                names.add(full if full in known else source)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def _local(name: str, known: dict[str, Path]) -> str | None:
    """The module of ours that ``name`` is or lies in; ``None`` for third-party names."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(edges between our modules, every imported name)``, per module."""
    known = modules()
    edges, raw = {}, {}
    for module, path in known.items():
        raw[module] = imported_names(module, path, known)
        edges[module] = {_local(name, known) for name in raw[module]} - {None, module}
    return edges, raw


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_graph_sees_lazy_relative_and_from_imports(graph):
    edges, _ = graph
    assert "forensics.stats.ct" in edges["forensics.stats.baseline"]  # top level
    assert "forensics.plugin.manager" in edges["forensics.steps.engine"]  # top level
    assert "forensics.data.images" in edges["forensics.steps.bank_access"]  # inside a function
    assert "forensics.plugin.hookspecs" in edges["fp_plugins.distances"]  # from ... import name
    assert "forensics.stats.fingerprints" in edges["fp_plugins.fingerprints"]  # from pkg import mod


def test_no_import_cycles(graph):
    edges, _ = graph
    pruned = {m: {t for t in ts if (m, t) not in ALLOWED_CYCLE_EDGES} for m, ts in edges.items()}
    assert cycles(pruned) == [], "import cycles (break them; imports point one way)"


def test_allowed_edges_still_exist(graph):
    """An allowance outlives its edge only by mistake: drop it when the edge is gone."""
    edges, _ = graph
    for source, target in ALLOWED_CYCLE_EDGES:
        assert target in edges[source], f"{source} -> {target} is gone: remove its allowance"


def test_refbank_imports_neither_torch_nor_the_engine(graph):
    edges, raw = graph
    for module in (m for m in edges if m.split(".")[0] == "refbank"):
        ours = {t for t in edges[module] if t.split(".")[0] == "forensics"}
        assert ours <= REFBANK_MAY_IMPORT, f"{module} imports {sorted(ours - REFBANK_MAY_IMPORT)}"
        heavy = {n for n in raw[module] if n.split(".")[0] in REFBANK_NEVER}
        assert not heavy, f"{module} imports {sorted(heavy)}"


def test_plugins_never_import_the_command_line(graph):
    edges, _ = graph
    for module in (m for m in edges if m.split(".")[0] == "fp_plugins"):
        bad = {t for t in edges[module] if t.startswith(PLUGINS_NEVER)}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_only_the_public_api_package_is_above_everything(graph):
    """Modules read the version from forensics._version, never from the lazy package root."""
    edges, _ = graph
    importers = {m for m, ts in edges.items() if "forensics" in ts} - ALLOWED_ROOT_IMPORTS
    assert importers == set(), f"{sorted(importers)} import the package root forensics"


def test_the_contract_and_the_version_are_leaves(graph):
    """The Protocols depend on nothing of ours, so every layer may import them."""
    edges, _ = graph
    for leaf in ("forensics.plugin.protocols", "forensics._version"):
        assert edges[leaf] == set(), f"{leaf} imports {sorted(edges[leaf])}"


def forbidden_edges(edges: dict[str, set[str]]) -> dict[tuple[str, str], str]:
    """Every edge that points up or sideways, with the rule it breaks."""
    bad = {}
    for source, targets in edges.items():
        src = layer_of(source)
        for target in targets:
            dst = layer_of(target)
            if dst == src or dst in LAYERS[src]:
                if src == "stats" and dst == "plugin" and target not in STATS_MAY_USE_OF_PLUGIN:
                    bad[(source, target)] = "stats receives plugin objects, never looks them up"
                continue
            bad[(source, target)] = f"{src} may not import {dst}"
    return bad


def test_every_module_has_a_layer(graph):
    edges, _ = graph
    unknown = {m: layer_of(m) for m in edges if layer_of(m) not in LAYERS}
    assert unknown == {}, "modules outside the layers (add them to LAYERS or move them)"


def test_imports_point_down_the_layers(graph):
    edges, _ = graph
    bad = {e: why for e, why in forbidden_edges(edges).items() if e not in ALLOWED_LAYER_EDGES}
    assert bad == {}, "imports that point up or sideways:\n" + "\n".join(
        f"  {a} -> {b}: {why}" for (a, b), why in sorted(bad.items()))


def test_allowed_layer_edges_still_exist(graph):
    edges, _ = graph
    for source, target in ALLOWED_LAYER_EDGES:
        assert target in edges[source], f"{source} -> {target} is gone: remove its allowance"


def test_the_layer_rules_catch_an_upward_edge():
    edges = {"forensics.stats.ct": {"forensics.steps.curve", "forensics.errors"},
             "forensics.stats.baseline": {"forensics.plugin.manager", "forensics.plugin.protocols"},
             "refbank.bank": {"forensics.stats.ct"}}
    assert set(forbidden_edges(edges)) == {
        ("forensics.stats.ct", "forensics.steps.curve"),
        ("forensics.stats.baseline", "forensics.plugin.manager"),
        ("refbank.bank", "forensics.stats.ct")}
