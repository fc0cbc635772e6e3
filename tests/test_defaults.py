"""The core names a built-in plugin only in forensics/defaults.py, and reads its defaults there."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from forensics import defaults
from forensics.plugin import manager

ROOT = Path(__file__).resolve().parents[1]

#: String constants that equal a built-in plugin's name but do not name the plugin,
#: as (file relative to forensics/, value): why.
ALLOWED: dict[tuple[str, str], str] = {
    ("steps/curve.py", "given"): "tau_rule 'given' (tau given by the user), not the partitioner",
    ("stats/memorization.py", "given"): "layer_choice 'given' (a layer named by the user)",
    ("cli/commands/invmm.py", "invmm"): "the command's name and its progress label: the "
                                        "command is the InvMM measure's own",
    ("cli/app.py", "invmm"): "the command's name in the help panels (fp --help)",
    # The candidate searches' vocabulary: the formula a distance declares in its ``metric``
    # attribute (the kind of index and re-ranking it needs), not a plugin looked up by name.
    ("stats/neighbours.py", "abscosine"): "a distance's declared metric",
    ("stats/neighbours.py", "cosine"): "a distance's declared metric",
    ("stats/neighbours.py", "euclidean"): "a distance's declared metric",
    ("stats/neighbours.py", "sqeuclidean"): "a distance's declared metric",
}


def builtin_names() -> set[str]:
    """The names every built-in plugin registers, of every kind."""
    return {name for kind in manager.KINDS for name in manager.names(kind)}


def plugin_literals() -> dict[tuple[str, str], list[int]]:
    """``{(file, value): [line, ...]}`` of string constants naming a built-in plugin."""
    names = builtin_names()
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted((ROOT / "forensics").rglob("*.py")):
        rel = path.relative_to(ROOT / "forensics").as_posix()
        if rel == "defaults.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value in names:
                found.setdefault((rel, node.value), []).append(node.lineno)
    return found


def test_the_builtin_names_are_seen():
    names = builtin_names()
    assert {defaults.DISTANCE, defaults.PARTITIONER, defaults.FINGERPRINT, defaults.MATCHER,
            defaults.MEASURE, defaults.DEMO_ENCODER.split("@")[0],
            defaults.GIVEN_PARTITIONER} <= names
    assert set(defaults.PAPER_MATCHERS) <= names


def test_the_core_names_builtin_plugins_only_in_defaults():
    found = plugin_literals()
    bad = {k: v for k, v in found.items() if k not in ALLOWED}
    assert bad == {}, "name built-in plugins through forensics.defaults:\n" + "\n".join(
        f"  forensics/{f}:{lines} {value!r}" for (f, value), lines in sorted(bad.items()))
    stale = set(ALLOWED) - set(found)
    assert stale == set(), f"allowances no longer needed: {sorted(stale)}"


def test_library_and_cli_defaults_agree():
    """The keyword defaults of the steps are the command line's option defaults."""
    import typer.main

    from forensics.cli.app import app
    from forensics.steps.attribute import attribute
    from forensics.steps.build_baseline import build_baseline
    from forensics.steps.enroll import enroll

    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    group = {c.name: c for c in commands["baseline"].commands.values()}

    def options(cmd):
        return {p.name: p.default for p in cmd.params}

    def keywords(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}

    for fn, cmd in ((build_baseline, group["build"]), (enroll, commands["enroll"]),
                    (attribute, commands["attribute"])):
        opts, kws = options(cmd), keywords(fn)
        for name in set(opts) & set(kws):
            if name in ("drop_layers",):
                assert opts[name] == ",".join(map(str, kws[name])), name
            elif name not in ("cache_dir", "progress", "bank", "weights", "baseline"):
                assert str(opts[name]) == str(kws[name]) or opts[name] == kws[name], \
                    (fn.__name__, name, opts[name], kws[name])


def test_the_readme_names_the_belonging_defaults_the_code_has():
    import re
    from pathlib import Path

    from forensics import defaults

    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    m = re.search(r"the default:\s*`forensics\.defaults\.BELONG_KIND = \"(\w+)\"`,\s*"
                  r"`BELONG_ORDER = \"(\w+)\"`,\s*`BELONG_GATE =\s*(\w+)`", text)
    assert m, "README no longer states the belonging defaults"
    assert m.groups() == (defaults.BELONG_KIND, defaults.BELONG_ORDER,
                          str(defaults.BELONG_GATE))
