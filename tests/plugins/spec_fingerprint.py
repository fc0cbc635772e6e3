"""A fingerprint written to the README contract only: per layer, the set's mean distance
to T's centre, with T's centres prepared once per baseline."""

from __future__ import annotations

import numpy as np

from forensics.plugin.hookspecs import hookimpl


class CentreDistance:
    name = "spec-centre"
    description = "per layer: the set's mean distance to T's centre (test plugin)"
    default_matcher = "l2"

    def prepare(self, ctx):
        return {f"centre.{i}": np.asarray(T, dtype=np.float64).mean(axis=0)
                for i, T in enumerate(ctx.train)}

    def compute(self, ctx):
        return np.array([
            np.linalg.norm(np.asarray(X, dtype=np.float64) - ctx.extras[f"centre.{i}"],
                           axis=1).mean()
            for i, X in enumerate(ctx.embeddings)])


@hookimpl
def register_fingerprints(register):
    register(CentreDistance())
