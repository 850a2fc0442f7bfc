"""The Kaggle (COMP90086) data layout: reading and checking it, loading images, the validation
split.

Layout under a dataset folder DATA (an id is a file's stem)::

    train.csv             left,right         one labelled pair per row
    train/{left,right}/<id>.jpg
    test_candidates.csv   left,c0..c19       one query per row: 1 true right + 19 foils
    test/{left,right}/<id>.jpg

Every image is addressed by a key ``split/side/id`` (``train/left/abh``); the feature cache uses
the same keys. Images may be JPEG or PNG in any common mode, 8 or 16 bits, with or without an
EXIF orientation; they load upright as RGB float32 in [0, 1]. A dataset's fingerprint covers what
its images contain (sha256 of each file), so a cache never keeps the features of an image that
has changed. Bad data raises `DataError` whose message names the file and line. Imports no torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from tll import UserError

N_CANDIDATES = 20
DEFAULT_INPUT_SIZE = (245, 200)  # (H, W): the dataset's native size
# how an image is resized to a trunk's input size: the trunk's weights say which; caches, runs
# and models from before this was recorded used bilinear
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
DEFAULT_INTERPOLATION = "bilinear"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TRAIN_COLUMNS = ["left", "right"]
CANDIDATE_COLUMNS = ["left"] + [f"c{i}" for i in range(N_CANDIDATES)]


class DataError(UserError, ValueError):
    """Bad input data. The message names the culprit: file, line, id."""


@dataclass(frozen=True)
class Query:
    """One ranking problem: a left image and its candidate right images, all as keys."""

    left: str
    candidates: tuple[str, ...]
    truth: int | None  # index of the true match in `candidates`; None where unknown (test)


@dataclass(frozen=True)
class Dataset:
    root: Path
    train_pairs: list[tuple[str, str]]  # (left id, right id), in train.csv order
    test_queries: list[Query]  # in test_candidates.csv order
    images: dict[str, Path]  # key -> image file, for every image the CSVs name
    _digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def keys(self) -> list[str]:
        """Every image once, grouped by split/side and sorted by id: the cache's row order."""
        return sorted(self.images)

    def files(self) -> list[Path]:
        """Every file the dataset is read from: its two CSVs and every image."""
        return [self.root / "train.csv", self.root / "test_candidates.csv",
                *self.images.values()]

    def digests(self, keys: list[str] | None = None) -> list[str]:
        """sha256 of each image file's bytes, for `keys` (default: all, in `keys()` order).
        Each file is read once per Dataset; all 7,200 real images take about a second."""
        keys = self.keys() if keys is None else keys
        for key in keys:
            if key not in self._digests:
                self._digests[key] = file_sha256(self.images[key])
        return [self._digests[key] for key in keys]

    def fingerprint(self) -> str:
        """sha256 of every key with its image's content: tells one dataset, or one version of
        it, from another."""
        digest = hashlib.sha256()
        for key, content in zip(self.keys(), self.digests(), strict=True):
            digest.update(f"{key}\t{content}\n".encode())
        return digest.hexdigest()


def file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:  # unreadable, a folder, a link loop, a link to nothing
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None


