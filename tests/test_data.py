"""The data layer: reading the Kaggle layout, loading images, the validation split, and the one
clear message (and nothing written) that bad data gets."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SMALL_PAIRS, SMALL_QUERIES
from PIL import Image

from extract.extract_features import cli as extract_cli
from tll.data import (
    DataError,
    Dataset,
    fold_splits,
    load_image,
    read_dataset,
    validation_split,
)


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def write_rows(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


# --- reading a dataset -----------------------------------------------------------------------


def test_synthetic_dataset_reads_back(synthetic: Path) -> None:
    dataset = read_dataset(synthetic)
    train_rows = read_rows(synthetic / "train.csv")[1:]
    candidate_rows = read_rows(synthetic / "test_candidates.csv")[1:]

    assert dataset.train_pairs == [(left, right) for left, right in train_rows]
    assert len(dataset.train_pairs) == SMALL_PAIRS
    assert len(dataset.test_queries) == SMALL_QUERIES
    for query, (left, *candidates) in zip(dataset.test_queries, candidate_rows, strict=True):
        assert query.left == f"test/left/{left}"
        assert query.candidates == tuple(f"test/right/{c}" for c in candidates)
        assert len(set(query.candidates)) == 20
        assert query.truth is None

    keys = dataset.keys()
    assert len(keys) == 2 * (SMALL_PAIRS + SMALL_QUERIES)
    assert keys == sorted(set(keys))
    for key in keys:
        split_side, image = key.rsplit("/", 1)
        assert dataset.images[key] == synthetic / split_side / f"{image}.jpg"
        assert dataset.images[key].is_file()
    # every image on disk is named by a CSV, and every key is an image on disk
    on_disk = {
        p.relative_to(synthetic).with_suffix("").as_posix() for p in synthetic.rglob("*.jpg")
    }
    assert set(keys) == on_disk


def test_fingerprint_is_stable_and_tracks_file_sizes(synthetic: Path, dataset_copy: Path) -> None:
    fingerprint = read_dataset(synthetic).fingerprint()
    assert read_dataset(synthetic).fingerprint() == fingerprint
    assert read_dataset(dataset_copy).fingerprint() == fingerprint  # independent of the folder

    image = next(iter(sorted((dataset_copy / "test" / "right").iterdir())))
    with image.open("ab") as handle:
        handle.write(b"\0")  # same key set, one file one byte longer
    assert read_dataset(dataset_copy).fingerprint() != fingerprint


def test_accepts_bom_crlf_and_trailing_blank_lines(synthetic: Path, dataset_copy: Path) -> None:
    """A CSV saved by a spreadsheet on Windows reads the same as the original."""
    train_csv = dataset_copy / "train.csv"
    text = train_csv.read_text()
    train_csv.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode() + b"\r\n\r\n")
    assert read_dataset(dataset_copy).train_pairs == read_dataset(synthetic).train_pairs


# --- bad data: one DataError that names the culprit ------------------------------------------

# Each case damages a copy of the synthetic dataset and returns (the --data folder to use, the
# fragments the error message must contain).
BadCase = Callable[[Path], tuple[Path, list[str]]]


def _misnamed_column(root: Path):
    rows = read_rows(root / "train.csv")
    write_rows(root / "train.csv", [["left", "rigth"], *rows[1:]])
    return root, ["train.csv", "line 1", "rigth"]


def _missing_column(root: Path):
    rows = read_rows(root / "train.csv")
    write_rows(root / "train.csv", [[row[0]] for row in rows])
    return root, ["train.csv", "line 1", "missing: right"]


def _duplicate_train_left(root: Path):
    rows = read_rows(root / "train.csv")
    duplicate = rows[3][0]
    write_rows(root / "train.csv", [*rows, [duplicate, "zzz"]])
    return root, ["train.csv", f"line {len(rows) + 1}", duplicate, "line 4"]


def _duplicate_test_left(root: Path):
    rows = read_rows(root / "test_candidates.csv")
    write_rows(root / "test_candidates.csv", [*rows, rows[5]])
    return root, ["test_candidates.csv", f"line {len(rows) + 1}", rows[5][0], "line 6"]


def _missing_train_image(root: Path):
    rows = read_rows(root / "train.csv")
    missing = rows[7][1]  # line 8
    (root / "train" / "right" / f"{missing}.jpg").unlink()
    return root, ["train.csv", "line 8", missing]


def _missing_test_image(root: Path):
    rows = read_rows(root / "test_candidates.csv")
    missing = rows[2][7]
    first_line = next(n for n, row in enumerate(rows, start=1) if missing in row[1:])
    (root / "test" / "right" / f"{missing}.jpg").unlink()
    return root, ["test_candidates.csv", f"line {first_line}", missing]


def _repeated_candidate(root: Path):
    rows = read_rows(root / "test_candidates.csv")
    rows[2][5] = rows[2][9]  # line 3
    write_rows(root / "test_candidates.csv", rows)
    return root, ["test_candidates.csv", "line 3", rows[2][0], rows[2][9]]


def _short_train_row(root: Path):
    rows = read_rows(root / "train.csv")
    rows[4] = rows[4][:1]  # line 5
    write_rows(root / "train.csv", rows)
    return root, ["train.csv", "line 5", rows[4][0]]


def _short_candidate_row(root: Path):
    rows = read_rows(root / "test_candidates.csv")
    rows[10] = rows[10][:20]  # line 11: left + 19 candidates
    write_rows(root / "test_candidates.csv", rows)
    return root, ["test_candidates.csv", "line 11", rows[10][0]]


def _blank_value(root: Path):
    rows = read_rows(root / "train.csv")
    rows[6][1] = ""  # line 7
    write_rows(root / "train.csv", rows)
    return root, ["train.csv", "line 7", rows[6][0]]


def _empty_train_csv(root: Path):
    write_rows(root / "train.csv", [["left", "right"]])
    return root, ["train.csv", "no rows"]


def _missing_candidates_csv(root: Path):
    (root / "test_candidates.csv").unlink()
    return root, ["test_candidates.csv", "does not exist"]


def _missing_data_folder(root: Path):
    return root.parent / "no-such-data", ["no-such-data", "does not exist"]


def _missing_image_folder(root: Path):
    shutil.rmtree(root / "test" / "right")
    return root, ["test/right", "does not exist"]


def _two_files_for_one_id(root: Path):
    image = sorted((root / "train" / "left").iterdir())[0]
    shutil.copy(image, image.with_suffix(".png"))
    return root, ["train/left", image.stem, f"{image.stem}.jpg", f"{image.stem}.png"]


BAD_DATASETS: dict[str, BadCase] = {
    "misnamed-column": _misnamed_column,
    "missing-column": _missing_column,
    "duplicate-train-left": _duplicate_train_left,
    "duplicate-test-left": _duplicate_test_left,
    "missing-train-image": _missing_train_image,
    "missing-test-image": _missing_test_image,
    "repeated-candidate": _repeated_candidate,
    "short-train-row": _short_train_row,
    "short-candidate-row": _short_candidate_row,
    "blank-value": _blank_value,
    "empty-train-csv": _empty_train_csv,
    "missing-candidates-csv": _missing_candidates_csv,
    "missing-data-folder": _missing_data_folder,
    "missing-image-folder": _missing_image_folder,
    "two-files-for-one-id": _two_files_for_one_id,
}


@pytest.mark.parametrize("damage", BAD_DATASETS.values(), ids=BAD_DATASETS.keys())
def test_bad_dataset_names_the_culprit(dataset_copy: Path, damage: BadCase) -> None:
    data, fragments = damage(dataset_copy)
    with pytest.raises(DataError) as raised:
        read_dataset(data)
    for fragment in fragments:
        assert fragment in str(raised.value)


@pytest.mark.parametrize("damage", BAD_DATASETS.values(), ids=BAD_DATASETS.keys())
def test_extract_cli_on_bad_dataset_fails_cleanly_and_writes_nothing(
    dataset_copy: Path, tmp_path: Path, damage: BadCase
) -> None:
    data, fragments = damage(dataset_copy)
    out = tmp_path / "out" / "x.h5"
    result = CliRunner().invoke(
        extract_cli,
        [
            "--backbone",
            "resnet50",
            "--data",
            str(data),
            "--out",
            str(out),
            "--weights",
            "none",
            "--input-size",
            "32",
            "32",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-hflip",
        ],
    )
    output = result.output + (getattr(result, "stderr", "") or "")
    assert result.exit_code == 1, output
    assert "Error:" in output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output
    assert not out.exists()
    assert not out.with_name("x.h5.partial").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- loading images ----------------------------------------------------------------------------

RED = (200, 30, 45)


def _solid(mode: str) -> tuple[Image.Image, tuple[int, int, int]]:
    """A 40 x 50 (W x H) image in `mode` and the RGB colour it stands for."""
    size = (40, 50)
    if mode == "L":
        return Image.new("L", size, 128), (128, 128, 128)
    if mode == "CMYK":
        return Image.new("CMYK", size, (255 - RED[0], 255 - RED[1], 255 - RED[2], 0)), RED
    if mode == "P":
        image = Image.new("P", size, 1)
        image.putpalette([0, 0, 0, *RED])
        return image, RED
    if mode == "RGBA":
        return Image.new("RGBA", size, (*RED, 255)), RED
    return Image.new("RGB", size, RED), RED


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("RGB", ".jpg"),
        ("RGB", ".png"),
        ("L", ".jpg"),
        ("L", ".png"),
        ("RGBA", ".png"),
        ("P", ".png"),
        ("CMYK", ".jpg"),
    ],
)
def test_load_image_any_mode_gives_rgb_float(tmp_path: Path, mode: str, suffix: str) -> None:
    image, colour = _solid(mode)
    path = tmp_path / f"image{suffix}"
    image.save(path)
    with Image.open(path) as saved:
        assert saved.mode == mode  # the file really is in that mode

    loaded = load_image(path, (30, 20))
    assert loaded.dtype == np.float32
    assert loaded.shape == (3, 30, 20)  # (3, H, W)
    assert loaded.min() >= 0 and loaded.max() <= 1
    expected = np.array(colour, dtype=np.float32).reshape(3, 1, 1) / 255
    np.testing.assert_allclose(loaded, np.broadcast_to(expected, loaded.shape), atol=4 / 255)


def test_load_image_matches_pil_resize(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)  # (H, W, 3)
    path = tmp_path / "noise.png"
    Image.fromarray(pixels).save(path)

    reference = Image.fromarray(pixels).resize((20, 30), Image.Resampling.BILINEAR)  # (W, H)
    expected = np.asarray(reference, dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(load_image(path, (30, 20)), expected)
    # at its own size the image is not resampled at all
    np.testing.assert_array_equal(
        load_image(path, (50, 40)), pixels.transpose(2, 0, 1).astype(np.float32) / 255
    )


def test_load_image_jpeg_matches_pil_decode_and_resize(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    path = tmp_path / "noise.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    with Image.open(path) as decoded:
        reference = decoded.convert("RGB").resize((20, 30), Image.Resampling.BILINEAR)
    expected = np.asarray(reference, dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(load_image(path, (30, 20)), expected)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # transparent black everywhere ...
    rgba[0, 0] = (*RED, 255)  # ... but one opaque red pixel
    rgba[0, 1] = (0, 0, 0, 128)  # and one half-transparent black one
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)

    loaded = load_image(path, (4, 4))
    np.testing.assert_allclose(loaded[:, 0, 0], np.array(RED) / 255, atol=1e-6)
    np.testing.assert_allclose(loaded[:, 0, 1], 127 / 255, atol=1.5 / 255)
    assert (loaded[:, 1:, :] == 1).all()
    assert (loaded[:, 0, 2:] == 1).all()


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    image.putpixel((3, 3), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    loaded = load_image(path, (4, 4))
    np.testing.assert_allclose(loaded[:, 3, 3], np.array(RED) / 255, atol=1e-6)
    mask = np.ones((4, 4), dtype=bool)
    mask[3, 3] = False
    assert (loaded[:, mask] == 1).all()


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(5000))


def _truncated(path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (245, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    "damage", [_garbage, _truncated, _empty], ids=["garbage", "truncated", "empty"]
)
def test_unreadable_image_names_the_file(tmp_path: Path, damage) -> None:
    path = tmp_path / "broken-abc.jpg"
    damage(path)
    with pytest.raises(DataError, match="broken-abc.jpg"):
        load_image(path, (32, 32))


def test_missing_image_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="gone.jpg"):
        load_image(tmp_path / "gone.jpg")


# --- the validation split ----------------------------------------------------------------------


def _fake_dataset(n_pairs: int) -> Dataset:
    pairs = [(f"l{i:03d}", f"r{i:03d}") for i in range(n_pairs)]
    return Dataset(root=Path("unused"), train_pairs=pairs, test_queries=[], images={})


def _check_split(dataset: Dataset, fraction: float, seed: int) -> None:
    train, queries = validation_split(dataset, fraction, seed)
    assert len(queries) == round(len(dataset.train_pairs) * fraction)
    _check_held_out(dataset.train_pairs, train, queries)


def _check_held_out(pairs: list[tuple[str, str]], train: list[tuple[str, str]],
                    queries: list) -> None:
    """The queries hold out exactly the pairs not in `train`, laid out like the Kaggle test:
    each held-out right is one query's truth and every foil is another held-out right."""
    truth_of = {f"train/left/{left}": f"train/right/{right}" for left, right in pairs}
    held_out_lefts = [q.left.removeprefix("train/left/") for q in queries]
    assert len(set(held_out_lefts)) == len(queries)
    assert set(held_out_lefts).isdisjoint(left for left, _ in train)
    assert len(train) + len(queries) == len(pairs)
    held_out_pairs = {
        (q.left.removeprefix("train/left/"), q.candidates[q.truth].removeprefix("train/right/"))
        for q in queries
    }
    assert held_out_pairs | set(train) == set(pairs)

    held_out_rights = {truth_of[q.left] for q in queries}
    for query in queries:
        assert len(query.candidates) == 20
        assert len(set(query.candidates)) == 20
        assert set(query.candidates) <= held_out_rights
        assert query.candidates[query.truth] == truth_of[query.left]
    truths = Counter(q.candidates[q.truth] for q in queries)
    assert set(truths) == held_out_rights
    assert set(truths.values()) == {1}
    assert len({q.truth for q in queries}) > 1  # the truth is not always in the same column


