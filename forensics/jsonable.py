"""The one JSON cleaner: any nested value as plain JSON types, strict (no NaN, no Infinity)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """``value`` ready for ``json.dumps(..., allow_nan=False)``.

    Dict keys become strings, tuples lists, numpy arrays and scalars Python values,
    non-finite floats ``None`` and datetimes ISO 8601 text; anything else is kept as is.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return value
