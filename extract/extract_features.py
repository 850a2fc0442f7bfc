"""`python -m extract`: run a frozen trunk once over every image of a dataset into the cache.

Images are decoded and resized in DataLoader workers while the trunk runs (on CUDA; on a CPU the
trunk needs every core, so they are decoded inline); only this process writes the file. Batches
are fixed blocks of cache rows, so a resumed run computes every row in the same batch as an
uninterrupted one and the two caches come out identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np
import timm
import torch
import torchvision
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from extract import UserPath, logger, user_errors
from extract.backbones import CURATED, TIMM, Trunk, TrunkSpec, resolve_backbone, resolve_device
from extract.cache import CacheInfo, CacheWriter
from extract.data import DataError, load_image, read_dataset
from extract.files import check_output, exclusive

DEFAULT_CACHE_DIR = Path("cache")


def default_cache_path(spec: TrunkSpec) -> Path:
    """cache/<backbone>-<layer>-<weights>[-HxW].h5, the size given unless it is the backbone's
    own (timm:x.y is written timm-x.y)."""
    weights = (spec.weights if spec.weights in ("imagenet", "pretrained", "none")
               else Path(spec.weights).stem)
    height, width = spec.input_size
    size = "" if spec.input_size == resolve_backbone(spec.backbone).input_size \
        else f"-{height}x{width}"
    backbone = spec.backbone.replace(TIMM, TIMM[:-1] + "-")
    return DEFAULT_CACHE_DIR / f"{backbone}-{spec.layer}-{weights}{size}.h5"


class _Blocks(TorchDataset):
    """Item b = rows [b * batch, (b + 1) * batch) of the cache, decoded: (rows, images, error)."""

    def __init__(self, paths: list[Path], blocks: list[np.ndarray], input_size: tuple[int, int],
                 interpolation: str):
        self.paths, self.blocks = paths, blocks
        self.input_size, self.interpolation = input_size, interpolation

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int):
        rows = self.blocks[index]
        try:
            images = np.stack([load_image(self.paths[r], self.input_size, self.interpolation)
                               for r in rows])
        except DataError as error:  # carried to the main process as text: one clean message
            return rows, None, str(error)
        return rows, torch.from_numpy(images), None  # (B, 3, H, W)


def main(
    backbone: str,
    data: str | Path,
    out: str | Path | None = None,
    layer: str | None = None,
    weights: str = "pretrained",
    input_size: tuple[int, int] | None = None,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    amp: bool = True,
    overwrite: bool = False,
) -> Path:
    """Extract (or finish extracting, or update) the cache and return its path. `layer` and
    `input_size` None: the backbone's own."""
    dataset = read_dataset(data)
    spec = TrunkSpec.resolve(backbone, layer, weights, input_size)
    out = Path(out) if out else default_cache_path(spec)
    check_output(out, "cache", inputs=dataset.files())
    torch_device = resolve_device(device)
    if workers is None:
        # on a CPU the trunk needs every core and decoding is ~1% of its time: decode inline
        workers = 0 if torch_device.type == "cpu" else min(8, os.cpu_count() or 1)
    trunk = Trunk(spec)
    keys = dataset.keys()
    info = CacheInfo(
        backbone=spec.backbone, layer=spec.layer, weights=spec.weights,
        weights_id=spec.weights_id, mean=spec.mean, std=spec.std,
        input_size=spec.input_size, interpolation=spec.interpolation,
        feature_shape=trunk.output_shape(),
        dataset=str(dataset.root.resolve()), dataset_fingerprint=dataset.fingerprint(),
        torch_version=str(torch.__version__), torchvision_version=str(torchvision.__version__),
        timm_version=str(timm.__version__),
    )
    logger.info("extract %s (%s, weights %s, %d x %d %s) of %d images -> %s, features %s",
                spec.backbone, spec.layer, spec.weights_id, *spec.input_size, spec.interpolation,
                len(keys), out, info.feature_shape)
    # everything so far only read; from here on the cache is written, by one process at a time
    with exclusive(out):
        writer = CacheWriter(out, keys, dataset.digests(), info, overwrite=overwrite)
        try:
            if len(writer.missing):
                _run(trunk, writer, [dataset.images[k] for k in keys], torch_device, batch_size,
                     workers, amp)
            else:
                logger.info("%s is already complete", out)
            return writer.finish()
        finally:
            writer.close()


