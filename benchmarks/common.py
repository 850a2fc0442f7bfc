"""What the benchmark scripts share: where the data comes from, interleaved timing, the table.

Speed here is always a ratio against a baseline timed in the same process on the same machine:
the machine is small, shared and noisy, so the two measurements alternate round by round (the
order flips every round, so a slow spell hurts both alike) and each reports its median.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import click

# before tqdm is imported (each script imports this module before the project's): the stages'
# progress bars would only clutter the tables
os.environ.setdefault("TQDM_DISABLE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "tll"
N_CANDIDATES = 20


def has_real_data() -> bool:
    return (REAL_DATA / "train.csv").is_file() and (REAL_DATA / "test_candidates.csv").is_file()


def source_dataset(data: Path | None, scratch: Path, images: int) -> tuple[Path, str]:
    """The dataset to draw images from, and a word for the table: --data, else the real data
    at ../shared/tll, else a synthetic set of about `images` images written under `scratch`."""
    if data is not None:
        return Path(data), f"--data {data}"
    if has_real_data():
        return REAL_DATA, f"real ({REAL_DATA})"
    from extract.synth import main as make_synthetic

    pairs = images // 2  # enough train pairs for kaggle_subset(images)
    out = make_synthetic(scratch / "synth", pairs=pairs, queries=N_CANDIDATES, seed=0)
    return out, f"synthetic ({2 * (pairs + N_CANDIDATES)} images)"


def kaggle_subset(source: Path, out: Path, images: int) -> Path:
    """A Kaggle-layout dataset of exactly `images` images (>= 23) copied from `source`.

    The first train pairs of train.csv, plus a test part of the fewest images that makes a valid
    test_candidates.csv: the first few query lefts, each ranking the same 20 rights (the first
    query's candidates). The CSVs only decide which images the cache holds; that is all a
    speed measurement needs.
    """
    import csv

    from tll.data import CANDIDATE_COLUMNS, image_id, read_dataset

    if images < N_CANDIDATES + 3:
        raise ValueError(f"a subset needs at least {N_CANDIDATES + 3} images, not {images}")
    dataset = read_dataset(source)
    pairs = (images - N_CANDIDATES - 1) // 2
    queries = images - N_CANDIDATES - 2 * pairs  # 1 or 2
    if pairs > len(dataset.train_pairs) or queries > len(dataset.test_queries):
        raise click.ClickException(
            f"{source} is too small for a subset of {images} images ({pairs} train pairs, "
            f"{queries} test queries): pass a larger --data, or --quick")
    train = dataset.train_pairs[:pairs]
    lefts = [q.left for q in dataset.test_queries[:queries]]
    rights = list(dataset.test_queries[0].candidates)
    keys = ([f"train/left/{a}" for a, _ in train] + [f"train/right/{b}" for _, b in train]
            + lefts + rights)
    for split in ("train", "test"):
        for side in ("left", "right"):
            (out / split / side).mkdir(parents=True, exist_ok=True)
    for key in keys:
        path = dataset.images[key]
        shutil.copyfile(path, out / key.rsplit("/", 1)[0] / f"{image_id(key)}{path.suffix}")
    with open(out / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["left", "right"], *train])
    with open(out / "test_candidates.csv", "w", newline="") as f:
        csv.writer(f).writerows(
            [CANDIDATE_COLUMNS, *([image_id(left), *map(image_id, rights)] for left in lefts)])
    return out


def interleave(measures: dict[str, Callable[[], float]], rounds: int,
               log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Run each measure once per round, in reversed order every other round; each measure
    returns its own figure (e.g. seconds). Returns every figure of every measure."""
    results: dict[str, list[float]] = {name: [] for name in measures}
    names = list(measures)
    for number in range(rounds):
        for name in names if number % 2 == 0 else reversed(names):
            results[name].append(measures[name]())
        log(f"  round {number + 1}/{rounds}: "
            + ", ".join(f"{n} {results[n][-1]:.3g}" for n in names))
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """min-max of the rounds, for the table: how noisy the figure was."""
    return f"{min(values):.3g}-{max(values):.3g}"


class Timer:
    """`with Timer() as t: ...` then t.seconds."""

    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started


def table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[_format(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format(cell: object) -> str:
    if isinstance(cell, float):
        return f"{cell:.3g}" if abs(cell) < 1000 else f"{cell:,.0f}"
    return str(cell)


def verdict(ratio: float, target: float, at_least: bool = True) -> str:
    met = ratio >= target if at_least else ratio <= target
    return "met" if met else "MISSED"


def environment() -> str:
    """One line saying where and when: date, CPUs, load, library versions, threads."""
    import torch

    parts = [datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), platform.machine(),
             f"{os.cpu_count()} CPUs"]
    if hasattr(os, "getloadavg"):
        parts.append(f"load {os.getloadavg()[0]:.1f}")
    parts += [f"python {platform.python_version()}", f"torch {torch.__version__}",
              f"{torch.get_num_threads()} torch threads"]
    try:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
