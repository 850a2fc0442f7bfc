"""`python -m head.sweep`: search the head's and training's settings with Optuna, every trial
scored by k-fold cross-validation.

A study lives in its storage (default ``sqlite:///<runs-dir>/sweeps.db``): rerunning the same
command resumes it and adds `--trials` more; several processes, or several machines pointed at
one database URL (PostgreSQL or MySQL, which Optuna supports), run one study together. This is
Optuna's own distributed mode; there is no scheduler of ours.

The cache is loaded once per process and its folds are built once: every trial trains on the
same tensor (`head.train.cross_validate`), or, beyond `--memory-budget`, streams from the same
reader of the file (head.stream). Each trial samples a config from SEARCH_SPACE
(narrowed with `--param`, every value checked against head.train's own options before the study
opens; the space is recorded with the study, which refuses another), reports each epoch's mean
validation top-2 (after the assignment, unless `--assign none`) to TPE and the median pruner,
and is scored by its best epoch. Output in ``<runs-dir>/sweeps/<study>/``: leaderboard.md (the
best trials with mean +- standard error), trials.csv, history.png, importance.png and
best-command.txt, the `python -m head.train` command that trains the best config.
"""

from __future__ import annotations

import csv
import dataclasses
import random
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
import optuna
import torch

from head.config import (
    DEFAULT_RUNS_DIR,
    TRAIN_OPTIONS,
    TrainConfig,
    check_config,
    check_run_name,
)
from head.figures import best_epoch, selection_figure
from head.folds import prepare, read_caches
from head.loss import LOSSES, NEGATIVES
from head.model import ATTENTIONS
from head.train import cross_validate
from infer.scoring import ASSIGN_METHODS
from tll import UserError, UserPath, first_line, logger, setup_logging, user_errors
from tll.device import resolve_device
from tll.files import atomic_output, check_output, write_text

LEADERBOARD_SIZE = 10
STORAGE_ATTEMPTS = 5
HEARTBEAT_SECONDS = 30
DEFAULT_PATIENCE = 3
# the median pruner judges a trial from its second epoch on, once the study has 5 trials to
# compare with (issue 21: from the fourth epoch before; benchmarks/sweep_speed.py measures both)
PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS = 5, 1


