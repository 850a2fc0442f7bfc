"""`python -m head.sweep`: the study it writes and resumes, several processes on one storage,
the best command that reproduces the best trial, and the `--param` language."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from conftest import REPO_ROOT

from head.config import TrainConfig
from head.sweep import SEARCH_SPACE, Space, cli, parse_param, search_space
from head.train import main as train
from tll import UserError

# small and quick: 3 folds of 100 pairs, 2 epochs, batches of 64
QUICK = ["--folds", "3", "--param", "epochs=2", "--param", "batch_size=64", "--device", "cpu"]


def sweep(cache: Path, runs: Path, *extra) -> tuple[int, str]:
    """Exit code and output of the command; the output's last line is what it printed (stdout)
    last."""
    result = CliRunner().invoke(cli, ["--cache", str(cache), "--runs-dir", str(runs), *QUICK,
                                      *map(str, extra)])
    return result.exit_code, result.output + "\n" + result.stdout


def study_trials(runs: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'sweeps.db'}").trials


def test_sweep_writes_its_outputs_and_resumes(train_cache: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    code, text = sweep(train_cache, runs, "--trials", "3", "--sampler-seed", "1")
    assert code == 0, text
    out = runs / "sweeps" / "r50-3fold"
    assert text.strip().splitlines()[-1] == str(out)
    assert {p.name for p in out.iterdir()} >= {"leaderboard.md", "trials.csv",
                                               "best-command.txt", "history.png"}
    first = study_trials(runs, "r50-3fold")
    assert len(first) == 3
    leaderboard = (out / "leaderboard.md").read_text()
    complete = [t for t in first if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert f"| 1 | {best.number} | {best.value:.3f} +- " in leaderboard
    assert "mean validation top2" in leaderboard
    assert leaderboard in text  # printed at the end too

    code, text = sweep(train_cache, runs, "--trials", "2")  # the same study, two more trials
    assert code == 0, text
    again = study_trials(runs, "r50-3fold")
    assert len(again) == 5
    for before, after in zip(first, again, strict=False):  # nothing lost or changed
        assert (before.number, before.value, before.params) == (after.number, after.value,
                                                                 after.params)
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in rows] == list(range(5))


def test_best_command_reproduces_the_best_trial(train_cache: Path, tmp_path: Path) -> None:
    """The command the sweep prints trains the best config, cross-validated the same way: the
    same mean top-2 at the same epoch."""
    runs = tmp_path / "runs"
    code, text = sweep(train_cache, runs, "--trials", "2", "--sampler-seed", "3")
    assert code == 0, text
    command = (runs / "sweeps" / "r50-3fold" / "best-command.txt").read_text().strip()
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "head.train"]
    options = {words[i][2:].replace("-", "_"): words[i + 1] for i in range(3, len(words), 2)}
    types = {field.name: type(field.default) for field in dataclasses.fields(TrainConfig)}
    config = {k: types[k](v) for k, v in options.items() if k not in ("cache", "name")}
    run = train(options["cache"], name=options["name"], runs_dir=tmp_path / "again",
                device="cpu", **config)
    best = max((t for t in study_trials(runs, "r50-3fold")
                if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    summary = json.loads((run / "config.json").read_text())
    assert summary["best"]["epoch"] == best.user_attrs["epoch"]
    assert summary["best"]["top2_assigned"] == pytest.approx(best.value, abs=1e-12)


def test_a_study_of_another_setting_is_refused(train_cache: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert sweep(train_cache, runs, "--trials", "1", "--study", "s")[0] == 0
    code, text = sweep(train_cache, runs, "--trials", "1", "--study", "s", "--split-seed", "4")
    assert code == 1, text
    assert "study 's'" in text and "split_seed: 0 (study) vs 4 (now)" in text
    assert "Traceback" not in text
    assert len(study_trials(runs, "s")) == 1


@pytest.mark.slow
def test_two_processes_share_one_study(train_cache: Path, tmp_path: Path) -> None:
    """Two `python -m head.sweep` processes on one sqlite storage: 2 trials each, 4 in all."""
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "head.sweep", "--cache", str(train_cache), "--runs-dir",
               str(runs), "--trials", "2", "--study", "shared", *QUICK]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    runs.mkdir()
    processes = [subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        # the sweep logs the study it opens itself; Optuna's own INFO lines are not repeated
        assert "A new study created" not in output and "Using an existing study" not in output
    trials = study_trials(runs, "shared")
    assert len(trials) == 4 and sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state.is_finished() for t in trials)


# --- the --param language -------------------------------------------------------------------


@pytest.mark.parametrize(("text", "name", "space"), [
    ("lr=1e-4:1e-2:log", "lr", Space(1e-4, 1e-2, log=True)),
    ("margin=0.1:0.3", "margin", Space(0.1, 0.3)),
    ("pool=1:4", "pool", Space(1, 4)),
    ("negatives=all,semihard", "negatives", Space(choices=("all", "semihard"))),
    ("batch-size=32,64", "batch_size", Space(choices=(32, 64))),
    ("margin=0.2", "margin", Space(choices=(0.2,))),
    ("flip=true,false", "flip", Space(choices=(True, False))),
])
def test_param_spec(text: str, name: str, space: Space) -> None:
    assert parse_param(text) == (name, space)
    assert type(parse_param(text)[1].choices[0] if space.choices else space.low) is type(
        space.choices[0] if space.choices else space.low)


@pytest.mark.parametrize(("text", "fragment"), [
    ("colour=red", "NAME one of"),
    ("lr", "NAME one of"),
    ("lr=1e-2:1e-4", "low < high"),
    ("lr=0:1e-2:log", "low > 0"),
    ("negatives=a:b", "a range is low:high"),
    ("pool=two", "invalid literal"),
    ("flip=yes", "not true or false"),
    ("seed=3", "NAME one of"),  # the sweep's own options are not searched
])
def test_bad_param_spec_is_named(text: str, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        parse_param(text)


def test_params_narrow_the_default_space() -> None:
    space = search_space(["lr=1e-3", "pool=1:2"])
    assert space["lr"] == Space(choices=(1e-3,)) and space["pool"] == Space(1, 2)
    assert space["margin"] == SEARCH_SPACE["margin"]


def test_jobs_run_the_trials_side_by_side_and_score_them_as_one_process(
        train_cache: Path, tmp_path: Path) -> None:
    """--jobs 2: two worker processes share the trials of one study; every trial completes and
    scores what training its config in this process scores."""
    runs = tmp_path / "runs"
    code, text = sweep(train_cache, runs, "--trials", "3", "--jobs", "2", "--sampler-seed", "0",
                       "--param", "attention=none,spatial", "--param", "lr=1e-4:1e-2:log")
    assert code == 0, text
    trials = study_trials(runs, "r50-3fold")
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    assert sorted(t.user_attrs["job"] for t in trials) == [0, 0, 1]  # 2 trials and 1
    for trial in trials[:2]:
        run = train(train_cache, name=f"t{trial.number}", runs_dir=tmp_path / "check", folds=3,
                    device="cpu", patience=3, **trial.params)
        best = json.loads((run / "config.json").read_text())["best"]
        assert best["top2_assigned"] == pytest.approx(trial.value, abs=1e-12)
