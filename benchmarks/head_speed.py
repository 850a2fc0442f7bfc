"""Seconds per epoch of head training on cached features against training through the trunk.

Cached: `head.train.train_epoch` with the default TrainConfig over 1,600 pairs, on a VGG16 cache
(512 x 7 x 6) and a ResNet50 cache (2048 x 8 x 7): the real cache where one is found (by
default cache/<backbone>-<layer>-none.h5), else random float16 feature maps of those shapes.
End to end: the same head trained through the frozen trunk, both images of each pair through
`Trunk` every step (random pre-decoded images, channels_last, no_grad; then the head's forward,
loss, backward and AdamW step exactly as train_epoch does); a few steps are timed and
extrapolated to an epoch. The default head with a features layer, and the head the sweep found
(compare_configs.SWEEP_HEAD), are timed cached in the same rounds. All alternate
round by round; medians are reported.
Targets on the 2-core CPU: cached <= 0.5 s/epoch (VGG16), <= 2 s/epoch (ResNet50), and
end-to-end / cached >= 1000.

`--stream-cache PATH` (repeatable) times instead, on that real cache, the epoch streamed from
the file (head.stream: what head.train does beyond --memory-budget) against the epoch held in
memory, in the same rounds: with the file in the page cache (read whole, untimed, before the
epoch) and out of it (its pages evicted with posix_fadvise DONTNEED, which needs no root, before
the epoch), and cold with the read-ahead patched out (what the background thread buys).
Target: streamed warm / in memory <= 1.5.

    python benchmarks/head_speed.py [--data DIR] [--quick] [--profile] [--what-if]
    python benchmarks/head_speed.py --stream-cache CACHE [--stream-cache CACHE ...]
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from pathlib import Path

import click
import common
import numpy as np
import torch
import torch.nn.functional as F
from compare_configs import SWEEP_HEAD

import head.train as head_train
from extract.backbones import PINNED, Trunk, TrunkSpec
from extract.cache import read_info
from head.config import TrainConfig, head_config_for
from head.folds import Fold, load_pairs, make_fold
from head.loss import pair_loss
from head.model import Head, SpatialAttention
from head.train import train_epoch
from tll import UserError
from tll.data import DEFAULT_INPUT_SIZE

PAIRS = 1600  # the real train.csv
SHAPES = {"vgg16": (512, 7, 6), "resnet50": (2048, 8, 7)}  # at 245 x 200
TARGET_SECONDS = {"vgg16": 0.5, "resnet50": 2.0}
TARGET_RATIO = 1000.0
TRUNK_CHUNK = 32  # images per trunk forward in the end-to-end step (bounds its memory)
TARGET_STREAMED = 1.5  # streamed (page cache warm) / in memory


def split_from(features: torch.Tensor, left: np.ndarray, right: np.ndarray) -> Fold:
    """A Fold of these training pairs (rows of `features` (N, V, C, h, w)), no validation."""
    return Fold(
        features=[features], train_left=torch.as_tensor(left, dtype=torch.long),
        train_right=torch.as_tensor(right, dtype=torch.long),
        val_images=torch.zeros(0, dtype=torch.long), val_queries=np.zeros(0, dtype=np.int64),
        val_candidates=np.zeros((0, 20), dtype=np.int64), val_truth=np.zeros(0, dtype=np.int64))


def real_split(cache: Path, data: Path | None) -> tuple[Fold, str] | None:
    """The first PAIRS train pairs of a real cache, as head.train loads them, with no
    validation; None if the cache is absent or does not fit."""
    if not cache.is_file():
        return None
    try:
        pairs = load_pairs([cache], [read_info(cache)], data, torch.device("cpu"))
    except UserError:  # built from other images
        return None
    if len(pairs.dataset.train_pairs) < PAIRS:
        return None
    return make_fold(pairs, pairs.dataset.train_pairs[:PAIRS], []), f"real {cache}"


def synthetic_split(shape: tuple[int, int, int]) -> tuple[Fold, str]:
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(2 * PAIRS, 1, *shape, generator=generator).to(torch.float16)  # ReLU-like
    return split_from(features, np.arange(PAIRS), np.arange(PAIRS, 2 * PAIRS)), "random"


def _plain_head(self: Head, *features: torch.Tensor) -> torch.Tensor:
    """Head.forward as it was before issue 21: float32 maps in torch's default (NCHW) layout."""
    flat = torch.cat([branch(f.float()) for branch, f in zip(self.branches, features, strict=True)],
                     dim=1)  # (B, sum of branch widths)
    return F.normalize(self.fc(self.dropout(flat)), dim=1)  # (B, D)


