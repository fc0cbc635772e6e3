"""A partitioner written to the README contract only: cells by the sign of T's first axis."""

from __future__ import annotations

import numpy as np

from forensics.plugin.hookspecs import hookimpl


class HalvesPartition:
    def __init__(self, centre, params):
        self.centre = np.asarray(centre, dtype=np.float64)
        self.params = dict(params)
        self.n_cells = 2

    def transform(self, X):
        return np.asarray(X, dtype=np.float64) - self.centre

    def cells(self, Z):
        return (np.asarray(Z)[:, 0] > 0).astype(np.int64)

    def assign(self, X):
        return self.cells(self.transform(X))

    def to_arrays(self):
        return {"centre": self.centre}


class HalvesPartitioner:
    name = "spec-halves"
    description = "two cells: either side of T's median on the first feature (test plugin)"

    def fit(self, T, *, seed=0, **params):
        T = np.asarray(T, dtype=np.float64)
        centre = np.zeros(T.shape[1])
        centre[0] = np.median(T[:, 0])
        return HalvesPartition(centre, {"seed": int(seed)})

    def from_arrays(self, arrays, params):
        return HalvesPartition(arrays["centre"], params)


@hookimpl
def register_partitioners(register):
    register(HalvesPartitioner())
