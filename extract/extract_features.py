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
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import timm
import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from extract.backbones import (
    CURATED,
    SPEEDS_MEASURED,
    TIMM,
    Trunk,
    TrunkSpec,
    resolve_backbone,
)
from extract.cache import CacheInfo, CacheWriter, ShardWriter, foreign_cache
from extract.torchrun import Ranks, agree, process_group, same_everywhere, share, together
from tll import UserError, UserPath, logger, user_errors
from tll.data import DataError, Dataset, load_image, read_dataset
from tll.device import compute_precision, resolve_device
from tll.files import check_output, exclusive

DEFAULT_CACHE_DIR = Path("cache")


def default_cache_path(spec: TrunkSpec, hflip: bool = False) -> Path:
    """cache/<backbone>-<layer>-<weights>[-HxW][-hflip].h5, the size given unless it is the
    backbone's own (timm:x.y is written timm-x.y)."""
    weights = (spec.weights if spec.weights in ("imagenet", "pretrained", "none")
               else Path(spec.weights).stem)
    height, width = spec.input_size
    size = "" if spec.input_size == resolve_backbone(spec.backbone).input_size \
        else f"-{height}x{width}"
    backbone = spec.backbone.replace(TIMM, TIMM[:-1] + "-")
    views = "-hflip" if hflip else ""
    return DEFAULT_CACHE_DIR / f"{backbone}-{spec.layer}-{weights}{size}{views}.h5"


def views_of(hflip: bool) -> tuple[str, ...]:
    return ("identity", "hflip") if hflip else ("identity",)


