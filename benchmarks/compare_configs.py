"""Head configurations side by side, each scored by k-fold cross-validation as `head.train
--folds K` scores it: the measurements behind head.train's defaults (the training levers) and
the fusion table in the README. Quality, not speed, though seconds per epoch are printed too.

    .venv/bin/python benchmarks/compare_configs.py levers --cache cache/X-hflip.h5
    .venv/bin/python benchmarks/compare_configs.py fusion --cache NAME=PATH [--cache ...] \\
        --combination NAME[+NAME...] [...]
    .venv/bin/python benchmarks/compare_configs.py ensembles --cache NAME=PATH [--cache ...] \\
        [--seeds 5] [--rows seeds] [--rows fold-heads]
    .venv/bin/python benchmarks/compare_configs.py whiten-fusion --cache NAME=PATH [...] \\
        [--weight 0 --weight 0.1 ...]
    .venv/bin/python benchmarks/compare_configs.py runs runs/A runs/B [...]

`levers` runs the head of before the levers (triplet loss, no features layer, no dropout, the
images as they are), the levers one at a time and together, and the head the sweep found, on
one two-view cache (`extract --hflip`). `fusion` runs each combination of the named caches (one
alone, or several fused). `ensembles` runs, on each cache, the whitened baseline, one head and
`--seeds N` heads (head.train --seeds); with `--rows fold-heads`, what the folds' heads add to
the final head (head.train --keep-fold-heads), which k-fold cannot score (each fold head trained
on the other folds' validation pairs): nested, each outer fold's training pairs cut into K inner
folds whose heads, at the epoch the inner folds chose, join a final head trained on all of them,
and the outer fold's pairs score both. `whiten-fusion` fuses, per fold, the default head (each
fold's head at the epoch the mean chose) with head.whiten's whitening (fitted on that fold's
training images) at the score level: cosine (1 - w) head + w whitened for each `--weight` w,
with each w's paired difference to w = 0 and, since choosing w on the folds that score it is
optimistic, a w chosen per fold on the other folds' figures. `runs` reads finished `head.train
--folds K` run folders (any options: --seeds, --whitened-weight...) and prints each one's figures at
its kept epoch with the paired difference to the first run's, fold by fold.
Every configuration sees the same folds (`--split-seed`) and the same initialisation (`--seed`);
each cache is loaded once. The figure is the mean validation top-2 over the folds at the best
epoch by that mean, after the default assignment, +- its standard error; the plain top-2 beside
it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click
import common  # noqa: F401  (sets TQDM_DISABLE before the project's modules import tqdm)

from head.config import TrainConfig
from head.figures import best_epoch, evaluate, selection_figure, summarize
from head.folds import Prepared, make_fold, prepare, views_used
from head.model import ensemble_of
from head.train import (
    SeedTrainers,
    cross_validate,
    cross_validate_heads,
    embed,
    final_and_fold_members,
    validate,
)
from head.whiten import fused_with_whitening, score_whitening, whitened_embeddings
from tll.data import fold_splits

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
    return score_prepared(prepare(caches, base), base, configs)


def score_prepared(prepared: Prepared, base: TrainConfig, configs: dict[str, dict]
                   ) -> list[tuple[str, dict, float]]:
    """`score` on caches already loaded, `base` changed by each configuration."""
    epochs, results = base.epochs, []
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
    return f"{cells(best)} | {best['epoch']} | {seconds:.1f}"


def cells(summary: dict) -> str:
    """Top-2 after the assignment and plain, each mean +- standard error over the folds."""
    return " | ".join(f"{summary[k]:.3f} +- {summary[k + '_se']:.3f}"
                      for k in ("top2_assigned", "top2"))


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


def nested_fold_heads(prepared: Prepared, config: TrainConfig
                      ) -> tuple[dict[str, list[dict]], list[int]]:
    """For each outer fold: K inner folds of its training pairs, cross-validated with their
    heads kept at the chosen epoch; a final head trained on all its training pairs for that many
    epochs; each scored on the outer fold's pairs, which none of them saw. Returns each row's
    per-outer-fold figures and the chosen epochs."""
    records, epochs = {"final head": [], "fold heads": [], "final + fold heads": []}, []
    head_config = prepared.head_config(config)
    members = final_and_fold_members(config)
    outer_splits = fold_splits(prepared.pairs.dataset, config.folds, config.split_seed)
    for number, (outer, (train_pairs, _)) in enumerate(zip(prepared.folds, outer_splits,
                                                           strict=True)):
        inner_data = dataclasses.replace(prepared.pairs.dataset, train_pairs=train_pairs)
        inner = [make_fold(prepared.pairs, *split)
                 for split in fold_splits(inner_data, config.folds, config.split_seed)]
        history, fold_heads = cross_validate_heads(inner, head_config, config, progress=False,
                                                   keep_heads=True)
        chosen = best_epoch(history, config)["epoch"]
        final = SeedTrainers(outer, head_config, dataclasses.replace(config, epochs=chosen),
                             progress=False)
        for epoch in range(1, chosen + 1):
            record = final.epoch(epoch)
        records["final head"].append({k: v for k, v in record.items() if k != "loss"})
        records["fold heads"].append(
            validate(ensemble_of(fold_heads, members[config.seeds:]), outer, config, chosen))
        records["final + fold heads"].append(
            validate(ensemble_of([final.trained_head, *fold_heads], members), outer, config,
                     chosen))
        epochs.append(chosen)
        click.echo(f"  outer fold {number}: epoch {chosen}, " + ", ".join(
            f"{name} {rows[-1]['top2_assigned']:.3f}" for name, rows in records.items()),
            err=True)
    return records, epochs


@cli.command()
@click.option("--cache", "named", multiple=True, required=True, metavar="NAME=PATH",
              help="A cache and its name in the table; repeat for rows of each.")
@click.option("--seeds", default=5, show_default=True, help="The ensemble's heads.")
@click.option("--rows", "parts", type=click.Choice(["seeds", "fold-heads"]), multiple=True,
              default=("seeds",), show_default=True,
              help="seeds: the whitened baseline, one head and --seeds heads; fold-heads: the "
                   "nested measurement of the folds' heads (K + 1 times the cost of one head's "
                   "k-fold run). Repeat for both.")
@common_options
def ensembles(named: tuple[str, ...], seeds: int, parts: tuple[str, ...], folds: int,
              epochs: int, seed: int, split_seed: int) -> None:
    """The whitened baseline, one head, --seeds N heads and what the folds' heads add, on each
    cache; seconds for all folds and epochs (the nested rows: for all three together)."""
    click.echo(f"\nensembles: {folds}-fold, {epochs} epochs, seed {seed}, split seed "
               f"{split_seed}\n")
    lines = ["| cache | configuration | top-2, assigned | top-2, plain | epoch | seconds |",
             "|---|---|---|---|---|---|"]
    for text in named:
        name, path = text.split("=", 1)
        base = TrainConfig(caches=(path,), name="compare", folds=folds, epochs=epochs,
                           seed=seed, split_seed=split_seed, device="cpu")
        prepared = prepare([Path(path)], base)
        # untimed: the first epoch of a process pays for allocations the next ones reuse
        cross_validate(prepared.folds[:1], prepared.head_config(base),
                       dataclasses.replace(base, epochs=1), progress=False)
        if "seeds" in parts:
            started = time.perf_counter()
            whitened = summarize([score_whitening(fold, base)[1] for fold in prepared.folds])
            lines.append(f"| {name} | whitened (head.whiten) | {cells(whitened)} | - | "
                         f"{time.perf_counter() - started:.0f} |")
            for label, best, per_epoch in score_prepared(
                    prepared, base, {"one head": {}, f"{seeds} seeds": {"seeds": seeds}}):
                lines.append(f"| {name} | {label} | {cells(best)} | {best['epoch']} | "
                             f"{per_epoch * epochs:.0f} |")
        if "fold-heads" in parts:
            started = time.perf_counter()
            records, chosen = nested_fold_heads(prepared, base)
            seconds = time.perf_counter() - started
            for label, per_fold in records.items():
                lines.append(f"| {name} | nested: {label} | {cells(summarize(per_fold))} | "
                             f"{'/'.join(map(str, chosen))} | {seconds:.0f} |")
    click.echo("\n".join(lines))


def whitening_fusion(prepared: Prepared, config: TrainConfig, weights: list[float]
                     ) -> tuple[dict[float, list[dict]], int]:
    """Each fold's validation figures at each whitening weight w (cosine (1 - w) head +
    w whitened), the head at the epoch the folds' mean chose (returned too), the whitening
    fitted on the fold's training images only."""
    history, heads = cross_validate_heads(prepared.folds, prepared.head_config(config), config,
                                          progress=False, keep_heads=True)
    best = best_epoch(history, config)
    chosen, figure = best["epoch"], selection_figure(config)
    trained_figures = [record[figure] for record in best.get("folds", [best])]
    records = {weight: [] for weight in weights}
    for number, (fold, head) in enumerate(zip(prepared.folds, heads, strict=True)):
        fold = views_used(fold, config)
        trained = embed(head, fold.features, fold.val_images, config.batch_size)  # (M, D)
        whitening, _ = score_whitening(fold, config)
        whitened = whitened_embeddings(whitening, fold.features, fold.val_images)  # (M, k)
        for weight in weights:
            records[weight].append(evaluate(fused_with_whitening(trained, whitened, weight),
                                            fold, config.assign, config.assign_temperature))
        # w = 0 re-embeds the kept head: it must score what training validated
        click.echo(f"  fold {number}: in training {trained_figures[number]:.3f}; " + ", ".join(
            f"w {weight} {rows[-1][figure]:.3f}" for weight, rows in records.items()), err=True)
    return records, chosen


