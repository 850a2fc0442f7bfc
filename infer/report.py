"""The error-analysis page: one self-contained HTML file that opens offline, years later.

Inline CSS, an inline SVG chart and small JPEG thumbnails as base64, no framework, no network.
Each image is embedded once, in one list that a short inline script copies into the `<img>`s that
show it; on window load the script counts the thumbnails that decoded (naturalWidth > 0) into the
line at the bottom. Thumbnails are decoded by `tll.data.load_image`, like the model's input:
upright, at their depth, transparency on white.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from infer.scoring import ranking_metrics, truth_ranks
from tll.data import Query, image_id, load_image
from tll.files import write_text

REPORT_TITLE = "tll: error analysis"  # also how infer knows its own page, to rewrite it
THUMBNAIL_HEIGHT = 56  # px
THUMBNAIL_QUALITY = 65  # JPEG
SHOWN = 5  # candidates shown per query

STYLE = """
body { font: 13px/1.35 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
th { font-weight: 600; } .figures td { font-variant-numeric: tabular-nums; }
/* rows off screen skip layout and paint, so a page of 2,000 queries opens at once */
.q { display: flex; align-items: flex-start; gap: 6px; padding: 6px 0;
     border-top: 1px solid #ddd; content-visibility: auto; contain-intrinsic-size: auto 100px; }
.q .n { width: 5.5em; color: #666; font-size: 11px; }
figure { margin: 0; width: 64px; font-size: 10px; text-align: center; color: #444; }
figure img { max-width: 64px; display: block; margin: 0 auto 2px;
             border: 2px solid transparent; background: #eee; }
figure.truth img, figure.hit img { border-color: #1a8f3c; }
figure.hit figcaption { color: #1a8f3c; font-weight: 600; }
.sep { width: 1px; align-self: stretch; background: #ccc; margin: 0 6px; }
#rendered { margin-top: 1.5em; color: #666; }
"""

SCRIPT = """
for (const img of document.querySelectorAll("img[data-t]")) {
  img.src = "data:image/jpeg;base64," + THUMBNAILS[img.dataset.t];
}
addEventListener("load", () => {
  const shown = [...document.querySelectorAll("img[data-t]")];
  const rendered = shown.filter((img) => img.naturalWidth > 0).length;
  document.getElementById("rendered").textContent =
    `${rendered} of ${shown.length} thumbnails rendered`;
});
"""


def thumbnail(path: Path, height: int = THUMBNAIL_HEIGHT) -> str:
    """A small JPEG of the image, `height` px high (at most 4 times as wide), as base64."""
    with Image.open(path) as image:  # the header alone: the upright aspect ratio
        width, tall = image.size[::-1] if _rotated(image) else image.size
    size = (height, max(1, min(4 * height, round(width * height / tall))))  # (H, W)
    pixels = (load_image(path, size) * 255).round().astype(np.uint8)  # (3, H, W)
    buffer = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buffer, "JPEG", quality=THUMBNAIL_QUALITY,
                                                    optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _rotated(image: Image.Image) -> bool:
    """Whether the EXIF orientation turns the image by 90 degrees (swapping width and height)."""
    return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def write_report_page(path: str | Path, summary: dict[str, str], queries: list[Query],
                      images: dict[str, Path], scores: np.ndarray,
                      assigned_scores: np.ndarray | None = None,
                      truth: np.ndarray | None = None) -> Path:
    """Write the error-analysis page for `queries`; returns `path`.

    summary: what produced the scores (model, trunk, data, assignment...), shown as given.
    images: key -> file. scores (Q, K) plain; assigned_scores (Q, K) after one-to-one
    assignment, or None; truth (Q,) the true candidate's index, or None (the test split).
    Ranks and figures use the assigned scores where given, like `python -m infer` does.
    """
    ranked = assigned_scores if assigned_scores is not None else scores  # (Q, K)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :SHOWN]  # (Q, SHOWN) shown candidates
    shown = [q.left for q in queries]
    shown += [q.candidates[k] for q, row in zip(queries, order, strict=True) for k in row]
    if truth is not None:
        shown += [q.candidates[t] for q, t in zip(queries, truth, strict=True)]
    keys = list(dict.fromkeys(shown))  # each image once, in order of first use
    thumbnails = [thumbnail(images[key]) for key in keys]
    page = page_html(summary, queries, {key: i for i, key in enumerate(keys)}, thumbnails,
                     scores, assigned_scores, truth)
    return write_text(Path(path), lambda f: f.write(page))


def page_html(summary: dict[str, str], queries: list[Query], thumbnail_index: dict[str, int],
              thumbnails: list[str], scores: np.ndarray, assigned_scores: np.ndarray | None,
              truth: np.ndarray | None) -> str:
    """The page as text; `thumbnail_index` maps each shown image's key into `thumbnails`."""
    ranked = assigned_scores if assigned_scores is not None else scores  # (Q, K)
    n_queries, n_candidates = ranked.shape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{REPORT_TITLE}</title>", f"<style>{STYLE}</style></head><body>",
             "<h1>Error analysis</h1>", _summary_table(summary)]
    if truth is None:
        rows = np.arange(n_queries)  # the file's order
    else:
        plain_ranks = truth_ranks(scores, truth)  # (Q,)
        ranks = truth_ranks(ranked, truth)  # (Q,)
        true_scores = ranked[np.arange(n_queries), truth]  # (Q,)
        best_other = np.where(np.arange(n_candidates) == truth[:, None], -np.inf, ranked).max(1)
        rows = np.lexsort((true_scores - best_other, -ranks))  # worst rank first, then widest gap
        parts += [_figures_table(scores, assigned_scores, truth),
                  "<h2>Where the true match ranks</h2>",
                  _rank_chart(plain_ranks, ranks if assigned_scores is not None else None,
                              n_candidates)]
    parts.append(f"<h2>Queries ({n_queries}{', worst first' if truth is not None else ''})</h2>")
    order = np.argsort(-ranked, axis=1, kind="stable")  # (Q, K) best candidate first

    def figure(key: str, label: str, details: str = "", css: str = "") -> str:
        name = html.escape(image_id(key))
        css = f' class="{css}"' if css else ""
        details = f"<br>{details}" if details else ""
        return (f'<figure{css}><img data-t="{thumbnail_index[key]}" alt="{name}">'
                f"<figcaption>{label} {name}{details}</figcaption></figure>")

    def score_text(q: int, k: int) -> str:
        if assigned_scores is None:
            return f"{scores[q, k]:.3f}"
        return f"{assigned_scores[q, k]:.2f}<br>cos {scores[q, k]:.3f}"

    for q in rows:
        query = queries[q]
        cells = [f'<div class="n">#{q + 1}</div>', figure(query.left, "query")]
        if truth is not None:
            t = truth[q]
            rank = f"rank {ranks[q]}" + (f" (plain {plain_ranks[q]})"
                                         if assigned_scores is not None else "")
            cells.append(figure(query.candidates[t], "truth", f"{rank}<br>{score_text(q, t)}",
                                "truth"))
        cells.append('<span class="sep"></span>')
        for place, k in enumerate(order[q, :SHOWN], start=1):
            hit = truth is not None and k == truth[q]
            cells.append(figure(query.candidates[k], f"{place}.", score_text(q, k),
                                "hit" if hit else ""))
        parts.append(f'<div class="q">{"".join(cells)}</div>')
    parts += ['<p id="rendered">thumbnails not counted yet (needs JavaScript)</p>',
              f"<script>const THUMBNAILS = {json.dumps(thumbnails)};{SCRIPT}</script>",
              "</body></html>"]
    return "\n".join(parts)


def _summary_table(summary: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                   for k, v in summary.items())
    return f'<table class="summary">{rows}</table>'


def _figures_table(scores: np.ndarray, assigned_scores: np.ndarray | None,
                   truth: np.ndarray) -> str:
    rows = [("plain", ranking_metrics(scores, truth))]
    if assigned_scores is not None:
        rows.append(("assigned", ranking_metrics(assigned_scores, truth)))
    body = "".join(f"<tr><th>{name}</th><td>{m['top1']:.3f}</td><td>{m['top2']:.3f}</td>"
                   f"<td>{m['mrr']:.3f}</td></tr>" for name, m in rows)
    return ('<h2>Figures</h2><table class="figures"><tr><th></th><th>top-1</th><th>top-2</th>'
            f"<th>MRR</th></tr>{body}</table>")


def _rank_chart(plain_ranks: np.ndarray, assigned_ranks: np.ndarray | None,
                n_candidates: int) -> str:
    """An SVG bar chart of how many queries have their truth at rank 1..K: plain in grey, and
    assigned in blue beside it where given."""
    series = [("plain", "#9a9a9a", plain_ranks)]
    if assigned_ranks is not None:
        series.append(("assigned", "#2b6cb0", assigned_ranks))
    counts = [np.bincount(ranks, minlength=n_candidates + 1)[1:] for _, _, ranks in series]
    peak = max(int(c.max()) for c in counts) or 1
    slot, plot_h, left, top = 28, 140, 36, 10  # px: one rank's width, plot height, margins
    width, height = left + slot * n_candidates + 10, top + plot_h + 34
    bar = (slot - 6) / len(series)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-size="10" font-family="sans-serif">',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" '
           'stroke="#444"/>',
           f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>',
           f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>']
    for rank in range(n_candidates):
        x = left + rank * slot + 3
        for number, ((name, colour, _), count) in enumerate(zip(series, counts, strict=True)):
            h = plot_h * int(count[rank]) / peak
            out.append(f'<rect x="{x + number * bar:.1f}" y="{top + plot_h - h:.1f}" '
                       f'width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                       f"<title>{name}, rank {rank + 1}: {int(count[rank])}</title></rect>")
        out.append(f'<text x="{x + (slot - 6) / 2}" y="{top + plot_h + 13}" '
                   f'text-anchor="middle">{rank + 1}</text>')
    legend = "  ".join(f'<tspan fill="{colour}">&#9632; {name}</tspan>'
                       for name, colour, _ in series)
    out.append(f'<text x="{left}" y="{height - 4}">rank of the true match: {legend}</text>')
    return "".join(out) + "</svg>"
