"""Backbones and the frozen trunk: the one place that knows torchvision's and timm's models.

`--backbone` takes any torchvision classification model (`vgg16`, `densenet201`, ...) or
`timm:<model>[.<pretrained tag>]`. `resolve_backbone` asks the library itself for the weights and
their preprocessing (mean, std, input size, interpolation: torchvision's weights' `transforms()`,
timm's `resolve_model_data_config`); nothing is copied into a table here, except what keeps
`vgg16` and `resnet50` exactly as they were (`PINNED`).

Where the trunk is cut (`--layer`):
- torchvision: a named graph node, cut with torchvision's feature extraction (no slicing by index).
  The default is the last spatial feature map before global pooling, found on probe inputs.
- timm: one of the model's feature stages (`feature_info`: `blocks.11`, `stages.3`), taken with
  `forward_intermediates` as an NCHW map (a ViT's patch tokens after its final norm, reshaped to
  their grid, prefix tokens dropped); the default is the last. Or `global`: the model's image
  embedding as a vector, as its own head gives it (see `_TimmCut`).

A `Trunk` takes RGB in [0, 1] and applies its weights' own normalisation, so the exported ONNX
graph carries the preprocessing and nothing downstream re-implements it. Resizing to the input
size happens before, in `tll.data.load_image`, with the interpolation recorded in the spec.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import timm
import timm.data
import torch
from torch import nn
from torchvision import models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from extract.trunk_spec import TrunkSpec, WeightsUnavailable, file_id
from tll import UserError, first_line, is_out_of_memory
from tll.data import DEFAULT_INPUT_SIZE, INTERPOLATIONS

TIMM = "timm:"  # the prefix of a timm model name on --backbone
GLOBAL = "global"  # the --layer of a timm model's image embedding (a vector)
PRETRAINED = ("pretrained", "imagenet")  # --weights words for the library's published weights
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class Pinned:
    """What a backbone keeps from before it was resolved from the library."""

    weights: models.WeightsEnum
    layer: str
    input_size: tuple[int, int]  # (H, W)


PINNED: dict[str, Pinned] = {
    # features: conv5_3 + its max-pool -> 512 x 7 x 6 at 245 x 200
    "vgg16": Pinned(models.VGG16_Weights.IMAGENET1K_V1, "features", DEFAULT_INPUT_SIZE),
    # layer4: the last residual stage -> 2048 x 8 x 7 at 245 x 200
    "resnet50": Pinned(models.ResNet50_Weights.IMAGENET1K_V2, "layer4", DEFAULT_INPUT_SIZE),
}


@dataclass(frozen=True)
class Curated:
    """A row of `python -m extract --list-backbones` (tests check each figure but the speed)."""

    backbone: str
    layer: str  # the default cut
    input_size: tuple[int, int]  # the default (H, W)
    shape: tuple[int, ...]  # the default cut's features at the default input size
    global_shape: tuple[int, ...] | None  # `--layer global`'s vector (timm only)
    images_per_s: float  # benchmarks/extract_speed.py, pipeline img/s (see README)


# images/s: `python benchmarks/extract_speed.py` (pipeline img/s), random init, batch 32, real
# images; --list-backbones says where and when, so that a reader can tell how old they are
SPEEDS_MEASURED = ("on 2026-11-27 on a 2-core CPU at load 5-8 (other jobs running; resnet50 "
                   "made 19.9 img/s at load 1.8, so expect about 4x these on a quiet machine)")
CURATED = (
    Curated("vgg16", "features", (245, 200), (512, 7, 6), None, 3.8),
    Curated("resnet50", "layer4", (245, 200), (2048, 8, 7), None, 4.7),
    Curated("densenet201", "relu", (224, 224), (1920, 7, 7), None, 1.5),
    Curated("convnext_tiny", "features", (224, 224), (768, 7, 7), None, 5.4),
    Curated("timm:vit_base_patch16_clip_quickgelu_224.openai", "blocks.11", (224, 224),
            (768, 14, 14), (512,), 2.6),
    Curated("timm:vit_small_patch14_dinov2.lvd142m", "blocks.11", (518, 518), (384, 37, 37),
            (384,), 1.0),
)


@dataclass(frozen=True)
class Backbone:
    """One model as its library describes it."""

    name: str  # canonical: a torchvision model name, or timm:<model>.<tag>
    input_size: tuple[int, int]  # (H, W): its weights' own, the default
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # how its weights' preprocessing resizes: bilinear or bicubic
    weights_id: str  # names its published weights: a torchvision enum, or a hub repository
    weights_word: str  # what `--weights pretrained` is recorded as: imagenet or pretrained
    layer: str | None  # the default cut; None: found on probe inputs (torchvision)
    fixed_input_size: bool  # timm: built for one input size (ViTs); rebuilt for another


def resolve_backbone(name: str) -> Backbone:
    """What the library says about `--backbone name`; an unknown name is refused with how to
    find valid ones."""
    if name.startswith(TIMM):
        return _timm_backbone(name.removeprefix(TIMM))
    if name not in models.list_models(module=models):
        raise UserError(_unknown_backbone(name, models.list_models(module=models)))
    pinned = PINNED.get(name)
    weights = pinned.weights if pinned else models.get_model_weights(name).DEFAULT
    transform = weights.transforms()
    height, width = (transform.crop_size * 2)[:2]  # [224] or [H, W]
    return Backbone(
        name=name, input_size=pinned.input_size if pinned else (height, width),
        mean=tuple(transform.mean), std=tuple(transform.std),
        interpolation=_interpolation(name, transform.interpolation.value),
        weights_id=f"{type(weights).__name__}.{weights.name}", weights_word="imagenet",
        layer=pinned.layer if pinned else None, fixed_input_size=False,
    )


def _timm_backbone(model_name: str) -> Backbone:
    try:
        with torch.device("meta"):  # the architecture and its config, no weights, no compute
            model = timm.create_model(model_name, pretrained=False)
    except RuntimeError as error:  # "Unknown model (x)", "Invalid pretrained tag (x) for y"
        architecture, tag = timm.models.split_model_name_tag(model_name)
        if timm.is_model(architecture) and tag:
            tags = [t.removeprefix(architecture) for t in timm.list_pretrained(architecture + ".*")]
            raise UserError(f"timm has no weights {tag!r} for {architecture}; its pretrained tags: "
                            f"{', '.join(tags) or 'none'}") from None
        raise UserError(_unknown_backbone(TIMM + model_name, timm.list_models(),
                                          str(error))) from None
    config = timm.data.resolve_model_data_config(model)
    pretrained = model.pretrained_cfg
    tag = pretrained.get("tag")
    source = (f"hf-hub:{pretrained['hf_hub_id']}" if pretrained.get("hf_hub_id")
              else pretrained.get("url") or "none")
    return Backbone(
        name=TIMM + pretrained["architecture"] + (f".{tag}" if tag else ""),
        input_size=tuple(config["input_size"][1:]), mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=_interpolation(TIMM + model_name, config["interpolation"]),
        weights_id=source, weights_word="pretrained",
        layer=model.feature_info[-1]["module"] if getattr(model, "feature_info", None) else GLOBAL,
        fixed_input_size=bool(pretrained.get("fixed_input_size")),
    )


def _interpolation(backbone: str, name: str) -> str:
    if name not in INTERPOLATIONS:
        raise UserError(f"{backbone} resizes its inputs with {name!r} interpolation; tll resizes "
                        f"with {' or '.join(INTERPOLATIONS)} only")
    return name


def _unknown_backbone(name: str, known: list[str], detail: str = "") -> str:
    bare = name.removeprefix(TIMM)
    close = difflib.get_close_matches(bare, known, n=3)
    prefix = TIMM if name.startswith(TIMM) else ""
    return (f"unknown backbone {name!r}" + (f" ({detail})" if detail else "")
            + (f"; did you mean {', '.join(prefix + c for c in close)}?" if close else "")
            + ". --backbone takes a torchvision classification model (python -c 'import "
            "torchvision; print(torchvision.models.list_models(module=torchvision.models))') or "
            "timm:<model>[.<pretrained tag>] (python -c \"import timm; "
            "print(timm.list_pretrained('*clip*'))\"); `python -m extract --list-backbones` "
            "shows a curated few")


def resolve_trunk(backbone: str, layer: str | None = None, weights: str = "pretrained",
                  input_size: tuple[int, int] | None = None) -> TrunkSpec:
    """The spec of `--backbone --layer --weights --input-size` (`TrunkSpec.resolve`); None:
    the model's own."""
    entry = resolve_backbone(backbone)
    if weights in PRETRAINED:
        weights, weights_id = entry.weights_word, entry.weights_id
    elif weights == "none":
        weights_id = f"random-init seed {RANDOM_INIT_SEED}"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {path} does not exist (--weights takes "
                                     "pretrained, none or the path of a state dict)")
        # absolute, so that export finds it from any folder
        weights, weights_id = str(path.resolve()), file_id(path)
    return TrunkSpec(entry.name, layer or entry.layer or _default_cut(entry), weights,
                     weights_id, entry.mean, entry.std, tuple(input_size or entry.input_size),
                     entry.interpolation)