@pytest.mark.parametrize(
    ("n_pairs", "fraction", "seed"), [(200, 0.1, 0), (200, 0.5, 3), (25, 0.8, 1), (1600, 0.1, 0)]
)
def test_validation_split_layout(n_pairs: int, fraction: float, seed: int) -> None:
    _check_split(_fake_dataset(n_pairs), fraction, seed)


def test_validation_split_of_synthetic_data_uses_its_images(synthetic: Path) -> None:
    dataset = read_dataset(synthetic)
    _check_split(dataset, 0.9, 0)
    _, queries = validation_split(dataset, 0.9, 0)
    for query in queries:
        assert query.left in dataset.images
        assert all(c in dataset.images for c in query.candidates)


@pytest.mark.parametrize(("n_pairs", "folds", "seed"), [(100, 5, 0), (103, 5, 1), (1600, 5, 0),
                                                       (45, 2, 3)])
def test_fold_layout(n_pairs: int, folds: int, seed: int) -> None:
    """Each fold is a Kaggle-like split of its own pairs; every pair is held out exactly once."""
    dataset = _fake_dataset(n_pairs)
    splits = fold_splits(dataset, folds, seed)
    assert len(splits) == folds
    held_out = [q.left for _, queries in splits for q in queries]
    assert sorted(held_out) == sorted(f"train/left/{left}" for left, _ in dataset.train_pairs)
    sizes = [len(queries) for _, queries in splits]
    assert max(sizes) - min(sizes) <= 1
    for train, queries in splits:
        _check_held_out(dataset.train_pairs, train, queries)  # foils from this fold only
    assert fold_splits(dataset, folds, seed) == splits
    assert fold_splits(dataset, folds, seed + 1) != splits


