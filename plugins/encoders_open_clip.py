"""Built-in CLIP image towers via open_clip, and ``open_clip:<arch>[:<pretrained tag>]``.

Only the image tower is kept. Layers: one per residual attention block of a ViT tower
(``transformer.resblocks.N``; class token or mean of patch tokens), one per residual block
of a ResNet tower (``layerS.B``, global-average pooled), or the timm trunk's layers for
timm-based towers. Preprocessing is the model's own (``open_clip.image_transform`` with its
preprocess config).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

from forensics.plugin.hookspecs import hookimpl


@contextlib.contextmanager
def _quiet():
    """Silence open_clip's log line about random initialisation."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@dataclass(frozen=True)
class ClipEncoder:
    """The image tower of an open_clip model ``arch`` with pretrained tag ``tag``."""

    name: str
    arch: str
    tag: str | None
    description: str
    family: str = "clip"
    default_weights: str = "hub"
    image_size: int | None = None

    def with_input_size(self, size: int) -> ClipEncoder:
        """The same tower built for ``size`` x ``size`` inputs (``NAME@SIZE``)."""
        return replace(self, name=f"{self.name}@{size}", image_size=size)

    def _create(self, pretrained: str | None = None, device: str = "cpu"):
        """Return ``(visual tower, preprocess config)``."""
        import open_clip

        with _quiet():
            model = open_clip.create_model(self.arch, pretrained=pretrained, device=device,
                                           force_image_size=self.image_size)
        return model.visual, dict(open_clip.get_model_preprocess_cfg(model))

    def _meta(self):
        import torch

        with torch.device("meta"):
            return self._create(device="meta")

    def layer_names(self, pool: str = "cls") -> list[str]:
        """Layer names, from the architecture alone (no weights)."""
        return [name for name, _ in clip_taps(self._meta()[0])[0]]

    def layer_dims(self, pool: str = "cls") -> list[int]:
        """Embedding size of each layer, from a shape-only forward pass (no weights)."""
        from forensics.plugin.encoders import meta_layer_dims

        visual, cfg = self._meta()
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        return meta_layer_dims(lambda: self._create(device="meta")[0],
                               lambda m, x: _extractor(m, pool)(x), (3, *size))

    def load(self, weights: str | None, device: str, pool: str):
        """Build the image tower with ``weights`` (hub, file or random:SEED) on ``device``."""
        import open_clip

        from forensics.jsonable import jsonable
        from forensics.plugin.encoders import (
            TorchEncoder,
            check_pool,
            file_sha256,
            parse_weights,
            state_dict_sha256,
        )

        check_pool(pool)
        spec = parse_weights(weights, self.default_weights)
        visual, cfg = self._build(spec)
        sha = file_sha256(spec.path) if spec.kind == "file" else state_dict_sha256(
            visual.state_dict())
        visual = visual.eval().to(device)
        transform = open_clip.image_transform(
            cfg["size"], is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
            resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
            fill_color=cfg.get("fill_color", 0),
        )
        return TorchEncoder(
            layer_names=[name for name, _ in clip_taps(visual)[0]],
            extract=_extractor(visual, pool, self.name),
            transform=transform,
            preprocess={"library": "open_clip", **jsonable(cfg)},
            weights_sha256=sha,
            device=device,
            module=visual,
        )

    def _build(self, spec):
        from forensics.errors import InputError
        from forensics.plugin.encoders import (
            build_model,
            hub_guard,
            load_state_dict_file,
            load_weights_into,
        )

        def hub():
            if not self.tag:
                raise InputError(
                    f"{self.name!r} names no pretrained tag; use open_clip:{self.arch}:<tag>, "
                    f"or --weights random:SEED or --weights PATH"
                )
            with hub_guard(self.name, f"open_clip {self.arch} {self.tag}"):
                return self._create(pretrained=self.tag)

        def from_file(path):
            visual, cfg = self._create()
            state = load_state_dict_file(path)
            if any(k.startswith("visual.") for k in state):
                state = {k[len("visual."):]: v for k, v in state.items()
                         if k.startswith("visual.")}
            load_weights_into(visual, state, str(path))
            return visual, cfg

        return build_model(spec, hub=hub, create=self._create, from_file=from_file)


def clip_taps(visual):
    """``(taps, fmt, prefix_tokens, has_cls)`` for an open_clip image tower."""
    from torch import nn

    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):
        taps = [(f"transformer.resblocks.{i}", b) for i, b in enumerate(transformer.resblocks)]
        fmt = "NLC" if getattr(transformer, "batch_first", True) else "LNC"
        has_cls = getattr(visual, "class_embedding", None) is not None
        return taps, fmt, int(has_cls), has_cls
    if all(isinstance(getattr(visual, f"layer{i}", None), nn.Sequential) for i in range(1, 5)):
        taps = [(f"layer{s}.{b}", blk)
                for s in range(1, 5) for b, blk in enumerate(getattr(visual, f"layer{s}"))]
        return taps, "NCHW", 0, False
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        from fp_plugins.encoders_timm import timm_taps

        taps, fmt, prefix, has_cls = timm_taps(trunk)
        return [(f"trunk.{n}", m) for n, m in taps], fmt, prefix, has_cls
    return [], "NCHW", 0, False


def _extractor(visual, pool: str, name: str = "this model"):
    """``x -> [pooled layer outputs]`` for an open_clip image tower, through forward hooks."""
    from forensics.plugin.encoders import tap_extractor

    return tap_extractor(visual, *clip_taps(visual), pool, name)


@dataclass(frozen=True)
class OpenClipPattern:
    """Resolves ``open_clip:<arch>[:<pretrained tag>]`` to a :class:`ClipEncoder`."""

    name: str = "open_clip:*"
    family: str = "clip"
    description: str = "any open_clip image tower: open_clip:<arch>:<pretrained tag>"

    def layer_names(self, pool: str = "cls") -> None:
        return None

    def resolve(self, rest: str) -> ClipEncoder:
        import difflib

        import open_clip

        from forensics.errors import UnknownNameError

        arch, _, tag = rest.partition(":")
        archs = open_clip.list_models()
        if arch not in archs:
            close = difflib.get_close_matches(arch, archs, n=8, cutoff=0.5)
            raise UnknownNameError(
                f"unknown open_clip architecture {arch!r}"
                + (f"; close matches: {', '.join(close)}" if close else "")
                + ". List them with python -c \"import open_clip; print(open_clip.list_models())\""
            )
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag and tag not in tags:
            raise UnknownNameError(
                f"unknown pretrained tag {tag!r} for open_clip {arch}; valid tags: "
                f"{', '.join(tags) or '(none)'}"
            )
        return ClipEncoder(name=f"open_clip:{rest}", arch=arch, tag=tag or None,
                           description=f"open_clip {arch} image tower"
                           + (f" ({tag})" if tag else ""))


BUILTINS: tuple[ClipEncoder, ...] = (
    ClipEncoder("clip-vit-b32", "ViT-B-32-quickgelu", "openai",
                "CLIP ViT-B/32 image tower (OpenAI); 12 blocks, CLS token"),
    ClipEncoder("clip-vit-b16", "ViT-B-16-quickgelu", "openai",
                "CLIP ViT-B/16 image tower (OpenAI); 12 blocks, CLS token"),
    ClipEncoder("clip-vit-l14", "ViT-L-14-quickgelu", "openai",
                "CLIP ViT-L/14 image tower (OpenAI); 24 blocks, CLS token"),
)


@hookimpl(trylast=True)
def register_encoders(register):
    for encoder in BUILTINS:
        register(encoder)
    register(OpenClipPattern())
