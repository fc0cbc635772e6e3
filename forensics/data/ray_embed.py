"""Embedding on a Ray cluster: Ray Data decodes on CPU workers, encoder actors embed.

::

    (row, path, sha256) ─► read + hash check + transform ─► encoder actors ─► driver ─► cache
       Ray Data blocks       (CPU tasks, retried)          (1 GPU each, or     (rows kept once,
                                                            CPU; restarted)     written in chunks)

:func:`forensics.data.embed.embed_folder` uses this with ``ray=ADDRESS`` for the images
missing from the embedding cache; the manifest, the hashes, the cache and the provenance
are those of a local run. Only the driver writes to the cache, keyed by image hash, and a
row that arrives twice (a retried task) is kept once, so a killed worker is retried
without losing or doubling anything. The images (and a ``--weights`` file) must be
readable at the same path on every node, e.g. on a shared file system.

Ray is optional (``pip install 'fp-forensics[scale]'``) and imported inside functions only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from forensics.errors import FpError, InputError

INSTALL_HINT = "pip install 'fp-forensics[scale]'"
#: Retries of the task that describes a GPU-loaded encoder, should its worker die.
TASK_RETRIES = 4
#: Rows per block of the file list handed to Ray Data.
LIST_BLOCK_ROWS = 1024
#: Environment variables the workers of a running cluster are given (a local cluster's
#: workers inherit the whole environment), so that they load plugins, weights and images
#: as the driver does.
FORWARDED_ENV = ("FP_LOAD_PLUGINS", "FP_MAX_IMAGE_BYTES", "HF_HUB_OFFLINE", "HF_HOME",
                 "TORCH_HOME")


def require_ray():
    """The ``ray`` module.

    Raises:
        InputError: Ray is not installed (the message says how to install it).
    """
    try:
        import ray
        import ray.data  # noqa: F401 - the ray[data] extra, not just ray core
    except ImportError:
        raise InputError(f"--ray needs Ray Data, which is not installed; install it with: "
                         f"{INSTALL_HINT}") from None
    return ray


def connect(address: str, num_cpus: int | None = None):
    """Join the Ray cluster at ``address`` (once per process); returns the ``ray`` module.

    Args:
        address: ``auto`` (the cluster in ``$RAY_ADDRESS`` or started with ``ray start``
            on this machine, else a new local one), ``local`` (always a new local one), or
            an address (``HOST:PORT`` or ``ray://HOST:PORT``).
        num_cpus: CPUs of a new local cluster (default: those this process may use).

    Raises:
        InputError: Ray is missing, or the address cannot be reached.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if not address or not address.strip():
        raise InputError("--ray needs a value: auto, local, or a cluster address HOST:PORT")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # Ray's own notices (token authentication, deprecations) are not the user's concern;
    # failures reach the user as exceptions.
    joined = dict(runtime_env={"env_vars": env} if env else None, logging_level="error")
    if address == "auto":
        try:
            ray.init(address="auto", **joined)
            return ray
        except ConnectionError:
            address = "local"
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus or _usable_cpus(),
                 include_dashboard=False, logging_level="error")
        return ray
    try:
        ray.init(address=address, **joined)
    except (ConnectionError, ValueError) as exc:
        raise InputError(f"--ray {address}: cannot reach a Ray cluster there ({exc}); give "
                         f"HOST:PORT of its head node, ray://HOST:PORT, auto or local") from None
    return ray


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class RayEmbedder:
    """Runs one encoder configuration over manifest entries on a Ray cluster.

    Args:
        address: as for :func:`connect`.
        device: ``auto`` (GPU actors if the cluster has GPUs, else CPU actors), ``cpu``,
            or ``cuda`` (the cluster must have GPUs; ``cuda:N`` is taken as ``cuda``).

    Raises:
        InputError: as for :func:`connect`; ``cuda`` on a cluster without GPUs.
    """

    def __init__(self, address: str, device: str = "auto"):
        ray = connect(address)
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.cpus = max(1, int(resources.get("CPU", 1)))
        if device.startswith("cuda") and not self.gpus:
            raise InputError(f"--device {device}: the Ray cluster has no GPUs; use --device "
                             f"auto or cpu")
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise InputError(f"--device {device!r}: choose auto, cpu or cuda with --ray")
        self.device = "cuda" if self.gpus and device != "cpu" else "cpu"

    def plan(self) -> dict[str, Any]:
        """Encoder actors and their resources, and the CPUs of each decoding task.

        GPU actors: one per GPU, fed by decoding tasks of one CPU each. CPU actors: one per
        4 CPUs (at least one), each with its share of the CPUs and torch running on them
        (``threads``; ``$OMP_NUM_THREADS`` if set), decoding their own batches (no
        decoded pixels cross processes; ``decode_cpus`` is None).
        """
        if self.device == "cuda":
            return {"actors": self.gpus, "num_gpus": 1, "num_cpus": 1, "decode_cpus": 1,
                    "threads": None}
        actors = max(1, self.cpus // 4)
        share = self.cpus // actors
        return {"actors": actors, "num_gpus": 0, "num_cpus": share, "decode_cpus": None,
                "threads": int(os.environ.get("OMP_NUM_THREADS") or share)}

    def describe(self, load: Callable[[str], Any]) -> SimpleNamespace:
        """What the cache key and the provenance need of the encoder the GPU actors run.

        One GPU task loads it (its precision depends on the device); ``load(device)``
        returns a loaded encoder. CPU actors run what this process loads on its CPU.
        """
        import ray

        describe = ray.remote(num_gpus=1, max_retries=TASK_RETRIES)(_describe)
        return _with_errors(lambda: ray.get(describe.remote(load, self.device)))

    def batches(self, load: Callable[[str], Any], items: Sequence[tuple[int, str, str]],
                read: Callable, transform: Callable, batch_size: int
                ) -> Iterator[tuple[list[int], list[np.ndarray] | None, list[str]]]:
        """``(rows, per-layer features, errors)`` per batch, as the results arrive.

        Args:
            load: ``load(device) -> loaded encoder``, called once in each actor.
            items: ``(row, relative path, sha256)`` of each image to embed.
            read: ``read(row, relpath, sha256) -> (row, tensor or None, error)``.
            transform: the encoder's transform (its output shape sizes the batches).
            batch_size: images per forward pass.

        Raises:
            FpError: the cluster failed, or rows did not come back.
        """
        from ray.data import ActorPoolStrategy

        _quiet_ray_data()
        shape = _transform_shape(transform)
        plan = self.plan()
        # Ray Data's defaults are the fault tolerance: a task whose worker dies is retried,
        # and a killed actor is restarted and its batch retried.
        ds = _file_list(items)
        if plan["decode_cpus"]:
            ds = ds.map_batches(_decode, fn_kwargs={"read": read, "shape": shape},
                                batch_size=batch_size, batch_format="numpy",
                                num_cpus=plan["decode_cpus"])
        ds = ds.map_batches(
            _EncoderActor, fn_constructor_kwargs={
                "load": load, "device": self.device, "threads": plan["threads"],
                "shape": shape, "read": None if plan["decode_cpus"] else read},
            compute=ActorPoolStrategy(size=plan["actors"]), batch_size=batch_size,
            batch_format="numpy", num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"] or None,
        )
        wanted = np.zeros(max((r for r, _, _ in items), default=-1) + 1, bool)
        wanted[[r for r, _, _ in items]] = True
        seen = np.zeros_like(wanted)
        results = ds.iter_batches(batch_size=None, batch_format="numpy")
        for batch in _iterate(results):
            rows = batch["row"].astype(np.int64)
            fresh = wanted[rows] & ~seen[rows]  # a retried batch's rows are kept once
            seen[rows[fresh]] = True
            errors = batch["error"].astype(str)
            ok = fresh & (errors == "")
            feats = [np.asarray(batch[k][ok], np.float32) for k in sorted(batch) if
                     k.startswith("layer_")]
            yield rows[ok].tolist(), (feats if ok.any() else None), list(errors[fresh & ~ok])
        lost = int((wanted & ~seen).sum())
        if lost:
            raise FpError(f"{lost} image(s) did not come back from the Ray cluster; run again")


def _quiet_ray_data() -> None:
    """fp's bar shows the progress: no Ray Data bars, execution plans or INFO lines."""
    import logging

    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # A failure reaches the user as one fp error (its traceback with --debug).
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)


