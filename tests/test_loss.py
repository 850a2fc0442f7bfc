"""The losses against brute-force loops: the cosine triplet loss over explicit triplets (every
mode and dtype, plus the case where no triplet violates the margin) and InfoNCE over explicit
softmaxes in both directions."""

from __future__ import annotations

import math

import pytest
import torch

from head.loss import NEGATIVES, cosine_triplet_loss, info_nce_loss


def unit_pairs(batch: int, dim: int, seed: int, dtype: torch.dtype, noise: float = 0.8):
    """Random unit anchors and positives near them (so easy, semi-hard and hard triplets mix)."""
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    positives = anchors + noise * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    normalise = torch.nn.functional.normalize
    return normalise(anchors, dim=1).to(dtype), normalise(positives, dim=1).to(dtype)


def brute_force(anchors: torch.Tensor, positives: torch.Tensor, margin: float,
                negatives: str) -> float:
    """The docstring, literally: a Python loop over (anchor i, positive i, negative j != i)."""
    a = anchors.double().tolist()
    p = positives.double().tolist()

    def distance(x: list[float], y: list[float]) -> float:  # 1 - cos(x, y)
        dot = sum(u * v for u, v in zip(x, y, strict=True))
        return 1 - dot / (math.sqrt(sum(u * u for u in x)) * math.sqrt(sum(v * v for v in y)))

    values = []
    for i in range(len(a)):
        positive = distance(a[i], p[i])
        negative = {j: distance(a[i], p[j]) for j in range(len(p)) if j != i}
        if negatives == "all":
            chosen = list(negative)
        elif negatives == "hard":
            chosen = [min(negative, key=negative.get)]
        else:  # semihard
            chosen = [j for j, d in negative.items() if positive < d < positive + margin]
        values += [max(0.0, positive - negative[j] + margin) for j in chosen]
    violating = [v for v in values if v > 0]
    return sum(violating) / len(violating) if violating else 0.0