@pytest.mark.parametrize(("n_pairs", "folds"), [(100, 1), (100, 6), (39, 2), (100, 0)])
def test_fold_splits_refuse_folds_too_small_or_too_few(n_pairs: int, folds: int) -> None:
    with pytest.raises(DataError, match="at least 2 folds of at least 20 pairs"):
        fold_splits(_fake_dataset(n_pairs), folds, 0)


def test_validation_split_is_seeded() -> None:
    dataset = _fake_dataset(200)
    assert validation_split(dataset, 0.2, 7) == validation_split(dataset, 0.2, 7)
    train_a, queries_a = validation_split(dataset, 0.2, 7)
    train_b, queries_b = validation_split(dataset, 0.2, 8)
    assert set(train_a) != set(train_b)
    assert queries_a != queries_b


def test_validation_split_fraction_zero_holds_out_nothing() -> None:
    dataset = _fake_dataset(50)
    train, queries = validation_split(dataset, 0.0, 0)
    assert train == dataset.train_pairs
    assert queries == []


@pytest.mark.parametrize(
    ("n_pairs", "fraction"), [(200, 0.05), (30, 0.5), (100, 1.0), (100, 0.999), (100, -0.3)]
)
def test_validation_split_refuses_too_few_or_everything(n_pairs: int, fraction: float) -> None:
    with pytest.raises(DataError, match="at least 20"):
        validation_split(_fake_dataset(n_pairs), fraction, 0)


def test_validation_split_refuses_tiny_nonzero_fraction() -> None:
    with pytest.raises(DataError):
        validation_split(_fake_dataset(100), 0.004, 0)


# --- the real data -----------------------------------------------------------------------------


@pytest.mark.real
def test_real_data_reads(real_data: Path) -> None:
    dataset = read_dataset(real_data)
    assert len(dataset.train_pairs) == 1600
    assert len(dataset.test_queries) == 2000
    assert len(dataset.keys()) == 7200
    assert all(len(set(q.candidates)) == 20 for q in dataset.test_queries)
    for key in dataset.keys()[::900]:  # a few images, at their native size
        with Image.open(dataset.images[key]) as image:
            assert image.size == (200, 245)
        assert load_image(dataset.images[key]).shape == (3, 245, 200)


@pytest.mark.real
def test_real_data_validation_split(real_data: Path) -> None:
    dataset = read_dataset(real_data)
    _check_split(dataset, 0.1, 0)
    train, queries = validation_split(dataset, 0.1, 0)
    assert len(queries) == 160
    assert len(train) == 1440
    assert all(
        q.left in dataset.images and set(q.candidates) <= set(dataset.images) for q in queries
    )
