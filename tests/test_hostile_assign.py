"""Issue 19's assignment, training-numerics and export rows: temperatures and margins that are
not finite, a temperature so high the assigned scores come out flat, scores that carry no
information, a collapse whose cause is the data, and opsets the exporter cannot honour. One row
each, run by `hostile.run_case` (exit code, no traceback, the message's culprit and fix, and the
result itself where a silent failure used to hide), then the pure functions behind them against
hand-computed cases.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from hostile import COMMANDS, Case, World, run_case

from infer import predict
from infer.scoring import assign, flat_rows, uninformative

# --- infer: the Sinkhorn temperature ----------------------------------------------------------


def _infer(w: World, *extra, model: Path | None = None) -> list:
    model = model or w.fixture("exported_run") / "model.onnx"
    return ["infer", "--onnx", model, "--data", w.fixture("train_data"),
            "--out", w.tmp / "s.csv", "--device", "cpu", *extra]


def _fixed_scores(w: World, scores) -> None:
    """infer scores every query with `scores(Q)` (Q, 20) instead of running the model: the rows
    here test what is done with the scores, not the model."""
    w.monkeypatch.setattr(predict, "score_candidates",
                          lambda session, info, images, queries, batch_size, maps=False:
                          (scores(len(queries)), None))


def _spread_scores(n_queries: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(-0.2, 0.9, (n_queries, 20))  # cosines of a head


def _noise_scores(n_queries: int) -> np.ndarray:
    """Cosines that all sit at 0.999999 and differ by float rounding alone, as every image's
    embedding does where the features are one and the same."""
    return 0.999999 + 1e-9 * np.random.default_rng(0).standard_normal((n_queries, 20))


def infer_temperature_inf(w: World) -> list:
    return _infer(w, "--assign-temperature", "inf")


def infer_temperature_nan(w: World) -> list:
    return _infer(w, "--assign-temperature", "nan")


def infer_temperature_huge(w: World) -> list:
    _fixed_scores(w, _spread_scores)
    w.gone.append(w.tmp / "s.csv")
    return _infer(w, "--assign-temperature", "1e300")


def infer_model_temperature_inf(w: World) -> list:
    model = w.copy("exported_run", "run") / "model.onnx"
    proto = onnx.load(str(model))
    for entry in proto.metadata_props:
        if entry.key == "assign_temperature":
            entry.value = "inf"  # what head.train --assign-temperature inf used to export
    onnx.save_model(proto, str(model))
    w.gone.append(w.tmp / "s.csv")
    return _infer(w, model=model)


def infer_noise_scores(w: World) -> list:
    _fixed_scores(w, _noise_scores)
    return _infer(w, "--assign", "sinkhorn")


def _plain_scores_written(w: World) -> None:
    """The submission holds the plain scores, not a ranking Sinkhorn made of their noise."""
    with (w.tmp / "s.csv").open() as f:
        rows = list(csv.reader(f))[1:]
    written = np.array([[float(s) for s in row[1:]] for row in rows])  # (Q, 20)
    np.testing.assert_allclose(written, _noise_scores(len(rows)), rtol=1e-8, atol=0)


# --- head.train: temperatures, margin, and a collapse the data causes --------------------------


def _train(w: World, *extra, cache: Path | None = None) -> list:
    return ["train", "--cache", cache or w.fixture("train_cache"), "--runs-dir", w.tmp / "runs",
            "--name", "x", "--epochs", "1", "--device", "cpu", *extra]


def _no_run(w: World) -> None:
    assert not (w.tmp / "runs" / "x").exists()


def train_assign_temperature_inf(w: World) -> list:
    return _train(w, "--assign-temperature", "inf")


def train_assign_temperature_nan(w: World) -> list:
    return _train(w, "--assign-temperature", "nan")


def train_assign_temperature_huge(w: World) -> list:
    return _train(w, "--assign-temperature", "1e300")


def train_margin_inf(w: World) -> list:
    return _train(w, "--margin", "inf")


def train_temperature_nan(w: World) -> list:
    return _train(w, "--loss", "infonce", "--temperature", "nan")


def train_identical_images(w: World) -> list:
    """Every training image is one and the same picture: the cache's features are all alike."""
    data = w.data()
    train = sorted((data / "train").rglob("*.jpg"))
    for image in train[1:]:
        shutil.copyfile(train[0], image)
    w.cache(data)
    return _train(w, "--val-fraction", "0", cache=w.tmp / "cache" / "r50.h5")


# --- head.export: the opset ---------------------------------------------------------------------


def export_opset(opset: int):
    def setup(w: World) -> list:
        run = w.copy("trained_run", "run")
        w.keep(run)
        return ["export", "--run", run, "--out", w.tmp / "m.onnx", "--opset", opset]
    return setup


def _opset_written(opset: int):
    def then(w: World) -> None:
        model = onnx.load(str(w.tmp / "m.onnx"))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    return then


