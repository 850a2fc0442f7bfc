"""infer.report: the error-analysis page on the small synthetic set, as text (worst first, each
image embedded once, nothing from the network, the maps' numbers, the gallery) and in a headless
Chromium (every row, every thumbnail and every map overlay drawn, a screenshot)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infer.maps import ImageMaps, similarity_grid
from infer.report import GALLERY, SHOWN, page_maps, thumbnail, write_report_page
from infer.scoring import assign, truth_ranks
from tll.data import read_dataset, validation_split

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROW = re.compile(r'<div class="q" id="q\d+"')
FIGURE = "<figure"
TERMS = ((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, None, None), (None, None, None))


def random_maps(keys: list[str], seed: int = 0) -> ImageMaps:
    """Maps for `keys` as a model with a map input (a 2 x 2 grid), a vector input and a bias
    would give them: cell embeddings summing to unit embeddings, attention (4 x 3) in (0, 1)."""
    rng = np.random.default_rng(seed)
    cells = rng.normal(size=(len(keys), len(TERMS), 8))  # (N, P, D)
    cells /= np.linalg.norm(cells.sum(axis=1), axis=1)[:, None, None]
    return ImageMaps(row={key: i for i, key in enumerate(keys)}, cells=cells,
                     attention=rng.uniform(0.05, 0.95, size=(len(keys), 4, 3)), terms=TERMS)


@pytest.fixture(scope="module")
def val_page(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A validation page of 20 queries with random scores, a Sinkhorn assignment and maps."""
    dataset = read_dataset(synthetic)
    queries = validation_split(dataset, 0.85, seed=0)[1]  # 20 of the 24 pairs
    truth = np.array([q.truth for q in queries])
    scores = np.random.default_rng(0).normal(size=(len(queries), 20))  # (Q, 20)
    ids = np.unique([q.candidates for q in queries], return_inverse=True)[1].reshape(-1, 20)
    assigned = assign(scores, ids, "sinkhorn", temperature=0.5)
    path = tmp_path_factory.mktemp("page") / "val.html"
    summary = {"model": "random <scores>", "split": "val"}
    maps = random_maps(sorted(dataset.images))
    assert write_report_page(path, summary, queries, dataset.images, scores, assigned,
                             truth, maps) == path
    top = np.argsort(-assigned, axis=1)[:, :SHOWN]  # (Q, SHOWN)
    shown = {q.left for q in queries}
    shown |= {q.candidates[t] for q, t in zip(queries, truth, strict=True)}
    shown |= {q.candidates[k] for q, row in zip(queries, top, strict=True) for k in row}
    return path, {"queries": queries, "truth": truth, "assigned": assigned, "shown": shown,
                  "maps": maps}


def test_page_is_self_contained_worst_first_and_embeds_each_image_once(val_page) -> None:
    path, made = val_page
    page = path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["val.html"]  # no temp file left
    assert len(ROW.findall(page)) == 20
    assert "random &lt;scores&gt;" in page  # the summary, escaped
    assert "<svg" in page and "<style>" in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing from the network
    assert "@import" not in page and "<link" not in page
    thumbnails = re.findall(r'"(/9j/[A-Za-z0-9+/=]+)"', page)  # base64 of a JPEG's first bytes
    assert len(thumbnails) == len(set(thumbnails)) == len(made["shown"])
    # worst first: the truth's rank under the assigned scores never improves down the page
    ranks = truth_ranks(made["assigned"], made["truth"])
    first_row = {q.left.rsplit("/", 1)[1]: i for i, q in enumerate(made["queries"])}
    order = [first_row[m] for m in re.findall(r'<figcaption>query ([^<]+)</figcaption>', page)]
    assert sorted(order) == list(range(20))
    assert (np.diff(ranks[order]) <= 0).all()


def test_test_page_keeps_the_file_order(synthetic: Path, tmp_path: Path) -> None:
    dataset = read_dataset(synthetic)
    queries = dataset.test_queries
    scores = np.random.default_rng(1).normal(size=(len(queries), 20))
    path = write_report_page(tmp_path / "test.html", {"split": "test"}, queries, dataset.images,
                             scores)
    page = path.read_text()
    assert len(ROW.findall(page)) == len(queries)
    assert "<canvas" not in page and "No maps" in page  # no maps given: none drawn
    lefts = re.findall(r"<figcaption>query ([^<]+)</figcaption>", page)
    assert lefts == [q.left.rsplit("/", 1)[1] for q in queries]
    assert 'class="truth"' not in page and "<svg" not in page  # no truth: no ranks to show
    assert 'class="g"' not in page  # nor a gallery


