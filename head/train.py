"""`python -m head.train`: train the head on a feature cache, in seconds.

The train images' features (maps or vectors) are loaded once into one tensor per cache (on the
GPU when training there) and batches are gathered from it by index; `python -m head.sweep` loads
them once for all its trials and folds. Validation is laid out like the Kaggle test, in one of
two ways:

- one seeded split (`--val-fraction`, `--split-seed`): every epoch is validated and the run keeps
  the best epoch's head;
- k-fold cross-validation (`--folds K`): the same config is trained on each of K folds side by
  side; every epoch reports the mean and standard error over the folds, the number of epochs is
  chosen by the mean, and the final head is trained on every train pair for that many epochs.

The epoch is chosen by the figure `python -m infer` will give by default: top-2 after the
one-to-one assignment `--assign`, unless that is none. The frozen trunk's own score
(global-average-pooled features, cosine) is printed first, so each run shows the head's lift
over it. `--split-seed` draws the validation split or the folds, `--seed` the initialisation and
the batch order: each can change alone. The run folder ``runs/<name>/`` holds head.pt,
config.json, metrics.jsonl and curves.png; it appears only once training has finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from extract.cache import CacheInfo, read_features, read_image_digests, read_info
from head.loss import LOSS_NAMES, LOSSES, NEGATIVES, cosine_triplet_loss, info_nce_loss
from head.model import ATTENTIONS, Head, HeadConfig, save_checkpoint
from infer.scoring import (
    ASSIGN_METHODS,
    DEFAULT_ASSIGN,
    DEFAULT_TEMPERATURE,
    assign,
    candidate_similarities,
    ranking_metrics,
    uninformative,
)
from tll import FiniteFloat, UserError, UserPath, logger, user_errors
from tll.data import (
    N_CANDIDATES,
    Dataset,
    Query,
    fold_splits,
    read_dataset,
    validation_split,
)
from tll.device import resolve_device
from tll.files import atomic_output, check_output

DEFAULT_RUNS_DIR = Path("runs")
MAX_NAME_LENGTH = 100
MAX_LR = 1.0  # AdamW moves each weight by about lr a step: beyond 1 nothing is learnt


@dataclass(frozen=True)
class TrainConfig:
    caches: tuple[str, ...]  # one or more (fusion: one branch of the head per cache)
    name: str
    # Measured (README, "Training levers"): with flip views, the source report's head (triplet
    # loss, no features layer, no dropout) scored best on both random-init backbones, 5-fold; the
    # sweep's InfoNCE head tied it on VGG16 and fell behind on ResNet50.
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    margin: float = 0.2  # the triplet loss's
    embedding_dim: int = 256
    pool: int = 2
    attention: str = "spatial"
    features_dim: int = 0  # the 1x1 features layer's channels; 0: none
    dropout: float = 0.0  # before the fully connected layer
    loss: str = "triplet"
    negatives: str = "all"  # the triplet loss's
    temperature: float = 0.07  # InfoNCE's
    flip: bool = True  # train on the cache's flipped views too, where it has them
    assign: str = DEFAULT_ASSIGN
    assign_temperature: float = DEFAULT_TEMPERATURE
    val_fraction: float = 0.1  # used without --folds
    folds: int = 0  # 0: one split of val_fraction; K >= 2: K-fold cross-validation
    split_seed: int = 0  # draws the validation split or the folds
    seed: int = 0  # draws the initialisation and the batch order
    device: str = "auto"


@dataclass
class CachedPairs:
    """Every train image's feature map in memory, once per process (a sweep's trials and folds
    share it), and where each image's row is."""

    features: list[torch.Tensor]  # per cache (N, V, C, h, w) or (N, V, D) float16: each image's
    #                               views
    row: dict[str, int]  # key -> row of each of `features`
    dataset: Dataset
    views: tuple[str, ...]  # what the V views are: ("identity",) or ("identity", "hflip")


