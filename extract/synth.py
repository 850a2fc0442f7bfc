"""Synthetic look-alike dataset in the Kaggle COMP90086 layout, so demos and tests never download.

This module owns the generator: hidden "concepts" (shape family x palette x texture) shared by
the two images of a pair, nuisance factors that make the two images differ, the on-disk layout
(train/test image folders, `train.csv`, `test_candidates.csv`, `sample-submission.csv`), and
writing it atomically. It imports no torch.
"""

from __future__ import annotations

import colorsys
import csv
import itertools
import string
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw

from tll import UserError, UserPath, logger, setup_logging, user_errors
from tll.data import DEFAULT_INPUT_SIZE, N_CANDIDATES
from tll.files import atomic_output, check_output

IMAGE_HEIGHT, IMAGE_WIDTH = DEFAULT_INPUT_SIZE
JPEG_QUALITY = 90
ID_LENGTH = 3
ID_ALPHABET = string.ascii_lowercase
MAX_IDS = len(ID_ALPHABET) ** ID_LENGTH

SHAPES = ("disc", "square", "triangle", "star", "cross", "ring")
TEXTURES = ("plain", "stripes", "dots", "checker")
# (foreground, background) pairs chosen so that no two palettes are easily confused.
PALETTES = (
    ((200, 30, 45), (245, 236, 212)),  # crimson on cream
    ((25, 45, 130), (228, 190, 60)),  # navy on mustard
    ((245, 245, 240), (35, 105, 55)),  # white on forest green
    ((20, 20, 25), (140, 195, 235)),  # black on sky blue
    ((225, 50, 170), (50, 50, 58)),  # magenta on charcoal
    ((250, 140, 20), (85, 40, 120)),  # orange on purple
    ((20, 140, 140), (245, 160, 140)),  # teal on salmon
    ((170, 220, 40), (105, 65, 35)),  # lime on brown
)

# Stream tags mixed into the seed so that each purpose gets an independent random stream, and
# each image's stream depends only on (seed, pair index, side), never on generation order.
_STREAM_IDS = 0
_STREAM_CONCEPTS = 1
_STREAM_IMAGE = 2
_STREAM_CANDIDATES = 3
_STREAM_SUBMISSION = 4


@dataclass(frozen=True)
class Concept:
    """What the two images of a pair share; everything else about them is nuisance."""

    shape: str
    palette: int
    texture: str


@dataclass(frozen=True)
class Pair:
    """One look-alike pair: a left and a right image of the same concept."""

    index: int  # global pair index (train first, then test): keys the per-image random streams
    left_id: str
    right_id: str
    concept: Concept


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _id_from_number(number: int) -> str:
    letters = []
    for _ in range(ID_LENGTH):
        number, digit = divmod(number, len(ID_ALPHABET))
        letters.append(ID_ALPHABET[digit])
    return "".join(reversed(letters))


def _check_sizes(pairs: int, queries: int, seed: int) -> None:
    if pairs < 1:
        raise ValueError(f"--pairs must be at least 1 (got {pairs})")
    if queries < N_CANDIDATES:
        raise ValueError(
            f"--queries must be at least {N_CANDIDATES} (got {queries}): each query "
            f"lists its true right plus {N_CANDIDATES - 1} foils drawn from the other "
            "test rights"
        )
    if 2 * (pairs + queries) > MAX_IDS:
        raise ValueError(
            f"--pairs + --queries must be at most {MAX_IDS // 2} (got {pairs + queries}): every "
            f"image needs a distinct {ID_LENGTH}-letter id"
        )
    if seed < 0:
        raise ValueError(f"--seed must be non-negative (got {seed})")


