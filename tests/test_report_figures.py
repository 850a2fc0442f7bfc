"""head.train's figures over epochs and folds, by hand: `summarize` (the mean and standard error
over folds) and `best_epoch` (the epoch a run keeps), and the curves' loss axis, without training
anything."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.axes
import pytest

from head.config import TrainConfig
from head.figures import best_epoch, summarize
from head.loss import LOSSES
from head.report import plot_curves


def config(assign: str) -> TrainConfig:
    return TrainConfig(caches=("x",), name="x", assign=assign)


def test_summarize_one_fold_is_its_figures_without_standard_errors() -> None:
    assert summarize([{"loss": 0.5, "top2": 0.25}]) == {"loss": 0.5, "top2": 0.25}


def test_summarize_takes_the_mean_and_the_standard_error_over_folds() -> None:
    # top2: 1, 2, 4 -> mean 7/3; sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3, so the
    # standard error is sqrt(7/3) / sqrt(3) = sqrt(7) / 3. loss: 0.2, 0.4, 0.3 -> 0.3, se
    # 0.1 / sqrt(3)
    records = [{"loss": 0.2, "top2": 1.0}, {"loss": 0.4, "top2": 2.0}, {"loss": 0.3, "top2": 4.0}]
    assert summarize(records) == pytest.approx({
        "loss": 0.3, "loss_se": 0.1 / math.sqrt(3), "top2": 7 / 3, "top2_se": math.sqrt(7) / 3})
    # two equal folds: no spread at all
    assert summarize([{"top1": 0.5}, {"top1": 0.5}]) == {"top1": 0.5, "top1_se": 0.0}


HISTORY = [
    {"epoch": 1, "loss": 0.9, "top2": 0.40, "top2_assigned": 0.50},
    {"epoch": 2, "loss": 0.7, "top2": 0.60, "top2_assigned": 0.55},
    {"epoch": 3, "loss": 0.5, "top2": 0.60, "top2_assigned": 0.70},
    {"epoch": 4, "loss": 0.4, "top2": 0.50, "top2_assigned": 0.70},
]


def test_best_epoch_is_chosen_by_what_infer_reports() -> None:
    """Plain top-2 without assignment, the assigned top-2 with it; of equal ones, the first."""
    assert best_epoch(HISTORY, config("none"))["epoch"] == 2  # 0.60 at 2 and 3: the first
    assert best_epoch(HISTORY, config("sinkhorn"))["epoch"] == 3  # 0.70 at 3 and 4: the first
    assert best_epoch(HISTORY, config("hungarian"))["epoch"] == 3


def test_best_epoch_without_validation_is_the_last() -> None:
    history = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.9}]
    assert best_epoch(history, config("sinkhorn")) == history[-1]
    assert best_epoch(history, config("none")) == history[-1]


@pytest.mark.parametrize("loss", LOSSES)
def test_the_curves_name_the_configured_loss(loss: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    labels = []
    original = matplotlib.axes.Axes.set

    def record(self: matplotlib.axes.Axes, **properties):
        labels.append(properties.get("ylabel"))
        return original(self, **properties)

    monkeypatch.setattr(matplotlib.axes.Axes, "set", record)
    plot_curves(HISTORY, {"top2": 0.3}, tmp_path / "curves.png", loss)
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert labels[0] == {"triplet": "cosine triplet loss", "infonce": "InfoNCE loss"}[loss]