@dataclass(frozen=True)
class Space:
    """Where one TrainConfig field is searched: a range (`low`..`high`, on a log scale if `log`)
    or a set of `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    def values(self) -> tuple:
        """What a trial can draw, at its edges: every choice, or both ends of the range."""
        return self.choices if self.choices is not None else (self.low, self.high)

    def spec(self) -> str:
        """The `--param NAME=SPEC` text of this space."""
        if self.choices is not None:
            return ",".join(str(c).lower() if isinstance(c, bool) else str(c)
                            for c in self.choices)
        return f"{self.low!r}:{self.high!r}" + (":log" if self.log else "")

    def suggest(self, trial: optuna.Trial, name: str, kind: type):
        if self.choices is not None:
            return trial.suggest_categorical(name, self.choices)
        if kind is int:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)


SEARCH_SPACE: dict[str, Space] = {
    "lr": Space(1e-5, 1e-2, log=True),
    "weight_decay": Space(1e-6, 1e-1, log=True),
    "margin": Space(0.05, 0.5),
    "negatives": Space(choices=NEGATIVES),
    "batch_size": Space(choices=(32, 64, 128)),
    "embedding_dim": Space(choices=(64, 128, 256, 512)),
    "pool": Space(1, 3),
    "attention": Space(choices=ATTENTIONS),
    "features_dim": Space(choices=(0, 128, 256, 512)),
    "dropout": Space(0.0, 0.5),
    "loss": Space(choices=LOSSES),
    "temperature": Space(0.02, 0.2, log=True),
    "epochs": Space(4, 20),  # the most a trial trains; its best epoch is chosen by the mean
}
# searched only where the loss uses them
USED_BY_LOSS = {"margin": "triplet", "negatives": "triplet", "temperature": "infonce"}
# what a study is run with, the same for every trial: set by the sweep's own options (a study
# resumed with other values is refused), never by --param
STUDY_SETTING = ("folds", "split_seed", "seed", "assign", "assign_temperature", "patience")
# held fixed for every trial besides: val_fraction is unused with folds, and a trial trains no
# final head for the folds' heads to join
FIXED_FIELDS = ("caches", "name", *STUDY_SETTING, "device", "memory_budget", "val_fraction",
                "keep_fold_heads")
FIELD_TYPES = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)
               if f.name not in FIXED_FIELDS}


def parse_param(text: str) -> tuple[str, Space]:
    """`name=low:high[:log]` (a range), `name=a,b,c` (choices) or `name=value` (fixed)."""
    name, _, spec = text.partition("=")
    name = name.strip().replace("-", "_")
    if name not in FIELD_TYPES or not spec:
        own = [o.opts[0] for o in cli.params if o.name == name]  # the sweep's own option
        held = (f"{name} is the same for every trial"
                + (f", set by the sweep's own {own[0]}" if own else "") + ", not searched; "
                if name in FIXED_FIELDS else "")
        raise UserError(f"--param {text!r}: {held}expected NAME=SPEC with NAME one of "
                        f"{', '.join(sorted(FIELD_TYPES))}")
    kind = FIELD_TYPES[name]
    if kind is bool:
        kind = _boolean
    try:
        if ":" in spec:
            low, high, *rest = spec.split(":")
            if rest not in ([], ["log"]) or kind not in (int, float):
                raise ValueError("a range is low:high or low:high:log, of numbers")
            space = Space(kind(low), kind(high), log=rest == ["log"])
            if not space.low < space.high or (space.log and space.low <= 0):
                raise ValueError("a range needs low < high (and low > 0 on a log scale)")
            return name, space
        return name, Space(choices=tuple(kind(value) for value in spec.split(",")))
    except ValueError as error:
        raise UserError(f"--param {text!r}: {error}") from None


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"{text!r} is not true or false")
    return text.lower() == "true"


def search_space(params: list[str]) -> dict[str, Space]:
    """SEARCH_SPACE with each `--param` in place of its default; a name given twice is
    refused."""
    parsed = [parse_param(text) for text in params]
    names = [name for name, _ in parsed]
    for name in names:
        if names.count(name) > 1:
            given = " and ".join(f"{name}={space.spec()}" for n, space in parsed if n == name)
            raise UserError(f"--param {name} is given twice ({given}): give it once, as a "
                            "range or a list of choices")
    return {**SEARCH_SPACE, **dict(parsed)}


def check_space(space: dict[str, Space], fixed: dict) -> None:
    """Every value a trial can draw (a fixed value, each choice, both ends of a range) must be
    one head.train takes: its option's own type and range (TRAIN_OPTIONS), then its own config
    check."""
    for name, where in space.items():
        option = TRAIN_OPTIONS[name]
        for value in where.values():
            try:
                option.type.convert(value, option, None)
                check_config(TrainConfig(**fixed, **{name: value}))
            except (click.BadParameter, UserError) as error:
                reason = error.message if isinstance(error, click.BadParameter) else str(error)
                raise UserError(f"--param {name}={where.spec()}: head.train refuses "
                                f"{option.opts[0]} {value} ({reason.rstrip('.')}); every value "
                                "a trial can draw must be one head.train takes") from None


def main(cache: str | Path | list[str | Path], trials: int = 40, folds: int = 5,
         study: str | None = None,
         storage: str | None = None, timeout: float | None = None, params: tuple[str, ...] = (),
         runs_dir: str | Path = DEFAULT_RUNS_DIR, data: str | Path | None = None,
         assign: str = TrainConfig.assign,
         assign_temperature: float = TrainConfig.assign_temperature, split_seed: int = 0,
         seed: int = 0, sampler_seed: int | None = None, device: str = "auto",
         memory_budget: int | None = None, patience: int = DEFAULT_PATIENCE,
         jobs: int = 1) -> Path:
    """Run `trials` more trials of the study (created or resumed) on `cache` (or a list of
    caches, fused), in `jobs` processes side by side; returns its output folder."""
    caches = [Path(c) for c in ([cache] if isinstance(cache, str | Path) else cache)]
    runs_dir = Path(runs_dir)
    study_name = study or f"{'+'.join(c.stem for c in caches)}-{folds}fold"
    check_run_name(study_name, "--study")
    out = runs_dir / "sweeps" / study_name
    check_output(out, "sweep folder", folder=True)
    fixed = dict(caches=tuple(map(str, caches)), name=study_name, folds=folds,
                 split_seed=split_seed, seed=seed, assign=assign,
                 assign_temperature=assign_temperature, device=device,
                 memory_budget=memory_budget, patience=patience)
    check_config(TrainConfig(**fixed))
    if folds < 2:
        raise UserError(f"--folds {folds}: a sweep scores each trial by cross-validation, "
                        "which takes at least 2 folds")
    space = search_space(list(params))
    check_space(space, fixed)  # before any trial, so that no trial fails on a value
    infos = read_caches(caches)
    if storage is None:
        runs_dir.mkdir(parents=True, exist_ok=True)  # the default storage's folder
        storage = f"sqlite:///{runs_dir / 'sweeps.db'}"
    the_study = _open_study(study_name, storage, infos, fixed, space, sampler_seed)
    figure = selection_figure(TrainConfig(**fixed))

    logger.info("sweep %s (%s): %d trials of %d-fold cross-validation on %s, scored by %s; "
                "%d trials already in the study%s", study_name, storage, trials, folds,
                " + ".join(map(str, caches)), figure, len(the_study.trials),
                f"; {jobs} processes side by side" if jobs > 1 else "")
    work = dict(study_name=study_name, storage=storage, caches=caches, infos=infos,
                fixed=fixed, space=space, data=data, timeout=timeout)
    if jobs == 1:
        ran = run_trials(the_study, trials=trials, progress=True, **work)
    else:
        numbers = _run_jobs(jobs, trials, sampler_seed, work)
        ran = [t for t in the_study.get_trials(deepcopy=False) if t.number in numbers]
    out = write_outputs(the_study, out, figure, fixed)
    check_some_completed(ran, the_study, out)
    return out


def run_trials(study: optuna.Study, study_name: str, storage: str, caches: list[Path],
               infos: list, fixed: dict, space: dict[str, Space], data: str | Path | None,
               timeout: float | None, trials: int, progress: bool, job: int | None = None
               ) -> list[optuna.trial.FrozenTrial]:
    """Load the caches once and run `trials` trials of the study in this process (`job`: which
    of `--jobs` worker processes it is, recorded with each trial); returns them as they
    ended."""
    base = TrainConfig(**fixed)
    figure = selection_figure(base)
    prepared = prepare(caches, base, data, resolve_device(base.device, tf32=True), infos)

    def objective(trial: optuna.Trial) -> float:
        config = TrainConfig(**fixed, **sample(trial, space))  # no field is both
        if job is not None:
            trial.set_user_attr("job", job)

        def report(epoch: int, summary: dict) -> None:
            trial.report(summary[figure], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            check_config(config)
            history = cross_validate(prepared.folds, prepared.head_config(config), config,
                                     report, progress=False)
        except UserError as error:  # this config does not train (it diverged...): the next may
            trial.set_user_attr("error", str(error))  # for _log_trial and the final message
            raise
        best = best_epoch(history, config)
        for key, value in best.items():
            if key != "folds":
                trial.set_user_attr(key, value)
        trial.set_user_attr("epochs_trained", len(history))
        return best[figure]

    ran: list[optuna.trial.FrozenTrial] = []  # this process's trials, as they end
    study.optimize(objective, n_trials=trials, timeout=timeout, catch=(UserError,),
                   callbacks=[_log_trial, lambda _, trial: ran.append(trial)],
                   show_progress_bar=progress)
    return ran


def _run_jobs(jobs: int, trials: int, sampler_seed: int | None, work: dict) -> set[int]:
    """`trials` trials shared by `jobs` worker processes on one study (Optuna's own parallel
    mode: its storage hands out the trials), each on its share of torch's threads and of the
    memory budget; returns the numbers of the trials they ran. Trials are independent, so
    processes scale with cores where an epoch's small operations gain little from more
    threads."""
    import concurrent.futures
    import multiprocessing

    from head.stream import budget_share, memory_budget

    threads = max(1, torch.get_num_threads() // jobs)
    budget, _ = memory_budget(work["fixed"]["memory_budget"],
                              resolve_device(work["fixed"]["device"]))
    fixed = {**work["fixed"], "memory_budget": budget_share(budget, jobs)}  # each holds its own
    shares = [trials // jobs + (job < trials % jobs) for job in range(jobs)]
    with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_job, job, threads, bool(logger.handlers),
                               # workers with one seed would sample alike
                               None if sampler_seed is None else sampler_seed + job,
                               {**work, "fixed": fixed, "trials": share})
                   for job, share in enumerate(shares) if share]
        return {number for future in futures for number in future.result()}


def _job(job: int, threads: int, log: bool, sampler_seed: int | None, work: dict) -> list[int]:
    """One worker process of `_run_jobs`: its trials' numbers."""
    if log:
        setup_logging()
    torch.set_num_threads(threads)
    study = _open_study(work["study_name"], work["storage"], work["infos"], work["fixed"],
                        work["space"], sampler_seed)
    return [t.number for t in run_trials(study, progress=job == 0, job=job, **work)]


