"""What a training run leaves behind besides its head: metrics.jsonl (a line per epoch, as it
ends), config.json, curves.png, and the log's lines and closing summary table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from extract.cache import CacheInfo
from head.config import TrainConfig
from head.figures import selection_figure
from head.folds import Fold
from head.loss import LOSS_NAMES
from tll import logger


def epoch_log(metrics: Path) -> Callable[[int, dict], None]:
    """`on_epoch(number, record)`: appends the epoch's record to the file `metrics`
    (metrics.jsonl) and logs its figures."""

    def log_epoch(number: int, record: dict) -> None:
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info("epoch %2d  %s  (%.1f s)", number, figures_text(record), record["seconds"])

    return log_epoch


def write_summary(work: Path, history: list[dict], baseline: dict | None, best: dict,
                  config: TrainConfig, infos: list[CacheInfo]) -> None:
    """config.json (the config, the caches, the frozen trunk's and the kept epoch's figures)
    and curves.png, in the run folder `work`."""
    summary = {"config": asdict(config), "caches": [asdict(info) for info in infos],
               "baseline": baseline, "best": {k: v for k, v in best.items() if k != "folds"}}
    (work / "config.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(history, baseline, work / "curves.png", config.loss)


def validated_on(folds: list[Fold]) -> str:
    if len(folds) == 1:
        return f"{len(folds[0].val_truth)} validation queries"
    return f"mean of {len(folds)} folds of {min(len(f.val_truth) for f in folds)}+ queries"


def figures_only(record: dict) -> dict:
    """An epoch's figures, without its number, loss, time and folds (the checkpoint's
    `metrics`)."""
    return {k: v for k, v in record.items() if k not in ("epoch", "loss", "loss_se", "seconds",
                                                          "folds")}


def figures_text(record: dict) -> str:
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


def split_baseline(baseline: dict[str, float]) -> tuple[dict, dict]:
    """The frozen trunk's pooled-cosine figures and head.whiten's (`whitened_<figure>`, PCA
    fitted on the training images), each under the figures' own names."""
    whitened = {k.removeprefix("whitened_"): v for k, v in baseline.items()
                if k.startswith("whitened_")}
    return {k: v for k, v in baseline.items() if not k.startswith("whitened_")}, whitened


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
        frozen, whitened = split_baseline(baseline)
        lines.append("frozen  -       " + cells(frozen))
        if whitened:
            lines.append("whitened -      " + cells(whitened))
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
