"""Every hook is documented (docstring, versionadded, README) and exercised by a test."""

from __future__ import annotations

from pathlib import Path

import pytest

from forensics import hookspecs
from forensics.plugins import KINDS

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


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    kind = hook.removeprefix("register_")
    files = (REPO / "tests").glob("test_*.py")
    tests = "".join(p.read_text() for p in files if p.name != "test_docs.py")
    assert hook in tests or f'"{kind}"' in tests, f"no test exercises {hook}"