def check_some_completed(ran: list[optuna.trial.FrozenTrial], study: optuna.Study,
                         out: Path) -> None:
    """Refuses a run none of whose trials completed where that leaves nothing measured (the
    study has no complete trial) or where a trial failed: a sweep that measured nothing must
    not look like one that did. A run whose trials were all pruned, on a study that has complete
    trials to prune against, did its job."""
    states = [t.state for t in ran]
    if optuna.trial.TrialState.COMPLETE in states:
        return
    if (optuna.trial.TrialState.FAIL not in states
            and study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))):
        logger.info("every trial of this run was pruned: none beat the study's median")
        return
    counts = ", ".join(f"{states.count(state)} {state.name.lower()}"
                       for state in optuna.trial.TrialState if states.count(state))
    failed = [t for t in ran if "error" in t.user_attrs]
    reason = (f"; trial {failed[0].number}: {failed[0].user_attrs['error']}" if failed
              else "")
    raise UserError(f"no trial of this run completed ({counts}){reason}; the study keeps "
                    f"them ({out / 'trials.csv'}): change the --param values that fail and "
                    "rerun")


def sample(trial: optuna.Trial, space: dict[str, Space]) -> dict:
    """One config from the space; a loss's own settings only where that loss is drawn."""
    sampled = {}
    if "loss" in space:
        sampled["loss"] = space["loss"].suggest(trial, "loss", str)
    loss = sampled.get("loss", TrainConfig.loss)
    for name, where in space.items():
        if name != "loss" and USED_BY_LOSS.get(name, loss) == loss:
            sampled[name] = where.suggest(trial, name, FIELD_TYPES[name])
    return sampled