@dataclass
class Fold:
    """One way of holding out validation pairs: training pairs and queries as row indices."""

    features: list[torch.Tensor]  # CachedPairs.features (N, V, C, h, w) each, shared, not copied
    train_left: torch.Tensor  # (P,) rows of each training pair's left
    train_right: torch.Tensor  # (P,) rows of its right
    val_images: torch.Tensor  # (M,) rows of every image the validation queries use
    val_queries: np.ndarray  # (Q,) positions in val_images of each query's left
    val_candidates: np.ndarray  # (Q, 20) positions in val_images of its candidates
    val_truth: np.ndarray  # (Q,) index of the true candidate


# what every fused cache must share: one image feeds every trunk
FUSED_FIELDS = ("dataset_fingerprint", "input_size", "interpolation")


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
               device: torch.device) -> CachedPairs:
    """The train images' features from every cache, in every view they all hold, checked to be
    of these very images (their sha256)."""
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
    features = [torch.from_numpy(np.stack([read_features(cache, keys, view) for view in views],
                                          axis=1)).to(device)  # (N, V, C, h, w)
                for cache in caches]
    return CachedPairs(features, {key: i for i, key in enumerate(keys)}, dataset, views)


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


def evaluate(embeddings: np.ndarray, fold: Fold, assign_method: str = "none",
             temperature: float = DEFAULT_TEMPERATURE) -> dict[str, float]:
    """Validation figures from unit embeddings (M, D) of the validation images: top1, top2,
    mrr, and the same with `_assigned` after the one-to-one assignment (unless none)."""
    scores = candidate_similarities(embeddings, fold.val_queries, fold.val_candidates)
    metrics = ranking_metrics(scores, fold.val_truth)
    if assign_method != "none" and (reason := uninformative(scores)):
        logger.warning("validation: %s; the %s figures are the plain ones", reason, assign_method)
    if assign_method != "none":
        try:
            assigned = assign(scores, fold.val_candidates, assign_method, temperature)  # (Q, K)
        except ValueError as error:  # the split is one-to-one: the temperature flattens rows
            raise UserError(f"--assign-temperature: {error}") from None
        metrics |= {f"{k}_assigned": v
                    for k, v in ranking_metrics(assigned, fold.val_truth).items()}
    return metrics


def selection_figure(config: TrainConfig) -> str:
    """The figure the kept epoch is chosen by: what `python -m infer` reports by default."""
    return "top2" if config.assign == "none" else "top2_assigned"


def summarize(records: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each figure over folds, and with several folds its standard error
    (`<figure>_se`, sample standard deviation / sqrt(K))."""
    summary = {}
    for key in records[0]:
        values = np.array([r[key] for r in records], dtype=np.float64)
        summary[key] = float(values.mean())
        if len(values) > 1:
            summary[f"{key}_se"] = float(values.std(ddof=1) / np.sqrt(len(values)))
    return summary


@torch.no_grad()
def embed(head: Head, features: list[torch.Tensor], rows: torch.Tensor,
          batch_size: int) -> np.ndarray:
    """Unit embeddings (len(rows), D) of `rows` of each cache's features (N, V, C, h, w): with
    several views the mean of each view's embedding, normalised again (test-time augmentation,
    as the exported model does it)."""
    head.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        blocks = [f[rows[i:i + batch_size]].float() for f in features]  # each (b, V, C, h, w)
        views = torch.stack([head(*[block[:, v] for block in blocks])
                             for v in range(blocks[0].shape[1])])  # (V, b, D)
        out.append(torch.nn.functional.normalize(views.mean(dim=0), dim=1))  # (b, D)
    return torch.cat(out).cpu().numpy()


def views_used(fold: Fold, config: TrainConfig) -> Fold:
    """The fold with the views `config` trains on: all the cache has, or (flip off) the first,
    the images as they are (a view of the tensor, not a copy)."""
    if config.flip:
        return fold
    return dataclasses.replace(fold, features=[f[:, :1] for f in fold.features])


def frozen_baseline(fold: Fold, config: TrainConfig) -> dict[str, float]:
    """The trunks alone: each cache's features averaged over views and positions, normalised,
    concatenated, compared by cosine."""
    fold = views_used(fold, config)
    normalize = torch.nn.functional.normalize
    pooled = []
    for features in fold.features:
        x = features[fold.val_images].float()  # (M, V, C, ...)
        pooled.append(normalize(x.mean(dim=[d for d in range(x.ndim) if d not in (0, 2)]),
                                dim=1))  # (M, C)
    return evaluate(normalize(torch.cat(pooled, dim=1), dim=1).cpu().numpy(), fold,
                    config.assign, config.assign_temperature)


def pair_loss(anchors: torch.Tensor, positives: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The configured loss of a batch of (B, D) anchor and positive embeddings."""
    if config.loss == "infonce":
        return info_nce_loss(anchors, positives, config.temperature)
    return cosine_triplet_loss(anchors, positives, config.margin, config.negatives)


