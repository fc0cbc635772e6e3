"""Every hook is documented (docstring, versionadded, README); the README's plugin contract
is generated from the Protocols (tests/test_plugin_hooks.py runs every hook end to end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forensics.plugin import hookspecs
from forensics.plugin.manager import KINDS

REPO = Path(__file__).resolve().parents[1]
HOOKS = sorted(KINDS.values())


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_docstring_and_versionadded(hook):
    doc = getattr(hookspecs, hook).__doc__ or ""
    assert doc.strip().splitlines()[0].strip(), f"{hook} needs a one-line docstring"
    assert ".. versionadded::" in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_in_readme(hook):
    readme = (REPO / "README.md").read_text()
    assert f"`{hook}(register)`" in readme, f"README's 'Hooks' section must document {hook}"


def test_readme_plugin_contract_is_generated_from_the_protocols():
    """``python -m forensics.plugin.tables --check`` (what CI runs through this test)."""
    from forensics.plugin import tables

    assert tables.main(["--check", str(REPO / "README.md")]) == 0, (
        "README's plugin contract differs from forensics/plugin/protocols.py: run "
        "python -m forensics.plugin.tables")


def test_the_contract_check_fails_on_a_drifted_readme(tmp_path, capsys):
    from forensics.plugin import tables

    readme = tmp_path / "README.md"
    text = (REPO / "README.md").read_text()
    readme.write_text(text.replace("return_index=False", "chunk_bytes=..., return_index=False", 1))
    assert tables.main(["--check", str(readme)]) == 1
    assert "Error: the plugin contract" in capsys.readouterr().err
    assert tables.main([str(readme)]) == 0 and readme.read_text() == text  # regenerated


def test_every_hook_is_documented_with_its_signature():
    readme = (REPO / "README.md").read_text()
    for hook in HOOKS:
        line = next((x for x in readme.splitlines() if x.startswith(f"- `{hook}(")), "")
        first = (getattr(hookspecs, hook).__doc__ or "").strip().splitlines()[0]
        assert line.startswith(f"- `{hook}(register)`: {first}"), hook
