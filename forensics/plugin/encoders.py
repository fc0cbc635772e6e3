"""Helpers that encoder plugins share.

The encoder contract (what ``register_encoders`` objects and their loaded models provide)
is :class:`forensics.plugin.protocols.Encoder` and
:class:`~forensics.plugin.protocols.LoadedEncoder`.

This module imports torch and numpy only inside functions, so plugins and CLI modules may
import it at top level.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from forensics import defaults
from forensics.errors import InputError, OfflineError

if TYPE_CHECKING:
    import numpy as np

POOLS = ("cls", "mean")


@dataclass(frozen=True)
class WeightsSpec:
    """A parsed ``--weights`` value: ``hub``, ``random:SEED`` or a file path."""

    kind: str  # "hub" | "random" | "file"
    seed: int | None = None
    path: Path | None = None

    def __str__(self) -> str:
        if self.kind == "random":
            return f"random:{self.seed}"
        if self.kind == "file":
            return str(self.path)
        return "hub"


def parse_weights(spec: str | None, default: str = "hub") -> WeightsSpec:
    """Parse a weights spec; ``None`` means ``default``.

    Raises:
        InputError: a malformed ``random:`` seed or a path that does not exist.
    """
    text = (spec if spec is not None else default).strip()
    if text == "hub":
        return WeightsSpec("hub")
    if text.startswith("random:"):
        seed = text.removeprefix("random:")
        if not seed.isdigit():
            raise InputError(f"--weights {text!r}: the seed must be a non-negative integer")
        return WeightsSpec("random", seed=int(seed))
    path = Path(text).expanduser()
    if not path.is_file():
        raise InputError(
            f"--weights {text!r} is neither 'hub', 'random:SEED' nor an existing file"
        )
    return WeightsSpec("file", path=path.resolve())


def check_pool(pool: str) -> str:
    """Return ``pool`` if valid, else raise :class:`InputError` listing the choices."""
    if pool not in POOLS:
        raise InputError(f"unknown pooling {pool!r}; choose one of: {', '.join(POOLS)}")
    return pool


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state_dict: dict[str, Any]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and values (sorted by name)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy())
    return digest.hexdigest()


#: Containers a checkpoint's weights are found in, tried in order: plain trainers
#: (``state_dict``, ``model``), then DINO's teacher (the network DINO evaluates).
CHECKPOINT_KEYS = ("state_dict", "model", "teacher")
#: Wrapper prefixes stripped when every key carries them: DDP, ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict_file(path: str | os.PathLike, notes: list[str] | None = None
                         ) -> dict[str, Any]:
    """Load tensors from a ``.safetensors`` file, or a torch file with ``weights_only=True``.

    The state dict is unwrapped as :func:`unwrap_state_dict` describes. Nothing is ever
    unpickled beyond plain tensors and containers.

    Args:
        path: the file.
        notes: if given, a sentence per unwrapping step is appended (for provenance).

    Raises:
        InputError: the file cannot be read as weights.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            import torch

            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"cannot read weights from {path} ({type(exc).__name__}: {exc}). Use a "
            f".safetensors file, or a torch file holding only tensors (loaded with "
            f"weights_only=True; pickled objects are refused)"
        ) from exc
    state, steps = unwrap_state_dict(obj)
    if not state:
        raise InputError(f"{path} does not hold a state dict (name -> tensor)")
    if notes is not None:
        notes.extend(steps)
    return state