def plan_pairs(pairs: int, queries: int, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Ids and concepts of every pair `main` writes for these arguments, without rendering.

    Returns (train, test), each sorted by left id like the real data. The test pairs are the
    answer key that `test_candidates.csv` does not carry, for scoring rankings on synthetic data.
    """
    _check_sizes(pairs, queries, seed)
    id_numbers = _rng(seed, _STREAM_IDS).permutation(MAX_IDS)[: 2 * (pairs + queries)]
    ids = [_id_from_number(int(number)) for number in id_numbers]

    all_concepts = [
        Concept(shape, palette, texture)
        for shape, palette, texture in itertools.product(SHAPES, range(len(PALETTES)), TEXTURES)
    ]
    concept_order = _rng(seed, _STREAM_CONCEPTS).permutation(len(all_concepts))
    # Cycling through a shuffled list keeps concepts distinct until they run out, so test foils
    # rarely share the query's concept.
    all_pairs = [
        Pair(
            index=index,
            left_id=ids[2 * index],
            right_id=ids[2 * index + 1],
            concept=all_concepts[concept_order[index % len(all_concepts)]],
        )
        for index in range(pairs + queries)
    ]

    def by_left_id(pair: Pair) -> str:
        return pair.left_id

    return sorted(all_pairs[:pairs], key=by_left_id), sorted(all_pairs[pairs:], key=by_left_id)


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Slight hue and brightness shift, so equal palettes are similar rather than identical."""
    hue, saturation, value = colorsys.rgb_to_hsv(*(channel / 255 for channel in rgb))
    hue = (hue + rng.uniform(-0.03, 0.03)) % 1.0
    value = float(np.clip(value * rng.uniform(0.88, 1.12), 0.0, 1.0))
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255


def _unit_outline(shape: str) -> np.ndarray:
    """Polygon vertices (k, 2) of a shape of radius about 1 centred on the origin."""
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        return np.stack([np.cos(angles), -np.sin(angles)], axis=1)
    if shape == "star":
        angles = np.pi / 2 + np.pi * np.arange(10) / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), -radii * np.sin(angles)], axis=1)
    if shape == "cross":
        arm = 0.33
        return np.array(
            [
                [-arm, -1], [arm, -1], [arm, -arm], [1, -arm], [1, arm], [arm, arm],
                [arm, 1], [-arm, 1], [-arm, arm], [-1, arm], [-1, -arm], [-arm, -arm],
            ]
        )  # fmt: skip
    raise ValueError(f"{shape!r} is not a polygon shape")


