"""fp: a forensic toolkit for generative image models.

Heavy dependencies (torch, sklearn, scipy, pyarrow) are imported only inside the
functions that need them, so ``import forensics`` and ``fp --help`` stay instant.

The investigator's steps are importable from here, loaded on first use
(see :mod:`forensics.pipeline`)::

    import forensics
    forensics.build_baseline("cifar", "train/", "heldout/", encoder="vit-b16", bank="bank/")
    forensics.enroll("gen_a/", baseline="cifar", model="a", family="gan", bank="bank/")
    answer = forensics.attribute("suspect/", bank="bank/")
    answer.decision.family, answer.to_dict()
    report = forensics.memorize("generated/", baseline="cifar", bank="bank/")
    table = forensics.evaluate_bank("bank/", fingerprint="paper")

``forensics.attribute`` is also the module :mod:`forensics.attribute`: calling it runs
:func:`forensics.pipeline.attribute`. The package, not that module, makes it callable, so
the module of pure functions never imports the pipeline that uses it.
"""

import inspect as _inspect
import sys as _sys
import types as _types

from forensics._version import __version__

#: Names exported lazily: name -> module that defines it.
_LAZY = {
    "build_baseline": "forensics.pipeline",
    "compute_curve": "forensics.pipeline",
    "enroll": "forensics.pipeline",
    "load_baseline": "forensics.pipeline",
    "memorize": "forensics.pipeline",
    "CurveResult": "forensics.pipeline",
    "evaluate_bank": "forensics.evaluate",
    "run_demo": "forensics.demo",
}

__all__ = ["__version__", "attribute", *_LAZY]


class _AttributeModule(_types.ModuleType):
    """:mod:`forensics.attribute`, callable as :func:`forensics.pipeline.attribute`."""

    def __call__(self, folder, **kwargs):
        from forensics.pipeline import attribute

        return attribute(folder, **kwargs)

    @property
    def __signature__(self) -> _inspect.Signature:
        """The parameters of :func:`forensics.pipeline.attribute` (for help and IDEs)."""
        from forensics.pipeline import attribute

        return _inspect.signature(attribute)


class _Package(_types.ModuleType):
    """This package: its ``attribute`` submodule becomes callable as it is bound here."""

    def __setattr__(self, name: str, value) -> None:
        # The import system binds a loaded submodule with setattr(package, name, module),
        # whether it was imported directly (import forensics.attribute) or lazily below.
        if name == "attribute" and type(value) is _types.ModuleType:
            value.__class__ = _AttributeModule
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    import importlib

    if name == "attribute":  # the module, callable as the pipeline step
        return importlib.import_module("forensics.attribute")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forensics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
