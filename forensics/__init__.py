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
:func:`forensics.pipeline.attribute`.
"""

__version__ = "0.1.0"

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