def paired(values: list[float], baseline: list[float]) -> str:
    """The mean difference over folds +- its standard error (of the per-fold differences)."""
    difference = summarize([{"d": a - b} for a, b in zip(values, baseline, strict=True)])
    return f"{difference['d']:+.3f} +- {difference['d_se']:.3f}"


def chosen_on_other_folds(per_fold: dict[float, list[float]]) -> tuple[list[float], list[float]]:
    """For each fold, the weight with the best mean figure over the other folds (the first such
    weight), and that weight's figure on the fold: (weights, figures)."""
    folds = len(next(iter(per_fold.values())))
    weights, figures = [], []
    for k in range(folds):
        best = max(per_fold, key=lambda w: sum(v for i, v in enumerate(per_fold[w]) if i != k))
        weights.append(best)
        figures.append(per_fold[best][k])
    return weights, figures


@cli.command("whiten-fusion")
@click.option("--cache", "named", multiple=True, required=True, metavar="NAME=PATH",
              help="A cache and its name in the table; repeat for rows of each.")
@click.option("--weight", "weights", type=click.FloatRange(0, 1), multiple=True,
              default=(0.0, 0.1, 0.25, 0.5), show_default=True,
              help="The whitened cosine's weight w (repeat); w = 0 is the head alone.")
@common_options
def whiten_fusion(named: tuple[str, ...], weights: tuple[float, ...], folds: int, epochs: int,
                  seed: int, split_seed: int) -> None:
    """The default head's cosine fused with the whitened one, (1 - w) head + w whitened, per
    fold; each w's figures, its paired difference to w = 0, and w chosen on the other folds."""
    weights = sorted(set(weights) | {0.0})
    click.echo(f"\nwhitening fused with the head: {folds}-fold, {epochs} epochs, seed {seed}, "
               f"split seed {split_seed}\n")
    lines = ["| cache | w (whitened) | top-2, assigned | top-2, plain | assigned - (w = 0), "
             "paired | epoch | seconds |", "|---|---|---|---|---|---|---|"]
    for text in named:
        name, path = text.split("=", 1)
        base = TrainConfig(caches=(path,), name="compare", folds=folds, epochs=epochs,
                           seed=seed, split_seed=split_seed, device="cpu")
        started = time.perf_counter()
        records, chosen = whitening_fusion(prepare([Path(path)], base), base, weights)
        seconds = time.perf_counter() - started
        figure = selection_figure(base)
        per_fold = {w: [r[figure] for r in rows] for w, rows in records.items()}
        for weight, rows in records.items():
            lines.append(f"| {name} | {weight:g} | {cells(summarize(rows))} | "
                         f"{paired(per_fold[weight], per_fold[0.0])} | {chosen} | "
                         f"{seconds:.0f} |")
        picked, figures = chosen_on_other_folds(per_fold)
        selected = summarize([{"f": f} for f in figures])
        lines.append(f"| {name} | chosen on the other folds ({'/'.join(f'{w:g}' for w in picked)})"
                     f" | {selected['f']:.3f} +- {selected['f_se']:.3f} | - | "
                     f"{paired(figures, per_fold[0.0])} | {chosen} | (same) |")
    click.echo("\n".join(lines))