# seeds picked so that every mode meets zero and non-zero batches, and the semi-hard window
# both holds negatives and is empty where the other modes are not (e.g. batch 2, seed 22)
BATCHES = [(2, 1), (2, 2), (2, 22), (2, 25), (3, 9), (3, 12), (3, 33), (8, 3), (8, 4), (17, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("batch,seed", BATCHES)
@pytest.mark.parametrize("margin", [0.2, 0.5])
def test_matches_brute_force(batch: int, seed: int, negatives: str, dtype: torch.dtype,
                             margin: float) -> None:
    anchors, positives = unit_pairs(batch, dim=6, seed=seed, dtype=dtype)
    loss = cosine_triplet_loss(anchors, positives, margin=margin, negatives=negatives)
    assert loss.dtype == dtype and loss.shape == ()
    expected = brute_force(anchors, positives, margin, negatives)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert loss.item() == pytest.approx(expected, abs=tolerance)


def test_the_modes_differ_on_one_batch() -> None:
    """The comparison above would not notice a mode ignored: on this batch all three differ."""
    anchors, positives = unit_pairs(17, dim=6, seed=5, dtype=torch.float64)
    values = {mode: cosine_triplet_loss(anchors, positives, 0.5, mode).item()
              for mode in NEGATIVES}
    assert len({round(v, 9) for v in values.values()}) == 3, values
    assert all(v > 0 for v in values.values()), values


def test_reduction_is_the_mean_over_violating_triplets_only() -> None:
    """Hand-computed: of six triplets two violate the margin (0.3 each), four are easy (0)."""
    anchors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    positives = torch.tensor([[0.8, 0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    # anchor 0: D(a0,p0) = 0.2, D(a0,p1) = 0.4 -> 0.3; D(a0,p2) = 1 -> below zero
    # anchor 1: the same by symmetry -> 0.3 and below zero; anchor 2: D 0 vs D 1 -> below zero
    loss = cosine_triplet_loss(anchors, positives, margin=0.5)
    assert loss.item() == pytest.approx(0.3, abs=1e-6)  # not 0.6 (sum) nor 0.1 (mean of all six)


@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_violation_is_exactly_zero_and_backward_works(negatives: str,
                                                         dtype: torch.dtype) -> None:
    # one-hot rows: every positive equals its anchor (D 0), every negative is orthogonal (D 1)
    anchors = torch.eye(4, 6, dtype=dtype).requires_grad_(True)
    positives = torch.eye(4, 6, dtype=dtype).requires_grad_(True)
    loss = cosine_triplet_loss(anchors, positives, margin=0.1, negatives=negatives)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    for tensor in (anchors, positives):
        assert tensor.grad is not None
        assert torch.equal(tensor.grad, torch.zeros_like(tensor))


def test_gradient_matches_the_hand_derived_one() -> None:
    """d loss / d a_i = sum over anchor i's violating triplets (i, j) of (p_j - p_i), over the
    number of violating triplets in the batch (the loss differentiates 1 - a.p as given)."""
    anchors, positives = unit_pairs(8, dim=6, seed=3, dtype=torch.float64)
    anchors.requires_grad_(True)
    margin = 0.5
    loss = cosine_triplet_loss(anchors, positives, margin=margin)
    loss.backward()
    a, p = anchors.detach(), positives
    violating = [(i, j) for i in range(8) for j in range(8)
                 if j != i and (1 - a[i] @ p[i]) - (1 - a[i] @ p[j]) + margin > 0]
    assert 0 < len(violating) < 8 * 7  # some, not all: the selection matters
    expected = torch.zeros_like(a)
    for i, j in violating:
        expected[i] += (p[j] - p[i]) / len(violating)
    torch.testing.assert_close(anchors.grad, expected, atol=1e-12, rtol=0)


def test_unknown_mode_raises_value_error() -> None:
    anchors, positives = unit_pairs(4, dim=6, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown negatives 'hardest'"):
        cosine_triplet_loss(anchors, positives, negatives="hardest")


# --- InfoNCE ------------------------------------------------------------------------------------


def info_nce_brute_force(anchors: torch.Tensor, positives: torch.Tensor,
                         temperature: float) -> float:
    """The docstring, literally: each left's softmax over every right, each right's over every
    left, the true partner's negative log-probability, averaged over both directions."""
    a, p = anchors.double().tolist(), positives.double().tolist()

    def similarity(x: list[float], y: list[float]) -> float:
        return sum(u * v for u, v in zip(x, y, strict=True)) / temperature

    def mean_cross_entropy(rows: list, columns: list) -> float:
        total = 0.0
        for i, row in enumerate(rows):
            logits = [similarity(row, column) for column in columns]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
        return total / len(rows)

    return (mean_cross_entropy(a, p) + mean_cross_entropy(p, a)) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,seed", [(2, 1), (3, 9), (8, 3), (17, 5)])
@pytest.mark.parametrize("temperature", [0.05, 0.07, 0.5])
def test_info_nce_matches_brute_force(batch: int, seed: int, dtype: torch.dtype,
                                      temperature: float) -> None:
    anchors, positives = unit_pairs(batch, 6, seed, dtype)
    got = info_nce_loss(anchors, positives, temperature)
    assert got.dtype == dtype
    expected = info_nce_brute_force(anchors, positives, temperature)
    tolerance = dict(rel=1e-5, abs=1e-6) if dtype == torch.float32 else dict(rel=1e-10)
    assert got.item() == pytest.approx(expected, **tolerance)


def test_info_nce_counts_both_directions() -> None:
    """Left-to-right and right-to-left differ when the similarity matrix is not symmetric;
    the loss is their mean, so swapping the sides leaves it unchanged."""
    anchors, positives = unit_pairs(5, 4, 7, torch.float64)
    one_way = torch.nn.functional.cross_entropy(anchors @ positives.T / 0.1, torch.arange(5))
    other_way = torch.nn.functional.cross_entropy(positives @ anchors.T / 0.1, torch.arange(5))
    assert abs(one_way - other_way) > 1e-3
    loss = info_nce_loss(anchors, positives, 0.1)
    assert loss.item() == pytest.approx(((one_way + other_way) / 2).item(), rel=1e-12)
    assert info_nce_loss(positives, anchors, 0.1).item() == pytest.approx(loss.item(),
                                                                           rel=1e-12)


def test_info_nce_of_perfect_pairs_falls_with_the_temperature() -> None:
    """Orthogonal pairs, each left equal to its right: the loss is log(1 + (B-1) e^(-1/T))."""
    eye = torch.eye(4, dtype=torch.float64)
    for temperature in (0.5, 0.1):
        expected = math.log(1 + 3 * math.exp(-1 / temperature))
        assert info_nce_loss(eye, eye, temperature).item() == pytest.approx(expected, rel=1e-12)
