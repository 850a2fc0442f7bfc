"""The training-free baselines side by side, k-fold, as `head.train --folds K` scores them: the
frozen trunk's pooled cosine and `head.whiten`'s PCA whitening at several numbers of components,
each fitted on the fold's training images only. Quality, with the seconds of each (all folds).

    .venv/bin/python benchmarks/whiten_baseline.py --cache cache/X-hflip.h5 [--cache ...] \\
        [--folds 5] [--components 16 --components 64 ...]

Each cache is loaded once and every row sees the same folds (`--split-seed`). The figure is the
mean validation top-2 over the folds after the default assignment, +- its standard error; the
plain top-2 beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import common  # noqa: F401  (sets TQDM_DISABLE before the project's modules import tqdm)
import sklearn.decomposition  # noqa: F401  (imported here, not inside the first row's seconds)

from head.config import TrainConfig
from head.figures import frozen_baseline, summarize
from head.folds import prepare
from head.whiten import DEFAULT_COMPONENTS, score_whitening


def cell(summary: dict, key: str) -> str:
    return f"{summary[key]:.3f} +- {summary[key + '_se']:.3f}"


@click.command()
@click.option("--cache", "caches", type=click.Path(exists=True, path_type=Path), multiple=True,
              required=True, help="A cache; repeat for one table row group per cache.")
@click.option("--folds", default=5, show_default=True)
@click.option("--split-seed", default=0, show_default=True)
@click.option("--components", multiple=True, type=click.IntRange(min=1),
              default=(16, 32, DEFAULT_COMPONENTS, 128), show_default=True,
              help="Principal components kept; repeat.")
def cli(caches: tuple[Path, ...], folds: int, split_seed: int,
        components: tuple[int, ...]) -> None:
    """Frozen pooled cosine and PCA whitening, k-fold, on each cache."""
    click.echo("| cache | baseline | top-2, assigned | top-2, plain | seconds (all folds) |")
    click.echo("|---|---|---|---|---|")
    for cache in caches:
        config = TrainConfig(caches=(str(cache),), name="whiten", folds=folds,
                             split_seed=split_seed, device="cpu")
        prepared = prepare([cache], config)
        for k in (None, *components):  # None: the frozen trunk's pooled cosine
            name = "frozen, pooled cosine" if k is None else f"whitened, {k} components"
            started = time.perf_counter()
            summary = summarize([frozen_baseline(fold, config) if k is None
                                 else score_whitening(fold, config, k)[1]
                                 for fold in prepared.folds])
            seconds = time.perf_counter() - started
            click.echo(f"| {cache.name} | {name} | {cell(summary, 'top2_assigned')} | "
                       f"{cell(summary, 'top2')} | {seconds:.1f} |")


if __name__ == "__main__":
    cli()