def image_id(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def read_dataset(root: str | Path) -> Dataset:
    """Read and check both CSVs and find every image they name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    folders = {
        f"{split}/{side}": _index_images(root / split / side)
        for split in ("train", "test")
        for side in ("left", "right")
    }
    train_rows = _read_csv(root / "train.csv", TRAIN_COLUMNS)
    test_rows = _read_csv(root / "test_candidates.csv", CANDIDATE_COLUMNS)
    images: dict[str, Path] = {}

    def image_key(split_side: str, image: str, csv_path: Path, line: int) -> str:
        path = folders[split_side].get(image)
        if path is None:
            raise DataError(
                f"{csv_path}, line {line}: id {image!r} has no image file in "
                f"{root / split_side} (looked for {image}{'|'.join(IMAGE_SUFFIXES)})"
            )
        key = f"{split_side}/{image}"
        images[key] = path
        return key

    train_csv = root / "train.csv"
    for column in TRAIN_COLUMNS:
        _refuse_duplicates(train_csv, [(line, row[column]) for line, row in train_rows], column)
    train_pairs = []
    for line, row in train_rows:
        image_key("train/left", row["left"], train_csv, line)
        image_key("train/right", row["right"], train_csv, line)
        train_pairs.append((row["left"], row["right"]))

    test_csv = root / "test_candidates.csv"
    _refuse_duplicates(test_csv, [(line, row["left"]) for line, row in test_rows], "left")
    test_queries = []
    for line, row in test_rows:
        candidates = [row[f"c{i}"] for i in range(N_CANDIDATES)]
        if len(set(candidates)) != N_CANDIDATES:
            repeated = sorted({c for c in candidates if candidates.count(c) > 1})
            raise DataError(
                f"{test_csv}, line {line} (left {row['left']!r}): needs {N_CANDIDATES} distinct "
                f"candidates, got {len(set(candidates))} (repeated: {', '.join(repeated)})"
            )
        test_queries.append(
            Query(
                left=image_key("test/left", row["left"], test_csv, line),
                candidates=tuple(image_key("test/right", c, test_csv, line) for c in candidates),
                truth=None,
            )
        )
    return Dataset(root=root, train_pairs=train_pairs, test_queries=test_queries, images=images)


def _index_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        raise DataError(f"image folder {folder} cannot be listed ({error.strerror})") from None
    found: dict[str, Path] = {}
    for path in entries:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise DataError(f"{folder}: id {path.stem!r} has two image files: "
                            f"{found[path.stem].name} and {path.name}")
        found[path.stem] = path
    return found


def _read_csv(path: Path, columns: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows as (line number, row); refuses a missing file, wrong columns, blanks, no rows."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {raw[error.start]:#04x}); "
                        "save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return _rows(path, reader, columns)
    except csv.Error as error:  # a NUL byte, an unclosed quote at the end
        raise DataError(f"{path}, line {reader.line_num}: not a readable CSV ({error})") from None


def _rows(path: Path, reader, columns: list[str]) -> list[tuple[int, dict[str, str]]]:
    header = [name.strip() for name in next(reader, [])]
    if header != columns:
        missing = [c for c in columns if c not in header]
        unexpected = [c for c in header if c not in columns]
        raise DataError(
            f"{path}, line 1: expected columns {','.join(columns)}; got {','.join(header)}"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (unexpected: {', '.join(unexpected)})" if unexpected else "")
        )
    rows = []
    for line, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue  # a trailing blank line
        values = [v.strip() for v in values]
        if len(values) != len(columns) or not all(values):
            raise DataError(f"{path}, line {line}: expected {len(columns)} non-empty values, "
                            f"got {values}")
        rows.append((line, dict(zip(columns, values, strict=True))))
    if not rows:
        raise DataError(f"{path} has no rows: the dataset is empty")
    return rows


def _refuse_duplicates(path: Path, lines_and_ids: list[tuple[int, str]], column: str) -> None:
    first_line: dict[str, int] = {}
    for line, image in lines_and_ids:
        if image in first_line:
            raise DataError(f"{path}, line {line}: duplicate {column} id {image!r} "
                            f"(first on line {first_line[image]})")
        first_line[image] = line


# 16-bit greyscale PNGs open as I;16 (or I, 32-bit integers holding 16-bit values); F is float
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535,
               "F": 1}


def load_image(path: str | Path, size: tuple[int, int] = DEFAULT_INPUT_SIZE,
               interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """Decode an image upright (EXIF orientation applied) to RGB float32 (3, H, W) in [0, 1]
    at `size` (H, W), resized whole with `interpolation` (bilinear or bicubic). Never cropped,
    unlike the weights' own center-crop preprocessing: what makes two images look alike may
    sit at their edges. 16-bit and float greyscale keep their depth: scaled, not clipped to 8
    bits."""
    height, width = size
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"unknown interpolation {interpolation!r}; choose from "
                        f"{', '.join(INTERPOLATIONS)}")
    resample = INTERPOLATIONS[interpolation]
    try:
        with Image.open(path) as image:
            image.load()  # decode fully now, so a truncated file fails here and not later
            image = ImageOps.exif_transpose(image)  # phone photos store "rotate me" in EXIF
            if image.mode in _WIDE_MODES:
                grey = image if image.mode == "F" else image.convert("F")
                grey = grey.resize((width, height), resample)
                values = np.asarray(grey, dtype=np.float32) / _WIDE_MODES[image.mode]
                return np.repeat(np.clip(values, 0, 1)[None], 3, axis=0)  # (3, H, W)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                # transparent pixels often hide arbitrary colours: show them on white
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            rgb = image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise DataError(f"{path}: too large to decode safely ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot read image ({error}); replace it with a readable copy "
                        "of the picture and rerun") from None
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample)
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, H, W)


def validation_split(
    dataset: Dataset, fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[Query]]:
    """Hold out a seeded fraction of the train pairs, laid out like the Kaggle test.

    Each held-out left gets its true right plus 19 foils drawn from the other held-out rights,
    in shuffled positions, so every held-out right is the true match of exactly one query.
    Returns (the pairs left for training, the validation queries); fraction 0 holds out nothing.
    """
    pairs = dataset.train_pairs
    if fraction == 0:
        return list(pairs), []
    n_val = round(len(pairs) * fraction)
    if not 0 < fraction < 1 or n_val < N_CANDIDATES or n_val == len(pairs):
        raise DataError(
            f"validation fraction {fraction} of {len(pairs)} train pairs holds out {n_val}; "
            f"it needs at least {N_CANDIDATES} and must leave some for training"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    held_out = sorted(order[:n_val].tolist())
    kept = sorted(order[n_val:].tolist())
    return [pairs[i] for i in kept], _queries(pairs, held_out, rng)


def fold_splits(
    dataset: Dataset, folds: int, seed: int
) -> list[tuple[list[tuple[str, str]], list[Query]]]:
    """Cut the train pairs into `folds` seeded folds of near-equal size; for each fold, (the
    pairs of every other fold, the fold's pairs as validation queries laid out like the Kaggle
    test: each left's 19 foils are drawn from that fold's rights only). Every pair is held out
    exactly once."""
    pairs = dataset.train_pairs
    if folds < 2 or len(pairs) // folds < N_CANDIDATES:
        raise DataError(f"{folds} folds of {len(pairs)} train pairs: it takes at least 2 folds "
                        f"of at least {N_CANDIDATES} pairs each (a query needs "
                        f"{N_CANDIDATES} candidates)")
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(len(pairs)), folds)
    splits = []
    for k, part in enumerate(parts):
        kept = sorted(np.concatenate([p for j, p in enumerate(parts) if j != k]).tolist())
        splits.append(([pairs[i] for i in kept], _queries(pairs, sorted(part.tolist()), rng)))
    return splits


def _queries(pairs: list[tuple[str, str]], held_out: list[int],
             rng: np.random.Generator) -> list[Query]:
    """The held-out pairs as queries: each left, its true right and 19 foils from the other
    held-out rights, the truth at a random position."""
    rights = [f"train/right/{pairs[i][1]}" for i in held_out]
    queries = []
    for j, i in enumerate(held_out):
        others = np.delete(np.arange(len(held_out)), j)
        foils = rng.choice(others, N_CANDIDATES - 1, replace=False)
        truth = int(rng.integers(N_CANDIDATES))
        columns = np.insert(foils, truth, j)
        queries.append(Query(left=f"train/left/{pairs[i][0]}",
                             candidates=tuple(rights[c] for c in columns), truth=truth))
    return queries
