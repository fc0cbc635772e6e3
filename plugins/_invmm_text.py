"""Text conditioning for InvMM on text-to-image pipelines (imported only when InvMM runs).

As the official Stable Diffusion scripts: the prompt is the empty prompt whose token
positions ``1 .. tokens`` (right after the start token) are replaced by learned soft
tokens. Each soft token is a Gumbel-softmax mixture (temperature ``tau``) of the text
encoder's vocabulary embeddings, with logits (``log_coeffs``, zeros at the start) learned
jointly with ``mu`` and ``log sigma^2``. ``--prompt`` instead conditions on a fixed prompt
encoded by the pipeline's own tokenizer and text encoder.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Any

import torch

from forensics.errors import InputError


def _component(folder: Path, name: str) -> tuple[str, str] | None:
    """(library, class) of a pipeline component from ``model_index.json``."""
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    try:
        entry = json.loads(index.read_text()).get(name)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {index}: {exc}") from exc
    if not isinstance(entry, list) or len(entry) != 2 or None in entry:
        return None
    return str(entry[0]), str(entry[1])


def _library_class(library: str, cls: str) -> Any:
    names = (library,) if library in ("transformers", "diffusers") else (
        f"diffusers.pipelines.{library}", library)
    for module_name in names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, cls):
            return getattr(module, cls)
    hint = " (pip install transformers)" if library == "transformers" else ""
    raise InputError(f"cannot import {library}.{cls}, the pipeline's text component{hint}")


def has_text_encoder(folder: Path) -> bool:
    """Whether a pipeline folder holds a tokenizer and a text encoder."""
    return all((folder / sub).is_dir() for sub in ("tokenizer", "text_encoder"))


class TextConditioner:
    """A pipeline's tokenizer and text encoder, frozen, with soft-token prompts."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        tok_spec = _component(folder, "tokenizer") or ("transformers", "CLIPTokenizer")
        enc_spec = _component(folder, "text_encoder") or ("transformers", "CLIPTextModel")
        try:
            self.tokenizer = _library_class(*tok_spec).from_pretrained(folder / "tokenizer")
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"cannot load the tokenizer in {folder / 'tokenizer'}: {exc}") from exc
        try:
            encoder = _library_class(*enc_spec).from_pretrained(
                folder / "text_encoder", use_safetensors=True)
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise InputError(f"cannot load the text encoder in {folder / 'text_encoder'} "
                             f"(weights must be .safetensors): {exc}") from exc
        self.encoder = encoder.to(device).eval().requires_grad_(False)
        self.device = device
        embedding = self.encoder.get_input_embeddings()
        if not isinstance(embedding, torch.nn.Embedding):
            raise InputError(f"text encoder {type(encoder).__name__} has no token embedding "
                             f"table, so prompt tokens cannot be learned")
        self.embedding = embedding
        self.voc_emb = embedding.weight.detach().clone()  # (V, D)
        self.max_length = int(self.tokenizer.model_max_length)
        self.info = {"tokenizer": type(self.tokenizer).__name__,
                     "text_encoder": type(encoder).__name__,
                     "vocabulary": int(self.voc_emb.shape[0]), "max_length": self.max_length}

    @property
    def vocab_size(self) -> int:
        return int(self.voc_emb.shape[0])

    def _ids(self, prompt: str, n: int) -> torch.Tensor:
        ids = self.tokenizer([prompt], padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device).expand(n, -1)

    @contextlib.contextmanager
    def _replace_tokens(self, tok_emb: torch.Tensor):
        """Token positions 1..n of every prompt in the batch become ``tok_emb``."""
        n = tok_emb.shape[1]

        def hook(module, args, output):
            out = output.clone()
            out[:, 1 : 1 + n] = tok_emb.to(out.dtype)
            return out

        handle = self.embedding.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def encode(self, prompt: str, n: int = 1) -> torch.Tensor:
        """``(n, L, D)`` hidden states of ``prompt`` (the UNet's ``encoder_hidden_states``)."""
        with torch.no_grad():
            return self.encoder(self._ids(prompt, 1))[0].float().expand(n, -1, -1)

    def encode_soft(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Hidden states of the empty prompt with soft tokens ``coeffs @ vocabulary``.

        Args:
            coeffs: ``(B, tokens, V)`` mixture weights (rows sum to 1).
        """
        if coeffs.shape[1] > self.max_length - 2:
            raise InputError(f"--tokens {coeffs.shape[1]} does not fit the text encoder's "
                             f"{self.max_length} positions; use at most {self.max_length - 2}")
        tok_emb = coeffs @ self.voc_emb
        with self._replace_tokens(tok_emb):
            return self.encoder(self._ids("", coeffs.shape[0]))[0].float()


def gumbel_softmax(logits: torch.Tensor, tau: float, gen: torch.Generator) -> torch.Tensor:
    """Soft Gumbel-softmax samples (as ``F.gumbel_softmax(hard=False)``), seeded by ``gen``."""
    u = torch.empty(logits.shape, device=logits.device).exponential_(generator=gen)
    return torch.softmax((logits - u.log()) / tau, dim=-1)


def load_text(folder: Path, device: torch.device) -> TextConditioner:
    """The pipeline's text conditioning; :class:`InputError` when it cannot be loaded."""
    return TextConditioner(folder, device)
