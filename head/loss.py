"""The losses, as pure functions of embeddings: the cosine triplet loss and the symmetric
InfoNCE, both with in-batch negatives.

Row i of `anchors` (a left) pairs with row i of `positives` (its right); every other row j of
`positives` is a negative for anchor i, so a batch of B pairs gives each anchor B - 1 negatives
and embeds each feature map once. The embeddings must have unit norm, as the head's are, so
x . y is their cosine.

Triplet: distance D(x, y) = 1 - x . y; value max(0, D(a_i, p_i) - D(a_i, p_j) + margin).
InfoNCE: logits_ij = a_i . p_j / temperature; the cross-entropy of each left over the rights
(its own right is the class) and of each right over the lefts, averaged.

`pair_loss` is the one place a training config picks its loss: a new loss is a function here,
a branch there and its name in LOSSES and LOSS_NAMES, plus its own settings, if any, as
TrainConfig fields and options in head.config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from head.config import TrainConfig

NEGATIVES = ("all", "hard", "semihard")
LOSSES = ("triplet", "infonce")
LOSS_NAMES = {"triplet": "cosine triplet loss", "infonce": "InfoNCE loss"}  # as plots say it


def info_nce_loss(anchors: torch.Tensor, positives: torch.Tensor,
                  temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE: mean of the left-to-right and right-to-left cross-entropies, each
    the mean over the batch."""
    logits = anchors @ positives.T / temperature  # (B, B): left i against right j
    target = torch.arange(len(anchors), device=anchors.device)  # (B,) the diagonal
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def cosine_triplet_loss(anchors: torch.Tensor, positives: torch.Tensor, margin: float = 0.2,
                        negatives: str = "all") -> torch.Tensor:
    """Mean triplet value over the selected triplets whose value is above zero (0 if none).

    Selected negatives per anchor: `all` every j != i; `hard` the one nearest the anchor;
    `semihard` those farther than the positive but within the margin,
    D(a_i, p_i) < D(a_i, p_j) < D(a_i, p_i) + margin. Averaging over the violating triplets
    only keeps the gradient from fading as most triplets become easy.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"unknown negatives {negatives!r}; choose from {NEGATIVES}")
    batch = anchors.shape[0]
    distance = 1 - anchors @ positives.T  # (B, B): anchor i to positive j
    positive = distance.diagonal().unsqueeze(1)  # (B, 1)
    is_negative = ~torch.eye(batch, dtype=torch.bool, device=anchors.device)  # (B, B)
    if negatives == "hard":
        nearest = distance.masked_fill(~is_negative, float("inf")).argmin(dim=1)  # (B,)
        selected = torch.zeros_like(is_negative)
        selected[torch.arange(batch), nearest] = True
        selected &= is_negative
    elif negatives == "semihard":
        selected = is_negative & (distance > positive) & (distance < positive + margin)
    else:
        selected = is_negative
    values = (positive - distance + margin).clamp(min=0)  # (B, B)
    violating = selected & (values > 0)
    if not violating.any():
        return values.sum() * 0  # zero, still attached to the graph
    return values[violating].mean()


def pair_loss(anchors: torch.Tensor, positives: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The configured loss of a batch of (B, D) anchor and positive embeddings."""
    if config.loss == "infonce":
        return info_nce_loss(anchors, positives, config.temperature)
    return cosine_triplet_loss(anchors, positives, config.margin, config.negatives)