def kept_epoch_folds(run: Path) -> tuple[dict, dict, list[dict], float]:
    """A finished k-fold run's config (config.json's), its kept epoch's summary, that epoch's
    per-fold figures and the seconds its epochs took (metrics.jsonl)."""
    summary = json.loads((run / "config.json").read_text())
    config, best = summary["config"], summary["best"]
    if not config.get("folds"):
        raise click.UsageError(f"{run} was not trained with --folds: no per-fold figures")
    with open(run / "metrics.jsonl") as lines:
        history = [json.loads(line) for line in lines]
    epoch = next(r for r in history if r["epoch"] == best["epoch"])
    return config, best, epoch["folds"], sum(r["seconds"] for r in history)


@cli.command("runs")
@click.argument("runs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
def compare_runs(runs: tuple[Path, ...]) -> None:
    """Finished `head.train --folds K` runs on the same folds (the same caches, --folds and
    --split-seed): each one's figures at its kept epoch and the paired difference of its
    selection figure to the first run's, with the seconds its folds trained."""
    read = [kept_epoch_folds(run) for run in runs]
    same = ("caches", "folds", "split_seed")
    first = read[0][0]
    figure = selection_figure(TrainConfig(**first))
    for run, (config, *_) in zip(runs, read, strict=True):
        if any(config[key] != first[key] for key in same):
            raise click.UsageError(f"{run} was not validated on {runs[0]}'s folds (the same "
                                   f"{', '.join(same)} are needed)")
        if selection_figure(TrainConfig(**config)) != figure:
            raise click.UsageError(f"{run} chose its epoch by another figure than {figure}")
    baseline = [f[figure] for f in read[0][2]]
    click.echo(f"| run | top-2, assigned | top-2, plain | {figure} - {runs[0].name}'s, paired "
               "| epoch | seconds (folds) |")
    click.echo("|---|---|---|---|---|---|")
    for run, (_, best, folds, seconds) in zip(runs, read, strict=True):
        difference = "-" if run == runs[0] else paired([f[figure] for f in folds], baseline)
        click.echo(f"| {run.name} | {cells(best)} | {difference} | {best['epoch']} | "
                   f"{seconds:.0f} |")

if __name__ == "__main__":
    cli()
