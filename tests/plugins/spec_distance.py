"""A distance written to the README contract only: no ``prepared``, no ``chunk_bytes``."""

from __future__ import annotations

import numpy as np

from forensics.plugin.hookspecs import hookimpl


class BruteForceEuclidean:
    name = "spec-euclidean"
    description = "brute-force Euclidean distance (spec-only test plugin)"

    def nn(self, query, ref, *, device="cpu", return_index=False):
        q = np.asarray(query, dtype=np.float64)
        r = np.asarray(ref, dtype=np.float64)
        d = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(axis=2))
        index = d.argmin(axis=1)
        dist = d[np.arange(len(q)), index]
        return (dist, index.astype(np.int64)) if return_index else dist


@hookimpl
def register_distances(register):
    register(BruteForceEuclidean())
