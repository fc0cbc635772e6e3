"""The ``fp`` reference bank: enrolled C_T curves and their baselines, as plain Parquet.

Imports pyarrow, never torch: a bank can be read, verified, exported and imported on any
machine. See :class:`refbank.Bank` and the README's "Reference bank" section.
"""

from refbank.bank import Bank, ImportReport, Problem, VerifyReport, default_bank_path
from refbank.schema import BASELINE_COLUMNS, CURVE_COLUMNS, SCHEMA_VERSION

__all__ = [
    "BASELINE_COLUMNS",
    "CURVE_COLUMNS",
    "SCHEMA_VERSION",
    "Bank",
    "ImportReport",
    "Problem",
    "VerifyReport",
    "default_bank_path",
]
