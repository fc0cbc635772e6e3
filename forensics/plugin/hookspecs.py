"""Hook specifications: the plugin API of ``fp``.

Each hook receives a ``register`` callable; the plugin calls ``register(obj)`` once for
each thing it provides. ``obj`` must have a unique ``name`` attribute (a string) within
its kind. New keyword arguments may be added to hooks later; pluggy passes a hook
implementation only the arguments it names, so old plugins keep working.

What each registered object must provide is its kind's Protocol in
:mod:`forensics.plugin.protocols`.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("fp")
hookimpl = pluggy.HookimplMarker("fp")


@hookspec
def register_encoders(register):
    """Register image encoders that turn images into per-layer embeddings.

    .. versionadded:: 0.1.0
    """


@hookspec
def register_distances(register):
    """Register nearest-neighbour distances between embedding sets.

    .. versionadded:: 0.1.0
    """


@hookspec
def register_partitioners(register):
    """Register partitioners that split embedding space into cells.

    .. versionadded:: 0.1.0
    """


@hookspec
def register_matchers(register):
    """Register matchers that score a suspect curve against enrolled curves.

    .. versionadded:: 0.1.0
    """


@hookspec
def register_fingerprints(register):
    """Register fingerprints that turn a set's per-layer statistics into the matched vector.

    .. versionadded:: 0.1.0
    """


@hookspec
def register_memorization_measures(register):
    """Register measures that score how strongly a model memorized given images.

    A measure has ``score(images, model=..., **params) -> list[dict]`` (one dict per
    image, in input order, with at least ``image`` and ``score``) and may set
    ``more_memorized = "lower"`` (default) or ``"higher"``; ``fp memorize`` runs it.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.2.0 ``more_memorized``; ``fp memorize --measure NAME``.
    """
