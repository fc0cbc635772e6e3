"""Built-in fingerprints: the paper's C_T-layer curve, its mean/std/FID baseline, set means.

See :mod:`forensics.stats.fingerprints` for the protocol. ``paper`` is the curve itself (one
C_T value per layer, matched by the ``l2`` / ``cosine`` / ``combined`` matchers).
``setstats`` is the simple set summary He et al. (2024) compare against
(:mod:`forensics.stats.setstats`): per layer the set's feature mean, standard deviation and FID
against T, laid out ``[means..., stds..., fids...]`` and matched by the authors' rule.
T's per-layer Gaussian statistics are computed once when a baseline is built.

``proj-mean`` and ``proj-mean-early`` summarise a set by the mean of its embeddings
projected on T's leading principal axes (an exact PCA fitted on T when the baseline is
built), per layer: all layers, or the early half of the network (layers ``0 .. L // 2``),
where low-level generator traits live. ``resid-early`` subtracts from each image's early
layers what its content predicts (a ridge regression on the next layers, fitted on T), so
that which digits or objects a set happens to show no longer moves its vector; the
``-ct`` variants put the C_T curve in front. All are matched by ``zscore``, which weighs
every entry by its spread over the enrolled vectors. On real samples of 11 GAN
architectures this attributes far better than the C_T curve (``docs/attribution.md``).
"""

from __future__ import annotations

from forensics.plugin.hookspecs import hookimpl


def exact_pca(T, k):
    """Mean and ``k`` leading principal axes of ``T``.

    See :func:`forensics.stats.fingerprints.exact_pca`.
    """
    from forensics.stats.fingerprints import exact_pca as core

    return core(T, k)


class PaperFingerprint:
    """The C_T-layer curve exactly as in the paper: C_T per layer."""

    name = "paper"
    description = "C_T per layer (the paper's curve), matched by l2 / cosine / combined"
    default_matcher = "combined"
    needs_ct = True

    def compute(self, ctx):
        """The curve's values."""
        return ctx.values


class SetStatsFingerprint:
    """The paper's baseline: per-layer feature mean, std and FID against T."""

    name = "setstats"
    description = "the paper's mean/std/FID baseline: set summaries per layer, authors' rule"
    default_matcher = "combined"
    needs_ct = False

    def prepare(self, ctx):
        """Per layer what FID against T needs, compactly (:class:`CompactStats`): T's mean,
        covariance trace, and T's rows or a covariance factor, whichever is smaller."""
        import numpy as np

        from forensics.errors import InsufficientDataError
        from forensics.stats.setstats import covariance_factor

        out = {}
        for i, name in enumerate(ctx.layers):
            T = ctx.train[i]
            n, d = T.shape
            if n < 2:
                raise InsufficientDataError(f"layer {name!r} of T has {n} sample(s); "
                                            f"FID needs at least 2")
            itemsize = np.dtype(T.dtype).itemsize if np.issubdtype(T.dtype, np.floating) else 8
            out[f"n.{i}"] = np.int64(n)
            if n * d * itemsize <= d * min(n - 1, d) * 8:
                # T's rows are smaller than a factor (n <= 2 D): read whole, stored as they are.
                T = np.asarray(T)
                if not np.issubdtype(T.dtype, np.floating):
                    T = T.astype(np.float64)
                X = np.asarray(T, dtype=np.float64)
                mu = X.mean(axis=0)
                Xc = X - mu
                out[f"mu.{i}"], out[f"rows.{i}"] = mu, T
                out[f"trace.{i}"] = np.float64(np.einsum("ij,ij->", Xc, Xc) / (n - 1))
            else:
                eig = ctx.covariance(i)  # streamed over T's rows, shared with the PCA
                out[f"mu.{i}"] = eig.mean
                out[f"trace.{i}"] = np.float64(eig.trace)
                out[f"factor.{i}"] = covariance_factor(eig.values, eig.vectors)
        return out

    @staticmethod
    def reference(ctx, i, name):
        """T's statistics of layer ``i`` as stored: compact, or full (older baselines)."""
        import numpy as np

        from forensics.errors import InputError
        from forensics.stats.setstats import CompactStats, GaussianStats

        ex = ctx.extras
        try:
            n = int(np.asarray(ex[f"n.{i}"]).reshape(-1)[0])
            if f"trace.{i}" in ex:
                if f"factor.{i}" not in ex and f"rows.{i}" not in ex:
                    raise KeyError(f"factor.{i}")
                return CompactStats(ex[f"mu.{i}"], float(ex[f"trace.{i}"]), n,
                                    factor=ex.get(f"factor.{i}"), rows=ex.get(f"rows.{i}")), None
            return GaussianStats(ex[f"mu.{i}"], ex[f"cov.{i}"], n), ex.get(f"root.{i}")
        except KeyError:
            raise InputError(f"the baseline's setstats arrays lack layer {i} ({name}); "
                             f"rebuild the baseline") from None

    def compute(self, ctx):
        """``[means..., stds..., fids...]`` of the set (see :func:`baseline_vector`)."""
        from forensics.stats.setstats import baseline_vector, mean_std_fid_features

        features = {}
        for i, (name, X) in enumerate(zip(ctx.layers, ctx.embeddings, strict=True)):
            ref, root = self.reference(ctx, i, name)
            features[name] = mean_std_fid_features(X, ref, root)
        return baseline_vector(features, ctx.layers)

    def entry_layers(self, dims):
        """Means and stds belong to their layer, entry by entry; then one FID per layer."""
        import numpy as np

        per_layer = np.repeat(np.arange(len(dims)), dims)
        return np.concatenate([per_layer, per_layer, np.arange(len(dims))])

    def matcher(self, name, dims):
        """The authors' rule for ``l2`` / ``cosine`` / ``combined`` on this layout."""
        from forensics.stats.setstats import baseline_matchers

        return {m.name: m for m in baseline_matchers(dims)}.get(name)


