"""fp: a forensic toolkit for generative image models.

Heavy dependencies (torch, sklearn, scipy, pyarrow) are imported only inside the
functions that need them, so ``import forensics`` and ``fp --help`` stay instant.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
