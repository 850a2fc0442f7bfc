"""The backbone table and the frozen trunk: one place that knows each torchvision model.

A `Trunk` takes RGB in [0, 1] and applies its weights' own normalisation, so the exported ONNX
graph carries the preprocessing and nothing downstream re-implements it. It cuts the model at a
named graph node with torchvision's feature extraction (no slicing by index).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from extract import UserError


@dataclass(frozen=True)
class Backbone:
    builder: Callable[..., nn.Module]
    weights: models.WeightsEnum  # the ImageNet weights `--weights imagenet` loads
    default_layer: str  # graph node to cut at


BACKBONES: dict[str, Backbone] = {
    # features: conv5_3 + its max-pool -> 512 x 7 x 6 at 245 x 200
    "vgg16": Backbone(models.vgg16, models.VGG16_Weights.IMAGENET1K_V1, "features"),
    # layer4: the last residual stage -> 2048 x 8 x 7 at 245 x 200
    "resnet50": Backbone(models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2, "layer4"),
}
RANDOM_INIT_SEED = 0


class WeightsUnavailable(UserError, RuntimeError):
    """The requested weights cannot be had; the message says what to pass instead."""


@dataclass(frozen=True)
class TrunkSpec:
    """Everything needed to rebuild the very same trunk; stored in caches, checkpoints, ONNX."""

    backbone: str
    layer: str
    weights: str  # "imagenet", "none" or the absolute path of a state dict
    weights_id: str  # the torchvision enum name, "random-init seed N", or "sha256:<hex>"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def resolve(cls, backbone: str, layer: str | None, weights: str) -> TrunkSpec:
        if backbone not in BACKBONES:
            raise UserError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
        entry = BACKBONES[backbone]
        if weights == "imagenet":
            weights_id = f"{type(entry.weights).__name__}.{entry.weights.name}"
        elif weights == "none":
            weights_id = f"random-init seed {RANDOM_INIT_SEED}"
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise WeightsUnavailable(f"weights file {path} does not exist "
                                         "(--weights takes imagenet, none or a state-dict path)")
            # absolute, so that export finds it from any folder
            weights, weights_id = str(path.resolve()), file_id(path)
        transform = entry.weights.transforms()
        return cls(backbone, layer or entry.default_layer, weights, weights_id,
                   tuple(transform.mean), tuple(transform.std))


    @classmethod
    def from_metadata(cls, meta: dict) -> TrunkSpec:
        """The spec recorded in a cache's (or a checkpoint's) metadata."""
        return cls(meta["backbone"], meta["layer"], meta["weights"], meta["weights_id"],
                   tuple(meta["mean"]), tuple(meta["std"]))

    def with_weights_file(self, path: str | Path) -> TrunkSpec:
        """The same trunk with its state dict found at `path` (moved since extraction); refused
        unless the file is the very one the cache was built with."""
        path = Path(path).expanduser()
        if not self.weights_id.startswith("sha256:"):
            raise UserError(f"this trunk's weights are {self.weights!r}, not a file: "
                            "--weights PATH does not apply")
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {path} does not exist")
        if file_id(path) != self.weights_id:
            raise WeightsUnavailable(f"weights file {path} is not the one the cache was built "
                                     f"with (expected {self.weights_id})")
        return dataclasses.replace(self, weights=str(path.resolve()))


def file_id(path: Path) -> str:
    """`sha256:<hex>` of a weights file: how caches and runs name the very file they used."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


class Trunk(nn.Module):
    """Frozen conv trunk: image (N, 3, H, W) RGB in [0, 1] -> feature map (N, C, h, w)."""

    def __init__(self, spec: TrunkSpec):
        super().__init__()
        self.spec = spec
        model = _build(spec)
        nodes = get_graph_node_names(model)[1]
        if spec.layer not in nodes and not any(n.startswith(spec.layer + ".") for n in nodes):
            # the names a user would pass: modules and their direct children (layer4, features.29)
            usable = dict.fromkeys(".".join(n.split(".")[:depth])
                                   for n in nodes for depth in (1, 2))
            raise UserError(f"{spec.backbone} has no node {spec.layer!r}; its nodes include: "
                            f"{', '.join(usable)}")
        self.body = create_feature_extractor(model, {spec.layer: "features"})
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body((image - self.mean) / self.std)["features"]

    def output_shape(self, input_size: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the feature map for an (H, W) input, found by one forward pass; an input
        too small for the trunk is refused with the smallest square one it takes."""
        if not self._runs_at(input_size):
            raise UserError(f"input size {input_size[0]} x {input_size[1]} is too small for "
                            f"{self.spec.backbone} {self.spec.layer}: it needs at least "
                            f"{self._smallest_square()} x {self._smallest_square()}")
        with torch.inference_mode():
            probe = torch.zeros(1, 3, *input_size, device=self.mean.device)
            return tuple(self(probe).shape[1:])

    def _runs_at(self, input_size: tuple[int, int]) -> bool:
        if min(input_size) < 1:
            return False
        try:
            with torch.inference_mode():
                self(torch.zeros(1, 3, *input_size, device=self.mean.device))
        except RuntimeError:  # "Output size is too small", "Kernel size can't be greater"
            return False
        return True

    def _smallest_square(self) -> int:
        """By bisection over square inputs: a handful of forward passes on tiny images."""
        low, high = 0, 16  # runs at high, not at low
        while not self._runs_at((high, high)):
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if self._runs_at((middle, middle)) else (middle, high)
        return high


def _build(spec: TrunkSpec) -> nn.Module:
    entry = BACKBONES[spec.backbone]
    if spec.weights == "none":
        # a fixed seed makes "none" one particular trunk, rebuilt identically on resume and export
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return entry.builder(weights=None)
    model = entry.builder(weights=None)
    if spec.weights == "imagenet":
        try:
            state = entry.weights.get_state_dict(progress=True, check_hash=True)
        except Exception as error:  # no network, a proxy, a corrupt download: say what to do
            raise WeightsUnavailable(
                f"cannot get the ImageNet weights of {spec.backbone} ({entry.weights.url}): "
                f"{error}. Put the file in {Path(torch.hub.get_dir()) / 'checkpoints'}, or pass "
                "--weights PATH (a local state dict) or --weights none (random init)"
            ) from None
    else:
        path = Path(spec.weights)
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {path} does not exist")
        digest = file_id(path)
        if digest != spec.weights_id:
            raise WeightsUnavailable(
                f"weights file {path} has changed: expected {spec.weights_id}, found {digest}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # not a torch file, a pickle of arbitrary objects, truncated
            raise WeightsUnavailable(f"weights file {path} is not a readable state dict "
                                     f"({str(error).splitlines()[0]})") from None
        if not isinstance(state, dict):
            raise WeightsUnavailable(f"weights file {path} holds a {type(state).__name__}, not a "
                                     "state dict (save model.state_dict())")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError) as error:
        raise WeightsUnavailable(f"weights {spec.weights} do not fit {spec.backbone}: "
                                 f"{str(error).splitlines()[0]}") from None
    return model


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda where there is one, else cpu; `cuda` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)