def train_epoch(head: Head, optimizer: torch.optim.Optimizer, fold: Fold,
                config: TrainConfig, epoch: int, generator: torch.Generator,
                progress: bool = True) -> float:
    """One pass over the training pairs in shuffled batches; returns the mean batch loss.
    Refuses an epoch that diverges, or ends with every embedding in one point (the head has
    collapsed: the loss then sits at the margin and nothing can move it again)."""
    head.train()
    device, views = fold.features[0].device, fold.features[0].shape[1]
    order = torch.randperm(len(fold.train_left), generator=generator).to(device)
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    batches = [b for b in batches if len(b) > 1]  # a lone pair has no in-batch negative
    if not batches:
        raise UserError(f"{len(order)} training pair(s) make no batch of two; an epoch would "
                        "take no step")
    total = 0.0
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True,
               disable=not progress)
    for number, batch in enumerate(bar, start=1):
        left_view, right_view = 0, 0
        if views > 1:  # each image in a view of its own, drawn anew at every step
            left_view, right_view = torch.randint(views, (2, len(batch)),
                                                  generator=generator).to(device)  # (2, B)
        lefts, rights = fold.train_left[batch], fold.train_right[batch]
        anchors = head(*[f[lefts, left_view].float() for f in fold.features])  # (B, D)
        positives = head(*[f[rights, right_view].float() for f in fold.features])  # (B, D)
        loss = pair_loss(anchors, positives, config)
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at epoch {epoch}, batch {number}; "
                            + ("that is before any step, so not --lr: check --margin, "
                               "--temperature and the cache's features" if epoch == number == 1
                               else "try a lower --lr"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    if embeddings_collapsed(torch.cat([anchors, positives]).detach()):
        inputs = [f[torch.cat([lefts, rights])] for f in fold.features]  # (2B, V, ...) each
        if all(bool((x == x[:1]).all()) for x in inputs):  # no head could tell them apart
            raise UserError(f"the head cannot learn: the cache holds the same features for "
                            f"every training image of epoch {epoch}'s last batch (are the "
                            "training images all one picture?); check the data and extract the "
                            "cache again (--lr is not the cause)")
        raise UserError(f"the head collapsed in epoch {epoch}: every embedding is the same "
                        "point, so the loss can no longer fall; try a lower --lr")
    return total / len(batches)


def embeddings_collapsed(embeddings: torch.Tensor, tolerance: float = 1e-4) -> bool:
    """Whether unit embeddings (N, D) all lie within `tolerance` of their mean: one point."""
    spread = (embeddings - embeddings.mean(dim=0)).norm(dim=1)  # (N,)
    return bool(spread.max() < tolerance)


class Trainer:
    """One head, its optimiser and its batch order, trained epoch by epoch on one fold.
    `--seed` alone decides the initialisation, the order and the dropout, whatever the fold and
    whatever ran before in the process."""

    def __init__(self, fold: Fold, head_config: HeadConfig, config: TrainConfig,
                 progress: bool = True):
        self.fold, self.config, self.progress = views_used(fold, config), config, progress
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.head = Head(head_config).to(fold.features[0].device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)

    def epoch(self, number: int) -> dict[str, float]:
        """Train one epoch; returns its loss and, where the fold has queries, the validation
        figures."""
        device = self.fold.features[0].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # dropout draws from the global generator: seed it from --seed and the epoch alone,
            # so a run does not depend on what trained before it in this process (a sweep)
            torch.manual_seed(self.config.seed * 1_000_003 + number)
            loss = train_epoch(self.head, self.optimizer, self.fold, self.config, number,
                               self.generator, self.progress)
        if not len(self.fold.val_truth):
            return {"loss": loss}
        embeddings = embed(self.head, self.fold.features, self.fold.val_images,
                           self.config.batch_size)
        if not np.isfinite(embeddings).all():  # the last step can diverge unseen
            raise UserError(f"the weights diverged in epoch {number} (non-finite embeddings); "
                            "try a lower --lr")
        return {"loss": loss, **evaluate(embeddings, self.fold, self.config.assign,
                                         self.config.assign_temperature)}


def cross_validate(folds: list[Fold], head_config: HeadConfig, config: TrainConfig,
                   on_epoch: Callable[[int, dict], None] | None = None,
                   progress: bool = True) -> list[dict]:
    """Train one head per fold, side by side, for config.epochs; returns each epoch's summary
    over the folds (`summarize`, plus `epoch`, `seconds` and the per-fold figures under
    `folds`). `on_epoch(epoch, summary)` runs after each epoch (a sweep reports and prunes);
    `progress` shows each epoch's batch bar."""
    trainers = [Trainer(fold, head_config, config, progress) for fold in folds]
    history = []
    for number in range(1, config.epochs + 1):
        started = time.perf_counter()
        records = [trainer.epoch(number) for trainer in trainers]
        summary = {"epoch": number, **summarize(records),
                   "seconds": time.perf_counter() - started}
        if len(records) > 1:
            summary["folds"] = records
        history.append(summary)
        if on_epoch:
            on_epoch(number, summary)
    return history


def best_epoch(history: list[dict], config: TrainConfig) -> dict:
    """The first epoch with the best mean selection figure (the last one without validation)."""
    figure = selection_figure(config)
    if figure not in history[0]:
        return history[-1]
    return max(history, key=lambda record: record[figure])


def check_run_name(name: str, option: str = "--name") -> None:
    """A run name (or a sweep's study name, `option`) is one plain folder name: it can never
    point outside the runs folder."""
    problem = None
    if not name or name in (".", ".."):
        problem = "it names no folder of its own"
    elif "/" in name or "\\" in name:
        problem = "it holds a path separator"
    elif name.startswith("."):
        problem = "it starts with a dot (hidden names are kept for temporary files)"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"it is longer than {MAX_NAME_LENGTH} characters"
    elif not name.isprintable():
        problem = "it holds a control character"
    if problem:
        raise UserError(f"{option} {name!r} is not a plain folder name: {problem}")


def main(cache: str | Path | list[str | Path], name: str | None = None,
         data: str | Path | None = None, runs_dir: str | Path = DEFAULT_RUNS_DIR,
         overwrite: bool = False, **options) -> Path:
    """Train a head on `cache` (or on a list of caches, fused: one branch of the head each);
    returns the run folder `runs_dir/name`, which appears only once training has finished. An
    existing run folder is refused unless `overwrite`. `options` are TrainConfig's fields."""
    caches = [Path(c) for c in ([cache] if isinstance(cache, str | Path) else cache)]
    if not caches:
        raise UserError("no cache given: pass --cache (repeat it to fuse several)")
    name = name or f"{'+'.join(c.stem for c in caches)}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_run_name(name)
    run = Path(runs_dir) / name
    check_output(run, "run folder", folder=True)
    if (run.exists() or run.is_symlink()) and not overwrite:
        raise UserError(f"run folder {run} exists; pass --overwrite to replace it, or choose "
                        "another --name")
    infos = read_caches(caches)
    config = TrainConfig(caches=tuple(map(str, caches)), name=name, **options)
    check_config(config)
    device = resolve_device(config.device)
    described = [f"{c} ({i.backbone} {i.layer}, weights {i.weights_id})"
                 for c, i in zip(caches, infos, strict=True)]
    logger.info("train %s on %s on %s", name, " + ".join(described), device)
    logger.info("config %s", json.dumps(asdict(config)))
    pairs = load_pairs(caches, infos, Path(data) if data else None, device)
    folds = validation_folds(pairs, config)
    has_val = len(folds[0].val_truth) > 0
    baseline = summarize([frozen_baseline(f, config) for f in folds]) if has_val else None
    if baseline:
        logger.info("frozen trunk (pooled, cosine), %s:%s", _validated_on(folds),
                    "".join(f"  {k} {v:.3f}" for k, v in baseline.items()))
    head_config = head_config_for(infos, config)
    views = pairs.views if config.flip else ("identity",)
    if len(views) > 1:
        logger.info("views: %s (one drawn per image at each step; validation averages them)",
                    ", ".join(views))
    description = dict(caches=[asdict(info) for info in infos], train_config=asdict(config),
                       baseline=baseline, views=list(views))

    with atomic_output(run, folder=True, overwrite=overwrite) as work:
        def log_epoch(number: int, record: dict) -> None:
            with open(work / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            logger.info("epoch %2d  %s  (%.1f s)", number, _figures(record), record["seconds"])

        if config.folds:
            history = cross_validate(folds, head_config, config, log_epoch)
            best = best_epoch(history, config)
            logger.info("%d-fold cross-validation chose %d epochs; training the final head on "
                        "all %d train pairs", config.folds, best["epoch"],
                        len(pairs.dataset.train_pairs))
            final = Trainer(all_pairs_fold(pairs), head_config,
                            dataclasses.replace(config, epochs=best["epoch"]))
            for number in range(1, best["epoch"] + 1):
                final.epoch(number)
            save_checkpoint(work / "head.pt", final.head, best_epoch=best["epoch"],
                            metrics=_figures_only(best), **description)
        else:
            history = _train_single_split(folds[0], head_config, config, work, description,
                                          log_epoch)
            best = best_epoch(history, config)
        summary = {"config": asdict(config), "caches": [asdict(info) for info in infos],
                   "baseline": baseline, "best": {k: v for k, v in best.items() if k != "folds"}}
        (work / "config.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(history, baseline, work / "curves.png", config.loss)
    log_summary(history, baseline, best, config)
    return run


def head_config_for(infos: list[CacheInfo], config: TrainConfig) -> HeadConfig:
    """The head for these caches' features (one branch each) and this config."""
    return HeadConfig(feature_shapes=tuple(info.feature_shape for info in infos),
                      embedding_dim=config.embedding_dim,
                      pool=config.pool, attention=config.attention,
                      features_dim=config.features_dim, dropout=config.dropout)


def check_config(config: TrainConfig) -> None:
    if (config.negatives not in NEGATIVES or config.attention not in ATTENTIONS
            or config.assign not in ASSIGN_METHODS or config.loss not in LOSSES):
        raise UserError(f"--negatives takes {NEGATIVES}, --attention takes {ATTENTIONS}, "
                        f"--assign takes {ASSIGN_METHODS}, --loss takes {LOSSES}")
    if not 0 <= config.dropout < 1 or config.features_dim < 0 or not config.temperature > 0:
        raise UserError("--dropout takes [0, 1), --features-dim 0 or more, --temperature "
                        "more than 0")
    for option, value in (("--margin", config.margin), ("--temperature", config.temperature),
                          ("--assign-temperature", config.assign_temperature)):
        if not math.isfinite(value):
            raise UserError(f"{option} {value}: give a finite number")
    if config.folds == 1 or config.folds < 0:
        raise UserError(f"--folds {config.folds}: cross-validation takes at least 2 folds "
                        "(0 for one split of --val-fraction)")


def _train_single_split(fold: Fold, head_config: HeadConfig, config: TrainConfig, work: Path,
                        description: dict, log_epoch: Callable[[int, dict], None]
                        ) -> list[dict]:
    """Train on one split, keeping the head of the best epoch so far in work/head.pt."""
    trainer = Trainer(fold, head_config, config)
    history = []
    for number in range(1, config.epochs + 1):
        started = time.perf_counter()
        record = {"epoch": number, **trainer.epoch(number),
                  "seconds": time.perf_counter() - started}
        history.append(record)
        log_epoch(number, record)
        if best_epoch(history, config) is record:
            save_checkpoint(work / "head.pt", trainer.head, best_epoch=number,
                            metrics=_figures_only(record), **description)
    return history


def _validated_on(folds: list[Fold]) -> str:
    if len(folds) == 1:
        return f"{len(folds[0].val_truth)} validation queries"
    return f"mean of {len(folds)} folds of {min(len(f.val_truth) for f in folds)}+ queries"


def _figures_only(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("epoch", "loss", "loss_se", "seconds",
                                                          "folds")}


def _figures(record: dict) -> str:
    """`loss 0.1234  top1 0.250±0.020 ...`: each figure, with its standard error if any."""
    parts = []
    for key, value in record.items():
        if key in ("epoch", "seconds", "folds") or key.endswith("_se"):
            continue
        text = f"{value:.4f}" if key == "loss" else f"{value:.3f}"
        if f"{key}_se" in record:
            text += f"±{record[key + '_se']:.3f}"
        parts.append(f"{key.replace('_assigned', '+a')} {text}")
    return "  ".join(parts)


def plot_curves(history: list[dict], baseline: dict | None, path: Path, loss: str) -> None:
    """Training loss (`loss`: which one, for the axis), and validation top-2 per epoch (plain,
    and assigned where it was run); with cross-validation the mean over folds with a band of one
    standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.array([r["epoch"] for r in history])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    _plot_with_band(left, epochs, history, "loss", "loss")
    left.set(xlabel="epoch", ylabel=LOSS_NAMES[loss], title="training loss")
    if baseline:
        for key, label in (("top2", "head"), ("top2_assigned", "head, assigned")):
            if key in baseline:
                line = _plot_with_band(right, epochs, history, key, label)
                right.axhline(baseline[key], color=line.get_color(), linestyle="--",
                              label=f"frozen trunk{label[4:]}")
        folds = history[0].get("folds")
        title = f"validation top-2, mean of {len(folds)} folds" if folds else "validation top-2"
        right.set(xlabel="epoch", ylabel="top-2 accuracy", title=title)
        right.legend()
    else:
        right.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _plot_with_band(axes, epochs: np.ndarray, history: list[dict], key: str, label: str):
    mean = np.array([r[key] for r in history])
    (line,) = axes.plot(epochs, mean, marker="o", label=label)
    if f"{key}_se" in history[0]:
        se = np.array([r[f"{key}_se"] for r in history])
        axes.fill_between(epochs, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    return line


def log_summary(history: list[dict], baseline: dict | None, best: dict,
                config: TrainConfig) -> None:
    """One table: the frozen trunk, then each epoch's loss and figures (mean ± standard error
    with cross-validation), the kept epoch marked."""
    figures = [c for c in ("top1", "top2", "mrr", "top1_assigned", "top2_assigned",
                           "mrr_assigned") if c in best]
    width = 14 if config.folds else 8

    def cells(record: dict) -> str:
        return "".join((f"{record[c]:.3f}±{record[c + '_se']:.3f}" if c + "_se" in record
                        else f"{record[c]:.3f}").rjust(width) for c in figures)

    names = [c.replace("_assigned", "+a") for c in figures]
    lines = ["epoch   loss    " + "".join(name.rjust(width) for name in names)]
    if baseline:
        lines.append("frozen  -       " + cells(baseline))
    for r in history:
        mark = "  <- kept" if r is best else ""
        lines.append(f"{r['epoch']:<7} {r['loss']:<7.4f} " + cells(r) + mark)
    if config.folds:
        lines.append(f"mean ± standard error over {config.folds} folds; the final head was "
                     f"trained on all pairs for {best['epoch']} epochs")
    if "top2_assigned" in figures:
        lines.append(f"+a: after {config.assign} assignment"
                     + (f" at temperature {config.assign_temperature:g}"
                        if config.assign == "sinkhorn" else "")
                     + f"; the kept epoch is the best by {selection_figure(config)}")
    logger.info("summary\n%s", "\n".join(lines))


_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--cache", type=UserPath(), required=True, multiple=True,
              help="Feature cache written by `python -m extract`; repeat it to fuse several "
                   "(trunks or layers of the same images at the same input size): one branch "
                   "of the head each, concatenated before the fully connected layer.")
@click.option("--name", default=None,
              help="Run folder name, a plain folder name [default: <cache>-<time>].")
@click.option("--overwrite", is_flag=True,
              help="Replace the run folder <runs-dir>/<name> if it exists (it is refused "
                   "otherwise).")
@click.option("--data", type=UserPath(), default=None,
              help="Dataset folder [default: the one the cache was built from].")
@click.option("--runs-dir", type=UserPath(), default=DEFAULT_RUNS_DIR)
@click.option("--epochs", type=click.IntRange(min=1), default=_defaults["epochs"])
@click.option("--batch-size", type=click.IntRange(min=2), default=_defaults["batch_size"],
              help="Pairs per batch; each anchor gets batch-size - 1 in-batch negatives.")
@click.option("--lr", type=click.FloatRange(min=0, max=MAX_LR, min_open=True),
              default=_defaults["lr"])
@click.option("--weight-decay", type=click.FloatRange(min=0), default=_defaults["weight_decay"])
@click.option("--margin", type=FiniteFloat(min=0), default=_defaults["margin"])
@click.option("--embedding-dim", type=click.IntRange(min=1), default=_defaults["embedding_dim"])
@click.option("--pool", type=click.IntRange(min=1), default=_defaults["pool"],
              help="Max-pool each feature map to a pool x pool grid.")
@click.option("--attention", type=click.Choice(ATTENTIONS), default=_defaults["attention"])
@click.option("--features-dim", type=click.IntRange(min=0), default=_defaults["features_dim"],
              help="Channels of a 1x1 conv + batch norm + ReLU features layer before the "
                   "attention; 0: none.")
@click.option("--dropout", type=click.FloatRange(min=0, max=1, max_open=True),
              default=_defaults["dropout"], help="Dropout before the fully connected layer.")
@click.option("--loss", type=click.Choice(LOSSES), default=_defaults["loss"],
              help="Cosine triplet loss, or symmetric InfoNCE over the in-batch pairs.")
@click.option("--negatives", type=click.Choice(NEGATIVES), default=_defaults["negatives"],
              help="The triplet loss's in-batch negatives: all, the hardest, or the semi-hard "
                   "ones.")
@click.option("--temperature", type=FiniteFloat(min=0, min_open=True),
              default=_defaults["temperature"], help="InfoNCE's temperature.")
@click.option("--flip/--no-flip", default=_defaults["flip"],
              help="With a two-view cache (extract --hflip): draw an image's flipped view half "
                   "the time, and average both at validation and in the exported model.")
@click.option("--assign", type=click.Choice(ASSIGN_METHODS), default=_defaults["assign"],
              help="One-to-one assignment that validation also reports and that picks the "
                   "kept epoch; recorded in the exported model as infer's default.")
@click.option("--assign-temperature", type=FiniteFloat(min=0, min_open=True),
              default=_defaults["assign_temperature"], help="Sinkhorn's temperature.")
@click.option("--val-fraction", type=click.FloatRange(min=0, max=1, max_open=True),
              default=_defaults["val_fraction"],
              help="Train pairs held out for validation (0: train on all, keep the last "
                   "epoch). Not with --folds.")
@click.option("--folds", type=click.IntRange(min=0), default=_defaults["folds"],
              help="K >= 2: K-fold cross-validation (mean and standard error per epoch; the "
                   "final head trained on all pairs for the best number of epochs). 0: one "
                   "split of --val-fraction.")
@click.option("--split-seed", type=int, default=_defaults["split_seed"],
              help="Draws the validation split or the folds.")
@click.option("--seed", type=int, default=_defaults["seed"],
              help="Draws the initialisation and the batch order.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default=_defaults["device"])
@click.pass_context
def cli(context: click.Context, **options) -> None:
    """Train the attention / max-pool / FC head on a feature cache (cosine triplet loss or
    InfoNCE)."""
    if options["folds"] and context.get_parameter_source("val_fraction") \
            == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--val-fraction and --folds exclude each other: the folds hold "
                               "out 1/K of the pairs each")
    with user_errors(interrupted="interrupted; no run folder was written (training does not "
                                 "resume: rerun to train again)"):
        run = main(**options)
    click.echo(run)


if __name__ == "__main__":
    cli(prog_name="python -m head.train")
