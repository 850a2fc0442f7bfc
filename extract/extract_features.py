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
import torch
import torchvision
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from extract import UserPath, logger, user_errors
from extract.backbones import BACKBONES, Trunk, TrunkSpec, resolve_device
from extract.cache import CacheInfo, CacheWriter
from extract.data import DEFAULT_INPUT_SIZE, DataError, load_image, read_dataset
from extract.files import check_output, exclusive

DEFAULT_CACHE_DIR = Path("cache")


def default_cache_path(spec: TrunkSpec, input_size: tuple[int, int]) -> Path:
    weights = spec.weights if spec.weights in ("imagenet", "none") else Path(spec.weights).stem
    size = "" if tuple(input_size) == DEFAULT_INPUT_SIZE else f"-{input_size[0]}x{input_size[1]}"
    return DEFAULT_CACHE_DIR / f"{spec.backbone}-{spec.layer}-{weights}{size}.h5"


class _Blocks(TorchDataset):
    """Item b = rows [b * batch, (b + 1) * batch) of the cache, decoded: (rows, images, error)."""

    def __init__(self, paths: list[Path], blocks: list[np.ndarray], input_size: tuple[int, int]):
        self.paths, self.blocks, self.input_size = paths, blocks, input_size

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int):
        rows = self.blocks[index]
        try:
            images = np.stack([load_image(self.paths[r], self.input_size) for r in rows])
        except DataError as error:  # carried to the main process as text: one clean message
            return rows, None, str(error)
        return rows, torch.from_numpy(images), None  # (B, 3, H, W)


def main(
    backbone: str,
    data: str | Path,
    out: str | Path | None = None,
    layer: str | None = None,
    weights: str = "imagenet",
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    amp: bool = True,
    overwrite: bool = False,
) -> Path:
    """Extract (or finish extracting, or update) the cache and return its path."""
    dataset = read_dataset(data)
    spec = TrunkSpec.resolve(backbone, layer, weights)
    out = Path(out) if out else default_cache_path(spec, input_size)
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
        input_size=tuple(input_size), feature_shape=trunk.output_shape(input_size),
        dataset=str(dataset.root.resolve()), dataset_fingerprint=dataset.fingerprint(),
        torch_version=str(torch.__version__), torchvision_version=str(torchvision.__version__),
    )
    logger.info("extract %s (%s, weights %s) of %d images -> %s, feature map %s",
                spec.backbone, spec.layer, spec.weights_id, len(keys), out, info.feature_shape)
    # everything so far only read; from here on the cache is written, by one process at a time
    with exclusive(out):
        writer = CacheWriter(out, keys, dataset.digests(), info, overwrite=overwrite)
        try:
            if len(writer.missing):
                _run(trunk, writer, [dataset.images[k] for k in keys], input_size,
                     torch_device, batch_size, workers, amp)
            else:
                logger.info("%s is already complete", out)
            return writer.finish()
        finally:
            writer.close()


def _run(trunk: Trunk, writer: CacheWriter, paths: list[Path], input_size: tuple[int, int],
         device: torch.device, batch_size: int, workers: int, amp: bool) -> None:
    all_blocks = np.array_split(np.arange(len(paths)), range(batch_size, len(paths), batch_size))
    missing = set(writer.missing.tolist())
    blocks = [b for b in all_blocks if missing.intersection(b.tolist())]
    loader = DataLoader(_Blocks(paths, blocks, input_size), batch_size=None, shuffle=False,
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
                features = trunk(images)  # (B, C, h, w)
            # the DataLoader hands the row indices back as a tensor; the cache takes numpy
            writer.write(np.asarray(rows), features.to(torch.float16).cpu().numpy())
            bar.update(len(rows))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--backbone", type=click.Choice(sorted(BACKBONES)), required=True,
              help="Frozen trunk to run.")
@click.option("--data", type=UserPath(), default=Path("data"),
              help="Dataset folder in the Kaggle layout (train.csv, test_candidates.csv, ...).")
@click.option("--out", type=UserPath(), default=None,
              help="Cache file [default: cache/<backbone>-<layer>-<weights>.h5].")
@click.option("--layer", default=None,
              help="Graph node to cut at [default: features for vgg16, layer4 for resnet50; "
                   "e.g. features.29 is vgg16's conv5_3 before its last max-pool].")
@click.option("--weights", default="imagenet",
              help="imagenet (torchvision's, from the torch hub cache), none (random init, "
                   "fixed seed), or the path of a state dict.")
@click.option("--input-size", type=(click.IntRange(min=1), click.IntRange(min=1)),
              default=DEFAULT_INPUT_SIZE,
              help="Image size H W fed to the trunk.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto")
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader processes that decode images [default: 0 on CPU, up to 8 on "
                   "CUDA].")
@click.option("--amp/--no-amp", default=True, help="float16 autocast on CUDA.")
@click.option("--overwrite", is_flag=True, help="Rebuild the cache even if one exists.")
def cli(**options) -> None:
    """Run a frozen VGG16/ResNet50 trunk over every image and store its feature maps in an
    HDF5 cache. Rerun the same command to resume an interrupted extraction."""
    with user_errors(interrupted="interrupted; rerun the same command to resume"):
        path = main(**options)
    click.echo(path)
