"""`python -m head.whiten`: a run with no training at all, the trunk's pooled features
PCA-whitened on the train images, exported and used like a trained head.

Raw cosines of pooled random-init maps all sit near 1 (one dominant direction); whitening spreads
them: each image's features are averaged over positions (mean pooling), L2-normalised per cache
and concatenated, the train images' mean is subtracted, and they are projected on the principal
components, each divided by the square root of its variance (scikit-learn's
`PCA(whiten=True)`, fitted on the train images only: the whitened train features have identity
covariance), then L2-normalised. It is fitted in closed form in about a second, so `python -m
infer` can write a submission right after extraction. On a two-view cache the fit takes each
image's views averaged, and the embedding is, as for a trained head, the mean of its views'.

`python -m head.train` reports the same figures beside the frozen trunk's (the `whitened_`
line), fitted on each fold's training images. This command is its own rather than a
`head.train --whiten-only` flag because none of head.train's training settings (epochs, lr,
loss, the head's shape) would apply to it; it takes the same caches, validation options and
assignment, and writes the same run folder: head.pt (head kind "whitening", since checkpoint
format 4), which `python -m head.export` turns into one ONNX model (trunk + whitening as graph
ops), and config.json. `head.train --whitened-weight` fuses this whitening with a trained head
(`head.model.Fused`)."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from head.config import (
    DEFAULT_RUNS_DIR,
    TRAIN_OPTIONS,
    TrainConfig,
    check_config,
    new_run,
    refuse_val_fraction_with_folds,
)
from head.figures import evaluate, summarize
from head.folds import Fold, all_pairs_fold, prepare, read_caches, views_used
from head.model import save_checkpoint
from head.report import validated_on
from head.stream import pooling_blocks
from tll import UserError, UserPath, logger, user_errors
from tll.device import resolve_device
from tll.files import atomic_output

DEFAULT_COMPONENTS = 64  # the measurement (VGG16, random init): 0.22 -> 0.31 top-2


@dataclass(frozen=True)
class WhiteningConfig:
    feature_shapes: tuple[tuple[int, ...], ...]  # (C, h, w) of each trunk's map, or (D,)
    embedding_dim: int  # the principal components kept

    def __post_init__(self):
        object.__setattr__(self, "feature_shapes",
                           tuple(tuple(int(n) for n in shape) for shape in self.feature_shapes))


class WhiteningHead(nn.Module):
    """Pooled features -> subtract the train mean -> project on the components / sqrt(their
    variance) -> unit norm. Takes the inputs a trained `Head` takes (one per cache), so
    `TLLNet` and the export treat it alike; its parameters are buffers, fitted, not learnt."""

    kind = "whitening"

    def __init__(self, config: WhiteningConfig):
        super().__init__()
        self.config = config
        width = sum(shape[0] for shape in config.feature_shapes)
        self.register_buffer("mean", torch.zeros(width))  # (W,)
        self.register_buffer("projection", torch.zeros(width, config.embedding_dim))  # (W, k)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        # each (B, C_i, h_i, w_i) or (B, D_i)
        return self.whiten(pool(features))  # (B, k)

    def whiten(self, pooled: torch.Tensor) -> torch.Tensor:  # (..., W) -> (..., k), unit norm
        return F.normalize((pooled - self.mean) @ self.projection, dim=-1)


def pool(features: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Each cache's features (B, C, ...) averaged over positions and L2-normalised (so that
    fused caches weigh alike), concatenated: (B, W)."""
    return torch.cat([F.normalize(f.flatten(2).mean(dim=2) if f.ndim > 2 else f, dim=1)
                      for f in features], dim=1)


