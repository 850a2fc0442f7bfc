"""The caches' train images in memory and the folds that hold validation pairs out of them.

The train images' features (maps or vectors) are loaded once into one tensor per cache (on the
GPU when training there) and batches are gathered from it by index: a `Fold` is rows of that
tensor, never a copy. A cache whose features do not fit the memory budget is streamed from the
file instead (`head.stream.StreamedFeatures`, indexed alike; the same figures). `prepare` is
what every training of some caches starts with (head.train, head.sweep for all its trials, the
benchmarks): their metadata, checked to fuse, the pairs, checked to be of these very images,
and the folds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from extract.cache import CacheInfo, read_features, read_image_digests, read_info
from head.config import TrainConfig, head_config_for
from head.model import HeadConfig
from head.stream import (
    StreamedFeatures,
    features_bytes,
    fits_in_memory,
    log_memory_plan,
    memory_budget,
)
from tll import UserError, logger
from tll.data import N_CANDIDATES, Dataset, Query, fold_splits, read_dataset, validation_split

# what every fused cache must share: one image feeds every trunk
FUSED_FIELDS = ("dataset_fingerprint", "input_size", "interpolation")


@dataclass
class CachedPairs:
    """Every train image's feature map in memory, once per process (a sweep's trials and folds
    share it), and where each image's row is."""

    features: list[torch.Tensor | StreamedFeatures]  # per cache (N, V, C, h, w) or (N, V, D)
    #                               float16: each image's views, in memory or streamed
    row: dict[str, int]  # key -> row of each of `features`
    dataset: Dataset
    views: tuple[str, ...]  # what the V views are: ("identity",) or ("identity", "hflip")


@dataclass
class Fold:
    """One way of holding out validation pairs: training pairs and queries as row indices."""

    features: list[torch.Tensor | StreamedFeatures]  # CachedPairs.features (N, V, C, h, w)
    #                                                  each, shared, not copied
    train_left: torch.Tensor  # (P,) rows of each training pair's left
    train_right: torch.Tensor  # (P,) rows of its right
    val_images: torch.Tensor  # (M,) rows of every image the validation queries use
    val_queries: np.ndarray  # (Q,) positions in val_images of each query's left
    val_candidates: np.ndarray  # (Q, 20) positions in val_images of its candidates
    val_truth: np.ndarray  # (Q,) index of the true candidate


@dataclass
class Prepared:
    """What every config trained on these caches shares: their metadata, the train images in
    memory and the folds (built once: a sweep's trials all see the same ones)."""

    infos: list[CacheInfo]
    pairs: CachedPairs
    folds: list[Fold]

    def head_config(self, config: TrainConfig) -> HeadConfig:
        """The head for these caches' features (one branch each) and this config."""
        return head_config_for([info.feature_shape for info in self.infos], config)


def prepare(caches: list[Path], config: TrainConfig, data: str | Path | None = None,
            device: torch.device | str = "cpu",
            infos: list[CacheInfo] | None = None) -> Prepared:
    """The caches' metadata (`infos`, if already read by `read_caches`), their train images on
    `device` (from the dataset `data`, by default the one the first cache was built from; in
    memory or streamed, by config.memory_budget), and the folds of `config` (its --folds, or its
    --val-fraction split)."""
    infos = infos if infos is not None else read_caches(caches)
    pairs = load_pairs(caches, infos, Path(data) if data else None, device,
                       config.memory_budget)
    return Prepared(infos, pairs, validation_folds(pairs, config))


def read_caches(caches: list[Path]) -> list[CacheInfo]:
    """Each cache's metadata; several caches (fusion) must describe one dataset at one input
    size, and are refused naming the field that differs."""
    files = [cache.resolve() for cache in caches]  # one file by two paths, or a link, is one
    for i, file in enumerate(files):
        if file in files[:i]:
            raise UserError(f"a cache is given twice: {caches[files.index(file)]} and "
                            f"{caches[i]} are the same file ({file}); fuse different caches")
    infos = [read_info(cache) for cache in caches]
    for cache, info in zip(caches[1:], infos[1:], strict=True):
        for field in FUSED_FIELDS:
            if getattr(info, field) != getattr(infos[0], field):
                raise UserError(f"{cache} cannot be fused with {caches[0]}: its {field} is "
                                f"{getattr(info, field)}, not {getattr(infos[0], field)} (fused "
                                "caches must be of the same images at the same input size)")
    return infos


