"""A matcher written to the README contract only: minus the L1 distance."""

from __future__ import annotations

import numpy as np

from forensics.plugin.hookspecs import hookimpl


class NegativeL1:
    name = "spec-l1"
    description = "minus the L1 distance (spec-only test plugin)"

    def score(self, query, refs):
        q = np.asarray(query, dtype=np.float64).reshape(-1)
        r = np.asarray(refs, dtype=np.float64).reshape(-1, q.size)
        return -np.abs(r - q).sum(axis=1)


@hookimpl
def register_matchers(register):
    register(NegativeL1())