def _plain_attention(self: SpatialAttention, x: torch.Tensor) -> torch.Tensor:
    """SpatialAttention as it was before issue 21: its 1x1 convolutions as convolutions."""
    return x * torch.sigmoid(self.score(x))  # weights (B, 1, h, w)


@contextlib.contextmanager
def what_if(plain: bool = False, threads: int | None = None):
    """For --what-if only: run the head as it was before issue 21 and/or on other threads."""
    saved = Head.forward, SpatialAttention.forward, torch.get_num_threads()
    if plain:
        Head.forward, SpatialAttention.forward = _plain_head, _plain_attention
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        Head.forward, SpatialAttention.forward = saved[:2]
        torch.set_num_threads(saved[2])


WHAT_IFS = {"what-if: NCHW, attention as convolutions": {"plain": True},
            "what-if: 1 thread": {"threads": 1},
            "what-if: both": {"plain": True, "threads": 1}}


# other heads timed beside the default one (head.train options)
LEVERS = {"--no-amp (float32 training steps)": {"amp": False},
          "+ features layer 256": {"features_dim": 256},
          "the sweep's head (InfoNCE, features layer 256, dropout 0.4)": SWEEP_HEAD}


def cached_measure(split: Fold, shape: tuple[int, int, int], config: TrainConfig,
                   variant: dict | None = None):
    """A measure: one epoch of train_epoch (the same head and optimizer, epoch after epoch),
    as head.train does it, or under a `what_if` variant."""
    torch.manual_seed(config.seed)
    head = Head(head_config_for([shape], config))
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, fused=True)  # as head.train
    generator = torch.Generator().manual_seed(config.seed)
    epochs = itertools.count(1)

    def measure() -> float:
        with what_if(**(variant or {})), common.Timer() as timer:
            train_epoch(head, optimizer, split, config, next(epochs), generator, progress=False)
        return timer.seconds

    return measure


