"""The one thread policy for linear algebra: small work runs on one thread.

Waking a thread pool costs more than a small product or decomposition itself, several
times more on a busy machine; large work uses every thread. One rule, three entry points:
:func:`_one_thread` around a step (BLAS and OpenMP, by array elements),
:func:`blas_threads_for` around one query layer's projection (BLAS, by multiply-adds) and
:func:`torch_threads_for` around a nearest-neighbour search (torch, by multiply-adds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Up to this many array elements, a step's linear algebra runs single-threaded.
SMALL_WORK = 4_000_000


def _one_thread(elements: int = 0, load: bool = True) -> contextlib.AbstractContextManager:
    """Single-threaded BLAS and OpenMP for small arrays (``elements`` up to SMALL_WORK).

    Waking thread pools for a (m, D) x (D, d) product or the SVD of a few thousand rows
    costs more than the work itself, a hundred times more on a busy machine. A limit
    reaches only the libraries loaded when it is set: with ``load`` SciPy's and
    scikit-learn's are loaded first; without, only what is loaded now (a step that may
    import them later sets its own limit there).
    """
    if elements > SMALL_WORK:
        return contextlib.nullcontext()
    try:
        if load:
            import scipy.linalg  # noqa: F401
            import sklearn.cluster  # noqa: F401
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - they come with the dependencies
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


#: A query layer whose projection takes fewer multiply-adds than this runs on one BLAS
#: thread: waking a thread pool for a small product costs more than it saves (several
#: times more on a busy machine). Paper-sized layers (500 x 768 x 64) use every thread.
SINGLE_THREAD_WORK = 2**22
_blas_controller = None


@contextmanager
def blas_threads_for(work: int) -> Iterator[None]:
    """One BLAS thread for ``work`` below :data:`SINGLE_THREAD_WORK` multiply-adds."""
    global _blas_controller
    if work >= SINGLE_THREAD_WORK:
        yield
        return
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController

        _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=1, user_api="blas"):
        yield


#: Searches with fewer multiply-adds (m * n * D) than this run on one CPU thread: for small
#: blocks, waking torch's thread pool costs more than it saves (much more on a busy machine).
TORCH_SINGLE_THREAD_WORK = 2**25


@contextmanager
def torch_threads_for(dev: Any, work: int) -> Iterator[None]:
    """One torch CPU thread for a search below :data:`TORCH_SINGLE_THREAD_WORK` on ``dev``."""
    import torch

    if dev.type != "cpu" or work >= TORCH_SINGLE_THREAD_WORK or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