def test_page_maps_split_each_shown_pairs_cosine(val_page) -> None:
    """The numbers the page paints: each shown pair's cell parts and rest sum to its cosine
    rounded to the thousandths the page writes (the rest takes up the cells' rounding), each
    side's parts are `similarity_grid`'s, and the attention is every shown image's, in
    hundredths."""
    _, made = val_page
    queries, maps, truth = made["queries"], made["maps"], made["truth"]
    order = np.argsort(-made["assigned"], axis=1, kind="stable")[:, :SHOWN]
    keys = sorted(made["shown"])
    numbers = page_maps(maps, queries, keys, order, truth)
    assert numbers["pool"] == 2
    assert [row[:2] for row in numbers["attention"]] == [[4, 3]] * len(keys)
    np.testing.assert_array_equal(
        numbers["attention"][0][2], np.rint(100 * maps.attention[maps.row[keys[0]]]).ravel())
    for q, query in enumerate(queries):
        assert set(numbers["pairs"][q]) == {*order[q].tolist(), int(truth[q])}
        for k, parts in numbers["pairs"][q].items():
            left, right = maps.embedding(query.left), maps.embedding(query.candidates[k])
            cosine = round(1000 * left @ right)
            assert sum(parts[:4]) + parts[8] == cosine
            assert sum(parts[4:8]) + parts[9] == cosine
            grid, rest = similarity_grid(maps.cells[maps.row[query.left]], right, TERMS, 2)
            assert parts[:4] == np.rint(1000 * grid.ravel()).tolist()
            assert abs(parts[8] - 1000 * rest) <= 3  # its own rounding and the 4 cells' at most


def test_similarity_grid_adds_the_cells_of_every_map_input() -> None:
    """By hand: two map inputs on a 1 x 1 grid, a vector input and the bias."""
    cells = np.array([[1.0, 0], [0, 2], [3, 0], [0, 4]])  # (P, D)
    terms = ((0, 0, 0), (1, 0, 0), (2, None, None), (None, None, None))
    grid, rest = similarity_grid(cells, np.array([0.5, 0.25]), terms, 1)
    assert grid.tolist() == [[0.5 + 0.5]] and rest == 1.5 + 1.0


def test_gallery_shows_the_most_confidently_wrong_and_right(val_page) -> None:
    path, made = val_page
    page = path.read_text()
    ranked, truth = made["assigned"], made["truth"]
    ranks = truth_ranks(ranked, truth)
    true_scores = ranked[np.arange(20), truth]
    best_other = np.where(np.arange(20) == truth[:, None], -np.inf, ranked).max(axis=1)
    margins = true_scores - best_other
    wrong = [q for q in np.argsort(margins) if ranks[q] > 1][:GALLERY]
    right = [q for q in np.argsort(-margins) if ranks[q] == 1][:GALLERY]
    strips = re.findall(r'<div class="strip">(.*?)</div></div>\s*<', page, flags=re.S)
    assert len(strips) == 2
    gallery = re.findall(r'<div class="g" data-row="(\d+)"', page)
    assert [int(q) for q in gallery] == wrong + right
    assert len(wrong) == min(GALLERY, int((ranks > 1).sum())) and right


def test_thumbnail_is_small_and_upright(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored sideways, shown rotated 90 degrees clockwise
    path = tmp_path / "sideways.jpg"
    Image.new("RGB", (240, 120), "red").save(path, exif=exif)  # wide as stored, tall as shown
    with Image.open(io.BytesIO(base64.b64decode(thumbnail(path, height=48)))) as small:
        assert small.format == "JPEG" and small.size == (24, 48)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium on PATH "
                    "(apt-get install chromium); .ci/run installs it")
def test_page_renders_in_a_browser(val_page, tmp_path: Path) -> None:
    path, _ = val_page
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    page = path.read_text()
    dom = subprocess.run([*browser, "--dump-dom", path.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert len(ROW.findall(dom)) == 20
    shown = page.count(FIGURE)  # the rows' (query, truth, top candidates) and the gallery's
    assert shown >= 20 * (2 + SHOWN)
    assert f"{shown} of {shown} thumbnails rendered" in dom
    # every figure's two overlays (attention, similarity) painted: counted by the page, and in
    # the DOM, where each painted canvas is marked and given its map's size
    assert f"{2 * shown} of {2 * shown} maps drawn" in dom
    assert len(re.findall(r'<canvas class="a" width="3" height="4" data-drawn="1">', dom)) == shown
    assert len(re.findall(r'<canvas class="s" width="2" height="2" data-drawn="1">', dom)) == shown

    screenshot = tmp_path / "page.png"
    subprocess.run([*browser, f"--screenshot={screenshot}", "--window-size=1200,1600",
                    path.as_uri()], capture_output=True, timeout=120, check=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(screenshot) as image:
        assert image.size == (1200, 1600)
