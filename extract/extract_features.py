"""`python -m extract`: run a frozen trunk once over every image of a dataset into the cache.

Images are decoded and resized in DataLoader workers while the trunk runs (on CUDA; on a CPU the
trunk needs every core, so they are decoded inline); only this process writes the file. Batches
are fixed blocks of cache rows, so a resumed run computes every row in the same batch as an
uninterrupted one and the two caches come out identical.

Under torchrun (`torchrun --nproc-per-node N -m extract ...`, on one machine or several sharing
the cache folder) every process runs `main`: rank 0 opens the cache and takes in the shards an
interrupted run left, the blocks still to do are dealt out (block b to rank b mod N), each rank
writes its rows to its own shard, and once all are done rank 0 copies the shards into the cache
and finishes it; extract.torchrun has how an error on one rank stops them all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from extract import UserPath, logger, user_errors
from extract.backbones import BACKBONES, Trunk, TrunkSpec, resolve_device
from extract.cache import CacheInfo, CacheWriter, ShardWriter
from extract.data import DEFAULT_INPUT_SIZE, DataError, Dataset, load_image, read_dataset
from extract.files import check_output, exclusive
from extract.torchrun import Ranks, agree, process_group, share, together

DEFAULT_CACHE_DIR = Path("cache")


def default_cache_path(spec: TrunkSpec, input_size: tuple[int, int], hflip: bool = False) -> Path:
    weights = spec.weights if spec.weights in ("imagenet", "none") else Path(spec.weights).stem
    size = "" if tuple(input_size) == DEFAULT_INPUT_SIZE else f"-{input_size[0]}x{input_size[1]}"
    views = "-hflip" if hflip else ""
    return DEFAULT_CACHE_DIR / f"{spec.backbone}-{spec.layer}-{weights}{size}{views}.h5"


def views_of(hflip: bool) -> tuple[str, ...]:
    return ("identity", "hflip") if hflip else ("identity",)


def default_workers(device: torch.device, processes_here: int = 1) -> int:
    """DataLoader workers: on a CPU none (the trunk needs every core and decoding is ~1% of its
    time: decode inline); on CUDA up to 8, the machine's cores shared among its processes."""
    if device.type == "cpu":
        return 0
    return min(8, max(1, (os.cpu_count() or 1) // processes_here))


def blocks_to_do(rows: int, batch_size: int, missing: np.ndarray) -> list[np.ndarray]:
    """The fixed blocks [b * batch_size, (b + 1) * batch_size) of `rows` rows (the last one
    shorter) that hold a `missing` row, in order. Each is computed whole, so that every row is
    computed in the same batch as in an uninterrupted run."""
    is_missing = np.zeros(rows, dtype=bool)
    is_missing[missing] = True
    blocks = np.array_split(np.arange(rows), range(batch_size, rows, batch_size))
    return [block for block in blocks if is_missing[block].any()]


class _Blocks(TorchDataset):
    """Item i = the rows of blocks[i], decoded: (rows, images, error)."""

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
    hflip: bool = False,
    overwrite: bool = False,
) -> Path:
    """Extract (or finish extracting, or update) the cache and return its path; with `hflip`
    also every image's map flipped left to right (a two-view cache). Under torchrun every
    process calls this, and each computes its share of the blocks."""
    torch_device = resolve_device(device)
    ranks = Ranks.from_environment()
    if ranks is not None:
        return _main_ranked(ranks, torch_device, backbone, data, out, layer, weights,
                            tuple(input_size), batch_size, workers, amp, hflip, overwrite)
    dataset, spec, out, trunk = _prepare(backbone, data, out, layer, weights, input_size, hflip)
    workers = default_workers(torch_device) if workers is None else workers
    keys = dataset.keys()
    info = _cache_info(dataset, spec, trunk, input_size, hflip)
    _log_start(info, len(keys), out)
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


def _prepare(backbone: str, data: str | Path, out: str | Path | None, layer: str | None,
             weights: str, input_size: tuple[int, int],
             hflip: bool) -> tuple[Dataset, TrunkSpec, Path, Trunk]:
    """Read and check what the extraction reads, before anything is written: the dataset, the
    trunk, and where the cache goes."""
    dataset = read_dataset(data)
    spec = TrunkSpec.resolve(backbone, layer, weights)
    out = Path(out) if out else default_cache_path(spec, input_size, hflip)
    check_output(out, "cache", inputs=dataset.files())
    return dataset, spec, out, Trunk(spec)


def _cache_info(dataset: Dataset, spec: TrunkSpec, trunk: Trunk,
                input_size: tuple[int, int], hflip: bool) -> CacheInfo:
    return CacheInfo(
        backbone=spec.backbone, layer=spec.layer, weights=spec.weights,
        weights_id=spec.weights_id, mean=spec.mean, std=spec.std,
        input_size=tuple(input_size), feature_shape=trunk.output_shape(input_size),
        dataset=str(dataset.root.resolve()), dataset_fingerprint=dataset.fingerprint(),
        torch_version=str(torch.__version__), torchvision_version=str(torchvision.__version__),
        views=views_of(hflip),
    )


def _log_start(info: CacheInfo, images: int, out: Path) -> None:
    logger.info("extract %s (%s, weights %s) of %d images%s -> %s, feature map %s",
                info.backbone, info.layer, info.weights_id, images,
                " and their left-right flips" if "hflip" in info.views else "", out,
                info.feature_shape)


def _run(trunk: Trunk, writer: CacheWriter, paths: list[Path], input_size: tuple[int, int],
         device: torch.device, batch_size: int, workers: int, amp: bool) -> None:
    blocks = blocks_to_do(len(paths), batch_size, writer.missing)
    with tqdm(total=sum(len(b) for b in blocks), unit="img", desc="extract",
              dynamic_ncols=True) as bar:
        for rows, features in _computed(trunk, paths, blocks, input_size, device, workers, amp,
                                        writer.info.views):
            writer.write(rows, features)
            bar.update(len(rows))


def _computed(trunk: Trunk, paths: list[Path], blocks: list[np.ndarray],
              input_size: tuple[int, int], device: torch.device, workers: int,
              amp: bool, views: tuple[str, ...]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows (B,), features (B, V, C, h, w) float16: a map per view) of each block in turn, the
    trunk run on `device`; the next blocks are decoded in `workers` processes meanwhile (or
    inline if 0)."""
    loader = DataLoader(_Blocks(paths, blocks, input_size), batch_size=None, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    trunk.to(device, memory_format=torch.channels_last)
    for rows, images, error in loader:
        if error:
            raise DataError(error)
        images = images.to(device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16,
                                                    enabled=amp and device.type == "cuda"):
            features = torch.stack([trunk(images.flip(-1) if view == "hflip" else images)
                                    for view in views], dim=1)  # (B, V, C, h, w)
        # the DataLoader hands the row indices back as a tensor; the cache takes numpy
        yield np.asarray(rows), features.to(torch.float16).cpu().numpy()


def _main_ranked(ranks: Ranks, device: torch.device, backbone: str, data: str | Path,
                 out: str | Path | None, layer: str | None, weights: str,
                 input_size: tuple[int, int], batch_size: int, workers: int | None, amp: bool,
                 hflip: bool, overwrite: bool) -> Path:
    """`main` on one of torchrun's processes."""
    with process_group(ranks, device) as device, contextlib.ExitStack() as held:
        plan = None
        with together():  # every rank reads its input; rank 0 also opens the cache
            dataset, spec, out, trunk = _prepare(backbone, data, out, layer, weights, input_size,
                                                 hflip)
            if ranks.master:
                keys = dataset.keys()
                info = _cache_info(dataset, spec, trunk, input_size, hflip)
                _log_start(info, len(keys), out)
                held.enter_context(exclusive(out))
                # it takes in the shards an interrupted run left, before any rank starts its own
                writer = held.enter_context(contextlib.closing(CacheWriter(
                    out, keys, dataset.digests(), info, overwrite=overwrite)))
                plan = (info, dataset.digests(),
                        blocks_to_do(len(keys), batch_size, writer.missing))
        # only rank 0 hashes the images: the others get the digests it found
        info, digests, todo = share(plan)
        if todo:
            if ranks.master:
                logger.info("%d blocks of up to %d images dealt out to %d process%s (%s), "
                            "each writing its own shard beside %s", len(todo), batch_size,
                            ranks.world, "es" if ranks.world > 1 else "", dist.get_backend(), out)
            workers = default_workers(device, ranks.local_world) if workers is None else workers
            _run_ranked(ranks, trunk, out, dataset, digests, info, todo, input_size, device,
                        workers, amp)
        elif ranks.master:
            logger.info("%s is already complete", out)
        with together():  # every shard is closed: rank 0 copies them in and finishes the cache
            if ranks.master:
                writer.take_shards()
                writer.finish()
    return out


def _run_ranked(ranks: Ranks, trunk: Trunk, out: Path, dataset: Dataset, digests: list[str],
                info: CacheInfo, todo: list[np.ndarray], input_size: tuple[int, int],
                device: torch.device, workers: int, amp: bool) -> None:
    """This rank's blocks of `todo` (block b to rank b mod N) into its own shard, in step with
    the other ranks: after each block they add up their progress for rank 0's bar, and stop
    together if one of them failed."""
    keys = dataset.keys()
    mine = _computed(trunk, [dataset.images[k] for k in keys], todo[ranks.rank::ranks.world],
                     input_size, device, workers, amp, info.views)
    with contextlib.ExitStack() as held:
        with together():
            shard = held.enter_context(ShardWriter(out, ranks.rank, keys, digests, info))
        with tqdm(total=sum(len(b) for b in todo), unit="img", desc="extract",
                  dynamic_ncols=True, disable=not ranks.master) as bar:
            for _ in range(-(-len(todo) // ranks.world)):  # a rank past its last block joins in
                error, done = None, 0
                try:
                    block = next(mine, None)
                    if block is not None:
                        shard.write(*block)
                        done = len(block[0])
                except Exception as caught:
                    error = caught
                bar.update(agree(error, done))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--backbone", type=click.Choice(sorted(BACKBONES)), required=True,
              help="Frozen trunk to run.")
@click.option("--data", type=UserPath(), default=Path("data"),
              help="Dataset folder in the Kaggle layout (train.csv, test_candidates.csv, ...).")
@click.option("--out", type=UserPath(), default=None,
              help="Cache file [default: cache/<backbone>-<layer>-<weights>[-HxW][-hflip].h5].")
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
@click.option("--hflip", is_flag=True,
              help="Also store every image's map flipped left to right (a two-view cache: "
                   "head.train draws a view per step and averages both at validation).")
@click.option("--overwrite", is_flag=True, help="Rebuild the cache even if one exists.")
def cli(**options) -> None:
    """Run a frozen VGG16/ResNet50 trunk over every image and store its feature maps in an
    HDF5 cache. Rerun the same command to resume an interrupted extraction."""
    with user_errors(interrupted="interrupted; rerun the same command to resume"):
        path = main(**options)
    click.echo(path)