def default_workers(device: torch.device, processes_here: int = 1) -> int:
    """DataLoader workers: on a CPU none (the trunk needs every core and decoding is ~1% of its
    time: decode inline); on CUDA up to 8, the cores this process may run on (a container's or
    a batch job's share, not the whole machine's) shared among its processes."""
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, max(1, (cores or 1) // processes_here))


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


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """What `main` was asked, checked and put in one place: the layers and their caches in the
    same order (an out None: that layer's default name), the device resolved (under torchrun
    each rank runs on its own GPU of that type)."""

    backbone: str
    data: str | Path
    outs: tuple[str | Path | None, ...]
    layers: tuple[str | None, ...]
    weights: str
    input_size: tuple[int, int] | None  # None: the backbone's own
    device: torch.device
    batch_size: int
    workers: int | None  # None: default_workers
    amp: bool
    hflip: bool
    overwrite: bool


def main(
    backbone: str,
    data: str | Path,
    out: str | Path | list[str | Path] | None = None,
    layer: str | list[str] | None = None,
    weights: str = "pretrained",
    input_size: tuple[int, int] | None = None,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    amp: bool = True,
    hflip: bool = True,
    overwrite: bool = False,
) -> Path | list[Path]:
    """Extract (or finish extracting, or update) the cache and return its path; with `hflip`
    also every image's features flipped left to right (a two-view cache). `layer` and
    `input_size` None: the backbone's own. Several layers (a list): one pass of the trunk
    writes one cache per layer, at the paths `out` lists (default names where it is None), and
    their paths are returned. Under torchrun every process calls this, and each computes its
    share of the blocks."""
    layers = [layer] if isinstance(layer, str) or layer is None else list(layer)
    outs = [out] if isinstance(out, str | Path) or out is None else list(out)
    if len(layers) > 1 and outs != [None] and len(outs) != len(layers):
        raise UserError(f"{len(layers)} layers and {len(outs)} --out: give one --out per "
                        "--layer, in the same order, or none (default names)")
    if len(set(layers)) < len(layers):
        raise UserError(f"a layer is given twice: {', '.join(map(str, layers))}")
    outs = outs if len(outs) == len(layers) else [None] * len(layers)
    torch_device = resolve_device(device)
    ranks = Ranks.from_environment()
    config = ExtractConfig(
        backbone=backbone, data=data, outs=tuple(outs), layers=tuple(layers), weights=weights,
        input_size=tuple(input_size) if input_size else None, device=torch_device,
        batch_size=batch_size, workers=workers, amp=amp, hflip=hflip, overwrite=overwrite)
    paths = _extract(config, ranks)
    return paths[0] if len(paths) == 1 else paths


def _extract(config: ExtractConfig, ranks: Ranks | None) -> list[Path]:
    """The extraction, in one process (`ranks` None) or on each of torchrun's: there every
    stretch that can fail on some ranks only ends `together`, rank 0 alone opens and finishes
    the caches, and each rank computes its share of the blocks into shards of its own. The
    collectives come in the same order on every rank."""
    master = ranks is None or ranks.master
    with _group(ranks, config.device) as device, contextlib.ExitStack() as held:
        with _together(ranks):  # every rank reads its input and resolves what it would write
            dataset, specs, outs, trunk = _prepare(config)
            infos = _cache_infos(dataset, specs, trunk, config.hflip,
                                 compute_precision(device, config.amp))
        if ranks is not None:
            same_everywhere(_plan(infos, outs))
        # everything so far only read; from here on the caches are written, by one process at
        # a time (rank 0; the other ranks write shards)
        todo, writers = None, []
        with _together(ranks):
            if master:
                keys = dataset.keys()
                _log_start(infos, len(keys), outs)
                # they take in the shards an interrupted run left, before any rank starts its own
                writers, missing = _open_writers(held, outs, infos, dataset, config.overwrite)
                todo = blocks_to_do(len(keys), config.batch_size, missing)
        if ranks is not None:
            todo = share(todo)
        if todo:
            if ranks is not None and ranks.master:
                logger.info("%d blocks of up to %d images dealt out to %d process%s (%s), "
                            "each writing its own shards beside %s", len(todo),
                            config.batch_size, ranks.world, "es" if ranks.world > 1 else "",
                            dist.get_backend(), " and ".join(map(str, outs)))
            _run(ranks, trunk, writers, outs, dataset, infos, todo, device, config)
        elif master:
            logger.info("%s already complete", " and ".join(map(str, outs)))
        with _together(ranks):  # every shard is closed: rank 0 copies them in and finishes
            for writer in writers:
                if ranks is not None:
                    writer.take_shards()
                writer.finish()
    return outs


def _group(ranks: Ranks | None,
           device: torch.device) -> contextlib.AbstractContextManager[torch.device]:
    """torchrun's process group for the `with` block, which gets this rank's device; in one
    process nothing, and `device`."""
    return contextlib.nullcontext(device) if ranks is None else process_group(ranks, device)


def _together(ranks: Ranks | None) -> contextlib.AbstractContextManager[None]:
    """`together` under torchrun; in one process an error is raised as it is."""
    return contextlib.nullcontext() if ranks is None else together()


def _prepare(config: ExtractConfig) -> tuple[Dataset, list[TrunkSpec], list[Path], Trunk]:
    """Read and check what the extraction reads, before anything is written: the dataset, the
    trunk (cut at every layer), and where each layer's cache goes."""
    dataset = read_dataset(config.data)
    first = TrunkSpec.resolve(config.backbone, config.layers[0], config.weights,
                              config.input_size)
    specs = [dataclasses.replace(first, layer=layer) if layer else first
             for layer in config.layers]
    outs = [Path(out) if out else default_cache_path(spec, config.hflip)
            for out, spec in zip(config.outs, specs, strict=True)]
    if len(set(outs)) < len(outs):
        raise UserError(f"two layers would write one cache: {', '.join(map(str, outs))}")
    for out in outs:
        check_output(out, "cache", inputs=dataset.files(), foreign=foreign_cache)
    return dataset, specs, outs, Trunk(first, tuple(spec.layer for spec in specs))


def _open_writers(held: contextlib.ExitStack, outs: list[Path], infos: list[CacheInfo],
                  dataset: Dataset, overwrite: bool) -> tuple[list[CacheWriter], np.ndarray]:
    """Each cache locked and opened for writing (closed and unlocked with `held`), and the rows
    (ascending) that any of them still misses."""
    writers = []
    for out, info in zip(outs, infos, strict=True):
        held.enter_context(exclusive(out))
        writers.append(held.enter_context(contextlib.closing(
            CacheWriter(out, dataset.keys(), dataset.digests(), info, overwrite=overwrite))))
    return writers, np.unique(np.concatenate([writer.missing for writer in writers]))


def _cache_infos(dataset: Dataset, specs: list[TrunkSpec], trunk: Trunk, hflip: bool,
                 precision: str) -> list[CacheInfo]:
    return [CacheInfo(
        **dataclasses.asdict(spec), feature_shape=shape,
        dataset=str(dataset.root.resolve()), dataset_fingerprint=dataset.fingerprint(),
        torch_version=str(torch.__version__), torchvision_version=str(torchvision.__version__),
        timm_version=str(timm.__version__), views=views_of(hflip), precision=precision,
    ) for spec, shape in zip(specs, trunk.output_shapes(), strict=True)]


def _log_start(infos: list[CacheInfo], images: int, outs: list[Path]) -> None:
    first = infos[0]
    logger.info("extract %s (weights %s, %d x %d %s, in %s) of %d images%s -> %s",
                first.backbone, first.weights_id, *first.input_size, first.interpolation,
                first.precision, images,
                " and their left-right flips" if "hflip" in first.views else "",
                "; ".join(f"{info.layer} {info.feature_shape} to {out}"
                          for info, out in zip(infos, outs, strict=True)))


def _run(ranks: Ranks | None, trunk: Trunk, writers: list[CacheWriter], outs: list[Path],
         dataset: Dataset, infos: list[CacheInfo], todo: list[np.ndarray], device: torch.device,
         config: ExtractConfig) -> None:
    """Compute the blocks of `todo` and write them. In one process: every block, to every
    cache in `writers` not yet complete (a row it already holds is computed in the same block
    again, so it is rewritten with the same values). Under torchrun: this rank's blocks (block
    b to rank b mod N), to its own shard of each cache, in step with the other ranks: after
    each block they add up their progress for rank 0's bar, and stop together if one of them
    failed."""
    rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world)
    workers = config.workers
    if workers is None:
        workers = default_workers(device, 1 if ranks is None else ranks.local_world)
    keys = dataset.keys()
    mine = _computed(trunk, [dataset.images[k] for k in keys], todo[rank::world], device,
                     workers, infos[0].precision, infos[0].views)
    with contextlib.ExitStack() as held:
        if ranks is None:
            sinks = [None if writer.is_complete else writer for writer in writers]
        else:
            digests = dataset.digests()  # hashed for the fingerprint already
            with together():
                sinks = [held.enter_context(ShardWriter(out, rank, keys, digests, info))
                         for out, info in zip(outs, infos, strict=True)]
        with tqdm(total=sum(len(b) for b in todo), unit="img", desc="extract",
                  dynamic_ncols=True, disable=rank != 0) as bar:
            for _ in range(-(-len(todo) // world)):  # a rank past its last block joins in
                error, done = None, 0
                try:
                    block = next(mine, None)
                    if block is not None:
                        rows, per_layer = block
                        for sink, features in zip(sinks, per_layer, strict=True):
                            if sink is not None:
                                sink.write(rows, features)
                        done = len(rows)
                except Exception as caught:
                    if ranks is None:  # alone: stop here
                        raise
                    error = caught
                bar.update(done if ranks is None else agree(error, done))
        if ranks is not None:
            with together():  # every shard closed, its lock released, before rank 0 takes it in
                held.close()


def _computed(trunk: Trunk, paths: list[Path], blocks: list[np.ndarray], device: torch.device,
              workers: int, precision: str,
              views: tuple[str, ...]) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """(rows (B,), for each of the trunk's layers features (B, V, C, h, w) or (B, V, D)
    float16, one per view) of each block in turn, the trunk run once on `device` per view in
    `precision` (autocast unless float32); the next blocks are decoded in `workers` processes
    meanwhile (or inline if 0). On CUDA a block's features come back to the host while the
    next block runs, so that its write and the next decode overlap the trunk (a block is
    yielded once the next one is under way)."""
    loader = DataLoader(_Blocks(paths, blocks, trunk.spec.input_size, trunk.spec.interpolation),
                        batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    trunk.to(device, memory_format=torch.channels_last)
    pending = None  # the block whose features are on their way to the host
    for rows, images, error in loader:
        if error:
            if pending is not None:  # computed: written before the error stops the run
                yield _arrived(*pending)
            raise DataError(error)
        images = images.to(device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=getattr(torch, precision),
                                                    enabled=precision != "float32"):
            by_view = [trunk.features(images.flip(-1) if view == "hflip" else images)
                       for view in views]  # V x (one per layer)
            per_layer = [torch.stack(layer, dim=1).to(torch.float16)
                         for layer in zip(*by_view, strict=True)]  # (B, V, C, h, w) each
        if pending is not None:
            yield _arrived(*pending)
        # the DataLoader hands the row indices back as a tensor; the caches take numpy
        pending = (np.asarray(rows), *_to_host(per_layer))
        if pending[2] is None:  # on a CPU: nothing in flight, nothing to overlap
            yield _arrived(*pending)
            pending = None
    if pending is not None:
        yield _arrived(*pending)


def _to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Start copying `tensors` to the host: from CUDA into pinned memory without waiting, with
    the event that marks the copies' end (on the stream, after the kernels that compute them);
    on a CPU they are there already (no event)."""
    if tensors[0].device.type != "cuda":
        return tensors, None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for target, tensor in zip(host, tensors, strict=True):
        target.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def _arrived(rows: np.ndarray, host: list[torch.Tensor],
             copied: torch.cuda.Event | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """A block `_to_host` started, once its copies are done."""
    if copied is not None:
        copied.synchronize()
    return rows, [tensor.numpy() for tensor in host]


def _plan(infos: list[CacheInfo], outs: list[Path]) -> dict[str, tuple[str, object]]:
    """What must be the same on every rank, for `same_everywhere`: each entry as the user gave
    it and as resolved (weights by their content, the dataset by its images', paths real); the
    rest of a cache's description follows from these."""
    first = infos[0]
    return {
        "was given --backbone": (first.backbone, first.backbone),
        "was given --weights": (first.weights, first.weights_id),
        "was given --layer": (", ".join(i.layer for i in infos), [i.layer for i in infos]),
        "was given --input-size": ("{} x {}".format(*first.input_size), first.input_size),
        "was given --data": (f"{first.dataset} (images {first.dataset_fingerprint[:12]})",
                             (first.dataset, first.dataset_fingerprint)),
        "was given --out": (", ".join(map(str, outs)), [out.resolve() for out in outs]),
        "was given --hflip": ("yes" if "hflip" in first.views else "no", first.views),
        # a mixed cluster (CPUs with and without native bfloat16) must say --no-amp
        "computes (by --amp/--no-amp and its hardware) in": (first.precision, first.precision),
        "runs torch, torchvision, timm": (
            f"{first.torch_version}, {first.torchvision_version}, {first.timm_version}",
            (first.torch_version, first.torchvision_version, first.timm_version)),
    }


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
    click.echo("img/s: the whole extract pipeline in float32 (--no-amp), random init, batch "
               f"32, measured by benchmarks/extract_speed.py {SPEEDS_MEASURED}; run it for "
               "this machine's figures (README); it also times the default --amp, which on a "
               "CPU with native bfloat16 ran vgg16 and resnet50 1.86x and 1.84x faster "
               "(2026-12-02). Any torchvision classification model or timm:<model>[.<tag>] "
               "works too.")
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
@click.option("--out", type=UserPath(), default=None, multiple=True,
              help="Cache file, one per --layer in its order [default: "
                   "cache/<backbone>-<layer>-<weights>[-HxW][-hflip].h5].")
@click.option("--layer", default=None, multiple=True,
              help="Where to cut the trunk; repeat it to write one cache per layer from one "
                   "pass of the trunk [default: features for vgg16, layer4 for resnet50, "
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
                   "cropped; whole patches for a ViT) [default: the model's own; 245 200 for "
                   "vgg16 and resnet50].")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto")
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader processes that decode images [default: 0 on CPU, up to 8 on "
                   "CUDA].")
@click.option("--amp/--no-amp", default=True,
              help="Run the trunk in float16 autocast on CUDA, or bfloat16 autocast on a CPU "
                   "that computes it natively (AVX512-BF16 or AMX, Arm BF16: about 1.9x the "
                   "speed of float32), else float32. A cache records its precision: a resume "
                   "or rerun in another is refused (--overwrite rebuilds it).")
@click.option("--hflip/--no-hflip", default=True,
              help="Also store every image's features flipped left to right (a two-view cache: "
                   "head.train draws a view per step and averages both at validation; the "
                   "largest lever measured, for twice the extraction time and disk).")
@click.option("--overwrite", is_flag=True, help="Rebuild the cache even if one exists.")
def cli(**options) -> None:
    """Run a frozen trunk over every image and store its feature maps (or vectors) in an HDF5
    cache. Rerun the same command to resume an interrupted extraction."""
    options["layer"] = list(options["layer"]) or None
    options["out"] = list(options["out"]) or None
    with user_errors(interrupted="interrupted; rerun the same command to resume",
                     out_of_memory="lower --batch-size and rerun (it resumes where it "
                     "stopped), or lower --input-size (a new cache)"):
        paths = main(**options)
    for path in paths if isinstance(paths, list) else [paths]:
        click.echo(path)
