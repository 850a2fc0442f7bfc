"""What a trunk is, as data: the one description of it, stored in every cache (`CacheInfo`
extends it), in every checkpoint (as the cache's) and, for what `infer` needs, in the ONNX file.

Torch-free, so that what only reads descriptions (the cache, `head.train`) does not load torch's
model libraries; `TrunkSpec.resolve` asks them (`extract.backbones`) when it is called.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from tll import UserError
from tll.data import DEFAULT_INTERPOLATION


class WeightsUnavailable(UserError, RuntimeError):
    """The requested weights cannot be had; the message says what to pass instead."""


@dataclass(frozen=True)
class TrunkSpec:
    """Everything needed to rebuild the very same trunk; stored in caches, checkpoints, ONNX."""

    backbone: str
    layer: str
    weights: str  # "imagenet" | "pretrained", "none" or the absolute path of a state dict
    weights_id: str  # a torchvision enum name, a hub id, "random-init seed N", or "sha256:<hex>"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int]  # (H, W) fed to the trunk
    # how `load_image` resizes to input_size; what was written before it was recorded (schema 2
    # caches, their checkpoints) resized bilinearly
    interpolation: str = DEFAULT_INTERPOLATION

    @classmethod
    def resolve(cls, backbone: str, layer: str | None = None, weights: str = "pretrained",
                input_size: tuple[int, int] | None = None) -> TrunkSpec:
        """The spec of `--backbone --layer --weights --input-size`; None: the model's own, as
        torchvision or timm say (`extract.backbones.resolve_trunk`, imported here only)."""
        from extract.backbones import resolve_trunk

        return resolve_trunk(backbone, layer, weights, input_size)

    @classmethod
    def from_metadata(cls, meta: dict) -> Self:
        """The description recorded in a cache's (or a checkpoint's) metadata, other keys
        ignored; a field recorded only since (interpolation) takes its default."""
        values = {field.name: meta[field.name] for field in dataclasses.fields(cls)
                  if field.name in meta}
        return cls(**{name: tuple(value) if isinstance(value, list | tuple) else value
                      for name, value in values.items()})

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