def unwrap_state_dict(obj: Any) -> tuple[dict[str, Any], list[str]]:
    """The model's weights inside a checkpoint, and a sentence for each step taken.

    Takes the first of :data:`CHECKPOINT_KEYS` that holds a dict (repeatedly), strips
    :data:`WRAPPER_PREFIXES` that every key carries (DDP's ``module.``), and keeps the
    ``backbone.`` part of a DINO network (dropping its projection head).

    Returns:
        ``(state_dict, steps)``; an empty dict when ``obj`` holds no tensors by name.
    """
    steps: list[str] = []
    while isinstance(obj, dict):
        key = next((k for k in CHECKPOINT_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        others = sorted(str(k) for k in obj if k != key)
        steps.append(f"took the weights under {key!r}"
                     + (f" (ignored: {', '.join(others)})" if others else ""))
        obj = obj[key]
    if not isinstance(obj, dict) or not any(hasattr(v, "shape") for v in obj.values()):
        return {}, steps
    state = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(str(k).startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                steps.append(f"stripped the prefix {prefix!r} from every key")
                stripped = True
    backbone = {k: v for k, v in state.items() if str(k).startswith("backbone.")}
    if backbone and 2 * len(backbone) >= len(state):
        dropped = sorted({str(k).split(".")[0] for k in state if k not in backbone})
        steps.append("kept the 'backbone.' weights without the prefix"
                     + (f" (dropped: {', '.join(d + '.*' for d in dropped)})" if dropped else ""))
        state = {k[len("backbone."):]: v for k, v in backbone.items()}
    return state, steps


def load_weights_into(model, state_dict: dict[str, Any], source: str, ignore: Sequence[str] = ()):
    """Load ``state_dict`` into ``model``; every parameter must be present.

    Keys starting with a prefix in ``ignore`` (e.g. a classifier head not used for
    embeddings) may be missing or extra.

    Raises:
        InputError: keys are missing or unexpected, or shapes differ; the message says
            which.
    """
    own = model.state_dict()

    def counted(keys):
        return [k for k in keys if not any(k.startswith(p) for p in ignore)]

    missing = counted(k for k in own if k not in state_dict)
    unexpected = counted(k for k in state_dict if k not in own)
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape)
             != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("of another shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise InputError(
            f"the weights in {source} do not fit this model: {'; '.join(parts)}. "
            f"Use a checkpoint saved from the same architecture (model.state_dict())."
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block; restore the outer state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(spec: Any, *, hub: Callable[[], Any], create: Callable[[], Any],
                from_file: Callable[[Any], Any]) -> Any:
    """The one rule torch encoders build their model by, from a parsed ``--weights`` spec.

    ``hub``: ``hub()`` (pretrained weights; it raises when there are none); ``random:SEED``:
    ``create()`` with torch's generator seeded; a local file: ``from_file(path)`` (a fresh
    model with the file's weights loaded into it).
    """
    if spec.kind == "hub":
        return hub()
    if spec.kind == "random":
        with seeded(spec.seed):
            return create()
    return from_file(spec.path)


def check_device(device: str = defaults.DEVICE) -> str:
    """``device`` spelled the one way (``auto``, ``cpu`` or ``cuda:N``), checked without
    importing torch: whether CUDA is there is asked only where something runs on it.

    Raises:
        InputError: not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    text = (device or "auto").strip().lower()
    if text in ("auto", "cpu"):
        return text
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2] or "0"
        if not index.isdigit():
            raise InputError(f"--device {device!r}: expected cuda or cuda:N")
        return f"cuda:{int(index)}"
    raise InputError(f"unknown --device {device!r}; choose auto, cpu, cuda or cuda:N")


def resolve_device(device: str = defaults.DEVICE) -> str:
    """``auto`` -> ``cuda:0`` when available else ``cpu``; validate ``cpu`` / ``cuda[:N]``.

    Raises:
        InputError: an unknown device, or CUDA asked for but not available.
    """
    text = check_device(device)
    if text == "cpu":
        return "cpu"
    import torch

    if text == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    index = text.partition(":")[2]  # cuda:N
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index) >= count:
        raise InputError(
            f"--device {device!r}: {count} CUDA device(s) available; use --device cpu "
            f"or --device auto"
        )
    return text


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub endpoint accepts a TCP connection."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout).close()
    except OSError:
        return False
    return True


def offline_help(encoder: str, hub_id: str) -> str:
    """The three ways out when hub weights cannot be had."""
    return (
        f"the pretrained weights of {encoder!r} ({hub_id}) are not in the local cache and "
        f"the hub cannot be reached. Either (1) connect once so they are downloaded and "
        f"cached (or copy a Hugging Face cache, HF_HOME, from a machine that has them); "
        f"(2) pass a local file: --weights PATH (.safetensors, or a .pth/.pt state dict); "
        f"or (3) use deterministic random weights: --weights random:SEED"
    )


@contextlib.contextmanager
def hub_guard(encoder: str, hub_id: str) -> Iterator[None]:
    """Fetch hub weights inside this block: cache-only when offline, clear error on failure.

    When the hub cannot be reached, ``huggingface_hub`` is switched to offline mode for
    the block, so cached weights load at once and missing ones fail at once (instead of
    retrying for a minute).

    Raises:
        OfflineError: the weights could not be obtained; the message lists the options.
    """
    import huggingface_hub.constants as hf_constants

    previous = hf_constants.HF_HUB_OFFLINE
    offline = previous or not hub_reachable()
    hf_constants.HF_HUB_OFFLINE = offline
    try:
        yield
    except (OSError, RuntimeError, ValueError) as exc:
        if offline or _looks_like_network_error(exc):
            raise OfflineError(offline_help(encoder, hub_id)) from exc
        raise
    finally:
        hf_constants.HF_HUB_OFFLINE = previous


def _looks_like_network_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"LocalEntryNotFoundError", "ConnectionError", "ConnectError",
                         "OfflineModeIsEnabled", "Timeout", "ReadTimeout", "URLError"})


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def pool_output(x, pool: str, fmt: str = "NCHW", prefix_tokens: int = 1):
    """Pool one layer's output to ``(B, D)`` float32.

    Token sequences (``fmt`` ``NLC``, or ``LNC`` for sequence-first) give the class token
    (``cls``: token 0) or the mean of the non-prefix tokens (``mean``); feature maps are
    global-average pooled (``fmt`` ``NCHW`` or ``NHWC``); ``(B, D)`` passes through.
    """
    if isinstance(x, (tuple, list)):
        x = x[0]
    if x.ndim == 3 and fmt == "LNC":
        x = x.transpose(0, 1)
    if x.ndim == 3:
        return (x[:, 0] if pool == "cls" else x[:, prefix_tokens:].mean(1)).float()
    if x.ndim == 4:
        return x.float().mean((1, 2) if fmt == "NHWC" else (2, 3))
    if x.ndim == 2:
        return x.float()
    raise ValueError(f"cannot pool a layer output of shape {tuple(x.shape)}")


class HookTaps:
    """Forward hooks that pool the outputs of named submodules during one forward pass."""

    def __init__(self, modules: Sequence[tuple[str, Any]], pool: str, fmt: str = "NCHW",
                 prefix_tokens: int = 1):
        self.names = [name for name, _ in modules]
        self._outputs: list[Any] = []
        self._handles = [
            module.register_forward_hook(self._hook(pool, fmt, prefix_tokens))
            for _, module in modules
        ]

    def _hook(self, pool: str, fmt: str, prefix_tokens: int) -> Callable:
        def hook(_module, _inputs, output):
            self._outputs.append(pool_output(output, pool, fmt, prefix_tokens))

        return hook

    def run(self, fn: Callable[[Any], Any], x) -> list[Any]:
        """Call ``fn(x)`` and return the pooled outputs of the tapped modules, in order."""
        self._outputs = []
        fn(x)
        outputs, self._outputs = self._outputs, []
        if len(outputs) != len(self.names):
            raise RuntimeError(
                f"expected {len(self.names)} tapped layer outputs, got {len(outputs)}"
            )
        return outputs

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()


def tap_extractor(run: Callable, taps: Sequence[tuple[str, Any]], fmt: str,
                  prefix_tokens: int, has_cls: bool, pool: str, name: str) -> Callable:
    """``x -> [pooled outputs of taps]``, running ``run(x)`` with forward hooks.

    Args:
        run: the forward function that passes through every tapped module.
        taps: ``[(layer name, module)]`` in forward order.
        fmt: layout of the outputs (``NLC``/``LNC`` tokens, ``NCHW``/``NHWC`` maps).
        prefix_tokens: class/register tokens before the patch tokens.
        has_cls: whether token 0 is a class token.
        pool: ``cls`` or ``mean``.
        name: the encoder, for error messages.

    Raises:
        InputError: no layers found, or ``pool="cls"`` for tokens without a class token.
    """
    if not taps:
        raise InputError(f"cannot find the layers of {name}; it is not a supported model")
    if fmt in ("NLC", "LNC") and pool == "cls" and not has_cls:
        raise InputError(f"{name} has no class token; use --pool mean")
    hooks = HookTaps(taps, pool, fmt, prefix_tokens)
    return lambda x: hooks.run(run, x)


class TorchEncoder:
    """A loaded encoder around a torch feature extractor.

    Args:
        layer_names: names of the layers ``extract`` returns, in order.
        extract: ``extract(x) -> list[Tensor (B, D_l)]`` on a batch already on ``device``.
        transform: PIL RGB image -> ``(C, H, W)`` float tensor (picklable: it runs in
            DataLoader workers).
        preprocess: JSON-ready description of ``transform``.
        weights_sha256: hash of the weights used.
        device: torch device string.
        module: the ``torch.nn.Module`` holding the weights (kept alive, in eval mode).
        weights_loading: what was done to fit a local checkpoint (unwrapped, prefixes
            stripped, position embeddings resampled), one sentence each; recorded in the
            provenance.
    """

    def __init__(self, *, layer_names: list[str], extract: Callable, transform: Callable,
                 preprocess: dict[str, Any], weights_sha256: str, device: str, module=None,
                 weights_loading: Sequence[str] = ()):
        self.layer_names = list(layer_names)
        self.transform = transform
        self.preprocess = preprocess
        self.weights_sha256 = weights_sha256
        self.device = device
        self.precision = "bf16-autocast" if device.startswith("cuda") else "float32"
        self.module = module
        self.weights_loading = list(weights_loading)
        self._extract = extract

    def forward(self, batch) -> list[np.ndarray]:
        """Embed one batch: ``(B, C, H, W)`` tensor -> one float32 ``(B, D_l)`` per layer."""
        import torch

        x = batch.to(self.device, non_blocking=True)
        autocast: contextlib.AbstractContextManager[Any]
        if self.device.startswith("cuda"):
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        else:
            autocast = contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            feats = self._extract(x)
        return [f.float().cpu().numpy() for f in feats]


def meta_layer_dims(build: Callable[[], Any], run: Callable[[Any, Any], list[Any]],
                    input_size: Sequence[int]) -> list[int]:
    """Output dims of each layer, from a forward pass on the ``meta`` device (no weights).

    Args:
        build: returns the model; called inside ``torch.device("meta")``.
        run: ``run(model, x) -> list of pooled (B, D) outputs``.
        input_size: ``(C, H, W)``.
    """
    import torch

    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(1, *input_size)
        with torch.no_grad():
            outputs = run(model, x)
    return [int(o.shape[-1]) for o in outputs]
