"""The steps of an investigation, one module each, in the order they run.

::

    build_baseline(name, train, heldout, encoder=...)
      train/, heldout/ ─► scan_folder ─► embed_folder ─► T, P per layer ─► Baseline.build
                          (manifest)     (cached)                          (PCA, cells, P->T)
                                                   └─► fingerprint.prepare (e.g. T's stats)
                                                                 └─► bank: baselines row + files

    compute_curve(folder, baseline=NAME)
      folder ─► embed_folder ─► Baseline.query ─► C_T per layer ─► Curve (+ provenance)
                (same encoder,   (no refit)           └──────────► fingerprints {name: vector}
                 weights, pool)

    enroll(folder, baseline=NAME, model=M, family=F, per_curve=N)
      folder ─► embed once ─► chunks of N in manifest order ─► compute each ─► bank curve rows

    memorize(folder, baseline=NAME)
      folder ─► compute_curve (per-image details) ─► copying layers, likely copies ─► report

    attribute(folder, baseline=NAME, fingerprint=..., matcher=...)
      folder ─► compute_curve ─► fingerprint vector ─► rank vs bank ─► calibrate ─► decide
                      └─► resample embedding rows ─► query ─► fingerprint ─► bootstrap confidence
                                                                      └─► report (JSON, PNG, HTML)

Each folder is embedded once (the embedding cache makes repeats free) and the stored
baseline is only queried: PCA and KMeans are never refitted after ``build_baseline``.
One module per step: :mod:`.build_baseline`, :mod:`.curve` (``compute_curve``),
:mod:`.enroll`, :mod:`.memorization` (``memorize``), :mod:`.attribute`; the bank and its
baselines are opened by :mod:`.bank_access`; :mod:`.engine` runs the C_T engine on arrays with
its plugins named, and :mod:`.baseline_files` stores a baseline's files.
What they call lives in :mod:`forensics.data.images`, :mod:`forensics.data.embed`,
:mod:`forensics.stats.baseline`, :mod:`forensics.stats.fingerprints`,
:mod:`forensics.stats.curve`, :mod:`forensics.stats.attribution` and :mod:`refbank`.
"""
