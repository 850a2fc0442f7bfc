"""How much the one-to-one assignment lifts validation top-2, per method and temperature: the
measurement behind `infer.scoring.DEFAULT_ASSIGN` and `DEFAULT_TEMPERATURE`.

For each cache: k-fold cross-validation of the default head (`head.train.Trainer`, every fold
side by side); after every epoch each fold's validation embeddings are scored plainly and with
each assignment. Each method is reported at its own best epoch by the mean over folds (what
`head.train --assign METHOD` would keep), as mean +- standard error over folds, next to the
frozen trunk scored the same way. Quality, not speed: unlike the other scripts here this prints
accuracies, and it takes minutes (ResNet50 on the real data: 5 folds x 10 epochs).

    .venv/bin/python benchmarks/assignment_quality.py cache/resnet50-layer4-none.h5 [...]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import common  # noqa: F401  (sets TQDM_DISABLE before the project's modules import tqdm)
import numpy as np

from head.config import TrainConfig
from head.figures import evaluate, frozen_baseline, summarize
from head.folds import prepare
from head.train import Trainer, embed

METHODS = [("none", None), ("hungarian", None)] + [("sinkhorn", t)
                                                   for t in (0.05, 0.1, 0.2, 0.5, 1.0)]


def label(method: str, temperature: float | None) -> str:
    return method if temperature is None else f"{method} T={temperature:g}"


def figure(metrics: dict[str, float], method: str) -> float:
    return metrics["top2" if method == "none" else "top2_assigned"]


def top2_by_method(embeddings: np.ndarray, fold) -> dict[str, float]:
    return {label(m, t): figure(evaluate(embeddings, fold, m, t or 1.0), m) for m, t in METHODS}


@click.command()
@click.argument("caches", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--folds", default=5, show_default=True)
@click.option("--epochs", default=10, show_default=True)
@click.option("--seed", default=0, show_default=True)
def cli(caches: tuple[Path, ...], folds: int, epochs: int, seed: int) -> None:
    """Validation top-2 per assignment method, k-fold mean +- SE, for each CACHE."""
    for cache in caches:
        config = TrainConfig(caches=(str(cache),), name="assignment", epochs=epochs, folds=folds,
                             seed=seed, device="cpu")
        prepared = prepare([cache], config)
        info, fold_list = prepared.infos[0], prepared.folds
        trainers = [Trainer(fold, prepared.head_config(config), config, progress=False)
                    for fold in fold_list]
        frozen = summarize([
            {label(m, t): figure(frozen_baseline(fold, dataclasses.replace(
                config, assign=m, assign_temperature=t or 1.0)), m) for m, t in METHODS}
            for fold in fold_list])
        per_epoch = []
        for number in range(1, epochs + 1):
            records = []
            for trainer in trainers:
                trainer.epoch(number)
                embeddings = embed(trainer.head, trainer.fold.features, trainer.fold.val_images,
                                   config.batch_size)
                records.append(top2_by_method(embeddings, trainer.fold))
            per_epoch.append(summarize(records))
            print(f"  epoch {number}: " + "  ".join(
                f"{k} {per_epoch[-1][k]:.3f}" for k in per_epoch[-1] if not k.endswith("_se")),
                flush=True)
        print(f"\n{cache} ({info.backbone} {info.layer}, {info.weights_id}), {folds} folds of "
              f"{len(fold_list[0].val_truth)} queries, {epochs} epochs")
        print(f"{'method':<18}{'frozen trunk':>16}{'head':>16}{'epoch':>7}")
        for m, t in METHODS:
            key = label(m, t)
            best = max(range(epochs), key=lambda e: per_epoch[e][key])
            print(f"{key:<18}{frozen[key]:>9.3f} +- {frozen[key + '_se']:.3f}"
                  f"{per_epoch[best][key]:>9.3f} +- {per_epoch[best][key + '_se']:.3f}"
                  f"{best + 1:>7}")


if __name__ == "__main__":
    cli()
