"""Run any plugin object through its kind's contract (as scikit-learn's ``check_estimator``).

Two levels, both against the Protocols of :mod:`forensics.plugin.protocols`:

* **structure**: every required member is there, attributes have the right type, and each
  method accepts the arguments the engine passes (the Protocol's signature: data arguments
  positionally, options by keyword); optional members are checked when present;
* **a tiny call** on small seeded arrays, with the shapes, dtypes and properties the engine
  relies on (a distance's nearest row is the nearest, a matcher scores an identical vector
  highest, a partition rebuilt from its arrays assigns the same cells, a fingerprint gives
  as many entries as its layer map, every call twice gives the same result). Encoders are
  loaded and run only when asked (``load=True``: weights may be large); a memorization
  measure needs a model, so it gets the structural checks only.

Nothing here raises on a broken plugin except :func:`check_object`, which raises
:class:`~forensics.errors.PluginError` naming the plugin and every problem: an exception
inside a plugin's method becomes a problem in that list, never a traceback.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from forensics import defaults
from forensics.errors import PluginError, UnknownNameError
from forensics.plugin import manager, protocols
from forensics.plugin.protocols import CONTRACTS, Pattern, members

#: Types checked for attributes whose Protocol annotation is one of these.
_ATTRIBUTE_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str, "int": (int, np.integer), "bool": (bool, np.bool_),
    "list[str]": list, "dict[str, Any]": dict,
}


@dataclass
class CheckResult:
    """The contract check of one registered object.

    Attributes:
        kind: its plugin kind.
        name: its registered name.
        plugin: the plugin that registered it.
        problems: what breaks the contract, in words (empty: it keeps the contract).
    """

    kind: str
    name: str
    plugin: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the object keeps its contract."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"kind": self.kind, "name": self.name, "plugin": self.plugin, "ok": self.ok,
                "problems": list(self.problems)}


# -- structure ---------------------------------------------------------------------------


def _declared_type(member: property) -> str:
    return str(inspect.signature(member.fget).return_annotation)  # type: ignore[arg-type]


def _bind_problem(what: str, func: Any, spec: Callable) -> str | None:
    """Whether ``func`` accepts a call shaped like ``spec``'s signature (without self)."""
    try:
        got = inspect.signature(func)
    except (TypeError, ValueError):
        return None  # builtins without a signature: nothing to check
    args, kwargs = [], {}
    for p in list(inspect.signature(spec).parameters.values())[1:]:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            args.append(object())
        elif p.kind == p.KEYWORD_ONLY:
            kwargs[p.name] = object()
    try:
        got.bind(*args, **kwargs)
    except TypeError as exc:
        call = ", ".join(["_"] * len(args) + [f"{k}=..." for k in kwargs])
        return f"{what}{got} cannot be called as {what}({call}), as the engine does ({exc})"
    return None


def _member_problems(obj: Any, name: str, member: Any, required: bool) -> list[str]:
    if not hasattr(obj, name):
        return [f"it has no {name!r}"] if required else []
    value = getattr(obj, name)
    if isinstance(member, property):
        want = _ATTRIBUTE_TYPES.get(_declared_type(member))
        if want is not None and not isinstance(value, want):
            return [f"{name!r} must be {_declared_type(member)}, got {type(value).__name__}"]
        return []
    if not callable(value):
        return [f"{name!r} must be a method, got {type(value).__name__}"]
    problem = _bind_problem(name, value, member)
    return [problem] if problem else []


def _protocol_problems(obj: Any, protocol: type, options: type | None) -> list[str]:
    problems = []
    for name, member in members(protocol):
        problems += _member_problems(obj, name, member, required=True)
    if options is None:
        return problems
    own = members(options, own=True)
    if protocol in options.__mro__:
        # A capability (e.g. a distance that prepares references): its new members come
        # together, and once one is there every member of the capability is checked.
        new = [n for n, _ in own if n not in dict(members(protocol))]
        if any(hasattr(obj, n) for n in new):
            for name, member in own:
                problems += _member_problems(obj, name, member, required=True)
        return problems
    for name, member in own:
        problems += _member_problems(obj, name, member, required=False)
    return problems