def _default_cut(entry: Backbone) -> str:
    """A torchvision model's last spatial feature map before global pooling: the last graph
    node with a 4-D output that grows with the input (adaptive and global pooling's do not),
    found on probe inputs of a random-init model at its own input size and 32 pixels more. A
    model that takes only its own size is probed once, and any map larger than 1 x 1 counts.
    Named by the module it ends where it ends one (layer4, features), else by the node."""
    model = _seeded(models.get_model_builder(entry.name))
    nodes = get_graph_node_names(model)[1]
    every_node = create_feature_extractor(model, {node: node for node in nodes})

    def shapes_at(size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        with torch.inference_mode():
            outputs = every_node(torch.zeros(1, 3, *size))
        return {n: tuple(t.shape) for n, t in outputs.items() if isinstance(t, torch.Tensor)}

    height, width = entry.input_size
    own = shapes_at((height, width))
    try:
        larger = shapes_at((height + 32, width + 32))
    except (RuntimeError, AssertionError, ValueError):  # "Wrong image height!": one size only
        larger = None
    maps = [n for n, shape in own.items() if len(shape) == 4
            and (shape[2:] != larger[n][2:] if larger else shape[2] * shape[3] > 1)]
    if not maps or any(len(own[n]) == 3 for n in list(own)[list(own).index(maps[-1]):]):
        # a vision transformer's only map is its patch embedding; its blocks work on tokens
        raise UserError(f"{entry.name} has no spatial feature map to cut at by default (its "
                        "blocks work on token sequences): use a timm ViT (timm:<model>, maps "
                        "and --layer global), or --layer NODE")
    node = maps[-1]
    parts = node.split(".")
    for depth in range(1, len(parts)):
        module = ".".join(parts[:depth])
        if [n for n in nodes if n.startswith(module + ".")][-1] == node:
            return module
    return node


def _seeded(builder) -> nn.Module:
    """A random-init model; a fixed seed makes `--weights none` one particular trunk, rebuilt
    identically on resume and export."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return builder()


class Trunk(nn.Module):
    """Frozen trunk: image (N, 3, H, W) RGB in [0, 1] -> a feature map (N, C, h, w) or a
    vector (N, D). Cut at several `layers` of the one model (the spec's own by default), one
    pass gives them all: `features` returns each layer's, in order."""

    def __init__(self, spec: TrunkSpec, layers: tuple[str, ...] | None = None):
        super().__init__()
        self.spec = spec
        self.layers = tuple(layers or (spec.layer,))
        if spec.backbone.startswith(TIMM):
            self.body = _TimmCut(_build_timm(spec), spec, self.layers)
        else:
            self.body = _torchvision_cut(_build_torchvision(spec), spec, self.layers)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def features(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (N, 3, H, W)
        """Each layer's features: (N, C, h, w) or (N, D)."""
        return self.body((image - self.mean) / self.std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W)
        """The one layer's features (a trunk of several layers: use `features`)."""
        (features,) = self.features(image)
        return features  # (N, C, h, w) or (N, D)

    def output_shape(self) -> tuple[int, ...]:
        """(C, h, w) of the feature map or (D,) of the vector at the spec's input size; a trunk
        of one layer."""
        (shape,) = self.output_shapes()
        return shape

    def output_shapes(self) -> list[tuple[int, ...]]:
        """Each layer's (C, h, w) or (D,) at the spec's input size, found by one forward pass.
        An input size the model does not take is refused: too small, with the smallest square
        it takes; or not its own, for a model that takes one size only."""
        height, width = self.spec.input_size
        name = f"{self.spec.backbone} {'+'.join(self.layers)}"
        try:
            problem = self._problem_at((height, width))
        except (RuntimeError, MemoryError) as error:  # only running out of memory comes here
            raise UserError(f"input size {height} x {width} does not fit in memory for {name}, "
                            f"even one image at a time ({first_line(error)}); lower "
                            "--input-size") from None
        if problem and self._problem_at((height + 64, width + 64)) is None:
            raise UserError(f"input size {height} x {width} is too small for {name}: it needs at "
                            f"least {self._smallest_square()} x {self._smallest_square()}")
        if problem:
            raise UserError(f"{name} does not take input size {height} x {width} ({problem}); "
                            "it takes its own only: leave --input-size out")
        with torch.inference_mode():
            outputs = self.features(torch.zeros(1, 3, height, width, device=self.mean.device))
        shapes = [tuple(output.shape[1:]) for output in outputs]
        for layer, shape in zip(self.layers, shapes, strict=True):
            if len(shape) not in (1, 3):
                raise UserError(f"{self.spec.backbone} {layer} gives features of shape {shape} "
                                "per image: neither a map (C, h, w) nor a vector (D,) (a "
                                "transformer's tokens?); choose another --layer")
        return shapes

    def _problem_at(self, input_size: tuple[int, int]) -> str | None:
        """Why the trunk does not run at `input_size`; None where it does."""
        if min(input_size) < 1:
            return "an empty image"
        try:
            with torch.inference_mode():
                self.features(torch.zeros(1, 3, *input_size, device=self.mean.device))
        except (RuntimeError, AssertionError, ValueError) as error:
            if is_out_of_memory(error):  # the size is too large for this machine, not the model
                raise
            # "Output size is too small", "Kernel size can't be greater", "Wrong image height!"
            return first_line(error)
        return None

    def _smallest_square(self) -> int:
        """By bisection over square inputs: a handful of forward passes on tiny images."""
        low, high = 0, 16  # runs at high, not at low
        while self._problem_at((high, high)):
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if not self._problem_at((middle, middle)) else (middle, high)
        return high


def _torchvision_cut(model: nn.Module, spec: TrunkSpec, layers: tuple[str, ...]) -> nn.Module:
    nodes = get_graph_node_names(model)[1]
    for layer in layers:
        if layer not in nodes and not any(n.startswith(layer + ".") for n in nodes):
            # the names a user would pass: modules and their direct children (layer4, features.29)
            usable = dict.fromkeys(".".join(n.split(".")[:depth])
                                   for n in nodes for depth in (1, 2))
            culprit = (f"--layer {GLOBAL} (the image embedding) is for timm models "
                       f"(timm:<model>); {spec.backbone} is a torchvision model, whose --layer is "
                       "one of its graph nodes" if layer == GLOBAL
                       else f"{spec.backbone} has no node {layer!r}; its nodes include")
            raise UserError(f"{culprit}: {', '.join(usable)}")
    names = {layer: f"layer{i}" for i, layer in enumerate(dict.fromkeys(layers))}
    return _InOrder(create_feature_extractor(model, names), [names[layer] for layer in layers])


class _InOrder(nn.Module):
    """A torchvision feature extractor giving its outputs as a tuple in the layers' order."""

    def __init__(self, extractor: nn.Module, names: list[str]):
        super().__init__()
        self.extractor, self.names = extractor, names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.extractor(x)
        return tuple(outputs[name] for name in self.names)


class _TimmCut(nn.Module):
    """A timm model cut at some of its feature stages, or at its image embedding (`global`).

    The embedding is the model's own head output where that head is a projection into an
    embedding space (CLIP's image embedding: 512-d for ViT-B/16), and the pooled features
    before it where the head is a classifier over ImageNet labels (`pre_logits`) or absent
    (DINOv2: 0 classes). Which heads classify is timm's own call (`infer_imagenet_subset`).
    """

    def __init__(self, model: nn.Module, spec: TrunkSpec, layers: tuple[str, ...]):
        super().__init__()
        self.model = model
        patches = getattr(model, "patch_embed", None)
        if getattr(patches, "patch_size", None) and not getattr(patches, "dynamic_img_pad", False):
            _refuse_partial_patches(spec.backbone, spec.input_size, tuple(patches.patch_size))
        stages = [info["module"] for info in getattr(model, "feature_info", [])]
        if GLOBAL in layers:
            if len(layers) > 1:
                raise UserError(f"--layer {GLOBAL} takes the model's whole pass and cannot share "
                                "it with other layers: extract it on its own")
            self.stages = None
            self.pre_logits = (model.num_classes == 0
                               or timm.data.infer_imagenet_subset(model) is not None)
            return
        for layer in layers:
            if layer not in stages:
                raise UserError(f"{spec.backbone} has no feature stage {layer!r}; --layer takes "
                                f"{', '.join(stages + [GLOBAL])}")
        if not hasattr(model, "forward_intermediates"):
            raise UserError(f"timm's {spec.backbone} gives no feature maps "
                            "(forward_intermediates); use --layer global")
        self.stages = [stages.index(layer) for layer in layers]
        # drop the blocks after the last stage and the head: nothing runs or is exported for them
        model.prune_intermediate_layers(sorted(set(self.stages)), prune_norm=False,
                                        prune_head=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (N, 3, H, W), normalised
        if self.stages is None:
            return (self.model.forward_head(self.model.forward_features(x),
                                            pre_logits=self.pre_logits),)  # (N, D)
        indices = sorted(set(self.stages))
        maps = self.model.forward_intermediates(
            x, indices=indices, norm=True, output_fmt="NCHW", intermediates_only=True,
        )  # each (N, C, h, w), in the order of `indices`
        return tuple(maps[indices.index(stage)] for stage in self.stages)


def _refuse_partial_patches(backbone: str, input_size: tuple[int, int],
                            patch: tuple[int, int]) -> None:
    """Refuse an input size that is not whole patches: the patch embedding (a strided
    convolution) would drop the last rows and columns of every image, and "resized whole,
    never cropped" would not hold. The message offers the nearest sizes of whole patches."""
    left = [size % step for size, step in zip(input_size, patch, strict=True)]
    if not any(left):
        return
    lost = " and ".join(f"{n} {what}" for n, what in zip(left, ("rows", "columns"), strict=True)
                        if n)
    below = [max(step, size // step * step) for size, step in zip(input_size, patch, strict=True)]
    above = [-(-size // step) * step for size, step in zip(input_size, patch, strict=True)]
    raise UserError(f"{backbone} cuts images into {patch[0]} x {patch[1]} patches: at input size "
                    f"{input_size[0]} x {input_size[1]} it would never see the last {lost} of "
                    f"every image; give whole patches: --input-size {below[0]} {below[1]} or "
                    f"{above[0]} {above[1]}")


def _build_timm(spec: TrunkSpec) -> nn.Module:
    entry = resolve_backbone(spec.backbone)
    name = spec.backbone.removeprefix(TIMM)
    options = {}
    if entry.fixed_input_size and spec.input_size != entry.input_size:
        options["img_size"] = spec.input_size  # its position embedding resampled to this grid
    try:
        if spec.weights == "none":
            return _seeded(lambda: timm.create_model(name, pretrained=False, **options))
        if spec.weights in PRETRAINED:
            return _timm_pretrained(name, options)
        return _timm_from_file(name, _checked_file(spec), options)
    except TypeError as error:  # `img_size` on a model that takes no other size
        if "img_size" not in str(error):
            raise
        raise UserError(f"{spec.backbone} takes only its own input size {entry.input_size[0]} x "
                        f"{entry.input_size[1]}: leave --input-size out") from None


def _timm_from_file(name: str, path: Path, options: dict) -> nn.Module:
    """timm's own loading of a local file: its key filters, position-embedding resampling and
    strict load, with the weights-only unpickler."""
    try:
        return timm.create_model(name, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(path)}, **options)
    except TypeError:
        raise
    except Exception as error:  # not a state dict, truncated, keys or shapes of another model
        raise WeightsUnavailable(f"weights file {path} is not a state dict that fits timm:{name} "
                                 f"({first_line(error)})") from None


def _timm_pretrained(name: str, options: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, **options)
    except Exception as error:  # offline, not in the hub cache, a proxy, no such weights
        import huggingface_hub.constants

        cache = (huggingface_hub.constants.HF_HUB_CACHE
                 if timm.models.get_pretrained_cfg(name).hf_hub_id
                 else Path(torch.hub.get_dir()) / "checkpoints")
        raise WeightsUnavailable(
            f"cannot get the pretrained weights of timm:{name} from the Hugging Face hub "
            f"({type(error).__name__}: {first_line(error)}). "
            f"Put them in the hub cache {cache} (e.g. `huggingface-cli download` on a machine "
            "with network, then copy the folder), or pass --weights PATH (a local .safetensors "
            "or state dict) or --weights none (random init)"
        ) from None


def _build_torchvision(spec: TrunkSpec) -> nn.Module:
    builder = models.get_model_builder(spec.backbone)
    if spec.weights == "none":
        return _seeded(builder)
    model = builder(weights=None)
    if spec.weights in PRETRAINED:
        weights = models.get_weight(spec.weights_id)
        try:
            state = weights.get_state_dict(progress=True, check_hash=True)
        except Exception as error:  # no network, a proxy, a corrupt download: say what to do
            raise WeightsUnavailable(
                f"cannot get the ImageNet weights of {spec.backbone} ({weights.url}): "
                f"{error}. Put the file in {Path(torch.hub.get_dir()) / 'checkpoints'}, or pass "
                "--weights PATH (a local state dict) or --weights none (random init)"
            ) from None
    else:
        path = _checked_file(spec)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # not a torch file, a pickle of arbitrary objects, truncated
            raise WeightsUnavailable(f"weights file {path} is not a readable state dict "
                                     f"({first_line(error)})") from None
        if not isinstance(state, dict):
            raise WeightsUnavailable(f"weights file {path} holds a {type(state).__name__}, not a "
                                     "state dict (save model.state_dict())")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError) as error:
        raise WeightsUnavailable(f"weights {spec.weights} do not fit {spec.backbone}: "
                                 f"{first_line(error)}") from None
    return model


def _checked_file(spec: TrunkSpec) -> Path:
    """The spec's weights file, refused unless it is the very file it was resolved with."""
    path = Path(spec.weights)
    if not path.is_file():
        raise WeightsUnavailable(f"weights file {path} does not exist")
    digest = file_id(path)
    if digest != spec.weights_id:
        raise WeightsUnavailable(
            f"weights file {path} has changed: expected {spec.weights_id}, found {digest}")
    return path