def _file_list(items: Sequence[tuple[int, str, str]]):
    """The images to embed as a Ray dataset of ``row``, ``path``, ``sha256``, in blocks."""
    import pyarrow as pa
    import ray.data

    tables = []
    for start in range(0, len(items), LIST_BLOCK_ROWS):
        part = items[start:start + LIST_BLOCK_ROWS]
        tables.append(pa.table({"row": pa.array([p[0] for p in part], pa.int64()),
                                "path": pa.array([p[1] for p in part], pa.string()),
                                "sha256": pa.array([p[2] for p in part], pa.string())}))
    return ray.data.from_arrow(tables)


def _transform_shape(transform: Callable) -> tuple[int, ...]:
    from PIL import Image

    return tuple(int(s) for s in transform(Image.new("RGB", (64, 64))).shape)


def _decode(batch: dict[str, np.ndarray], read: Callable, shape: tuple[int, ...]
            ) -> dict[str, np.ndarray]:
    """Ray Data task: read, check and transform a batch of images (zeros where unreadable)."""
    n = len(batch["row"])
    pixels = np.zeros((n, *shape), np.float32)
    errors = [""] * n
    for i, (row, path, sha) in enumerate(zip(batch["row"], batch["path"], batch["sha256"],
                                             strict=True)):
        _, tensor, errors[i] = read(int(row), str(path), str(sha))
        if tensor is not None:
            pixels[i] = tensor.numpy()
    return {"row": batch["row"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class _EncoderActor:
    """Ray Data actor: one loaded encoder; a decoded batch -> per-layer features.

    Given ``read``, it decodes its batches itself (see :func:`_decode`).
    """

    def __init__(self, load: Callable[[str], Any], device: str, threads: int | None,
                 shape: tuple[int, ...], read: Callable | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.read, self.shape = read, shape
        self.loaded = load(device)
        probe = self.loaded.forward(torch.zeros((1, *shape)))
        self.dims = [int(f.shape[1]) for f in probe]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.read is not None:
            batch = _decode(batch, self.read, self.shape)
        n = len(batch["row"])
        ok = np.array([e == "" for e in batch["error"]], bool)
        out = {"row": batch["row"], "error": batch["error"]}
        layers = [np.zeros((n, d), np.float32) for d in self.dims]
        if ok.any():
            feats = self.loaded.forward(torch.from_numpy(np.ascontiguousarray(
                batch["pixels"][ok])))
            for layer, f in zip(layers, feats, strict=True):
                layer[ok] = f
        out.update({f"layer_{i:03d}": a for i, a in enumerate(layers)})
        return out


def _describe(load: Callable[[str], Any], device: str) -> SimpleNamespace:
    """Ray task: what the provenance needs of an encoder loaded on ``device``."""
    loaded = load(device)
    keep = ("layer_names", "preprocess", "weights_sha256", "precision", "weights_loading",
            "transform")
    return SimpleNamespace(**{k: getattr(loaded, k) for k in keep if hasattr(loaded, k)})


def _with_errors(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except FpError:
        raise
    except Exception as exc:
        raise _cluster_error(exc) from exc


def _iterate(results) -> Iterator[dict[str, np.ndarray]]:
    """``results``, with failures on the cluster as :class:`FpError` (their own if one)."""
    it = iter(results)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except FpError:
            raise
        except Exception as exc:
            raise _cluster_error(exc) from exc
        yield batch


def _cluster_error(exc: BaseException) -> FpError:
    """The fp error a worker raised (its traceback text crosses to here, not the object),
    or an :class:`FpError` naming the failure."""
    from forensics import errors

    text = _ANSI.sub("", "\n".join(str(e) for e in _chain(exc)))
    for name, message in _WORKER_FP_ERROR.findall(text):
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, FpError):
            return cls(message.strip())
    root = _ROOT_ERROR.search(text)
    what = root[0] if root else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return FpError(f"embedding on the Ray cluster failed: {what}; run with --debug for "
                   f"the workers' traceback")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: ``forensics.errors.InputError: message`` in a worker's traceback, up to a blank line.
_WORKER_FP_ERROR = re.compile(r"^forensics\.errors\.(\w+): (.*?)(?:\n\s*\n|\Z)", re.M | re.S)
#: The first ``SomeError: message`` line of a traceback.
_ROOT_ERROR = re.compile(r"^[\w.]+(?:Error|Exception): .*$", re.M)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the worker exceptions Ray attaches (``cause``)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo.extend(e for e in (getattr(cur, "cause", None), cur.__cause__, cur.__context__)
                    if isinstance(e, BaseException))