@torch.no_grad()
def pooled_views(features: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """`pool` of every view of `rows` of each cache's features (N, V, C, ...): (len(rows), V, W)
    float32, pooled a block of rows at a time (`pooling_blocks`)."""
    views = features[0].shape[1]
    out = []
    for block_rows in pooling_blocks(rows, features):
        blocks = [f[block_rows].float() for f in features]  # each (b, V, C, ...)
        out.append(torch.stack([pool([block[:, v] for block in blocks]) for v in range(views)],
                               dim=1))  # (b, V, W)
    return torch.cat(out)


def fit_whitening(features: list[torch.Tensor], rows: torch.Tensor,
                  components: int | None = None) -> WhiteningHead:
    """The whitening of `rows` (the training images) of each cache's features (N, V, C, ...),
    their views averaged: sklearn's PCA(whiten=True), `components` principal components
    (default min(64, images - 1, width): n images span at most n - 1 directions about their
    mean), fewer where the rest carry no variance (identical images)."""
    from sklearn.decomposition import PCA

    x = torch.cat([pooled_views(features, block).mean(dim=1)  # views averaged block by block:
                   for block in pooling_blocks(rows, features)])  # (n, W), never (n, V, W)
    x = x.double().cpu().numpy()
    wanted = min(components or DEFAULT_COMPONENTS, len(x) - 1, x.shape[1])
    if wanted < 1:
        raise UserError(f"whitening needs at least 2 training images, got {len(x)}")
    if components and components > wanted:
        logger.warning("--components %d: %d training images of %d features span at most %d "
                       "directions; keeping %d", components, len(x), x.shape[1], wanted, wanted)
    pca = PCA(n_components=wanted, whiten=True, svd_solver="full").fit(x)
    variance = pca.explained_variance_  # (wanted,), descending
    kept = int((variance > variance[0] * 1e-10).sum()) if variance[0] > 0 else 0
    if kept == 0:
        raise UserError("the training images' pooled features are all the same: there is "
                        "nothing to whiten (are the images all one picture?)")
    if kept < wanted:
        logger.warning("whitening: %d of %d components carry no variance; keeping %d",
                       wanted - kept, wanted, kept)
    head = WhiteningHead(WhiteningConfig(tuple(f.shape[2:] for f in features), kept))
    head.mean.copy_(torch.from_numpy(pca.mean_))
    head.projection.copy_(torch.from_numpy(pca.components_[:kept].T / np.sqrt(variance[:kept])))
    return head.to(features[0].device).eval()


def whitened_embeddings(head: WhiteningHead, features: list[torch.Tensor],
                        rows: torch.Tensor) -> np.ndarray:
    """Unit embeddings (len(rows), k): each view whitened, their mean normalised again, as the
    exported model (`TLLNet`) computes them."""
    embeddings = head.whiten(pooled_views(features, rows))  # (M, V, k)
    return F.normalize(embeddings.mean(dim=1), dim=1).cpu().numpy()


def fused_with_whitening(head_embeddings: np.ndarray, whitened: np.ndarray,
                         weight: float) -> np.ndarray:
    """Unit embeddings (M, D) and (M, k) of the same images joined as [sqrt(1 - w) head,
    sqrt(w) whitened], (M, D + k): unit norm, and the cosine of two is (1 - w) their heads'
    cosine + w their whitened cosine, so `evaluate` scores the fused cosine as it is."""
    if not 0 <= weight <= 1:
        raise ValueError(f"the whitening's weight must lie in [0, 1], got {weight}")
    return np.concatenate([np.sqrt(1 - weight) * head_embeddings, np.sqrt(weight) * whitened],
                          axis=1)


def training_rows(fold: Fold) -> torch.Tensor:
    """Every image of a fold's training pairs, once: (n,) rows."""
    return torch.unique(torch.cat([fold.train_left, fold.train_right]))


def score_whitening(fold: Fold, config: TrainConfig, components: int | None = None
                    ) -> tuple[WhiteningHead, dict[str, float]]:
    """The whitening fitted on the fold's training images (the views `config` uses) and its
    validation figures (`head.figures.evaluate`)."""
    fold = views_used(fold, config)
    head = fit_whitening(fold.features, training_rows(fold), components)
    return head, evaluate(whitened_embeddings(head, fold.features, fold.val_images), fold,
                          config.assign, config.assign_temperature)


def whitened_baseline(fold: Fold, config: TrainConfig
                      ) -> tuple[WhiteningHead, dict[str, float]]:
    """The frozen baseline's second line in head.train: `score_whitening` with the default
    components, each figure named `whitened_<figure>`; with the whitening, which
    --whitened-weight fuses with the fold's head."""
    head, figures = score_whitening(fold, config)
    return head, {f"whitened_{k}": v for k, v in figures.items()}


def main(cache: str | Path | list[str | Path], name: str | None = None,
         data: str | Path | None = None, runs_dir: str | Path = DEFAULT_RUNS_DIR,
         overwrite: bool = False, components: int | None = None, **options) -> Path:
    """Fit the whitening of `cache` (or several caches, fused) and write the run folder
    `runs_dir/name`; returns it. With a validation split (`val_fraction`, default 0.1) the
    whitening is fitted on its training images and its figures are reported (infer --split val
    gives them again); with `folds` K the figures are the mean over K fits and the run's
    whitening is fitted on every train image; with val_fraction 0 on every train image, no
    figures. `options`: TrainConfig's validation fields (flip, assign, assign_temperature,
    val_fraction, folds, split_seed, device)."""
    if components is not None and components < 1:
        raise UserError(f"--components {components}: keep at least 1")
    caches, name, run = new_run(cache, name, runs_dir, overwrite, kind="whiten")
    unknown = set(options) - set(WHITEN_OPTIONS)
    if unknown:
        raise TypeError(f"head.whiten takes no {', '.join(sorted(unknown))}")
    infos = read_caches(caches)
    config = TrainConfig(caches=tuple(map(str, caches)), name=name, epochs=1, **options)
    check_config(config)
    prepared = prepare(caches, config, data, resolve_device(config.device), infos)
    figures = None
    if len(prepared.folds[0].val_truth):
        scored = [score_whitening(fold, config, components) for fold in prepared.folds]
        head, figures = scored[-1][0], summarize([record for _, record in scored])
        logger.info("whitened, %s:%s", validated_on(prepared.folds),
                    "".join(f"  {k} {v:.3f}" for k, v in figures.items()))
    if config.folds or not figures:  # the run's whitening: fitted on every train image
        fold = views_used(all_pairs_fold(prepared.pairs), config)
        head = fit_whitening(fold.features, training_rows(fold), components)
    logger.info("the run's whitening keeps %d components", head.config.embedding_dim)
    views = prepared.pairs.views if config.flip else ("identity",)
    with atomic_output(run, folder=True, overwrite=overwrite) as work:
        save_checkpoint(work / "head.pt", head.cpu(), best_epoch=0, metrics=figures or {},
                        caches=[asdict(info) for info in infos], train_config=asdict(config),
                        baseline=None, views=list(views))
        summary = {"config": asdict(config), "components": head.config.embedding_dim,
                   "caches": [asdict(info) for info in infos], "whitened": figures}
        (work / "config.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run


# head.train's own options (the same types and defaults) for what a whitening run shares with
# it: the views, the assignment recorded as infer's default, and the validation it is scored on
WHITEN_OPTIONS = ("flip", "assign", "assign_temperature", "val_fraction", "folds", "split_seed",
                  "device", "memory_budget")
# where head.train's help speaks of training
WHITEN_HELP = {
    "flip": "With a two-view cache: fit on each image's views averaged, and average both views' "
            "embeddings at validation and in the exported model.",
    "assign": "One-to-one assignment that validation also reports; recorded in the exported "
              "model as infer's default.",
    "val_fraction": "Train pairs held out for validation (0: fit on all, no figures). Not with "
                    "--folds.",
    "folds": "K >= 2: K-fold cross-validation (mean and standard error of K fits; the run's "
             "whitening is fitted on all pairs). 0: one split of --val-fraction.",
}


def _whiten_options(command: click.Command) -> click.Command:
    for name in WHITEN_OPTIONS:
        option = copy.copy(TRAIN_OPTIONS[name])
        option.help = WHITEN_HELP.get(name, option.help)
        command.params.append(option)
    return command


@_whiten_options
@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--cache", type=UserPath(), required=True, multiple=True,
              help="Feature cache written by `python -m extract`; repeat it to fuse several.")
@click.option("--name", default=None,
              help="Run folder name, a plain folder name [default: <cache>-whiten-<time>].")
@click.option("--components", type=click.IntRange(min=1), default=None,
              help=f"Principal components kept [default: min({DEFAULT_COMPONENTS}, train "
                   "images - 1)].")
@click.option("--overwrite", is_flag=True,
              help="Replace the run folder <runs-dir>/<name> if it exists.")
@click.option("--data", type=UserPath(), default=None,
              help="Dataset folder [default: the one the cache was built from].")
@click.option("--runs-dir", type=UserPath(), default=DEFAULT_RUNS_DIR)
@click.pass_context
def cli(context: click.Context, **options) -> None:
    """Fit a PCA whitening of the trunk's pooled features on the train images (no training) and
    write a run folder that `python -m head.export` exports like a trained head."""
    refuse_val_fraction_with_folds(context, options)
    with user_errors():
        run = main(**options)
    click.echo(run)


if __name__ == "__main__":
    cli(prog_name="python -m head.whiten")