def _open_study(name: str, storage: str, infos: list, fixed: dict, space: dict[str, Space],
                sampler_seed: int | None) -> optuna.Study:
    """The study, created or resumed; refused if it was started on another cache, setting or
    search space."""
    _check_sqlite_folder(storage)
    # Optuna's errors only: the sweep logs a resumed study and each trial (a failed one with its
    # reason, not a traceback) itself
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            # a killed worker's trial is failed once its heartbeat is older than the grace
            # period (the next worker to start a trial sees it) and run once more
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
                rdb = optuna.storages.RDBStorage(
                    storage, heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=3 * HEARTBEAT_SECONDS, heartbeat_stale_trial_callback=retry)
            study = optuna.create_study(
                study_name=name, storage=rdb, direction="maximize", load_if_exists=True,
                sampler=optuna.samplers.TPESampler(seed=sampler_seed),
                pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                                   n_warmup_steps=PRUNER_WARMUP_EPOCHS))
            break
        except Exception as error:  # a bad URL, a database that cannot be opened or created
            # several workers creating one new database race on its tables (optuna#1092):
            # the loser finds them made on the next try
            if attempt == STORAGE_ATTEMPTS - 1:
                raise UserError(f"cannot open the study storage {storage!r}: "
                                f"{first_line(error)}") from None
            time.sleep(0.5 + random.random())
    setting = {"trunks": [[i.backbone, i.layer, i.weights_id, list(i.views)] for i in infos],
               "input_size": list(infos[0].input_size),
               "dataset": infos[0].dataset_fingerprint,
               **{k: fixed[k] for k in STUDY_SETTING}}
    recorded = study.user_attrs.get("setting")
    if recorded is not None and "patience" not in recorded:  # a study from before --patience
        recorded = {**recorded, "patience": 0}
    if recorded is None:
        study.set_user_attr("setting", setting)
        study.set_user_attr("caches", list(fixed["caches"]))
    elif recorded != setting:
        differ = [f"{k}: {recorded.get(k)} (study) vs {setting[k]} (now)" for k in setting
                  if recorded.get(k) != setting[k]]
        raise UserError(f"study {name!r} in {storage} was run with another setting "
                        f"({'; '.join(differ)}); its scores would not compare: pass another "
                        "--study")
    # Optuna cannot change a parameter's choices, nor a range into choices, within a study
    specs = {key: where.spec() for key, where in space.items()}
    searched = study.user_attrs.get("space")
    if searched is None:  # a new study, or one from before spaces were recorded
        study.set_user_attr("space", specs)
    elif searched != specs:
        differ = [f"{key}={searched.get(key, '(not searched)')} (study) vs "
                  f"{key}={specs.get(key, '(not searched)')} (now)"
                  for key in {**searched, **specs} if searched.get(key) != specs.get(key)]
        raise UserError(f"study {name!r} in {storage} searches another space ("
                        f"{'; '.join(differ)}); a study keeps its space: pass a new --study "
                        "name to search this one, or the study's own --param values to add "
                        "trials to it")
    return study


