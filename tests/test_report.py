"""infer.report: the error-analysis page on the small synthetic set, as text (worst first, each
image embedded once, nothing from the network) and in a headless Chromium (every row and every
thumbnail rendered, a screenshot)."""

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

from infer.report import SHOWN, thumbnail, write_report_page
from infer.scoring import assign, truth_ranks
from tll.data import read_dataset, validation_split

CHROMIUM = shutil.which("chromium")
ROW = '<div class="q">'


@pytest.fixture(scope="module")
def val_page(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A validation page of 20 queries with random scores and a Sinkhorn assignment."""
    dataset = read_dataset(synthetic)
    queries = validation_split(dataset, 0.85, seed=0)[1]  # 20 of the 24 pairs
    truth = np.array([q.truth for q in queries])
    scores = np.random.default_rng(0).normal(size=(len(queries), 20))  # (Q, 20)
    ids = np.unique([q.candidates for q in queries], return_inverse=True)[1].reshape(-1, 20)
    assigned = assign(scores, ids, "sinkhorn", temperature=0.5)
    path = tmp_path_factory.mktemp("page") / "val.html"
    summary = {"model": "random <scores>", "split": "val"}
    assert write_report_page(path, summary, queries, dataset.images, scores, assigned,
                             truth) == path
    top = np.argsort(-assigned, axis=1)[:, :SHOWN]  # (Q, SHOWN)
    shown = {q.left for q in queries}
    shown |= {q.candidates[t] for q, t in zip(queries, truth, strict=True)}
    shown |= {q.candidates[k] for q, row in zip(queries, top, strict=True) for k in row}
    return path, {"queries": queries, "truth": truth, "assigned": assigned, "shown": shown}


def test_page_is_self_contained_worst_first_and_embeds_each_image_once(val_page) -> None:
    path, made = val_page
    page = path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["val.html"]  # no temp file left
    assert page.count(ROW) == 20
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
    assert page.count(ROW) == len(queries)
    lefts = re.findall(r"<figcaption>query ([^<]+)</figcaption>", page)
    assert lefts == [q.left.rsplit("/", 1)[1] for q in queries]
    assert 'class="truth"' not in page and "<svg" not in page  # no truth: no ranks to show


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
    dom = subprocess.run([*browser, "--dump-dom", path.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert dom.count(ROW) == 20
    shown = 20 * (2 + SHOWN)  # per row: the query, its truth and the top candidates
    assert f"{shown} of {shown} thumbnails rendered" in dom

    screenshot = tmp_path / "page.png"
    subprocess.run([*browser, f"--screenshot={screenshot}", "--window-size=1200,1600",
                    path.as_uri()], capture_output=True, timeout=120, check=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(screenshot) as image:
        assert image.size == (1200, 1600)