#: Principal axes kept per layer by the projected-mean fingerprints.
PROJ_DIM = 64


class ProjMeanFingerprint:
    """Mean of the set's projection on T's leading principal axes, per selected layer.

    Args:
        name: registered name.
        early: keep only layers ``0 .. L // 2`` (the early half of the network).
        description: one line for ``fp list fingerprints``.
    """

    default_matcher = "zscore"
    needs_ct = False
    #: Principal axes kept per layer (at most the layer's width).
    dim = PROJ_DIM

    def __init__(self, name, early, description):
        self.name, self.early, self.description = name, bool(early), description

    def selected(self, n_layers):
        """Indices of the layers this fingerprint summarises."""
        return list(range(n_layers // 2 + 1)) if self.early else list(range(n_layers))

    def pca_layers(self, n_layers):
        """Indices of the layers whose PCA of T is stored with the baseline."""
        return self.selected(n_layers)

    def prepare(self, ctx):
        """T's mean and leading principal axes for each layer of :meth:`pca_layers`."""
        out = {}
        for i in self.pca_layers(len(ctx.layers)):
            mean, axes = ctx.pca(i, min(self.dim, ctx.train[i].shape[1]))
            out[f"mean.{i}"], out[f"axes.{i}"] = mean, axes
        return out

    def extra(self, ctx, key, i):
        """The stored baseline array ``key.i`` (the error says to rebuild if it is absent)."""
        try:
            return ctx.extras[f"{key}.{i}"]
        except KeyError:
            from forensics.errors import InputError

            raise InputError(f"the baseline's {self.name} arrays lack layer {i} "
                             f"({ctx.layers[i]}); rebuild the baseline") from None

    def projected_mean(self, ctx, i):
        """The set's mean embedding of layer ``i`` projected on T's stored axes."""
        import numpy as np

        X = np.asarray(ctx.embeddings[i], dtype=np.float64)
        return (X.mean(axis=0) - self.extra(ctx, "mean", i)) @ self.extra(ctx, "axes", i).T

    def compute(self, ctx):
        """``[mean projection of layer i for each selected i]``."""
        import numpy as np

        return np.concatenate([self.projected_mean(ctx, i)
                               for i in self.selected(len(ctx.layers))])

    def projected(self, ctx, i):
        """Each image's embedding of layer ``i`` projected on T's stored axes, ``(m, k)``."""
        import numpy as np

        X = np.asarray(ctx.embeddings[i], dtype=np.float64)
        return (X - self.extra(ctx, "mean", i)) @ self.extra(ctx, "axes", i).T

    def image_rows(self, ctx):
        """Each image's vector ``(m, K)``: the set's vector is their mean."""
        import numpy as np

        return np.concatenate([self.projected(ctx, i) for i in self.selected(len(ctx.layers))],
                              axis=1)

    def entry_layers(self, dims):
        """``min(dim, D_i)`` entries for each selected layer ``i``."""
        import numpy as np

        sel = self.selected(len(dims))
        return np.repeat(np.asarray(sel, dtype=np.int64), [min(self.dim, dims[i]) for i in sel])


#: Weight of the C_T curve against the projected means in ``proj-mean-ct``'s matcher.
CURVE_WEIGHT = 0.3


class GroupedZScoreMatcher:
    """``zscore`` on a vector of two parts, each part's mean squared z weighted.

    The first ``n_head`` entries form one part (weight ``head_weight``), the rest the
    other (weight 1): ``d^2 = (w * mean(z_head^2) + mean(z_tail^2)) / (w + 1)`` with
    ``z`` each entry's difference in units of its spread over the enrolled vectors;
    score ``1 / (1 + d)``. A part of 17 curve values is not drowned by 576 means.
    """

    def __init__(self, name, n_head, head_weight):
        self.name, self.n_head, self.head_weight = name, int(n_head), float(head_weight)
        self.description = "zscore with the C_T curve and the projected means weighed apart"

    def score(self, query, refs):
        """Similarity of ``query`` (L,) to each row of ``refs`` (N, L); higher is closer."""
        import numpy as np
        from fp_plugins.matchers import ZScoreMatcher

        q = np.asarray(query, dtype=np.float64).reshape(-1)
        r = np.atleast_2d(np.asarray(refs, dtype=np.float64))
        h = self.n_head
        parts = [(self.head_weight, slice(0, h)), (1.0, slice(h, q.size))]
        total, weight = 0.0, 0.0
        for w, sl in parts:
            if sl.stop - sl.start <= 0:
                continue
            d = 1.0 / ZScoreMatcher().score(q[sl], r[:, sl]) - 1.0
            total = total + w * d**2
            weight += w
        return 1.0 / (1.0 + np.sqrt(total / weight))


class CurveFirst:
    """Mixin: the C_T curve (every layer) in front of the base fingerprint's vector."""

    needs_ct = True

    def compute(self, ctx):
        """``[C_T per layer..., the base fingerprint's vector...]``."""
        import numpy as np

        return np.concatenate([np.nan_to_num(ctx.values, nan=0.0), super().compute(ctx)])

    def entry_layers(self, dims):
        """One curve entry per layer, then the base fingerprint's entries."""
        import numpy as np

        return np.concatenate([np.arange(len(dims)), super().entry_layers(dims)])

    def matcher(self, name, dims):
        """``zscore`` weighs the curve (the first ``len(dims)`` kept entries) apart."""
        if name == "zscore":
            return GroupedZScoreMatcher("zscore", len(dims), CURVE_WEIGHT)
        return None


class ProjMeanCurveFingerprint(CurveFirst, ProjMeanFingerprint):
    """The C_T curve (every layer) followed by ``proj-mean-early``."""


#: Principal axes kept per layer by the content-residual fingerprints.
RESID_DIM = 256
#: Their ridge strength, relative to the mean eigenvalue of the predictors' Gram matrix.
RESID_RIDGE = 1e-2


class ResidMeanFingerprint(ProjMeanFingerprint):
    """Early-layer set means with each image's content regressed out (``resid-early``).

    fp's default fingerprint (``docs/attribution.md``).

    When the baseline is built: T's exact PCA (``min(256, D)`` axes) of every early layer
    (``0 .. L // 2``) and of the two *content* layers right after them (``L // 2 + 1``,
    ``L // 2 + 2``), and a ridge regression, fitted on T, that predicts each early layer's
    projection from the content layers' projections. A set's vector is, per early layer,
    the mean over its images of the projection minus that prediction: the low-level
    traits (strokes, texture) that the image's content does not explain. A set mean alone
    moves as much with which digits the set happens to draw as between generators that
    share an architecture; the residual removes most of that. An encoder too shallow to
    have content layers gets plain projected means.

    Args:
        name: registered name.
        description: one line for ``fp list fingerprints``.
    """

    dim = RESID_DIM

    def __init__(self, name, description):
        super().__init__(name, True, description)

    @staticmethod
    def content(n_layers):
        """Indices of the layers the early ones are predicted from."""
        return [i for i in (n_layers // 2 + 1, n_layers // 2 + 2) if i < n_layers]

    def pca_layers(self, n_layers):
        """The early layers and the content layers."""
        return self.selected(n_layers) + self.content(n_layers)

    def prepare(self, ctx):
        """T's PCA of the early and content layers, and the ridge coefficients."""
        import numpy as np

        out = super().prepare(ctx)
        n = len(ctx.layers)
        content = self.content(n)
        if not content:
            return out

        def ridge():
            # Sums over chunks of T's rows (every layer read at the same rows): the
            # predictors' Gram matrix and their products with each early layer.
            from forensics.stats.streaming import check_chunk_rows

            step = check_chunk_rows(getattr(ctx, "chunk_rows", None))
            early = self.selected(n)
            gram, cross = None, {i: 0.0 for i in early}

            def proj(i, s):
                T = np.asarray(ctx.train[i][s : s + step], dtype=np.float64)
                return (T - out[f"mean.{i}"]) @ out[f"axes.{i}"].T

            for s in range(0, ctx.train[0].shape[0], step):
                A = np.hstack([proj(i, s) for i in content])
                gram = A.T @ A if gram is None else gram + A.T @ A
                for i in early:
                    cross[i] = cross[i] + A.T @ proj(i, s)
            lam = RESID_RIDGE * float(np.trace(gram)) / gram.shape[0]
            gram[np.diag_indices_from(gram)] += lam if lam > 0 else 1.0
            return {i: np.linalg.solve(gram, cross[i]) for i in early}

        key = ("resid-ridge", self.dim, RESID_RIDGE, tuple(content), tuple(self.selected(n)))
        for i, coef in ctx.shared(key, ridge).items():
            out[f"coef.{i}"] = coef
        return out

    def compute(self, ctx):
        """``[mean residual of early layer i for each i]`` (linear, so from set means)."""
        import numpy as np

        n = len(ctx.layers)
        content = self.content(n)
        parts = [self.projected_mean(ctx, i) for i in self.selected(n)]
        if content:
            c = np.concatenate([self.projected_mean(ctx, i) for i in content])
            parts = [p - c @ self.extra(ctx, "coef", i)
                     for i, p in zip(self.selected(n), parts, strict=True)]
        return np.concatenate(parts)

    def image_rows(self, ctx):
        """Each image's residuals ``(m, K)``: the set's vector is their mean."""
        import numpy as np

        n = len(ctx.layers)
        content = self.content(n)
        parts = [self.projected(ctx, i) for i in self.selected(n)]
        if content:
            c = np.concatenate([self.projected(ctx, i) for i in content], axis=1)
            parts = [p - c @ self.extra(ctx, "coef", i)
                     for i, p in zip(self.selected(n), parts, strict=True)]
        return np.concatenate(parts, axis=1)


class ResidMeanCurveFingerprint(CurveFirst, ResidMeanFingerprint):
    """The C_T curve (every layer) followed by ``resid-early`` (``resid-ct``)."""


class PerImage:
    """Mixin: declares ``per_image`` (the set's vector is the mean of ``image_rows``).

    Enrolment then stores the per-image variance with each curve, and attribution
    calibrates its confidence on the bank (:mod:`forensics.stats.confidence`). The ``-ct``
    variants do not declare it: a set's C_T is no mean of per-image values.
    """

    def per_image(self, ctx):
        """Each image's vector ``(m, K)``."""
        return self.image_rows(ctx)


class ProjMeanSet(PerImage, ProjMeanFingerprint):
    """``proj-mean`` / ``proj-mean-early``, with per-image vectors."""


class ResidMeanSet(PerImage, ResidMeanFingerprint):
    """``resid-early``, with per-image vectors."""


FINGERPRINTS = (
    PaperFingerprint(),
    SetStatsFingerprint(),
    ProjMeanSet("proj-mean", False,
                "mean of the set's PCA-64 projection (T's exact PCA), every layer; zscore"),
    ProjMeanSet("proj-mean-early", True,
                "proj-mean of the early half of the layers (0..L//2); zscore"),
    ProjMeanCurveFingerprint("proj-mean-ct", True,
                             "C_T curve + proj-mean-early, weighed apart by zscore"),
    ResidMeanSet("resid-early",
                 "early-layer means minus what the image content predicts "
                 "(ridge fitted on T); zscore; fp's default"),
    ResidMeanCurveFingerprint("resid-ct", "C_T curve + resid-early, weighed apart by zscore"),
)


@hookimpl(trylast=True)
def register_fingerprints(register):
    for fingerprint in FINGERPRINTS:
        register(fingerprint)
