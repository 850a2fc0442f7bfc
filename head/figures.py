"""The validation figures of training, from embeddings and per-epoch records: pure functions
beside the ranking maths of `infer.scoring` they use (which stays torch-free).

The kept epoch is chosen by the figure `python -m infer` will give by default: top-2 after the
one-to-one assignment `--assign`, unless that is none. The frozen trunk's own score
(global-average-pooled features, cosine) is each run's baseline.
"""

from __future__ import annotations

import numpy as np
import torch

from head.config import TrainConfig
from head.folds import Fold, views_used
from head.stream import pooling_blocks
from infer.scoring import (
    DEFAULT_TEMPERATURE,
    assign,
    candidate_similarities,
    ranking_metrics,
    uninformative,
)
from tll import UserError, logger


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


def best_epoch(history: list[dict], config: TrainConfig) -> dict:
    """The first epoch with the best mean selection figure (the last one without validation)."""
    figure = selection_figure(config)
    if figure not in history[0]:
        return history[-1]
    return max(history, key=lambda record: record[figure])


def stalled(history: list[dict], config: TrainConfig) -> bool:
    """Whether training should stop early: `config.patience` epochs have passed since the best
    one (never with patience 0, nor without validation)."""
    if not config.patience or selection_figure(config) not in history[-1]:
        return False
    return history[-1]["epoch"] - best_epoch(history, config)["epoch"] >= config.patience


def frozen_baseline(fold: Fold, config: TrainConfig) -> dict[str, float]:
    """The trunks alone: each cache's features averaged over views and positions, normalised,
    concatenated, compared by cosine."""
    fold = views_used(fold, config)
    normalize = torch.nn.functional.normalize
    pooled = []
    for features in fold.features:
        means = []
        for rows in pooling_blocks(fold.val_images, [features]):
            x = features[rows].float()  # (b, V, C, ...)
            means.append(x.mean(dim=[d for d in range(x.ndim) if d not in (0, 2)]))  # (b, C)
        pooled.append(normalize(torch.cat(means), dim=1))  # (M, C)
    return evaluate(normalize(torch.cat(pooled, dim=1), dim=1).cpu().numpy(), fold,
                    config.assign, config.assign_temperature)