def end_to_end_measure(trunk: Trunk, shape: tuple[int, int, int], config: TrainConfig,
                       pairs: int):
    """A measure: one training step of `pairs` pairs through trunk + head, extrapolated to
    seconds per epoch of PAIRS pairs."""
    torch.manual_seed(config.seed)
    head = Head(head_config_for([shape], config))
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, fused=True)  # as head.train
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2 * pairs, 3, *DEFAULT_INPUT_SIZE, generator=generator).contiguous(
        memory_format=torch.channels_last)  # lefts then rights, (2P, 3, H, W)
    head.train()

    def step() -> None:
        with torch.no_grad():  # the trunk is frozen; its output feeds the head's autograd
            features = torch.cat([trunk(chunk) for chunk in images.split(TRUNK_CHUNK)])
        anchors = head(features[:pairs])  # (P, D)
        positives = head(features[pairs:])  # (P, D)
        loss = pair_loss(anchors, positives, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    def measure() -> float:
        with common.Timer() as timer:
            step()
        return timer.seconds * PAIRS / pairs

    return measure


def profile_epoch(measure, backbone: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = measure()
    click.echo(f"\nprofile of one cached {backbone} epoch ({seconds:.2f} s), by self CPU time:")
    click.echo(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def bench(backbone: str, cache: Path | None, data: Path | None, rounds: int, e2e_pairs: int,
          profile: bool, what_ifs: bool) -> list[list]:
    shape = SHAPES[backbone]
    loaded = real_split(cache, data) if cache else None
    split, label = loaded or synthetic_split(shape)
    if tuple(split.features[0].shape[2:]) != shape:
        raise click.ClickException(f"{cache} holds {tuple(split.features[0].shape[2:])} maps, "
                                   f"not {backbone}'s {shape} at 245 x 200")
    config = TrainConfig(caches=(str(cache or "synthetic"),), name="bench")  # the defaults
    steps = math.ceil(PAIRS / config.batch_size)
    click.echo(f"{backbone}: {label} features {shape}, {len(split.train_left)} pairs, batch "
               f"{config.batch_size} ({steps} steps/epoch); end to end timed on {e2e_pairs} "
               f"pairs/step; {rounds} rounds")
    cached = cached_measure(split, shape, config)
    trunk = Trunk(TrunkSpec.resolve(backbone, None, "none")).to(memory_format=torch.channels_last)
    end_to_end = end_to_end_measure(trunk, shape, config, e2e_pairs)
    with torch.no_grad():  # warm-up: allocator, oneDNN kernels for the chunk shape
        trunk(torch.rand(min(TRUNK_CHUNK, 2 * e2e_pairs), 3, *DEFAULT_INPUT_SIZE).contiguous(
            memory_format=torch.channels_last))
    measures = {"cached": cached, "end-to-end": end_to_end}
    # the levers' heads, in the same rounds: what a features layer or the sweep's head costs
    measures |= {name: cached_measure(split, shape, dataclasses.replace(config, **options))
                 for name, options in LEVERS.items()}
    if what_ifs:
        measures |= {name: cached_measure(split, shape, config, variant)
                     for name, variant in WHAT_IFS.items()}
    for name, measure in measures.items():
        if name != "end-to-end":
            measure()  # warm-up epoch
    results = common.interleave(measures, rounds, log=click.echo)
    ratios = [e / c for c, e in zip(results["cached"], results["end-to-end"], strict=True)]
    seconds, ratio = common.median(results["cached"]), common.median(ratios)
    if profile:
        profile_epoch(cached, backbone)
    target = TARGET_SECONDS[backbone]
    rows = [[backbone, label.split()[0], seconds, common.spread(results["cached"]),
             f"<= {target:g}", common.verdict(seconds, target, at_least=False),
             common.median(results["end-to-end"]), common.spread(results["end-to-end"]), ratio,
             common.verdict(ratio, TARGET_RATIO)]]
    for name in [*LEVERS, *(WHAT_IFS if what_ifs else ())]:
        seconds = common.median(results[name])
        rows.append([f"  {name}", "", seconds, common.spread(results[name]), f"<= {target:g}",
                     common.verdict(seconds, target, at_least=False), "", "", "", ""])
    return rows


def read_whole(path: Path) -> float:
    """Read the file through the page cache; returns the seconds it took."""
    with common.Timer() as timer, open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
    return timer.seconds


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (no root needed: posix_fadvise DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def stream_bench(cache: Path, data: Path | None, rounds: int) -> list[list]:
    """Epochs of the first PAIRS pairs streamed from `cache` (warm, cold) against in memory."""
    info = read_info(cache)
    config = TrainConfig(caches=(str(cache),), name="bench")  # the defaults
    splits = {}
    for mode, budget in (("in memory", 1 << 60), ("streamed", 0)):
        pairs = load_pairs([cache], [info], data, torch.device("cpu"), budget)
        splits[mode] = make_fold(pairs, pairs.dataset.train_pairs[:PAIRS], [])
    size = cache.stat().st_size
    evict(cache)
    cold_read = read_whole(cache)
    warm_read = read_whole(cache)
    click.echo(f"{cache}: {info.backbone} {info.layer} {info.feature_shape} x "
               f"{len(info.views)} views, {size / 2 ** 30:.2f} GiB; reading it whole took "
               f"{cold_read:.2f} s evicted ({size / cold_read / 2 ** 20:.0f} MiB/s), "
               f"{warm_read:.2f} s in the page cache; {len(splits['streamed'].train_left)} "
               f"pairs, batch {config.batch_size}; {rounds} rounds")
    memory = cached_measure(splits["in memory"], info.feature_shape, config)
    streamed = cached_measure(splits["streamed"], info.feature_shape, config)
    cold = cached_measure(splits["streamed"], info.feature_shape, config)
    unannounced = cached_measure(splits["streamed"], info.feature_shape, config)

    def warm_epoch() -> float:
        read_whole(cache)
        return streamed()

    def cold_epoch() -> float:
        evict(cache)
        return cold()

    def no_read_ahead() -> float:
        """What the background thread buys from disk: every batch read when the loop asks."""
        evict(cache)
        announce, head_train.read_ahead = head_train.read_ahead, lambda *_: None
        try:
            return unannounced()
        finally:
            head_train.read_ahead = announce

    measures = {"in memory": memory, "streamed, warm": warm_epoch, "streamed, cold": cold_epoch,
                "streamed, cold, no read-ahead": no_read_ahead}
    for measure in measures.values():
        measure()  # warm-up epoch
    results = common.interleave(measures, rounds, log=click.echo)
    warm_ratios = [s / m for m, s in zip(results["in memory"], results["streamed, warm"],
                                         strict=True)]
    cold_ratios = [s / m for m, s in zip(results["in memory"], results["streamed, cold"],
                                         strict=True)]
    plain_ratios = [s / m for m, s in zip(results["in memory"],
                                          results["streamed, cold, no read-ahead"], strict=True)]
    ratio = common.median(warm_ratios)
    return [[f"{info.backbone} {info.layer}", f"{size / 2 ** 30:.2f}",
             common.median(results["in memory"]), common.spread(results["in memory"]),
             common.median(results["streamed, warm"]), ratio,
             common.verdict(ratio, TARGET_STREAMED, at_least=False),
             common.median(results["streamed, cold"]), common.median(cold_ratios),
             common.median(plain_ratios)]]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", type=click.Path(path_type=Path, file_okay=False, exists=True),
              default=None, help="Dataset a real cache was built from [default: the one its "
              "metadata names].")
@click.option("--quick", is_flag=True, help="Fewer rounds, a smaller end-to-end step.")
@click.option("--backbone", "backbones", multiple=True, type=click.Choice(sorted(SHAPES)),
              default=("vgg16", "resnet50"))
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False),
              default=common.REPO_ROOT / "cache",
              help="Where to look for real caches <backbone>-<layer>-none.h5 (read only).")
@click.option("--synthetic", is_flag=True, help="Random features even where a real cache is.")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="Alternations of the two measurements [default: 3, --quick 2].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads [default: torch's own choice].")
@click.option("--profile", is_flag=True,
              help="Also profile one cached epoch per backbone (torch.profiler, top ops).")