def _check_sqlite_folder(storage: str) -> None:
    """The storage must be a URL, and a sqlite file's folder must exist (sqlite would say only
    "unable to open database file"); it is not created, in case the URL is mistyped."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except ArgumentError:  # said now: Optuna would retry it for seconds first
        raise UserError(f"--storage {storage!r} is not a database URL: give one like "
                        "sqlite:///runs/sweeps.db") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).parent
        if not folder.is_dir():
            raise UserError(f"--storage {storage}: the folder {folder} of its sqlite file does "
                            "not exist; create it, or give a path in an existing folder")


def _log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if trial.state == optuna.trial.TrialState.COMPLETE:
        trained = trial.user_attrs.get("epochs_trained")
        stopped = (f" (stopped after {trained} of {trial.params.get('epochs')})"
                   if trained and trained != trial.params.get("epochs") else "")
        logger.info("trial %d: %.3f at epoch %s%s  %s", trial.number, trial.value,
                    trial.user_attrs.get("epoch"), stopped, _params_text(trial.params))
    else:
        error = trial.user_attrs.get("error")
        logger.info("trial %d %s%s  %s", trial.number, trial.state.name.lower(),
                    f" ({error})" if error else "", _params_text(trial.params))


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in params.items())


def write_outputs(study: optuna.Study, out: Path, figure: str, fixed: dict) -> Path:
    """The leaderboard, trials.csv, Optuna's plots and the best command, for every trial the
    study holds (other processes' too); written whole or not at all."""
    complete = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: -t.value)
    with atomic_output(out, folder=True, overwrite=True) as work:
        leaderboard = leaderboard_text(study, complete, figure)
        write_text(work / "leaderboard.md", lambda f: f.write(leaderboard))
        write_text(work / "trials.csv", lambda f: _write_trials(f, study, figure))
        if complete:
            command = best_command(complete[0], fixed)
            write_text(work / "best-command.txt", lambda f: f.write(command + "\n"))
        _plot(study, work)
    logger.info("sweep %s\n%s", study.study_name, leaderboard)
    return out


def leaderboard_text(study: optuna.Study, complete: list, figure: str) -> str:
    states = [t.state for t in study.trials]
    counts = ", ".join(f"{states.count(state)} {state.name.lower()}"
                       for state in optuna.trial.TrialState if states.count(state))
    lines = [f"# Sweep {study.study_name}", "",
             f"{len(study.trials)} trials ({counts}); score: mean validation {figure} over the "
             "folds +- its standard error, at the trial's best epoch", "",
             f"| rank | trial | {figure} | epoch | parameters |", "|---|---|---|---|---|"]
    for rank, trial in enumerate(complete[:LEADERBOARD_SIZE], start=1):
        se = trial.user_attrs.get(f"{figure}_se", float("nan"))
        lines.append(f"| {rank} | {trial.number} | {trial.value:.3f} +- {se:.3f} | "
                     f"{trial.user_attrs.get('epoch')} | {_params_text(trial.params)} |")
    return "\n".join(lines) + "\n"


def _write_trials(f, study: optuna.Study, figure: str) -> None:
    names = sorted({name for t in study.trials for name in t.params})
    writer = csv.writer(f)
    writer.writerow(["trial", "state", figure, f"{figure}_se", "epoch", "seconds", *names])
    for t in study.trials:
        seconds = t.duration.total_seconds() if t.duration else ""
        writer.writerow([t.number, t.state.name.lower(), "" if t.value is None else t.value,
                         t.user_attrs.get(f"{figure}_se", ""), t.user_attrs.get("epoch", ""),
                         seconds, *(t.params.get(name, "") for name in names)])