def _run(trunk: Trunk, writer: CacheWriter, paths: list[Path], device: torch.device,
         batch_size: int, workers: int, amp: bool) -> None:
    all_blocks = np.array_split(np.arange(len(paths)), range(batch_size, len(paths), batch_size))
    missing = set(writer.missing.tolist())
    blocks = [b for b in all_blocks if missing.intersection(b.tolist())]
    loader = DataLoader(_Blocks(paths, blocks, trunk.spec.input_size, trunk.spec.interpolation),
                        batch_size=None, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    trunk.to(device, memory_format=torch.channels_last)
    with torch.inference_mode(), tqdm(total=sum(len(b) for b in blocks), unit="img",
                                      desc="extract", dynamic_ncols=True) as bar:
        for rows, images, error in loader:
            if error:
                raise DataError(error)
            images = images.to(device, non_blocking=True).contiguous(
                memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16,
                                enabled=amp and device.type == "cuda"):
                features = trunk(images)  # (B, C, h, w) or (B, D)
            # the DataLoader hands the row indices back as a tensor; the cache takes numpy
            writer.write(np.asarray(rows), features.to(torch.float16).cpu().numpy())
            bar.update(len(rows))


def list_backbones(context: click.Context, _parameter, value: bool) -> None:
    """--list-backbones: print the curated table and exit."""
    if not value or context.resilient_parsing:
        return
    rows = [("backbone", "default cut (H x W)", "gives", "img/s", "weights from")]
    for c in CURATED:
        gives = ("map " if len(c.shape) == 3 else "vector ") + " x ".join(map(str, c.shape))
        if c.global_shape:
            gives += f"; global: vector {c.global_shape[0]}"
        source = ("Hugging Face hub (HF_HOME)" if c.backbone.startswith(TIMM)
                  else "torchvision download (TORCH_HOME)")
        rows.append((c.backbone, f"{c.layer} ({c.input_size[0]} x {c.input_size[1]})", gives,
                     f"{c.images_per_s:.1f}", source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                   .rstrip())
    click.echo("img/s: the whole extract pipeline on a busy 2-core CPU (load 5-8; about 4x "
               "that when quiet), random init, batch 32 (benchmarks/extract_speed.py; README). "
               "Any torchvision classification model or timm:<model>[.<tag>] works too.")
    context.exit()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--list-backbones", is_flag=True, is_eager=True, expose_value=False,
              callback=list_backbones, help="Print a curated list of backbones and exit.")
@click.option("--backbone", required=True,
              help="Frozen trunk to run: vgg16, resnet50, any torchvision classification model "
                   "(densenet201, convnext_tiny, ...) or timm:<model>[.<pretrained tag>] (e.g. "
                   "timm:vit_base_patch16_clip_quickgelu_224.openai); see --list-backbones.")
@click.option("--data", type=UserPath(), default=Path("data"),
              help="Dataset folder in the Kaggle layout (train.csv, test_candidates.csv, ...).")
@click.option("--out", type=UserPath(), default=None,
              help="Cache file [default: cache/<backbone>-<layer>-<weights>[-HxW].h5].")
@click.option("--layer", default=None,
              help="Where to cut the trunk [default: features for vgg16, layer4 for resnet50, "
                   "the last spatial map before global pooling for other torchvision models, "
                   "the last feature stage for timm]. torchvision: a graph node (e.g. "
                   "features.29 is vgg16's conv5_3 before its last max-pool); timm: a stage "
                   "(blocks.11, stages.3) or global (the image embedding, a vector).")
@click.option("--weights", default="pretrained",
              help="pretrained (torchvision's ImageNet weights from the torch hub cache, or the "
                   "timm tag's from the Hugging Face hub; imagenet is the same), none (random "
                   "init, fixed seed), or the path of a state dict or .safetensors file.")
@click.option("--input-size", type=(click.IntRange(min=1), click.IntRange(min=1)),
              default=None,
              help="Image size H W fed to the trunk (each image is resized to it whole, never "
                   "cropped) [default: the model's own; 245 200 for vgg16 and resnet50].")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto")
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader processes that decode images [default: 0 on CPU, up to 8 on "
                   "CUDA].")
@click.option("--amp/--no-amp", default=True, help="float16 autocast on CUDA.")
@click.option("--overwrite", is_flag=True, help="Rebuild the cache even if one exists.")
def cli(**options) -> None:
    """Run a frozen trunk over every image and store its feature maps (or vectors) in an HDF5
    cache. Rerun the same command to resume an interrupted extraction."""
    with user_errors(interrupted="interrupted; rerun the same command to resume"):
        path = main(**options)
    click.echo(path)
