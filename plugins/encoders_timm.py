"""Built-in timm encoders: ViT, DINO(v2), DeiT, Swin, ResNet, InceptionV3, ``timm:<any>``
and ``hf-hub:<owner>/<repo>``.

Every layer comes out of one forward pass through forward hooks:

- ViT-like models (ViT, DINO, DeiT, ...): one embedding per transformer block, the class
  token (``pool="cls"``, as the paper) or the mean of the patch tokens (``pool="mean"``);
  layers ``blocks.0`` ... ``blocks.{depth-1}``.
- Swin: one per block (``layers.S.blocks.B``); ResNet: one per residual block
  (``layerS.B``); InceptionV3: one per ``Conv2d_*`` / ``Mixed_*`` block; any other timm
  model: one per feature stage (its ``feature_info`` modules). Feature maps are global
  average pooled.

Preprocessing is the model's own pretrained data config (timm ``resolve_data_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from forensics.plugin.hookspecs import hookimpl

_DEMO_KWARGS = (
    ("patch_size", 4),
    ("embed_dim", 96),
    ("depth", 8),
    ("num_heads", 3),
    ("pretrained_cfg_overlay", (("input_size", (3, 32, 32)), ("crop_pct", 1.0),
                                ("interpolation", "bicubic"), ("mean", (0.5, 0.5, 0.5)),
                                ("std", (0.5, 0.5, 0.5)))),
    ("img_size", 32),
)


@dataclass(frozen=True)
class TimmEncoder:
    """An encoder built from a timm model name (with an optional ``.tag``)."""

    name: str
    model_name: str
    family: str
    description: str
    default_weights: str = "hub"
    kwargs: tuple = ()
    has_pretrained: bool = True

    def _create(self, pretrained: bool = False):
        import contextlib

        import timm

        from forensics.plugin.encoders import hub_guard

        kwargs = {k: dict(v) if k == "pretrained_cfg_overlay" else v for k, v in self.kwargs}
        # An hf-hub: model's architecture is in its hub config, needed even without weights.
        guard = (hub_guard(self.name, self.model_name) if self.model_name.startswith("hf-hub:")
                 else contextlib.nullcontext())
        with guard:
            return timm.create_model(self.model_name, pretrained=pretrained, num_classes=0,
                                     **kwargs)

    def with_input_size(self, size: int) -> TimmEncoder:
        """The same encoder at input size ``size`` (``NAME@SIZE``).

        Transformers are built for that size (timm resamples pretrained position
        embeddings); CNNs just get inputs of that size.
        """
        from forensics.errors import InputError

        sized = self._sized(size, takes_img_size=True)
        try:
            sized._meta_model()
        except TypeError:  # the model takes no img_size argument: a CNN
            return self._sized(size, takes_img_size=False)
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise InputError(f"{self.name} cannot take {size}x{size} inputs ({exc})") from exc
        return sized

    def _sized(self, size: int, takes_img_size: bool) -> TimmEncoder:
        kwargs = dict(self.kwargs)
        overlay = dict(kwargs.get("pretrained_cfg_overlay", ()))
        overlay["input_size"] = (3, size, size)
        kwargs["pretrained_cfg_overlay"] = tuple(overlay.items())
        kwargs.pop("img_size", None)
        if takes_img_size:
            kwargs["img_size"] = size
        return replace(self, name=f"{self.name}@{size}", kwargs=tuple(kwargs.items()))

    def _meta_model(self):
        import torch

        with torch.device("meta"):
            return self._create()

    def layer_names(self, pool: str = "cls") -> list[str]:
        """Layer names, from the architecture alone (no weights)."""
        return [name for name, _ in timm_taps(self._meta_model())[0]]

    def layer_dims(self, pool: str = "cls") -> list[int]:
        """Embedding size of each layer, from a shape-only forward pass (no weights)."""
        from forensics.plugin.encoders import meta_layer_dims

        model = self._meta_model()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        return meta_layer_dims(self._create, lambda m, x: _extractor(m, pool)(x), size)

    def load(self, weights: str | None, device: str, pool: str):
        """Build the model with ``weights`` (hub, file or random:SEED) on ``device``."""
        from timm.data import create_transform, resolve_data_config

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
        notes: list[str] = []
        model = self._build(spec, notes)
        sha = file_sha256(spec.path) if spec.kind == "file" else state_dict_sha256(
            model.state_dict())
        model = model.eval().to(device)
        config = resolve_data_config({}, model=model)
        names = [name for name, _ in timm_taps(model)[0]]
        return TorchEncoder(
            layer_names=names,
            extract=_extractor(model, pool, self.name),
            transform=create_transform(**config),
            preprocess={"library": "timm", **jsonable(config)},
            weights_sha256=sha,
            device=device,
            module=model,
            weights_loading=notes,
        )

    def _build(self, spec, notes: list[str]):
        from forensics.errors import InputError
        from forensics.plugin.encoders import (
            build_model,
            hub_guard,
            load_state_dict_file,
            load_weights_into,
        )

        def hub():
            if not self.has_pretrained:
                raise InputError(
                    f"encoder {self.name!r} has no pretrained weights; use --weights "
                    f"random:SEED or --weights PATH"
                )
            with hub_guard(self.name, self.model_name):
                return self._create(pretrained=True)

        def from_file(path):
            model = self._create()
            classifier = model.pretrained_cfg.get("classifier") or ()
            heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            state = timm_filter(load_state_dict_file(path, notes), model, notes)
            load_weights_into(model, state, str(path), ignore=[h + "." for h in heads])
            return model

        return build_model(spec, hub=hub, create=self._create, from_file=from_file)


def timm_filter(state: dict, model, notes: list[str]) -> dict:
    """A local checkpoint made to fit ``model`` as timm fits its hub weights.

    Runs the architecture's own ``checkpoint_filter_fn`` (the function timm applies to
    pretrained weights): for ViTs it resamples the position embeddings to the model's
    patch grid (``timm.layers.resample_abs_pos_embed``, bicubic) and the patch embedding
    to its patch size, converts DINOv2 / OpenCLIP layouts, and so on. What changed shape
    is appended to ``notes``.
    """
    import importlib

    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return state
    before = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    out = fn(dict(state), model)
    for key, value in out.items():
        old = before.get(key)
        if old is not None and hasattr(value, "shape") and tuple(value.shape) != old:
            notes.append(f"resampled {key} from {list(old)} to {list(value.shape)} "
                         f"(timm {type(model).__name__} checkpoint_filter_fn)")
    return out


def timm_taps(model):
    """The modules whose outputs are the layers of a timm model.

    Returns:
        ``(taps, fmt, prefix_tokens, has_cls)``: ``[(name, module)]`` in forward order, the
        layout of the outputs (``NLC`` tokens, ``NCHW`` or ``NHWC`` maps), the number of
        prefix tokens and whether token 0 is a class token.
    """
    from torch import nn

    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and hasattr(model, "num_prefix_tokens"):
        taps = [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
        has_cls = getattr(model, "cls_token", None) is not None
        return taps, "NLC", int(model.num_prefix_tokens), has_cls
    stages = getattr(model, "layers", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and all(
        hasattr(s, "blocks") for s in stages
    ):
        taps = [(f"layers.{s}.blocks.{b}", blk)
                for s, stage in enumerate(stages) for b, blk in enumerate(stage.blocks)]
    elif all(isinstance(getattr(model, f"layer{i}", None), nn.Sequential) for i in range(1, 5)):
        taps = [(f"layer{s}.{b}", blk)
                for s in range(1, 5) for b, blk in enumerate(getattr(model, f"layer{s}"))]
    elif type(model).__name__ == "InceptionV3":
        taps = [(n, m) for n, m in model.named_children() if n.startswith(("Conv2d_", "Mixed_"))]
    else:
        infos = getattr(model, "feature_info", None) or []
        taps = [(info["module"], model.get_submodule(info["module"])) for info in infos]
    fmt = str(getattr(model, "output_fmt", "NCHW"))
    return taps, ("NHWC" if fmt.endswith("NHWC") else "NCHW"), 0, False


def _extractor(model, pool: str, name: str = "this model"):
    """``x -> [pooled layer outputs]`` for a timm model, through forward hooks."""
    from forensics.plugin.encoders import tap_extractor

    return tap_extractor(model.forward_features, *timm_taps(model), pool, name)


@dataclass(frozen=True)
class TimmPattern:
    """Resolves ``timm:<model name>[.<tag>]`` to a :class:`TimmEncoder`."""

    name: str = "timm:*"
    family: str = "timm"
    description: str = "any timm model: timm:<model name>[.<pretrained tag>]"

    def layer_names(self, pool: str = "cls") -> None:
        return None

    def resolve(self, rest: str) -> TimmEncoder:
        import difflib

        import timm

        from forensics.errors import UnknownNameError

        if not rest or not timm.is_model(rest):
            arch = rest.split(".")[0]
            close = difflib.get_close_matches(arch, timm.list_models(), n=8, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise UnknownNameError(
                f"unknown timm model {rest!r}{hint}. List them with "
                f"python -c \"import timm; print(timm.list_models())\""
            )
        return TimmEncoder(name=f"timm:{rest}", model_name=rest, family="timm",
                           description=f"timm model {rest}")


@dataclass(frozen=True)
class HfHubPattern:
    """Resolves ``hf-hub:<owner>/<repo>`` (a timm model on the Hugging Face hub)."""

    name: str = "hf-hub:*"
    family: str = "timm"
    description: str = "a timm model on the Hugging Face hub: hf-hub:<owner>/<repo>"

    def layer_names(self, pool: str = "cls") -> None:
        return None

    def resolve(self, rest: str) -> TimmEncoder:
        from forensics.errors import UnknownNameError

        if rest.count("/") != 1 or not all(rest.split("/")):
            raise UnknownNameError(f"hf-hub:{rest!r} is not a hub repository name; use "
                                   f"hf-hub:<owner>/<repo>, e.g. "
                                   f"hf-hub:timm/vit_base_patch16_224.orig_in21k")
        return TimmEncoder(name=f"hf-hub:{rest}", model_name=f"hf-hub:{rest}", family="timm",
                           description=f"timm model {rest} from the Hugging Face hub")


_P = "vit_{}_patch{}_224.{}"
BUILTINS: tuple[TimmEncoder, ...] = (
    TimmEncoder("vit-b16", _P.format("base", 16, "orig_in21k"), "vit",
                "ViT-B/16, ImageNet-21k, the original Google weights (the paper's encoder, "
                "google/vit-base-patch16-224-in21k); 12 blocks, CLS token"),
    TimmEncoder("vit-b16-augreg", _P.format("base", 16, "augreg_in21k"), "vit",
                "ViT-B/16, ImageNet-21k, AugReg weights (Steiner et al. 2021); 12 blocks"),
    TimmEncoder("vit-l16", _P.format("large", 16, "augreg_in21k"), "vit",
                "ViT-L/16, ImageNet-21k; 24 blocks"),
    TimmEncoder("vit-h14", _P.format("huge", 14, "orig_in21k"), "vit",
                "ViT-H/14, ImageNet-21k; 32 blocks"),
    TimmEncoder("dino-vits16", _P.format("small", 16, "dino"), "dino",
                "DINO ViT-S/16 (self-supervised); 12 blocks"),
    TimmEncoder("dino-vitb16", _P.format("base", 16, "dino"), "dino",
                "DINO ViT-B/16 (self-supervised); 12 blocks"),
    TimmEncoder("dinov2-vits14", "vit_small_patch14_dinov2.lvd142m", "dinov2",
                "DINOv2 ViT-S/14 (self-supervised, 518 px); 12 blocks"),
    TimmEncoder("dinov2-vitb14", "vit_base_patch14_dinov2.lvd142m", "dinov2",
                "DINOv2 ViT-B/14 (self-supervised, 518 px); 12 blocks"),
    TimmEncoder("dinov2-vitl14", "vit_large_patch14_dinov2.lvd142m", "dinov2",
                "DINOv2 ViT-L/14 (self-supervised, 518 px); 24 blocks"),
    TimmEncoder("dinov2-vitg14", "vit_giant_patch14_dinov2.lvd142m", "dinov2",
                "DINOv2 ViT-g/14 (self-supervised, 518 px); 40 blocks"),
    TimmEncoder("deit-tiny", "deit_tiny_patch16_224.fb_in1k", "deit", "DeiT-Ti/16; 12 blocks"),
    TimmEncoder("deit-small", "deit_small_patch16_224.fb_in1k", "deit", "DeiT-S/16; 12 blocks"),
    TimmEncoder("deit-base", "deit_base_patch16_224.fb_in1k", "deit", "DeiT-B/16; 12 blocks"),
    TimmEncoder("swin-tiny", "swin_tiny_patch4_window7_224.ms_in1k", "swin",
                "Swin-T, ImageNet-1k; 12 blocks, global-average pooled"),
    TimmEncoder("swin-base", "swin_base_patch4_window7_224.ms_in22k_ft_in1k", "swin",
                "Swin-B, ImageNet-22k; 24 blocks, global-average pooled"),
    TimmEncoder("swin-large", "swin_large_patch4_window7_224.ms_in22k_ft_in1k", "swin",
                "Swin-L, ImageNet-22k; 24 blocks, global-average pooled"),
    TimmEncoder("resnet18", "resnet18.a1_in1k", "resnet",
                "ResNet-18, ImageNet-1k; 8 residual blocks, global-average pooled"),
    TimmEncoder("resnet50", "resnet50.a1_in1k", "resnet",
                "ResNet-50, ImageNet-1k; 16 residual blocks, global-average pooled"),
    TimmEncoder("inception-v3", "inception_v3.tv_in1k", "inception",
                "InceptionV3 (torchvision weights); 16 blocks, global-average pooled"),
    TimmEncoder("vit-tiny-demo", "vit_tiny_patch16_224", "vit",
                "small ViT for 32x32 inputs (patch 4, dim 96, 8 blocks), random weights; "
                "fast on CPU, for demos and tests",
                default_weights="random:0", kwargs=_DEMO_KWARGS, has_pretrained=False),
)


@hookimpl(trylast=True)
def register_encoders(register):
    for encoder in BUILTINS:
        register(encoder)
    register(TimmPattern())
    register(HfHubPattern())
