"""`python -m head.train`: train the head on a feature cache, in seconds.

The train images' features (maps or vectors) are loaded once into one tensor per cache (on the
GPU when training there) and batches are gathered from it by index (`head.folds`), or, for a
cache beyond `--memory-budget`, read from the file as they are needed (`head.stream`);
`python -m head.sweep` loads them once for all its trials and folds. Validation is laid out like
the Kaggle test, in one of two ways:

- one seeded split (`--val-fraction`, `--split-seed`): every epoch is validated and the run keeps
  the best epoch's head;
- k-fold cross-validation (`--folds K`): the same config is trained on each of K folds side by
  side; every epoch reports the mean and standard error over the folds, the number of epochs is
  chosen by the mean, and the final head is trained on every train pair for that many epochs.

`--seeds N` trains N heads (seeds --seed ... --seed + N - 1) wherever one would be trained: each
fold's N are validated as their ensemble (so the epoch chosen is the ensemble's), and the run
keeps the N as one `head.model.Ensemble`. `--keep-fold-heads` adds the K folds' heads, as they
were at the chosen epoch, to the final one(s): an ensemble k-fold cannot score, since each fold
head was trained on the other folds' validation pairs. `--whitened-weight w` fuses the trained
head(s) with a PCA whitening (head.whiten) fitted once on the same training images (each fold's,
the split's, every train pair's for the final head), as one `head.model.Fused`: every epoch's
figures are the fused model's, so the epoch chosen is the one that ships.

The epoch is chosen by the figure `python -m infer` will give by default: top-2 after the
one-to-one assignment `--assign`, unless that is none. The frozen trunk's own score
(global-average-pooled features, cosine) is printed first, so each run shows the head's lift
over it. `--split-seed` draws the validation split or the folds, `--seed` the initialisation and
the batch order: each can change alone. The run folder ``runs/<name>/`` holds head.pt,
config.json, metrics.jsonl and curves.png; it appears only once training has finished.

Here: the loop (`train_epoch`, `Trainer`, `cross_validate`) and the run (`main`, the command).
The config and its options are in head.config, the caches and folds in head.folds, the figures
in head.figures, the loss in head.loss, the run's files and summary in head.report.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from head.config import (
    DEFAULT_RUNS_DIR,
    TrainConfig,
    check_config,
    new_run,
    refuse_val_fraction_with_folds,
    training_options,
)
from head.figures import best_epoch, evaluate, frozen_baseline, selection_figure, stalled, summarize
from head.folds import CachedPairs, Fold, all_pairs_fold, prepare, read_caches, views_used
from head.loss import pair_loss
from head.model import (
    Head,
    HeadConfig,
    ensemble_of,
    mean_of_views,
    save_checkpoint,
    with_whitening,
)
from head.report import (
    epoch_log,
    figures_only,
    log_summary,
    split_baseline,
    validated_on,
    write_summary,
)
from head.stream import read_ahead
from head.whiten import WhiteningHead, fit_whitening, training_rows, whitened_baseline
from tll import UserError, UserPath, logger, user_errors
from tll.device import resolve_device, training_autocast
from tll.files import atomic_output


@torch.no_grad()
def embed(head: torch.nn.Module, features: list[torch.Tensor], rows: torch.Tensor,
          batch_size: int) -> np.ndarray:
    """Unit embeddings (len(rows), D) of `rows` of each cache's features (N, V, C, h, w): with
    several views the mean of each view's embedding, normalised again (test-time augmentation,
    as the exported model does it: `mean_of_views`). `head`: a Head, an Ensemble or a Fused
    one."""
    head.eval()
    out = []
    read_ahead(features, lambda: (rows[i:i + batch_size]
                                  for i in range(0, len(rows), batch_size)))
    for i in range(0, len(rows), batch_size):
        blocks = [f[rows[i:i + batch_size]].float() for f in features]  # each (b, V, C, h, w)
        views = torch.stack([head(*[block[:, v] for block in blocks])
                             for v in range(blocks[0].shape[1])])  # (V, b, D)
        out.append(mean_of_views(head, views))  # (b, D)
    return torch.cat(out).cpu().numpy()


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
    # each batch's loss, kept on the device and read once at the end: reading each as it comes
    # (.item(), or a finiteness test in Python) would wait for a GPU at every step
    losses = torch.empty(len(batches), device=device)  # (batches,)
    drawn = [(0, 0)] * len(batches)  # the (left, right) view of each batch's pairs
    if views > 1:  # each image in a view of its own, drawn anew at every step; all drawn here
        # (same generator, same order), so that no step waits on a copy to the device
        sizes = [len(b) for b in batches]
        drawn = torch.cat([torch.randint(views, (2, n), generator=generator) for n in sizes],
                          dim=1).to(device).split(sizes, dim=1)  # each (2, B)
    # a streamed cache (head.stream) reads the batches in this order ahead of the loop
    read_ahead(fold.features, lambda: (key for batch, (left, right) in zip(batches, drawn,
                                                                           strict=True)
                                       for key in ((fold.train_left[batch], left),
                                                   (fold.train_right[batch], right))))
    # without progress the bar is off; with it, TQDM_DISABLE still turns it off (tqdm reads the
    # environment only for the arguments not given)
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True,
               **({} if progress else {"disable": True}))
    for number, (batch, (left_view, right_view)) in enumerate(zip(bar, drawn, strict=True),
                                                              start=1):
        lefts, rights = fold.train_left[batch], fold.train_right[batch]
        # float16 as cached: the head makes channels-last maps in one copy (bfloat16 under --amp)
        with training_autocast(device, config.amp):
            anchors = head(*[f[lefts, left_view] for f in fold.features])  # (B, D)
            positives = head(*[f[rights, right_view] for f in fold.features])  # (B, D)
        anchors, positives = anchors.float(), positives.float()  # the loss in float32
        loss = pair_loss(anchors, positives, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[number - 1] = loss.detach()
    losses = losses.cpu()
    diverged = torch.nonzero(~torch.isfinite(losses)).flatten()  # the steps after it are lost
    if len(diverged):
        number = int(diverged[0]) + 1
        raise UserError(f"the loss became {losses[number - 1].item()} at epoch {epoch}, batch "
                        f"{number}; " + ("that is before any step, so not --lr: check --margin, "
                                         "--temperature and the cache's features"
                                         if epoch == number == 1 else "try a lower --lr"))
    if embeddings_collapsed(torch.cat([anchors, positives]).detach()):
        inputs = [f[torch.cat([lefts, rights])] for f in fold.features]  # (2B, V, ...) each
        if all(bool((x == x[:1]).all()) for x in inputs):  # no head could tell them apart
            raise UserError(f"the head cannot learn: the cache holds the same features for "
                            f"every training image of epoch {epoch}'s last batch (are the "
                            "training images all one picture?); check the data and extract the "
                            "cache again (--lr is not the cause)")
        raise UserError(f"the head collapsed in epoch {epoch}: every embedding is the same "
                        "point, so the loss can no longer fall; try a lower --lr")
    return float(losses.double().mean())


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
        # fused: one kernel for all parameters (CPU and CUDA, the devices tll runs on), the same
        # steps to rounding; a VGG16 epoch on CPU about 10% faster than the per-tensor loop
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay, fused=True)
        self.generator = torch.Generator().manual_seed(config.seed)

    def epoch(self, number: int) -> dict[str, float]:
        """Train one epoch; returns its loss and, where the fold has queries, the validation
        figures."""
        loss = self.train(number)
        if not len(self.fold.val_truth):
            return {"loss": loss}
        return {"loss": loss, **validate(self.head, self.fold, self.config, number)}

    def train(self, number: int) -> float:
        """Train one epoch; returns its mean batch loss."""
        device = self.fold.features[0].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # dropout draws from the global generator: seed it from --seed and the epoch alone,
            # so a run does not depend on what trained before it in this process (a sweep)
            torch.manual_seed(self.config.seed * 1_000_003 + number)
            return train_epoch(self.head, self.optimizer, self.fold, self.config, number,
                               self.generator, self.progress)


def validate(head: torch.nn.Module, fold: Fold, config: TrainConfig,
             number: int) -> dict[str, float]:
    """The validation figures of `head` (a Head, an Ensemble or a Fused one) on the fold after
    epoch `number`."""
    embeddings = embed(head, fold.features, fold.val_images, config.batch_size)
    if not np.isfinite(embeddings).all():  # the last step can diverge unseen
        raise UserError(f"the weights diverged in epoch {number} (non-finite embeddings); "
                        "try a lower --lr")
    return evaluate(embeddings, fold, config.assign, config.assign_temperature)


class SeedTrainers:
    """--seeds N heads on one fold, member i with seed --seed + i (its own initialisation, batch
    order and dropout), trained epoch by epoch and validated as one ensemble, fused with the
    fold's whitening under --whitened-weight. With N = 1 and no whitening it is the one Trainer,
    figure for figure."""

    def __init__(self, fold: Fold, head_config: HeadConfig, config: TrainConfig,
                 progress: bool = True, fold_number: int | None = None,
                 whitening: WhiteningHead | None = None):
        self.trainers = [Trainer(fold, head_config, dataclasses.replace(config, seed=seed),
                                 progress) for seed in member_seeds(config)]
        self.members = [{"seed": seed, "fold": fold_number} for seed in member_seeds(config)]
        self.weight, self.whitening = config.whitened_weight, None
        if self.weight:  # nothing in it is trained: `whitening` where the baseline fitted it
            used = self.trainers[0].fold  # in the views the config uses
            self.whitening = (fit_whitening(used.features, training_rows(used))
                              if whitening is None else whitening)

    @property
    def trained_head(self) -> torch.nn.Module:
        """The trained head, or the ensemble of them (which shares their weights)."""
        return ensemble_of([trainer.head for trainer in self.trainers], self.members)

    @property
    def head(self) -> torch.nn.Module:
        """What is validated and kept: the trained head(s), fused with the fold's whitening
        under --whitened-weight."""
        return with_whitening(self.trained_head, self.whitening, self.weight)

    def epoch(self, number: int) -> dict[str, float]:
        """Train each member one epoch; returns their mean loss and, where the fold has queries,
        the validation figures of `head`."""
        if len(self.trainers) == 1 and not self.weight:
            return self.trainers[0].epoch(number)
        loss = float(np.mean([trainer.train(number) for trainer in self.trainers]))
        first = self.trainers[0]
        if not len(first.fold.val_truth):
            return {"loss": loss}
        return {"loss": loss, **validate(self.head, first.fold, first.config, number)}


def member_seeds(config: TrainConfig) -> range:
    """--seed, --seed + 1, ...: the seed of each of --seeds heads."""
    return range(config.seed, config.seed + config.seeds)


def cross_validate(folds: list[Fold], head_config: HeadConfig, config: TrainConfig,
                   on_epoch: Callable[[int, dict], None] | None = None,
                   progress: bool = True) -> list[dict]:
    """Train one head (--seeds: N) per fold, side by side, for config.epochs (fewer where
    --patience stops them); returns each epoch's summary over the folds (`summarize`, plus
    `epoch`, `seconds` and the per-fold figures under `folds`). `on_epoch(epoch, summary)` runs
    after each epoch (a sweep reports and prunes); `progress` shows each epoch's batch bar and
    logs an early stop."""
    return cross_validate_heads(folds, head_config, config, on_epoch, progress)[0]


def cross_validate_heads(folds: list[Fold], head_config: HeadConfig, config: TrainConfig,
                         on_epoch: Callable[[int, dict], None] | None = None,
                         progress: bool = True, keep_heads: bool = False,
                         whitenings: list[WhiteningHead] | None = None
                         ) -> tuple[list[dict], list[torch.nn.Module]]:
    """`cross_validate`, and with `keep_heads` each fold's trained head(s) (without the
    whitening) as they were at the best epoch by the mean (`best_epoch`), on the CPU; []
    without. `whitenings`: each fold's, where already fitted (else fitted under
    --whitened-weight)."""
    whitenings = whitenings or [None] * len(folds)
    trainers = [SeedTrainers(fold, head_config, config, progress, fold_number, whitening)
                for fold_number, (fold, whitening) in enumerate(zip(folds, whitenings,
                                                                    strict=True))]
    history, kept = [], []
    for number in range(1, config.epochs + 1):
        started = time.perf_counter()
        records = [trainer.epoch(number) for trainer in trainers]
        summary = {"epoch": number, **summarize(records),
                   "seconds": time.perf_counter() - started}
        if len(records) > 1:
            summary["folds"] = records
        history.append(summary)
        if keep_heads and best_epoch(history, config) is summary:  # the best so far
            kept = [copy.deepcopy(trainer.trained_head).cpu() for trainer in trainers]
        if on_epoch:
            on_epoch(number, summary)
        if stalled(history, config):
            if progress:
                _log_stop(history, config)
            break
    return history, kept


def train_single_split(fold: Fold, head_config: HeadConfig, config: TrainConfig,
                       on_epoch: Callable[[int, dict], None],
                       whitening: WhiteningHead | None = None
                       ) -> tuple[list[dict], torch.nn.Module]:
    """Train on one split; returns each epoch's record and the head of the best epoch (of the
    last, without validation). `whitening`: the split's, where already fitted."""
    trainer = SeedTrainers(fold, head_config, config, whitening=whitening)
    history, kept = [], None
    for number in range(1, config.epochs + 1):
        started = time.perf_counter()
        record = {"epoch": number, **trainer.epoch(number),
                  "seconds": time.perf_counter() - started}
        history.append(record)
        on_epoch(number, record)
        if best_epoch(history, config) is record:
            kept = copy.deepcopy(trainer.head)
        if stalled(history, config):
            _log_stop(history, config)
            break
    return history, kept