CASES = {
    "infer --assign-temperature inf": Case(infer_temperature_inf, 2, (
        "--assign-temperature", "'inf' is not a finite number")),
    "infer --assign-temperature nan": Case(infer_temperature_nan, 2, (
        "--assign-temperature", "'nan' is not a finite number")),
    "infer --assign-temperature 1e300": Case(infer_temperature_huge, 1, (
        "--assign-temperature", "temperature 1e+300 is too high",
        "all look alike", "choose a lower one")),
    "infer model records temperature inf": Case(infer_model_temperature_inf, 1, (
        "{tmp}/run/model.onnx", "Sinkhorn temperature inf", "pass --assign-temperature")),
    "infer scores of float noise": Case(infer_noise_scores, 0, (
        "no sinkhorn assignment", "carry no information", "ranking by plain scores"),
        then=_plain_scores_written),
    "train --assign-temperature inf": Case(train_assign_temperature_inf, 2, (
        "--assign-temperature", "'inf' is not a finite number"), then=_no_run),
    "train --assign-temperature nan": Case(train_assign_temperature_nan, 2, (
        "--assign-temperature", "'nan' is not a finite number"), then=_no_run),
    "train --assign-temperature 1e300": Case(train_assign_temperature_huge, 1, (
        "--assign-temperature", "temperature 1e+300 is too high", "choose a lower one"),
        then=_no_run),
    "train --margin inf": Case(train_margin_inf, 2, (
        "--margin", "'inf' is not a finite number"), then=_no_run),
    "train --temperature nan": Case(train_temperature_nan, 2, (
        "--temperature", "'nan' is not a finite number"), then=_no_run),
    "train identical training images": Case(train_identical_images, 1, (
        "the same features for every training image", "extract the cache again",
        "--lr is not the cause"), then=_no_run),
    "export --opset 17": Case(export_opset(17), 2, ("--opset", "17 is not in the range 18<=x<=26")),
    "export --opset 99": Case(export_opset(99), 2, ("--opset", "99 is not in the range 18<=x<=26")),
    "export --opset 26": Case(export_opset(26), 0, then=_opset_written(26)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_assign_hostile(case: Case, request: pytest.FixtureRequest, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(case, request, tmp_path, monkeypatch)


def test_every_row_names_a_command() -> None:
    for name in CASES:
        assert name.split()[0] in COMMANDS, name


# --- the pure functions, by hand ----------------------------------------------------------------

# Two queries, two pool images, each image a candidate of both: one-to-one.
SCORES = np.array([[0.9, 0.1], [0.2, 0.8]])
CANDIDATES = np.array([[0, 1], [0, 1]])


def test_flat_rows() -> None:
    # range 0; range 2e-7 on magnitude 3 (under 1e-7 * 3); range 1e-6 on magnitude 1 (over)
    rows = np.array([[0.5, 0.5], [-3.0, -3.0 + 2e-7], [1.0, 1.0 - 1e-6]])
    assert flat_rows(rows).tolist() == [True, True, False]


def test_uninformative() -> None:
    assert uninformative(SCORES) is None
    # std 5e-10 beside magnitude 1: rounding noise (threshold 1e-6 * 1)
    noise = np.array([[1.0, 1.0 - 1e-9], [1.0 - 1e-9, 1.0]])
    assert "carry no information" in uninformative(noise)
    assert uninformative(np.zeros((2, 2))) is not None  # nothing at all to rank by


def test_assign_leaves_noise_as_it_is() -> None:
    noise = np.array([[1.0, 1.0 - 1e-9], [1.0 - 1e-9, 1.0]])
    for method in ("sinkhorn", "hungarian"):
        assert assign(noise, CANDIDATES, method) is noise


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 0.0, -1.0])
def test_sinkhorn_refuses_a_temperature_that_is_not_finite_and_positive(temperature) -> None:
    with pytest.raises(ValueError, match="must be positive and finite"):
        assign(SCORES, CANDIDATES, "sinkhorn", temperature)


@pytest.mark.parametrize("temperature", [1e300, 1e12])
def test_sinkhorn_refuses_a_temperature_that_flattens_rows(temperature) -> None:
    # scores / (T * std 0.35): differences of 1e-12 and less vanish beside log(1/2) = -0.69
    with pytest.raises(ValueError, match="candidates of 2 of the 2 queries all look alike"):
        assign(SCORES, CANDIDATES, "sinkhorn", temperature)


def test_sinkhorn_at_a_high_but_usable_temperature_keeps_the_order() -> None:
    assigned = assign(SCORES, CANDIDATES, "sinkhorn", 100.0)
    assert not flat_rows(assigned).any()
    assert (assigned.argmax(axis=1) == [0, 1]).all()


def test_finite_float_refuses_inf_and_nan_but_takes_numbers() -> None:
    import click

    from tll import FiniteFloat

    kind = FiniteFloat(min=0, min_open=True)
    assert kind.convert("0.5", None, None) == 0.5
    for bad in ("inf", "-inf", "nan", "0"):
        with pytest.raises(click.BadParameter):
            kind.convert(bad, None, None)
