"""Trials per minute of `python -m head.sweep` as it runs now against the sweep before issue 21,
in one process, on one cache, with the same study settings (5 folds, `--sampler-seed`): TPE's
first 10 trials are drawn at random from that seed, so both runs try the same configs.

Before: every trial trains its drawn --epochs (no --patience), the median pruner judges from the
fourth epoch, training steps in float32 and the head's forward as before issue 21 (the maps
NCHW, the attention as convolutions: head_speed's what-if). Now: head.sweep's defaults. The
table gives trials, complete / pruned, epochs trained (each over every fold), minutes, trials
per minute (of the wall clock and of the process's CPU time), the ratio (target >= 4), and the
best trial's mean top-2 after assignment +- SE, so that a faster sweep is seen to find as good
a head.

    python benchmarks/sweep_speed.py --cache cache/vgg16-features-none-hflip.h5 [--trials 10]
"""

from __future__ import annotations

import contextlib
import resource
import tempfile
import time
from pathlib import Path

import click
import common
import optuna
import torch
from head_speed import what_if

from head import sweep
from head.config import TrainConfig

TARGET_RATIO = 4.0


@contextlib.contextmanager
def before_issue_21():
    """The pruner's old warm-up and the head's old forward (the caller passes --patience 0 and
    --param amp=false: a one-value parameter draws nothing from the sampler)."""
    saved = sweep.PRUNER_WARMUP_EPOCHS
    sweep.PRUNER_WARMUP_EPOCHS = 3
    try:
        with what_if(plain=True):
            yield
    finally:
        sweep.PRUNER_WARMUP_EPOCHS = saved


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (--jobs' workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_sweep(cache: Path, trials: int, folds: int, sampler_seed: int, patience: int,
              params: tuple[str, ...], scratch: Path, jobs: int = 1) -> dict:
    started, cpu_started = time.perf_counter(), cpu_seconds()
    out = sweep.main(cache, trials=trials, folds=folds, study="bench", runs_dir=scratch,
                     sampler_seed=sampler_seed, device="cpu", patience=patience, params=params,
                     jobs=jobs)
    minutes = (time.perf_counter() - started) / 60
    cpu_minutes = (cpu_seconds() - cpu_started) / 60
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{scratch / 'sweeps.db'}")
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    figure = sweep.selection_figure(TrainConfig(caches=(str(cache),), name="x"))
    return {"trials": len(study.trials), "complete": states.count(optuna.trial.TrialState.COMPLETE),
            "pruned": states.count(optuna.trial.TrialState.PRUNED),
            "epochs": sum(len(t.intermediate_values) for t in study.trials),
            "minutes": minutes, "per_minute": len(study.trials) / minutes,
            "cpu_minutes": cpu_minutes, "per_cpu_minute": len(study.trials) / cpu_minutes,
            "best": (f"{best.value:.3f} +- {best.user_attrs.get(f'{figure}_se', float('nan')):.3f}"
                     f" (trial {best.number}, epoch {best.user_attrs.get('epoch')})"
                     if best else "-"),
            "out": out}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--cache", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              required=True, help="The cache both sweeps search on (the README's: VGG16).")
@click.option("--trials", type=click.IntRange(min=1), default=10)
@click.option("--folds", type=click.IntRange(min=2), default=5)
@click.option("--sampler-seed", type=int, default=0)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads [default: torch's].")
@click.option("--jobs", type=click.IntRange(min=2), default=None,
              help="Also the sweep now with --jobs N (its figure is the wall clock's: N "
                   "processes take no less CPU time, they use more cores).")
@click.option("--only", type=click.Choice(["before", "now"]), default=None,
              help="Run one of the two sweeps (two processes side by side, each on its own "
                   "core, take half the wall time; compare their CPU-time figures).")
def cli(cache: Path, trials: int, folds: int, sampler_seed: int, threads: int | None,
        jobs: int | None, only: str | None) -> None:
    """Trials per minute of head.sweep now against before issue 21, same study settings."""
    if threads:
        torch.set_num_threads(threads)
    click.echo(common.environment())
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        sweeps = [("before issue 21", 0, ("amp=false",), before_issue_21(), 1),
                  ("now (defaults)", sweep.DEFAULT_PATIENCE, (), contextlib.nullcontext(), 1)]
        if jobs:
            sweeps.append((f"now, --jobs {jobs}", sweep.DEFAULT_PATIENCE, (),
                           contextlib.nullcontext(), jobs))
        for number, (name, patience, params, context, processes) in enumerate(sweeps):
            if only and not name.startswith(only):
                continue
            with context:
                result = run_sweep(cache, trials, folds, sampler_seed, patience, params,
                                   Path(scratch) / str(number), processes)
            click.echo(f"{name}: {result}")
            rows.append([name, result["trials"], result["complete"], result["pruned"],
                         result["epochs"], result["minutes"], result["per_minute"],
                         result["per_cpu_minute"], result["best"]])
    if only:
        return
    rows[0] += ["", "", ""]
    for row in rows[1:]:
        ratios = [row[column] / rows[0][column] for column in (6, 7)]
        row += [*ratios, common.verdict(ratios[1] if row is rows[1] else ratios[0],
                                        TARGET_RATIO)]
    click.echo(f"\n{cache}, {folds} folds, --sampler-seed {sampler_seed}, {trials} trials each")
    click.echo(common.table(["sweep", "trials", "complete", "pruned", "epochs trained",
                             "minutes", "trials/min", "trials/CPU min",
                             "best top-2 (trial, epoch)", "ratio", "ratio (CPU)",
                             f"target >= {TARGET_RATIO:g}"], rows))
    click.echo("trials/CPU min: per minute of this process's CPU time (and its workers'), which "
               "other jobs on a shared machine disturb far less than the wall clock; the verdict "
               "uses it, and the wall clock's for --jobs")


if __name__ == "__main__":
    cli()