def load_pairs(caches: list[Path], infos: list[CacheInfo], dataset_path: Path | None,
               device: torch.device | str, budget: int | None = None) -> CachedPairs:
    """The train images' features from every cache, in every view they all hold, checked to be
    of these very images (their sha256): in memory on `device` for as many caches as fit
    `budget` bytes (by default a share of the memory available there), the smallest first;
    streamed from the file for the others."""
    dataset = read_dataset(dataset_path or infos[0].dataset)
    keys = sorted({f"train/left/{left}" for left, _ in dataset.train_pairs}
                  | {f"train/right/{right}" for _, right in dataset.train_pairs})
    for cache in caches:
        changed = [key for key, cached, now in zip(keys, read_image_digests(cache, keys),
                                                   dataset.digests(keys), strict=True)
                   if cached != now]
        if changed:
            raise UserError(f"{cache} was built from other images than {dataset.root}: "
                            f"{len(changed)} of its {len(keys)} train images differ (e.g. "
                            f"{changed[0]}); another dataset, or images changed since: rerun "
                            "`python -m extract` on this dataset")
    views = tuple(v for v in infos[0].views if all(v in info.views for info in infos))
    unused = sorted({v for info in infos for v in info.views} - set(views))
    if unused:  # every branch of a fused head sees the same view of an image
        fused = list(zip(map(str, caches), infos, strict=True))
        having = [c for c, info in fused if len(info.views) > len(views)]
        lacking = [c for c, info in fused if len(info.views) == len(views)]
        logger.info("the %s view of %s is not used: %s lacks it, and every branch of a fused "
                    "head sees the same view of an image (rebuild %s with `python -m extract "
                    "--hflip` to use it)", "/".join(unused), " and ".join(having),
                    " and ".join(lacking), " and ".join(lacking))
    device = torch.device(device)
    sizes = [features_bytes(info, len(keys), len(views)) for info in infos]
    budget, why = memory_budget(budget, device)
    kept = fits_in_memory(sizes, budget)
    log_memory_plan(caches, sizes, kept, why)
    features = [load_features(cache, info, keys, views).to(device) if in_memory
                else StreamedFeatures.open(cache, keys, views, device)
                for cache, info, in_memory in zip(caches, infos, kept, strict=True)]
    return CachedPairs(features, {key: i for i, key in enumerate(keys)}, dataset, views)


def load_features(cache: Path, info: CacheInfo, keys: list[str],
                  views: tuple[str, ...]) -> torch.Tensor:
    """The features (len(keys), V, *feature_shape) of `keys` in `views`, each view read into its
    place (no second copy of them all)."""
    features = np.empty((len(keys), len(views), *info.feature_shape), dtype=info.dtype)
    for i, view in enumerate(views):
        read_features(cache, keys, view, out=features[:, i])
    return torch.from_numpy(features)


def make_fold(pairs: CachedPairs, train_pairs: list[tuple[str, str]],
              queries: list[Query]) -> Fold:
    device, row = pairs.features[0].device, pairs.row
    val_keys = sorted({q.left for q in queries} | {c for q in queries for c in q.candidates})
    position = {key: i for i, key in enumerate(val_keys)}
    return Fold(
        features=pairs.features,
        train_left=torch.tensor([row[f"train/left/{left}"] for left, _ in train_pairs],
                                dtype=torch.long, device=device),
        train_right=torch.tensor([row[f"train/right/{right}"] for _, right in train_pairs],
                                 dtype=torch.long, device=device),
        val_images=torch.tensor([row[key] for key in val_keys], dtype=torch.long, device=device),
        val_queries=np.array([position[q.left] for q in queries], dtype=np.int64),
        val_candidates=np.array([[position[c] for c in q.candidates] for q in queries],
                                dtype=np.int64).reshape(len(queries), N_CANDIDATES),
        val_truth=np.array([q.truth for q in queries], dtype=np.int64),
    )


def validation_folds(pairs: CachedPairs, config: TrainConfig) -> list[Fold]:
    """The K folds of --folds K, or the one split of --val-fraction; each checked to leave
    something to train on."""
    if config.folds:
        splits = fold_splits(pairs.dataset, config.folds, config.split_seed)
    else:
        splits = [validation_split(pairs.dataset, config.val_fraction, config.split_seed)]
    folds = [make_fold(pairs, *split) for split in splits]
    for fold in folds:
        if len(fold.train_left) < 2:
            raise UserError(f"{len(fold.train_left)} training pair(s) left after holding out "
                            f"{len(fold.val_truth)} for validation: training needs at least 2; "
                            "lower --val-fraction")
    return folds


def all_pairs_fold(pairs: CachedPairs) -> Fold:
    """Every train pair for training, nothing held out: the final head after cross-validation."""
    return make_fold(pairs, pairs.dataset.train_pairs, [])


def views_used(fold: Fold, config: TrainConfig) -> Fold:
    """The fold with the views `config` trains on: all the cache has, or (flip off) the first,
    the images as they are (a view of the tensor, not a copy)."""
    if config.flip:
        return fold
    return dataclasses.replace(fold, features=[f[:, :1] for f in fold.features])
