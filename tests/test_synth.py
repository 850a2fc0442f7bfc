"""Behaviour of the synthetic dataset generator: layout, determinism, CLI and signal."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from extract.synth import cli, main, plan_pairs

PAIRS = 30
QUERIES = 20
CANDIDATE_HEADER = ["left", *(f"c{i}" for i in range(20))]


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        header, *rows = csv.reader(handle)
    return header, rows


def stems(folder: Path) -> set[str]:
    return {path.stem for path in folder.iterdir()}


def all_files(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def mean_colour(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float64).mean(axis=(0, 1))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return main(tmp_path_factory.mktemp("synth") / "data", pairs=PAIRS, queries=QUERIES, seed=0)


@pytest.fixture(scope="module")
def test_truth() -> dict[str, str]:
    _, test = plan_pairs(PAIRS, QUERIES, seed=0)
    return {pair.left_id: pair.right_id for pair in test}


def test_layout_and_headers(dataset: Path) -> None:
    assert sorted(path.name for path in dataset.iterdir()) == [
        "sample-submission.csv",
        "test",
        "test_candidates.csv",
        "train",
        "train.csv",
    ]
    train_header, train_rows = read_csv(dataset / "train.csv")
    assert train_header == ["left", "right"]
    assert len(train_rows) == PAIRS
    assert [row[0] for row in train_rows] == sorted(row[0] for row in train_rows)
    assert {row[0] for row in train_rows} == stems(dataset / "train" / "left")
    assert {row[1] for row in train_rows} == stems(dataset / "train" / "right")

    candidates_header, candidate_rows = read_csv(dataset / "test_candidates.csv")
    assert candidates_header == CANDIDATE_HEADER
    assert len(candidate_rows) == QUERIES
    assert [row[0] for row in candidate_rows] == sorted(row[0] for row in candidate_rows)
    assert {row[0] for row in candidate_rows} == stems(dataset / "test" / "left")
    assert len(stems(dataset / "test" / "right")) == QUERIES

    submission_header, submission_rows = read_csv(dataset / "sample-submission.csv")
    assert submission_header == CANDIDATE_HEADER
    assert [row[0] for row in submission_rows] == [row[0] for row in candidate_rows]
    scores = np.array([[float(value) for value in row[1:]] for row in submission_rows])
    assert scores.shape == (QUERIES, 20)
    assert ((scores >= 0) & (scores < 1)).all()


def test_ids_are_distinct_three_letter_stems(dataset: Path) -> None:
    folders = [dataset / split / side for split in ("train", "test") for side in ("left", "right")]
    files = [path for folder in folders for path in folder.iterdir()]
    ids = [path.stem for path in files]
    assert len(ids) == 2 * (PAIRS + QUERIES)
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z]{3}", image_id) for image_id in ids)
    assert all(path.suffix == ".jpg" for path in files)


def test_images_are_200x245_rgb_baseline_jpeg(dataset: Path) -> None:
    for path in sorted(dataset.rglob("*.jpg")):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (200, 245)
            assert "progressive" not in image.info


def test_candidates_hold_the_truth_and_use_every_test_right_once(
    dataset: Path, test_truth: dict[str, str]
) -> None:
    _, candidate_rows = read_csv(dataset / "test_candidates.csv")
    test_rights = stems(dataset / "test" / "right")
    assert set(test_truth) == {row[0] for row in candidate_rows}
    assert sorted(test_truth.values()) == sorted(test_rights)
    for left_id, *candidates in candidate_rows:
        assert len(set(candidates)) == 20
        assert set(candidates) <= test_rights
        assert test_truth[left_id] in candidates
    # Shuffled positions: the truth is not always in the same column.
    truth_columns = {
        candidates.index(test_truth[left_id]) for left_id, *candidates in candidate_rows
    }
    assert len(truth_columns) > 1


def test_plan_matches_train_csv(dataset: Path) -> None:
    train, _ = plan_pairs(PAIRS, QUERIES, seed=0)
    _, train_rows = read_csv(dataset / "train.csv")
    assert train_rows == [[pair.left_id, pair.right_id] for pair in train]


def test_same_seed_same_bytes_other_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = main(tmp_path / "again", pairs=PAIRS, queries=QUERIES, seed=0)
    other = main(tmp_path / "other", pairs=PAIRS, queries=QUERIES, seed=1)
    assert all_files(again) == all_files(dataset)
    assert all_files(other) != all_files(dataset)


def test_concept_is_visible_in_mean_colour(dataset: Path, test_truth: dict[str, str]) -> None:
    _, candidate_rows = read_csv(dataset / "test_candidates.csv")
    closer_to_truth = 0
    for left_id, *candidates in candidate_rows:
        left = mean_colour(dataset / "test" / "left" / f"{left_id}.jpg")
        distances = {
            right_id: np.linalg.norm(
                left - mean_colour(dataset / "test" / "right" / f"{right_id}.jpg")
            )
            for right_id in candidates
        }
        truth_distance = distances.pop(test_truth[left_id])
        closer_to_truth += truth_distance < np.mean(list(distances.values()))
    assert closer_to_truth >= 0.75 * len(candidate_rows)


def test_cli_writes_dataset(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = CliRunner().invoke(cli, [str(out), "--pairs", "3", "--queries", "20", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert len(read_csv(out / "train.csv")[1]) == 3
    assert len(read_csv(out / "test_candidates.csv")[1]) == 20
    assert len(list((out / "test" / "right").iterdir())) == 20


@pytest.mark.parametrize(
    ("arguments", "problem"), [(["--queries", "19"], "--queries"), (["--pairs", "0"], "--pairs")]
)
def test_cli_rejects_bad_sizes_and_writes_nothing(
    tmp_path: Path, arguments: list[str], problem: str
) -> None:
    out = tmp_path / "data"
    result = CliRunner().invoke(cli, [str(out), *arguments])
    assert result.exit_code != 0
    assert problem in result.output
    assert list(tmp_path.iterdir()) == []


def test_main_rejects_too_few_queries(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 20"):
        main(tmp_path / "data", pairs=5, queries=19)


def test_refuses_non_empty_out_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    result = CliRunner().invoke(cli, [str(out), "--pairs", "2", "--queries", "20"])
    assert result.exit_code != 0
    assert "--overwrite" in result.output
    assert sorted(path.name for path in out.iterdir()) == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]

    result = CliRunner().invoke(cli, [str(out), "--pairs", "2", "--queries", "20", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists()
    assert (out / "train.csv").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]


def test_empty_existing_out_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    assert main(out, pairs=2, queries=20) == out
    assert (out / "sample-submission.csv").exists()
