"""Bad input to `python -m head.sweep` and to fusion, one row each (the machinery and what every
row asserts: tests/hostile.py). A `--param` value head.train refuses is refused before the study
is opened (no storage written, no trial run); a study resumed with another search space is
refused before any trial."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from hostile import Case, World, run_case

from extract.extract_features import main as extract
from head.sweep import main as sweep_main

# small and quick, as tests/test_sweep.py: 3 folds of 100 pairs, 2 epochs, batches of 64
QUICK = ["--folds", "3", "--param", "epochs=2", "--param", "batch_size=64", "--device", "cpu"]
# the default head at lr 1 collapses in its first epoch (as in test_hostile's lr_that_collapses)
COLLAPSING = ["lr=1", "loss=triplet", "negatives=all", "margin=0.2", "weight_decay=1e-4",
              "embedding_dim=256", "pool=2", "attention=spatial", "features_dim=0", "dropout=0"]


def _sweep(w: World, *extra, quick: list = QUICK) -> list:
    return ["sweep", "--cache", w.fixture("train_cache"), "--runs-dir", w.tmp / "runs",
            "--trials", "1", *quick, *extra]


def _param(spec: str):
    """A sweep with this one --param (QUICK's would meet it: one more given twice)."""
    def setup(w: World) -> list:
        return _sweep(w, "--param", spec, quick=["--folds", "3", "--device", "cpu"])

    return setup


def _no_study(w: World) -> None:
    """Refused before the storage was opened: no database, so no trial."""
    assert not (w.tmp / "runs").exists()


def _trials(w: World, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study,
                             storage=f"sqlite:///{w.tmp / 'runs' / 'sweeps.db'}").trials


def _one_trial_of(w: World, study: str, *params: str) -> None:
    """A study with one complete trial over the space `params` give."""
    sweep_main(w.fixture("train_cache"), trials=1, folds=3, study=study, runs_dir=w.tmp / "runs",
               params=("epochs=2", "batch_size=64", *params), device="cpu")
    assert len(_trials(w, study)) == 1


def _still_one_trial(w: World) -> None:
    assert [t.state for t in _trials(w, "s")] == [optuna.trial.TrialState.COMPLETE]


def narrower_choices(w: World) -> list:
    _one_trial_of(w, "s", "negatives=all,semihard")
    return _sweep(w, "--study", "s", "--param", "negatives=all")


def range_made_fixed(w: World) -> list:
    _one_trial_of(w, "s", "negatives=all")
    return _sweep(w, "--study", "s", "--param", "negatives=all", "--param", "lr=1e-3")


def same_space_again(w: World) -> list:
    _one_trial_of(w, "s", "negatives=all,semihard")
    return _sweep(w, "--study", "s", "--param", "negatives=all,semihard")


def _two_complete_trials(w: World) -> None:
    assert [t.state for t in _trials(w, "s")] == [optuna.trial.TrialState.COMPLETE] * 2


def every_trial_fails(w: World) -> list:
    return _sweep(w, "--study", "s", *[word for p in COLLAPSING for word in ("--param", p)])


def _failed_trial_kept(w: World) -> None:
    assert [t.state for t in _trials(w, "s")] == [optuna.trial.TrialState.FAIL]
    assert (w.tmp / "runs" / "sweeps" / "s" / "trials.csv").is_file()


def sqlite_in_missing_folder(w: World) -> list:
    return _sweep(w, "--storage", f"sqlite:///{w.tmp / 'missing' / 'studies.db'}")


def storage_not_a_url(w: World) -> list:
    return _sweep(w, "--storage", str(w.tmp / "studies.db"))


def _no_database(w: World) -> None:
    _no_study(w)
    assert not (w.tmp / "studies.db").exists()


def _nothing_created(w: World) -> None:
    assert not (w.tmp / "missing").exists()


# --- fusion -------------------------------------------------------------------------------------


def one_view_with_two_view(w: World) -> list:
    """The small synthetic set at 32 x 32, once as it is and once with its flips."""
    data = w.fixture("synthetic")
    plain = w.tmp / "cache" / "plain.h5"
    flipped = w.tmp / "cache" / "flipped.h5"
    for out, hflip in ((plain, False), (flipped, True)):
        extract("resnet50", data, out=out, weights="none", input_size=(32, 32), device="cpu",
                batch_size=32, workers=0, hflip=hflip)
    return ["train", "--cache", flipped, "--cache", plain, "--runs-dir", w.tmp / "runs",
            "--name", "fused", "--epochs", "1", "--val-fraction", "0", "--device", "cpu"]


def _trained_on_one_view(w: World) -> None:
    summary = json.loads((w.tmp / "runs" / "fused" / "config.json").read_text())
    assert [c["views"] for c in summary["caches"]] == [["identity", "hflip"], ["identity"]]
    from head.model import load_checkpoint

    assert load_checkpoint(w.tmp / "runs" / "fused" / "head.pt")[1]["views"] == ["identity"]


def _fuse(w: World, first, second) -> list:
    return ["train", "--cache", first, "--cache", second, "--runs-dir", w.tmp / "runs",
            "--name", "x", "--epochs", "1", "--device", "cpu"]


def same_cache_relative_and_absolute(w: World) -> list:
    cache = w.copy("train_cache", "r50.h5")
    w.monkeypatch.chdir(w.tmp)
    return _fuse(w, "r50.h5", cache)


def same_cache_through_a_link(w: World) -> list:
    cache = w.copy("train_cache", "r50.h5")
    (w.tmp / "link.h5").symlink_to(cache)
    return _fuse(w, cache, w.tmp / "link.h5")


def _no_run(w: World) -> None:
    assert not (w.tmp / "runs").exists()


REFUSED = "every value a trial can draw must be one head.train takes"
CASES: dict[str, Case] = {
    # 10-18: every value a --param can take, against head.train's own options, before any trial
    "sweep --param attention=bogus": Case(
        _param("attention=bogus"), 1,
        ("--param attention=bogus", "head.train refuses --attention bogus",
         "'bogus' is not one of 'spatial', 'channel', 'none'", REFUSED), then=_no_study),
    "sweep --param dropout=1.5": Case(
        _param("dropout=1.5"), 1, ("head.train refuses --dropout 1.5", "0<=x<1", REFUSED),
        then=_no_study),
    "sweep --param batch_size=1": Case(
        _param("batch_size=1"), 1, ("head.train refuses --batch-size 1", "x>=2"),
        then=_no_study),
    "sweep --param embedding_dim=0": Case(
        _param("embedding_dim=0"), 1, ("head.train refuses --embedding-dim 0", "x>=1"),
        then=_no_study),
    "sweep --param epochs=0": Case(
        _param("epochs=0"), 1, ("head.train refuses --epochs 0", "x>=1"), then=_no_study),
    "sweep --param lr=-1": Case(
        _param("lr=-1"), 1, ("--param lr=-1.0", "head.train refuses --lr -1.0", "0<x<=1"),
        then=_no_study),
    "sweep --param pool=0": Case(
        _param("pool=0"), 1, ("head.train refuses --pool 0", "x>=1"), then=_no_study),
    "sweep --param assign_temperature=0": Case(
        _param("assign_temperature=0"), 1,
        ("--param 'assign_temperature=0'", "the same for every trial",
         "the sweep's own --assign-temperature", "not searched"), then=_no_study),
    "sweep --param lr=5": Case(
        _param("lr=5"), 1, ("head.train refuses --lr 5.0", "0<x<=1"), then=_no_study),
    "sweep --param a range's end": Case(
        _param("dropout=0.2:1"), 1, ("--param dropout=0.2:1.0", "head.train refuses --dropout 1.0"),
        then=_no_study),
    "sweep --param whitened_weight=0:1": Case(
        _param("whitened_weight=0:1"), 1,
        ("--param whitened_weight=0.0:1.0", "head.train refuses --whitened-weight 1.0", "0<=x<1"),
        then=_no_study),
    "sweep --param a choice among good ones": Case(
        _param("pool=1,0,2"), 1, ("--param pool=1,0,2", "head.train refuses --pool 0"),
        then=_no_study),
    "sweep --param given twice": Case(
        lambda w: _sweep(w, "--param", "lr=1e-3", "--param", "lr=1e-4:1e-2:log"), 1,
        ("--param lr is given twice", "lr=0.001 and lr=0.0001:0.01:log", "give it once"),
        then=_no_study),
    "sweep where every trial fails": Case(
        every_trial_fails, 1,
        ("trial 0 fail (the head collapsed", "no trial of this run completed (1 fail)",
         "trial 0: the head collapsed in epoch 1", "the study keeps them",
         "{tmp}/runs/sweeps/s/trials.csv", "change the --param values that fail"),
        then=_failed_trial_kept),
    # 20, 21: a study keeps its search space
    "sweep resumed with narrower choices": Case(
        narrower_choices, 1,
        ("study 's'", "searches another space",
         "negatives=all,semihard (study) vs negatives=all (now)", "pass a new --study",
         "the study's own --param values"), then=_still_one_trial),
    "sweep resumed with a range made fixed": Case(
        range_made_fixed, 1,
        ("study 's'", "lr=1e-05:0.01:log (study) vs lr=0.001 (now)", "pass a new --study"),
        then=_still_one_trial),
    "sweep resumed with the same space adds trials": Case(
        same_space_again, 0, then=_two_complete_trials),
    # 24, 28
    "sweep --storage in a missing folder": Case(
        sqlite_in_missing_folder, 1,
        ("--storage sqlite:///{tmp}/missing/studies.db", "the folder {tmp}/missing",
         "does not exist", "create it"), then=_nothing_created),
    "sweep --storage a path, not a URL": Case(
        storage_not_a_url, 1,
        ("--storage '{tmp}/studies.db' is not a database URL", "sqlite:///"),
        then=_no_database),
    "sweep --study ../x": Case(
        lambda w: _sweep(w, "--study", "../x"), 1,
        ("--study '../x' is not a plain folder name", "path separator"), then=_no_study),
    # 40, 42, 43: fusion
    "train fuses a one-view with a two-view cache": Case(
        one_view_with_two_view, 0,
        ("the hflip view of {tmp}/cache/flipped.h5 is not used: {tmp}/cache/plain.h5 lacks it",
         "rebuild {tmp}/cache/plain.h5 with `python -m extract --hflip`"),
        then=_trained_on_one_view),
    "train fuses one cache by relative and absolute path": Case(
        same_cache_relative_and_absolute, 1,
        ("a cache is given twice: r50.h5 and {tmp}/r50.h5 are the same file",
         "fuse different caches"), then=_no_run),
    "train fuses one cache and a link to it": Case(
        same_cache_through_a_link, 1,
        ("a cache is given twice: {tmp}/r50.h5 and {tmp}/link.h5 are the same file "
         "({tmp}/r50.h5)",), then=_no_run),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sweep_hostile_input(case: Case, request: pytest.FixtureRequest, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(case, request, tmp_path, monkeypatch)