def _log_stop(history: list[dict], config: TrainConfig) -> None:
    logger.info("stopped after epoch %d of %d: %s has not risen for %d epochs (--patience) "
                "since epoch %d", history[-1]["epoch"], config.epochs, selection_figure(config),
                config.patience, best_epoch(history, config)["epoch"])


def train_final_head(pairs: CachedPairs, head_config: HeadConfig, config: TrainConfig,
                     epochs: int, fold_heads: list[torch.nn.Module] = ()) -> torch.nn.Module:
    """After cross-validation: the head (--seeds: the ensemble of N) trained on every train pair
    for the chosen `epochs`, joined by `fold_heads` (--keep-fold-heads: `with_fold_heads`), fused
    with the whitening of every train pair under --whitened-weight."""
    logger.info("%d-fold cross-validation chose %d epochs; training the final head%s on all %d "
                "train pairs", config.folds, epochs,
                f"s ({config.seeds} seeds)" if config.seeds > 1 else "",
                len(pairs.dataset.train_pairs))
    final = SeedTrainers(all_pairs_fold(pairs), head_config,
                         dataclasses.replace(config, epochs=epochs))
    for number in range(1, epochs + 1):
        final.epoch(number)
    head = final.trained_head
    if fold_heads:
        head = with_fold_heads(head.cpu(), fold_heads, config)
    return with_whitening(head, final.whitening, config.whitened_weight)