def structure_problems(kind: str, obj: Any) -> list[str]:
    """What in ``obj``'s members breaks the contract of ``kind`` (no method is called)."""
    contract = _contract(kind)
    if protocols.is_pattern(obj):
        return _protocol_problems(obj, Pattern, None)
    problems = _protocol_problems(obj, contract.protocol, contract.options)
    name = getattr(obj, "name", None)
    if isinstance(name, str) and not name.strip():
        problems.append("'name' is empty")
    return problems


# -- tiny calls --------------------------------------------------------------------------


def _attempt(problems: list[str], what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``None`` with a problem recorded if it raised."""
    try:
        return fn()
    except Exception as exc:  # a plugin's failure is a finding, not a crash of the check
        problems.append(f"{what} raised {type(exc).__name__}: {exc}")
        return None


def _array(problems: list[str], what: str, value: Any, shape: tuple[int, ...],
           kind: str = "f") -> np.ndarray | None:
    """``value`` as an array of ``shape`` and dtype kind (``f`` float, ``i`` integer)."""
    arr = np.asarray(value)
    kinds = {"f": "f", "i": "iu"}[kind]
    if arr.shape != shape or arr.dtype.kind not in kinds:
        want = {"f": "float", "i": "integer"}[kind]
        problems.append(f"{what} must give a {want} array of shape {shape}, "
                        f"got {arr.dtype} {arr.shape}")
        return None
    if kind == "f" and not np.all(np.isfinite(arr)):
        problems.append(f"{what} gave non-finite values")
        return None
    return arr


def _same(a: Any, b: Any) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


def _call_distance(d: Any) -> list[str]:
    problems: list[str] = []
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
    what = "nn(query (5, 3), ref (7, 3), device='cpu')"
    dist = _attempt(problems, what, lambda: d.nn(q, r, device="cpu"))
    dist = None if dist is None else _array(problems, what, dist, (5,))
    pair = _attempt(problems, "nn(..., return_index=True)",
                    lambda: d.nn(q, r, device="cpu", return_index=True))
    if dist is None or pair is None:
        return problems
    if not (isinstance(pair, tuple) and len(pair) == 2):
        return problems + ["nn(..., return_index=True) must return (distances, indices)"]
    idx = _array(problems, "nn(..., return_index=True)'s indices", pair[1], (5,), "i")
    if idx is None:
        return problems
    if not np.allclose(pair[0], dist, rtol=1e-9, atol=0):
        problems.append("nn gives other distances with return_index=True")
    if idx.min() < 0 or idx.max() >= 7:
        return problems + [f"nn's indices must lie in [0, 7), got {idx.tolist()}"]
    single = np.array([[float(np.asarray(d.nn(q[j : j + 1], r[k : k + 1], device="cpu"))[0])
                        for k in range(7)] for j in range(5)])
    if not np.allclose(dist, single.min(axis=1), rtol=1e-6, atol=1e-9):
        problems.append("nn's distance is not the smallest over the rows of ref")
    if not np.allclose(single[np.arange(5), idx], dist, rtol=1e-6, atol=1e-9):
        problems.append("nn's index does not point at a row at that distance")
    if not _same(d.nn(q, r, device="cpu"), dist):
        problems.append("nn gives different results on the same input")
    if protocols.prepares_reference(d):
        ready = _attempt(problems, "prepare_reference(ref (7, 3))",
                         lambda: d.prepare_reference(r))
        got = None if ready is None else _attempt(
            problems, "nn(query, prepared ref, prepared=True)",
            lambda: d.nn(q, ready, device="cpu", return_index=True, prepared=True))
        if got is not None and not (np.allclose(got[0], dist, rtol=1e-12, atol=0)
                                    and _same(got[1], idx)):
            problems.append("nn on a prepared reference differs from nn on the reference")
    return problems


def _call_partitioner(p: Any) -> list[str]:
    problems: list[str] = []
    rng = np.random.default_rng(0)
    T = rng.normal(size=(40, 6))
    kwargs: dict[str, Any] = {}
    if _accepts(p.fit, "labels"):  # it takes the caller's cells
        kwargs = {"labels": np.arange(40, dtype=np.int64) % 3, "n_cells": 3}
    what = "fit(T (40, 6), seed=0)"
    fitted = _attempt(problems, what, lambda: p.fit(T, seed=0, **kwargs))
    if fitted is None:
        return problems
    problems += [f"the fitted partition: {x}" for x in
                 _protocol_problems(fitted, protocols.FittedPartition, None)]
    if problems:
        return problems
    k = fitted.n_cells
    if k < 1:
        problems.append(f"the fitted partition has n_cells={k}; it needs at least one cell")
    _attempt(problems, "json.dumps(fitted.params)", lambda: json.dumps(fitted.params))
    Z = _attempt(problems, "transform(T)", lambda: np.asarray(fitted.transform(T)))
    if Z is None or Z.ndim != 2 or Z.shape[0] != 40 or Z.dtype.kind != "f":
        return problems + [f"transform(T (40, 6)) must give a (40, d) float array, got "
                           f"{None if Z is None else (Z.dtype, Z.shape)}"]
    labels = _cells(problems, fitted, Z, k, assigns=not kwargs)
    arrays = _attempt(problems, "to_arrays()", fitted.to_arrays)
    if not isinstance(arrays, dict) or not all(
            isinstance(key, str) and isinstance(v, np.ndarray) and v.dtype != object
            for key, v in arrays.items()):
        return problems + ["to_arrays() must give {str: numeric numpy array}"]
    again = _attempt(problems, "from_arrays(to_arrays(), params)",
                     lambda: p.from_arrays(arrays, json.loads(json.dumps(fitted.params))))
    if again is not None and not (
            again.n_cells == k and _same(again.transform(T), Z)
            and (labels is None or _same(again.cells(Z), labels))):
        problems.append("a partition rebuilt with from_arrays(to_arrays(), params) differs")
    twice = _attempt(problems, "a second fit", lambda: p.fit(T, seed=0, **kwargs))
    if twice is not None and not (_same(twice.transform(T), Z) and all(
            _same(v, twice.to_arrays().get(key)) for key, v in arrays.items())):
        problems.append("fit with the same seed gives a different partition")
    return problems


def _cells(problems: list[str], fitted: Any, Z: np.ndarray, k: int,
           assigns: bool) -> np.ndarray | None:
    """Cells of transformed T; a partition of given cells may refuse (``assigns`` False)."""
    from forensics.errors import FpError

    try:
        labels = np.asarray(fitted.cells(Z))
    except FpError:
        if not assigns:
            return None
        problems.append("cells(transform(T)) refused to assign T's own samples")
        return None
    except Exception as exc:
        problems.append(f"cells(transform(T)) raised {type(exc).__name__}: {exc}")
        return None
    checked = _array(problems, "cells(transform(T))", labels, (Z.shape[0],), "i")
    if checked is None:
        return None
    labels = checked
    if labels.min() < 0 or labels.max() >= k:
        problems.append(f"cells(...) must give labels in [0, {k}), got {labels.min()}.."
                        f"{labels.max()}")
    X = np.random.default_rng(1).normal(size=(Z.shape[0], 6))
    got = _attempt(problems, "assign(X)", lambda: fitted.assign(X))
    if got is not None and not _same(got, fitted.cells(fitted.transform(X))):
        problems.append("assign(X) differs from cells(transform(X))")
    return labels


def _accepts(func: Callable, keyword: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params


def _call_matcher(m: Any, query: np.ndarray | None = None,
                  refs: np.ndarray | None = None) -> list[str]:
    problems: list[str] = []
    if query is None:
        rng = np.random.default_rng(0)
        query, refs = rng.normal(size=6), rng.normal(size=(4, 6))
    refs = np.array(refs, dtype=np.float64)
    refs[min(2, len(refs) - 1)] = query
    n, length = refs.shape
    what = f"score(query ({length},), refs ({n}, {length}))"
    s = _attempt(problems, what, lambda: m.score(query, refs))
    s = None if s is None else _array(problems, what, s, (n,))
    if s is None:
        return problems
    if s[min(2, n - 1)] < s.max() - 1e-9 * max(1.0, abs(float(s.max()))):
        problems.append("a row equal to the query must score at least as high as any other "
                        "(higher = closer)")
    if not _same(m.score(query, refs), s):
        problems.append("score gives different results on the same input")
    return problems


@lru_cache(maxsize=1)
def _tiny_baseline() -> tuple[Any, list[str], list[np.ndarray], list[np.ndarray],
                              list[list[np.ndarray]]]:
    """A seeded four-layer baseline of the default distance and partitioner, and sets."""
    from forensics.stats.baseline import Baseline

    rng = np.random.default_rng(0)
    names = [f"layer{i}" for i in range(4)]
    T = [rng.normal(size=(60, 8)) for _ in names]
    P = [rng.normal(size=(40, 8)) for _ in names]
    sets = [[rng.normal(loc=0.2 * s, size=(30, 8)) for _ in names] for s in range(4)]
    engine = Baseline.build(T, P, names, seed=0,
                            distance=manager.get("distances", defaults.DISTANCE),
                            partitioner=manager.get("partitioners", defaults.PARTITIONER))
    return engine, names, T, P, sets


def _call_fingerprint(fp: Any) -> list[str]:
    from forensics.stats import fingerprints as fpmod

    problems: list[str] = []
    engine, names, T, P, sets = _tiny_baseline()
    extras: dict[str, np.ndarray] = {}
    if fpmod.needs_extras(fp):
        ctx = fpmod.PrepareContext(list(names), T, P, engine)
        extras = _attempt(problems, "prepare(ctx)", lambda: dict(fp.prepare(ctx)))
        if extras is None:
            return problems
        if not all(np.asarray(v).dtype != object for v in extras.values()):
            return problems + ["prepare(ctx) must give {str: numeric numpy array}"]
    details = bool(getattr(fp, "needs_details", False))

    def vector(Q: list[np.ndarray]) -> np.ndarray:
        results = engine.query(Q, tau=0.0, details=details)
        return fpmod.compute(fp, fpmod.FingerprintContext(list(names), results, Q, engine,
                                                          extras))

    vecs = [_attempt(problems, f"compute(ctx) of set {i}", lambda Q=Q: vector(Q))  # type: ignore[misc]
            for i, Q in enumerate(sets)]
    if any(v is None for v in vecs):
        return problems
    dims = [lb.dim for lb in engine.layers]
    layers = _attempt(problems, "entry_layers(dims)", lambda: fpmod.entry_layers(fp, dims))
    if layers is not None and (layers.shape != vecs[0].shape or layers.min() < -1
                               or layers.max() >= len(dims)):
        problems.append(f"entry_layers({dims}) must give one layer index in [-1, {len(dims)}) "
                        f"per vector entry ({vecs[0].size}), got shape {layers.shape}")
    if len({v.size for v in vecs}) != 1:
        problems.append("compute(ctx) gives vectors of different lengths for sets of the "
                        "same layers")
        return problems
    if not _same(vector(sets[0]), vecs[0]):
        problems.append("compute(ctx) gives different results on the same input")
    resolved = _attempt(problems, "its matcher", lambda: manager.resolve_matcher(fp, None, dims))
    if resolved is not None:
        clean = [np.nan_to_num(v, nan=0.0) for v in vecs]
        problems += [f"its matcher {resolved[0]!r}: {x}" for x in
                     _call_matcher(resolved[1], clean[0], np.stack(clean[1:]))]
    return problems


def _call_encoder(enc: Any, load: bool) -> list[str]:
    problems: list[str] = []
    names = _attempt(problems, "layer_names('cls')", lambda: enc.layer_names("cls"))
    if names is not None and not (isinstance(names, list) and names
                                  and all(isinstance(n, str) for n in names)):
        return problems + [f"layer_names('cls') must give a non-empty list of str or None, "
                           f"got {names!r}"]
    dims = None
    if callable(getattr(enc, "layer_dims", None)):
        dims = _attempt(problems, "layer_dims('cls')", lambda: enc.layer_dims("cls"))
        if dims is not None and names is not None and len(dims) != len(names):
            problems.append(f"layer_dims gives {len(dims)} sizes for {len(names)} layers")
    if not load or problems:
        return problems
    weights = getattr(enc, "default_weights", None) or "random:0"
    loaded = _attempt(problems, f"load({weights!r}, 'cpu', 'cls')",
                      lambda: enc.load(weights, "cpu", "cls"))
    if loaded is None:
        return problems
    problems += [f"the loaded encoder: {x}" for x in
                 _protocol_problems(loaded, protocols.LoadedEncoder,
                                    protocols.LoadedEncoderOptions)]
    if problems:
        return problems
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
              for _ in range(2)]

    def run() -> list[Any]:
        import torch

        with torch.no_grad():
            return list(loaded.forward(torch.stack([loaded.transform(im) for im in images])))

    out = _attempt(problems, "forward(transform(2 images))", run)
    if out is None:
        return problems
    if len(out) != len(loaded.layer_names):
        return problems + [f"forward gives {len(out)} arrays for {len(loaded.layer_names)} "
                           f"layers"]
    for i, (layer, arr) in enumerate(zip(loaded.layer_names, out, strict=True)):
        arr = np.asarray(arr)
        if arr.ndim != 2 or arr.shape[0] != 2 or arr.dtype != np.float32:
            problems.append(f"forward: layer {layer!r} must be float32 (2, D), got "
                            f"{arr.dtype} {arr.shape}")
        elif dims is not None and arr.shape[1] != dims[i]:
            problems.append(f"forward: layer {layer!r} has {arr.shape[1]} features, "
                            f"layer_dims says {dims[i]}")
    return problems


# -- entry points ------------------------------------------------------------------------


def _contract(kind: str) -> protocols.Contract:
    if kind not in CONTRACTS:
        raise UnknownNameError(f"unknown plugin kind {kind!r}; choose one of: "
                               f"{', '.join(CONTRACTS)}")
    return CONTRACTS[kind]


def contract_problems(kind: str, obj: Any, *, call: bool = True, load: bool = False
                      ) -> list[str]:
    """Everything in ``obj`` that breaks the contract of ``kind``; empty when it keeps it.

    Args:
        kind: the plugin kind (``encoders``, ``distances``, ...).
        obj: the object, as registered.
        call: also run its methods on tiny seeded inputs (after the structure passes).
        load: for encoders, also load (default weights, else ``random:0``) and run one batch.

    Raises:
        UnknownNameError: ``kind`` is not a plugin kind.
    """
    problems = structure_problems(kind, obj)
    if problems or not call or protocols.is_pattern(obj):
        return problems
    runners: dict[str, Callable[[Any], list[str]]] = {
        "distances": _call_distance,
        "partitioners": _call_partitioner,
        "matchers": _call_matcher,
        "fingerprints": _call_fingerprint,
        "encoders": lambda e: _call_encoder(e, load),
    }
    runner = runners.get(kind)
    return [] if runner is None else runner(obj)


def check_object(kind: str, obj: Any, *, plugin: str = "", call: bool = True,
                 load: bool = False) -> None:
    """Raise if ``obj`` breaks the contract of ``kind`` (see :func:`contract_problems`).

    Raises:
        PluginError: naming the plugin, the object and every problem.
    """
    problems = contract_problems(kind, obj, call=call, load=load)
    if problems:
        raise PluginError(_message(_contract(kind).noun, getattr(obj, "name", repr(obj)),
                                   plugin, problems))


def check_registered(kinds: Iterable[str] | None = None, *, names: Sequence[str] = (),
                     call: bool = True, load: bool = False) -> list[CheckResult]:
    """Check every registered object of ``kinds`` (default: all), or only those ``names``.

    Returns:
        One :class:`CheckResult` per object, by kind then name.
    """
    from forensics.plugin.manager import registry

    results = []
    for kind in (list(CONTRACTS) if kinds is None else list(kinds)):
        for entry in sorted(registry(_contract(kind).kind).values(), key=lambda e: e.name):
            if names and entry.name not in names:
                continue
            results.append(CheckResult(kind, entry.name, entry.plugin,
                                       contract_problems(kind, entry.obj, call=call,
                                                         load=load)))
    return results


def failure_message(results: Sequence[CheckResult]) -> str:
    """One message naming each plugin whose objects break the contract, and why."""
    return " | ".join(_message(_contract(r.kind).noun, r.name, r.plugin, r.problems)
                      for r in results if not r.ok)


def _message(noun: str, name: str, plugin: str, problems: Sequence[str]) -> str:
    who = f"plugin {plugin!r}: " if plugin else ""
    return (f"{who}{noun} {name!r} breaks the plugin contract: {'; '.join(problems)}. "
            f"See README 'Writing a plugin'" + (", or leave the plugin out with "
                                                "FP_LOAD_PLUGINS" if plugin else ""))
