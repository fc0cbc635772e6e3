"""One thread policy for linear algebra: small arrays run single-threaded."""

from __future__ import annotations

import contextlib

#: Up to this many array elements, linear algebra runs single-threaded (see below).
SMALL_WORK = 4_000_000


def _one_thread(elements: int = 0) -> contextlib.AbstractContextManager:
    """Single-threaded BLAS and OpenMP for small arrays (``elements`` up to SMALL_WORK).

    Waking thread pools for a (m, D) x (D, d) product or the SVD of a few thousand rows
    costs more than the work itself, a hundred times more on a busy machine.
    """
    if elements > SMALL_WORK:
        return contextlib.nullcontext()
    try:
        # A limit reaches only libraries already loaded: load SciPy's and scikit-learn's.
        import scipy.linalg  # noqa: F401
        import sklearn.cluster  # noqa: F401
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - they come with the dependencies
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)