def best_command(trial: optuna.trial.FrozenTrial, fixed: dict) -> str:
    """The `python -m head.train` command that trains this trial's config, cross-validated the
    same way (so it picks the same number of epochs), the final head on every pair."""
    options = {**{k: fixed[k] for k in STUDY_SETTING}, **trial.params,
               "name": f"{fixed['name']}-trial{trial.number}"}
    words = ["python", "-m", "head.train"]
    for cache in fixed["caches"]:
        words += ["--cache", cache]
    for key, value in options.items():
        option = key.replace("_", "-")
        words += ([f"--{option}" if value else f"--no-{option}"] if isinstance(value, bool)
                  else [f"--{option}", str(value)])
    return shlex.join(words)


def _plot(study: optuna.Study, work: Path) -> None:
    """Optuna's history and parameter-importance plots (its matplotlib backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {"history.png": optuna.visualization.matplotlib.plot_optimization_history,
             "importance.png": optuna.visualization.matplotlib.plot_param_importances}
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the backend is marked experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as error:  # too few complete trials to say
                logger.info("no %s yet: %s", name, error)
                continue
        axes.figure.set_size_inches(8, 5)
        axes.figure.tight_layout()
        axes.figure.savefig(work / name, dpi=100, format="png")
        plt.close(axes.figure)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--cache", type=UserPath(), required=True, multiple=True,
              help="Feature cache written by `python -m extract`; repeat it to fuse several.")
@click.option("--trials", type=click.IntRange(min=1), default=40,
              help="Trials this process adds to the study.")
@click.option("--folds", type=click.IntRange(min=2), default=5,
              help="K-fold cross-validation of every trial.")
@click.option("--study", default=None, help="Study name [default: <cache>-<K>fold].")
@click.option("--storage", default=None,
              help="Optuna storage URL, shared by every process of the study, e.g. "
                   "postgresql://user@host/db [default: sqlite:///<runs-dir>/sweeps.db].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop starting trials after this many seconds.")
@click.option("--param", "params", multiple=True, metavar="NAME=SPEC",
              help="Narrow or widen the search, repeatable: lr=1e-4:1e-2:log (a range), "
                   "negatives=all,semihard (choices), margin=0.2 (fixed). NAME is any training "
                   "option: " + ", ".join(sorted(FIELD_TYPES)) + ".")
@click.option("--runs-dir", type=UserPath(), default=DEFAULT_RUNS_DIR)
@click.option("--data", type=UserPath(), default=None,
              help="Dataset folder [default: the one the cache was built from].")
@click.option("--assign", type=click.Choice(ASSIGN_METHODS), default=TrainConfig.assign,
              help="The assignment every trial is scored with (as head.train's).")
@click.option("--assign-temperature", type=TRAIN_OPTIONS["assign_temperature"].type,
              default=TrainConfig.assign_temperature,
              help="Sinkhorn's temperature (as head.train's).")
@click.option("--split-seed", type=int, default=0, help="Draws the folds.")
@click.option("--seed", type=int, default=0, help="Initialisation and batch order of trials.")
@click.option("--patience", type=TRAIN_OPTIONS["patience"].type, default=DEFAULT_PATIENCE,
              help="Stop a trial once its mean has not risen for this many epochs (its best "
                   "epoch is its score, as without); 0: every trial trains its drawn --epochs.")
@click.option("--jobs", type=click.IntRange(min=1), default=1,
              help="Worker processes that run the trials side by side, on one study, each with "
                   "its share of torch's threads and of the memory budget; on a CPU, one per "
                   "core or two (an epoch's small operations gain little from a second "
                   "thread).")
@click.option("--sampler-seed", type=int, default=None,
              help="Seeds TPE's sampling (with --jobs, worker k takes the seed + k; "
                   "processes given one seed would sample alike).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto")
@click.option("--memory-budget", type=TRAIN_OPTIONS["memory_budget"].type, default=None,
              help=TRAIN_OPTIONS["memory_budget"].help.replace(" [default", "; every trial "
                                                                "and fold share one reader "
                                                                "[default"))
def cli(**options) -> None:
    """Search head and training settings with Optuna (TPE, median pruning), each trial scored
    by k-fold cross-validation; rerun to add trials to the study."""
    with user_errors(interrupted="interrupted; the study keeps every finished trial: rerun "
                                 "the same command to go on",
                     out_of_memory="lower --memory-budget (features beyond it are streamed "
                                   "from the cache) or the --param batch_size values, and rerun"):
        out = main(**options)
    click.echo(out)


if __name__ == "__main__":
    cli(prog_name="python -m head.sweep")
