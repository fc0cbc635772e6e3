"""fp: a forensic toolkit for generative image models.

Heavy dependencies (torch, sklearn, scipy, pyarrow) are imported only inside the
functions that need them, so ``import forensics`` and ``fp --help`` stay instant.

The investigator's steps are importable from here, loaded on first use
(see :mod:`forensics.steps`)::

    import forensics
    forensics.build_baseline("cifar", "train/", "heldout/", encoder="vit-b16", bank="bank/")
    forensics.enroll("suspect_gen/", name="gen-a", labels={"arch": "GAN"}, baseline="cifar",
                     bank="bank/")
    answer = forensics.attribute("query/", bank="bank/")
    answers = forensics.attribute_many(["case/a/", "case/b/"], bank="bank/")
    report = forensics.memorize("generated/", baseline="cifar", bank="bank/")
    table = forensics.evaluate_bank("bank/", fingerprint="paper")

The package is laid out by layer; imports point down only::

    cli -> steps -> {stats, data, plugin} (and refbank) -> {errors, defaults, progress, _version}
"""

from forensics._version import __version__

#: Names exported lazily: name -> module that defines it.
_LAZY = {
    "attribute": "forensics.steps.attribute",
    "attribute_many": "forensics.steps.attribute",
    "build_baseline": "forensics.steps.build_baseline",
    "compute_curve": "forensics.steps.curve",
    "enroll": "forensics.steps.enroll",
    "load_baseline": "forensics.steps.bank_access",
    "memorize": "forensics.steps.memorization",
    "CurveResult": "forensics.steps.curve",
    "evaluate_bank": "forensics.steps.evaluate",
    "run_demo": "forensics.paper.demo",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forensics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
