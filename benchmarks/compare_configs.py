"""Head configurations side by side, each scored by k-fold cross-validation as `head.train
--folds K` scores it: the measurements behind head.train's defaults (the training levers) and
the fusion table in the README. Quality, not speed, though seconds per epoch are printed too.

    .venv/bin/python benchmarks/compare_configs.py levers --cache cache/X-hflip.h5
    .venv/bin/python benchmarks/compare_configs.py fusion --cache NAME=PATH [--cache ...] \\
        --combination NAME[+NAME...] [...]

`levers` runs the head of before the levers (triplet loss, no features layer, no dropout, the
images as they are), the levers one at a time and together, and the head the sweep found, on
one two-view cache (`extract --hflip`). `fusion` runs each combination of the named caches (one
alone, or several fused).
Every configuration sees the same folds (`--split-seed`) and the same initialisation (`--seed`);
each cache is loaded once. The figure is the mean validation top-2 over the folds at the best
epoch by that mean, after the default assignment, +- its standard error; the plain top-2 beside
it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click
import common  # noqa: F401  (sets TQDM_DISABLE before the project's modules import tqdm)

from head.config import TrainConfig
from head.figures import best_epoch
from head.folds import prepare
from head.train import cross_validate

# the levers of issue 12 one at a time, on the head before them
LEVERS = {
    "before (triplet, no features layer, no dropout, no flip)": {},
    "+ features layer 256": {"features_dim": 256},
    "+ dropout 0.4": {"dropout": 0.4},
    "+ flip views": {"flip": True},
    "+ InfoNCE (T 0.2)": {"loss": "infonce", "temperature": 0.2},
    "all four levers": {"features_dim": 256, "dropout": 0.4, "flip": True, "loss": "infonce",
                        "temperature": 0.2},
    "flip + dropout 0.4": {"flip": True, "dropout": 0.4},
    "flip + dropout 0.4 + InfoNCE": {"flip": True, "dropout": 0.4, "loss": "infonce",
                                     "temperature": 0.2},
}
# the 5-fold sweep's trial 0 on the VGG16 cache, rounded, with flip views; and without its
# features layer
SWEEP_HEAD = {"loss": "infonce", "temperature": 0.2, "lr": 6e-4, "weight_decay": 5e-4,
              "embedding_dim": 128, "attention": "channel", "features_dim": 256, "dropout": 0.4,
              "flip": True}
SWEPT = {"the sweep's head + flip": SWEEP_HEAD,
         "the sweep's head + flip, no features layer": {**SWEEP_HEAD, "features_dim": 0}}
# head.train's defaults before the levers and the sweep
BEFORE = {"loss": "triplet", "features_dim": 0, "dropout": 0.0, "flip": False, "lr": 1e-4,
          "weight_decay": 1e-4, "embedding_dim": 256, "attention": "spatial"}


def score(caches: list[Path], configs: dict[str, dict], folds: int, epochs: int, seed: int,
          split_seed: int) -> list[tuple[str, dict, float]]:
    """(name, the best epoch's summary, seconds per epoch) of each configuration."""
    base = TrainConfig(caches=tuple(map(str, caches)), name="compare", folds=folds,
                       epochs=epochs, seed=seed, split_seed=split_seed, device="cpu")
    prepared = prepare(caches, base)
    results = []
    for name, options in configs.items():
        config = dataclasses.replace(base, **options)
        started = time.perf_counter()
        history = cross_validate(prepared.folds, prepared.head_config(config), config,
                                 progress=False)
        seconds = (time.perf_counter() - started) / epochs
        best = best_epoch(history, config)
        results.append((name, best, seconds))
        click.echo(f"  {name}: {row(best, seconds)}", err=True)
    return results


def row(best: dict, seconds: float) -> str:
    figures = [f"{best[k]:.3f} +- {best[k + '_se']:.3f}" for k in ("top2_assigned", "top2")]
    return f"{figures[0]} | {figures[1]} | {best['epoch']} | {seconds:.1f}"


def table(title: str, results: list[tuple[str, dict, float]]) -> None:
    click.echo(f"\n{title}\n")
    click.echo("| configuration | top-2, assigned | top-2, plain | epoch | s/epoch (all folds) |")
    click.echo("|---|---|---|---|---|")
    for name, best, seconds in results:
        click.echo(f"| {name} | {row(best, seconds)} |")


@click.group()
def cli() -> None:
    """Head configurations scored by k-fold cross-validation."""


def common_options(function):
    for option in (click.option("--folds", default=5, show_default=True),
                   click.option("--epochs", default=10, show_default=True),
                   click.option("--seed", default=0, show_default=True),
                   click.option("--split-seed", default=0, show_default=True)):
        function = option(function)
    return function


@cli.command()
@click.option("--cache", type=click.Path(exists=True, path_type=Path), required=True,
              help="A two-view cache (extract --hflip).")
@click.option("--row", "rows", multiple=True, metavar="NAME",
              help="Run only this row of the table (repeat) [default: every row].")
@common_options
def levers(cache: Path, rows: tuple[str, ...], folds: int, epochs: int, seed: int,
           split_seed: int) -> None:
    """The head before the levers, each lever alone and together, and the sweep's head."""
    configs = {name: {**BEFORE, **options} for name, options in {**LEVERS, **SWEPT}.items()}
    if unknown := set(rows) - set(configs):
        raise click.BadParameter(f"no row {sorted(unknown)}; the rows: {list(configs)}",
                                 param_hint="--row")
    configs = {name: options for name, options in configs.items() if not rows or name in rows}
    results = score([cache], configs, folds, epochs, seed, split_seed)
    table(f"{cache}: {folds}-fold, {epochs} epochs, seed {seed}, split seed {split_seed}",
          results)


@cli.command()
@click.option("--cache", "named", multiple=True, required=True, metavar="NAME=PATH",
              help="A cache and its name in the table; repeat.")
@click.option("--combination", "combinations", multiple=True, required=True,
              metavar="NAME[+NAME...]", help="Caches to fuse (or one alone); repeat.")
@common_options
def fusion(named: tuple[str, ...], combinations: tuple[str, ...], folds: int, epochs: int,
           seed: int, split_seed: int) -> None:
    """Each combination of caches, alone or fused, with the default head."""
    paths = dict(text.split("=", 1) for text in named)
    results = []
    for combination in combinations:
        caches = [Path(paths[name]) for name in combination.split("+")]
        results += score(caches, {combination: {}}, folds, epochs, seed, split_seed)
    table(f"fusion: {folds}-fold, {epochs} epochs, seed {seed}, split seed {split_seed}",
          results)


if __name__ == "__main__":
    cli()