def _shape_mask(shape: str, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    mask = Image.new("L", (IMAGE_WIDTH, IMAGE_HEIGHT), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = centre
    if shape in ("disc", "ring"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        if shape == "ring":
            hole = 0.55 * radius
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    else:
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        vertices = _unit_outline(shape) @ rotation.T * radius + centre
        draw.polygon([tuple(vertex) for vertex in vertices], fill=255)
    return np.asarray(mask) > 0


def _texture_fill(
    texture: str, foreground: np.ndarray, background: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Full-frame (H, W, 3) fill for shape interiors: foreground with the texture's pattern."""
    fill = np.broadcast_to(foreground, (IMAGE_HEIGHT, IMAGE_WIDTH, 3)).copy()
    if texture == "plain":
        return fill
    ys, xs = np.mgrid[0:IMAGE_HEIGHT, 0:IMAGE_WIDTH].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    # Pattern coordinates rotated by a random angle with a random offset and period, so the
    # texture kind is shared across a pair but its exact pixels are not.
    u = xs * np.cos(angle) + ys * np.sin(angle) + rng.uniform(0, 100)
    v = -xs * np.sin(angle) + ys * np.cos(angle) + rng.uniform(0, 100)
    period = rng.uniform(9, 15)
    if texture == "stripes":
        pattern = np.floor(u / (period / 2)) % 2 == 1
    elif texture == "dots":
        du = u % period - period / 2
        dv = v % period - period / 2
        pattern = du**2 + dv**2 < (0.3 * period) ** 2
    elif texture == "checker":
        pattern = (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}")
    accent = 0.35 * foreground + 0.65 * background
    fill[pattern] = accent
    return fill


def _render(concept: Concept, rng: np.random.Generator) -> Image.Image:
    """One image of a concept; `rng` draws every nuisance factor."""
    foreground_rgb, background_rgb = PALETTES[concept.palette]
    foreground = _jitter_colour(foreground_rgb, rng)
    background = _jitter_colour(background_rgb, rng)

    # Background: the palette colour under a brightness ramp in a random direction.
    ys, xs = np.mgrid[0:IMAGE_HEIGHT, 0:IMAGE_WIDTH].astype(np.float64)
    ramp_angle = rng.uniform(0, 2 * np.pi)
    ramp = xs / IMAGE_WIDTH * np.cos(ramp_angle) + ys / IMAGE_HEIGHT * np.sin(ramp_angle)
    brightness = 1.0 + rng.uniform(0.0, 0.35) * (ramp - ramp.mean())
    image = background * brightness[..., None]

    fill = _texture_fill(concept.texture, foreground, background, rng)
    count = int(rng.integers(1, 4))
    base_radius = {1: 70.0, 2: 52.0, 3: 42.0}[count]
    for _ in range(count):
        radius = base_radius * rng.uniform(0.6, 1.0)
        centre = np.array(
            [
                rng.uniform(radius, IMAGE_WIDTH - radius),
                rng.uniform(radius, IMAGE_HEIGHT - radius),
            ]
        )
        mask = _shape_mask(concept.shape, centre, radius, rng.uniform(0, 2 * np.pi))
        image[mask] = fill[mask]

    image += rng.normal(0.0, rng.uniform(3.0, 12.0), size=image.shape)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")


def _save_jpeg(image: Image.Image, path: Path) -> None:
    image.save(path, format="JPEG", quality=JPEG_QUALITY, progressive=False)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _candidate_rows(test: list[Pair], seed: int) -> list[list[str]]:
    """Per query: its true right and 19 foils from the other test rights, in shuffled order."""
    rng = _rng(seed, _STREAM_CANDIDATES)
    right_ids = [pair.right_id for pair in test]
    rows = []
    for position, pair in enumerate(test):
        foil_pool = right_ids[:position] + right_ids[position + 1 :]
        foils = rng.choice(foil_pool, size=N_CANDIDATES - 1, replace=False).tolist()
        candidates = [pair.right_id, *foils]
        rows.append([pair.left_id, *(candidates[i] for i in rng.permutation(len(candidates)))])
    return rows


def _write_dataset(root: Path, train: list[Pair], test: list[Pair], seed: int) -> None:
    candidate_header = ["left", *(f"c{i}" for i in range(N_CANDIDATES))]
    for split, split_pairs in (("train", train), ("test", test)):
        for side in ("left", "right"):
            (root / split / side).mkdir(parents=True)
        for pair in split_pairs:
            for side_index, (side, image_id) in enumerate(
                (("left", pair.left_id), ("right", pair.right_id))
            ):
                image = _render(pair.concept, _rng(seed, _STREAM_IMAGE, pair.index, side_index))
                _save_jpeg(image, root / split / side / f"{image_id}.jpg")

    _write_csv(root / "train.csv", ["left", "right"], [[p.left_id, p.right_id] for p in train])
    candidate_rows = _candidate_rows(test, seed)
    _write_csv(root / "test_candidates.csv", candidate_header, candidate_rows)

    scores = _rng(seed, _STREAM_SUBMISSION).random((len(test), N_CANDIDATES))
    submission_rows = [
        [row[0], *(repr(float(score)) for score in row_scores)]
        for row, row_scores in zip(candidate_rows, scores, strict=True)
    ]
    _write_csv(root / "sample-submission.csv", candidate_header, submission_rows)


def main(
    out: Path, pairs: int = 200, queries: int = 40, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write a synthetic dataset of `pairs` train pairs and `queries` test queries to `out`.

    Same arguments give byte-identical files. Raises ValueError for impossible sizes and
    UserError when `out` is a non-empty folder (or a file) and `overwrite` is false; `out`
    appears whole or not at all.
    """
    out = Path(out)
    train, test = plan_pairs(pairs, queries, seed)  # validates the sizes before touching disk
    check_output(out, "dataset folder", folder=True)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    with atomic_output(out, folder=True, overwrite=overwrite) as built:
        _write_dataset(built, train, test, seed)
    logger.info(
        "wrote synthetic dataset (%d train pairs, %d test queries, seed %d) to %s",
        pairs,
        queries,
        seed,
        out,
    )
    return out


@click.command(
    help="Write a synthetic Totally-Looks-Like dataset in the Kaggle layout to OUT: train.csv, "
    "train/{left,right}/*.jpg, test_candidates.csv, test/{left,right}/*.jpg and "
    "sample-submission.csv. Deterministic: the same options give byte-identical files."
)
@click.argument("out", type=UserPath(file_okay=False))
@click.option("--pairs", default=200, show_default=True, help="Number of train pairs.")
@click.option(
    "--queries",
    default=40,
    show_default=True,
    help=f"Number of test queries (at least {N_CANDIDATES}).",
)
@click.option("--seed", default=0, show_default=True, help="Random seed; same seed, same bytes.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
def cli(out: Path, pairs: int, queries: int, seed: int, overwrite: bool) -> None:
    with user_errors():
        try:
            main(out, pairs=pairs, queries=queries, seed=seed, overwrite=overwrite)
        except ValueError as error:
            raise click.BadParameter(str(error)) from error


if __name__ == "__main__":
    setup_logging()
    cli()
