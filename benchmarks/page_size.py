"""Bytes of the error-analysis page (`infer.report.write_report_page`) with its maps, for a
number of validation queries, and what they are spent on (thumbnails, the maps' numbers, the
rest).

The queries are a validation split where the set's train pairs can hold them (the real set's
1,600 pairs: 160 queries, as infer --split val makes at --val-fraction 0.1), else the set's
first test queries (the real set's 2,000), each given a random true candidate so that the page
has its truth column and gallery; without --data, a synthetic set (`extract.synth`, 245 x 200
images like the real ones, whose thumbnails are smaller JPEGs than photos'). The scores are
random and the maps random numbers of the shapes a ResNet50 layer4 model at 245 x 200
gives (attention 8 x 7, a 2 x 2 cell grid, 256 dimensions): their size on the page does not
depend on their values beyond a digit or two.

    python benchmarks/page_size.py [--queries 160] [--queries 2000] [--data DIR]
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import click
import numpy as np

from extract.synth import main as make_synthetic
from infer.maps import ImageMaps
from infer.report import write_report_page
from tll.data import read_dataset, validation_split

ATTENTION = (8, 7)  # ResNet50 layer4 at 245 x 200
TERMS = tuple((0, r, c) for r in range(2) for c in range(2)) + ((None, None, None),)


def random_maps(keys: list[str], seed: int = 0) -> ImageMaps:
    rng = np.random.default_rng(seed)
    cells = rng.normal(size=(len(keys), len(TERMS), 256)).astype(np.float32)  # (N, P, D)
    cells /= np.linalg.norm(cells.sum(axis=1), axis=1)[:, None, None]
    return ImageMaps(row={key: i for i, key in enumerate(keys)}, cells=cells,
                     attention=rng.uniform(0.05, 0.95, size=(len(keys), *ATTENTION)),
                     terms=TERMS)


def measure(data: Path, n_queries: int, out: Path) -> list:
    dataset = read_dataset(data)
    rng = np.random.default_rng(1)
    if n_queries <= len(dataset.train_pairs) // 2:
        fraction = n_queries / len(dataset.train_pairs)
        queries = validation_split(dataset, fraction, seed=0)[1][:n_queries]
        truth = np.array([q.truth for q in queries])  # (Q,)
    else:
        queries = dataset.test_queries[:n_queries]
        truth = rng.integers(0, 20, size=len(queries))  # (Q,)
    scores = rng.normal(size=(len(queries), 20))  # (Q, 20)
    keys = sorted({q.left for q in queries} | {c for q in queries for c in q.candidates})
    page = write_report_page(out, {"queries": str(len(queries))}, queries, dataset.images,
                             scores, None, truth, random_maps(keys)).read_text()
    thumbnails = sum(map(len, re.findall(r"const THUMBNAILS = .*?;\n", page)))
    maps = sum(map(len, re.findall(r"const MAPS = .*?;", page)))
    total = len(page.encode())
    return [len(queries), total / 1e6, thumbnails / 1e6, maps / 1e6,
            (total - thumbnails - maps) / 1e6]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--queries", "counts", type=click.IntRange(min=20), multiple=True,
              default=(160, 2000))
@click.option("--data", type=click.Path(path_type=Path, file_okay=False, exists=True),
              default=None, help="Kaggle-layout dataset [default: a synthetic set big enough].")
def cli(counts: tuple[int, ...], data: Path | None) -> None:
    """Size of the error-analysis page with maps, by number of queries."""
    with tempfile.TemporaryDirectory(prefix="bench-page-") as scratch:
        scratch = Path(scratch)
        if data is None:
            data = make_synthetic(scratch / "data", pairs=400, queries=max(counts))
        rows = [measure(data, n, scratch / f"page-{n}.html") for n in counts]
    click.echo("queries  page MB  thumbnails MB  maps MB  rest MB")
    for row in rows:
        click.echo(f"{row[0]:7d}  {row[1]:7.2f}  {row[2]:13.2f}  {row[3]:7.2f}  {row[4]:7.2f}")


if __name__ == "__main__":
    cli()