def with_fold_heads(final: torch.nn.Module, fold_heads: list[torch.nn.Module],
                    config: TrainConfig) -> torch.nn.Module:
    """--keep-fold-heads: the final head(s), then each fold's, as one ensemble."""
    logger.info("keeping the %d folds' heads too: an ensemble of %d heads, which the k-fold "
                "figures do not score", config.folds, config.seeds * (config.folds + 1))
    return ensemble_of([final, *fold_heads], final_and_fold_members(config))


def final_and_fold_members(config: TrainConfig) -> list[dict]:
    """What each member of `with_fold_heads`'s ensemble is (EnsembleConfig.members): the final
    heads' seeds, then each fold's."""
    return [{"seed": seed, "fold": fold}
            for fold in (None, *range(config.folds)) for seed in member_seeds(config)]


def main(cache: str | Path | list[str | Path], name: str | None = None,
         data: str | Path | None = None, runs_dir: str | Path = DEFAULT_RUNS_DIR,
         overwrite: bool = False, **options) -> Path:
    """Train a head on `cache` (or on a list of caches, fused: one branch of the head each);
    returns the run folder `runs_dir/name`, which appears only once training has finished. An
    existing run folder is refused unless `overwrite`. `options` are TrainConfig's fields."""
    caches, name, run = new_run(cache, name, runs_dir, overwrite)
    infos = read_caches(caches)
    config = TrainConfig(caches=tuple(map(str, caches)), name=name, **options)
    check_config(config)
    device = resolve_device(config.device, tf32=True)
    described = [f"{c} ({i.backbone} {i.layer}, weights {i.weights_id})"
                 for c, i in zip(caches, infos, strict=True)]
    logger.info("train %s on %s on %s", name, " + ".join(described), device)
    logger.info("config %s", json.dumps(asdict(config)))
    prepared = prepare(caches, config, data, device, infos)
    folds, head_config = prepared.folds, prepared.head_config(config)
    # the baseline's whitening of each fold is the one --whitened-weight fuses: fitted once
    whitenings, baseline = [None] * len(folds), None
    if len(folds[0].val_truth):
        records = []
        for number, fold in enumerate(folds):
            whitenings[number], whitened = whitened_baseline(fold, config)
            records.append(frozen_baseline(fold, config) | whitened)
        baseline = summarize(records)
    if baseline:
        for line, figures in zip(("frozen trunk (pooled, cosine)",
                                  "frozen trunk PCA-whitened (head.whiten)"),
                                 split_baseline(baseline), strict=True):
            logger.info("%s, %s:%s", line, validated_on(folds),
                        "".join(f"  {k} {v:.3f}" for k, v in figures.items()))
    views = prepared.pairs.views if config.flip else ("identity",)
    if len(views) > 1:
        logger.info("views: %s (one drawn per image at each step; validation averages them)",
                    ", ".join(views))
    if config.whitened_weight:
        logger.info("validation scores the head fused with the PCA whitening of %s at weight "
                    "%g", "each fold's training images" if config.folds
                    else "the training images", config.whitened_weight)

    with atomic_output(run, folder=True, overwrite=overwrite) as work:
        log_epoch = epoch_log(work / "metrics.jsonl")
        if config.folds:
            history, fold_heads = cross_validate_heads(folds, head_config, config, log_epoch,
                                                       keep_heads=config.keep_fold_heads,
                                                       whitenings=whitenings)
            best = best_epoch(history, config)
            head = train_final_head(prepared.pairs, head_config, config, best["epoch"],
                                    fold_heads)
        else:
            history, head = train_single_split(folds[0], head_config, config, log_epoch,
                                               whitenings[0])
            best = best_epoch(history, config)
        save_checkpoint(work / "head.pt", head, best_epoch=best["epoch"],
                        metrics=figures_only(best), caches=[asdict(info) for info in infos],
                        train_config=asdict(config), baseline=baseline, views=list(views))
        write_summary(work, history, baseline, best, config, infos)
    log_summary(history, baseline, best, config)
    if config.whitened_weight:
        logger.info("the run keeps its head fused with the PCA whitening (%d components) at "
                    "weight %g", head.whitening.config.embedding_dim, config.whitened_weight)
    return run


@training_options
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
@click.pass_context
def cli(context: click.Context, **options) -> None:
    """Train the attention / max-pool / FC head on a feature cache (cosine triplet loss or
    InfoNCE)."""
    refuse_val_fraction_with_folds(context, options)
    with user_errors(interrupted="interrupted; no run folder was written (training does not "
                                 "resume: rerun to train again)",
                     out_of_memory="lower --memory-budget (features beyond it are streamed "
                                   "from the cache) or --batch-size, and rerun"):
        run = main(**options)
    click.echo(run)


if __name__ == "__main__":
    cli(prog_name="python -m head.train")