@click.option("--what-if", "what_ifs", is_flag=True,
              help="Also race cached epochs with the head as it was before issue 21 (NCHW maps, "
              "the attention as convolutions; patched in this process only) and/or on 1 "
              "thread.")
@click.option("--stream-cache", "stream_caches", multiple=True,
              type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Instead: time epochs streamed from this real cache (page cache warm and "
              "cold) against epochs in memory (target: warm / in memory <= 1.5).")
def cli(data: Path | None, quick: bool, backbones: tuple[str, ...], cache_dir: Path,
        synthetic: bool, rounds: int | None, threads: int | None, profile: bool,
        what_ifs: bool, stream_caches: tuple[Path, ...]) -> None:
    """Head training s/epoch on cached features vs through the trunk (targets: <= 0.5 s VGG16,
    <= 2 s ResNet50, ratio >= 1000), or streamed from a cache vs in memory (<= 1.5)."""
    common.set_threads(threads)
    rounds = rounds or (2 if quick else 3)
    e2e_pairs = 16 if quick else TrainConfig.batch_size
    click.echo(common.environment())
    if stream_caches:
        rows = [row for cache in stream_caches for row in stream_bench(cache, data, rounds)]
        click.echo()
        click.echo(common.table(
            ["cache", "GiB", "in memory s/epoch", "(range)", "streamed warm s/epoch", "ratio",
             f"target <= {TARGET_STREAMED:g}", "streamed cold s/epoch", "ratio",
             "cold, no read-ahead: ratio"], rows))
        click.echo(f"epoch = {PAIRS} pairs, default TrainConfig; ratio: median over rounds of "
                   "streamed / in memory, timed in the same rounds; warm: the file read whole "
                   "before the epoch, cold: its pages evicted before the epoch; no read-ahead: "
                   "cold, each batch read when asked for (head.train.read_ahead patched out)")
        return
    rows = []
    for backbone in backbones:
        cache = None if synthetic else \
            cache_dir / f"{backbone}-{PINNED[backbone].layer}-none.h5"
        rows += bench(backbone, cache, data, rounds, e2e_pairs, profile, what_ifs)
    click.echo()
    click.echo(common.table(
        ["backbone", "features", "cached s/epoch", "(range)", "target", "", "end-to-end s/epoch",
         "(range)", "ratio", f"target >= {TARGET_RATIO:g}"], rows))
    click.echo(f"epoch = {PAIRS} pairs, default TrainConfig; ratio: median over rounds of "
               "end-to-end / cached")
    if any(row[5] != "met" for row in rows) and not profile:
        click.echo("a cached epoch missed its target: rerun with --profile to see where the "
                   "time goes")


if __name__ == "__main__":
    cli()
