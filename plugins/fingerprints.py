"""Built-in fingerprints: the paper's C_T-layer curve, and the paper's mean/std/FID baseline.

See :mod:`forensics.fingerprints` for the protocol. ``paper`` is the curve itself (one
C_T value per layer, matched by the ``l2`` / ``cosine`` / ``combined`` matchers).
``setstats`` is the simple set summary He et al. (2024) compare against
(:mod:`forensics.setstats`): per layer the set's feature mean, standard deviation and FID
against T, laid out ``[means..., stds..., fids...]`` and matched by the authors' rule.
T's per-layer Gaussian statistics are computed once when a baseline is built.
"""

from __future__ import annotations

from forensics.hookspecs import hookimpl


class PaperFingerprint:
    """The C_T-layer curve exactly as in the paper: C_T per layer."""

    name = "paper"
    description = "C_T per layer (the paper's curve), matched by l2 / cosine / combined"
    default_matcher = "combined"

    def compute(self, ctx):
        """The curve's values."""
        return ctx.values


class SetStatsFingerprint:
    """The paper's baseline: per-layer feature mean, std and FID against T."""

    name = "setstats"
    description = "the paper's mean/std/FID baseline: set summaries per layer, authors' rule"
    default_matcher = "combined"

    def prepare(self, ctx):
        """T's mean and covariance per layer (what FID against T needs)."""
        from forensics.setstats import gaussian_stats

        out = {}
        for i, (name, T) in enumerate(zip(ctx.layers, ctx.train, strict=True)):
            stats = gaussian_stats(T, f"layer {name!r} of T")
            out[f"mu.{i}"], out[f"cov.{i}"] = stats.mu, stats.cov
            out[f"n.{i}"] = stats.n
        return out

    def compute(self, ctx):
        """``[means..., stds..., fids...]`` of the set (see :func:`baseline_vector`)."""
        import numpy as np

        from forensics.errors import InputError
        from forensics.setstats import GaussianStats, baseline_vector, mean_std_fid_features

        features = {}
        for i, (name, X) in enumerate(zip(ctx.layers, ctx.embeddings, strict=True)):
            try:
                ref = GaussianStats(ctx.extras[f"mu.{i}"], ctx.extras[f"cov.{i}"],
                                    int(np.asarray(ctx.extras[f"n.{i}"]).reshape(-1)[0]))
            except KeyError:
                raise InputError(f"the baseline's setstats arrays lack layer {i} ({name}); "
                                 f"rebuild the baseline") from None
            features[name] = mean_std_fid_features(X, ref)
        return baseline_vector(features, ctx.layers)

    def entry_layers(self, dims):
        """Means and stds belong to their layer, entry by entry; then one FID per layer."""
        import numpy as np

        per_layer = np.repeat(np.arange(len(dims)), dims)
        return np.concatenate([per_layer, per_layer, np.arange(len(dims))])

    def matcher(self, name, dims):
        """The authors' rule for ``l2`` / ``cosine`` / ``combined`` on this layout."""
        from forensics.setstats import baseline_matchers

        return {m.name: m for m in baseline_matchers(dims)}.get(name)


FINGERPRINTS = (PaperFingerprint(), SetStatsFingerprint())


@hookimpl(trylast=True)
def register_fingerprints(register):
    for fingerprint in FINGERPRINTS:
        register(fingerprint)
