"""The error-analysis page: one self-contained HTML file that opens offline, years later.

Inline CSS, an inline SVG chart and small JPEG thumbnails as base64, no framework, no network.
Each image is embedded once, in one list that a short inline script copies into the `<img>`s that
show it; on window load the script counts the thumbnails that decoded (naturalWidth > 0) into the
line at the bottom. Thumbnails are decoded by `tll.data.load_image`, like the model's input:
upright, at their depth, transparency on white.

Where the model gives maps (`infer.maps`), each thumbnail carries two small <canvas> overlays
that the same script paints from inline arrays of numbers, one canvas pixel per map cell,
stretched over the thumbnail by CSS: the image's attention (h x w weights, in hundredths) and
where its cosine with the compared image comes from (pool x pool cells, in thousandths). Numbers
rather than pre-rendered PNGs: a 4 x 4 map is 16 small integers (a PNG data URI of it is ~100
bytes before base64), the colours and the compared candidate can change in the page, and the
figures stay readable in the source. A gallery at the top shows the queries the model gets most
confidently wrong and most confidently right.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from infer.maps import ImageMaps, similarity_grid
from infer.scoring import ranking_metrics, truth_ranks
from tll.data import Query, image_id, load_image
from tll.files import write_text

REPORT_TITLE = "tll: error analysis"  # also how infer knows its own page, to rewrite it
THUMBNAIL_HEIGHT = 56  # px
THUMBNAIL_QUALITY = 65  # JPEG
SHOWN = 5  # candidates shown per query
GALLERY = 6  # queries in each of the gallery's two strips

STYLE = """
body { font: 13px/1.35 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
th { font-weight: 600; } .figures td { font-variant-numeric: tabular-nums; }
/* rows off screen skip layout and paint, so a page of 2,000 queries opens at once */
.q { display: flex; align-items: flex-start; gap: 6px; padding: 6px 0;
     border-top: 1px solid #ddd; content-visibility: auto; contain-intrinsic-size: auto 100px; }
.q .n { width: 5.5em; color: #666; font-size: 11px; }
.q .n label { display: block; margin-top: 4px; }
figure { margin: 0; width: 64px; font-size: 10px; text-align: center; color: #444; }
figure .m { position: relative; width: fit-content; margin: 0 auto 2px;
            border: 2px solid transparent; background: #eee; }
figure img { max-width: 64px; display: block; }
figure canvas { position: absolute; inset: 0; width: 100%; height: 100%; pointer-events: none; }
canvas.s { image-rendering: pixelated; }  /* one pixel per pooled cell: show the cells */
body[data-maps="off"] canvas, body[data-maps="attention"] canvas.s,
body[data-maps="similarity"] canvas.a, .nomaps canvas { display: none; }
figure[data-k]:not([data-k="q"]) { cursor: pointer; }
figure.sel .m { outline: 2px dashed #555; }
figure.truth .m, figure.hit .m { border-color: #1a8f3c; }
figure.hit figcaption { color: #1a8f3c; font-weight: 600; }
.sep { width: 1px; align-self: stretch; background: #ccc; margin: 0 6px; }
.strip { display: flex; flex-wrap: wrap; gap: 14px; }
.g { display: flex; gap: 3px; padding: 4px; border: 1px solid #ddd; }
.g .n { width: 4em; font-size: 11px; color: #666; }
.controls { position: sticky; top: 0; background: #fff; padding: 4px 0; z-index: 1; }
.legend { color: #555; max-width: 60em; }
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
    `${rendered} of ${shown.length} thumbnails rendered` + (MAPS ? `; ${
      document.querySelectorAll("canvas[data-drawn]").length} of ${
      document.querySelectorAll("canvas").length} maps drawn` : "");
});
// one canvas pixel per map cell; strength in [-1, 1]: alpha, and the colour by its sign
function paint(canvas, width, height, strengths, positive, negative) {
  canvas.width = width; canvas.height = height;
  const context = canvas.getContext("2d"), pixels = context.createImageData(width, height);
  strengths.forEach((v, i) => pixels.data.set(
    [...(v >= 0 ? positive : negative), Math.round(160 * Math.min(1, Math.abs(v)))], 4 * i));
  context.putImageData(pixels, 0, 0);
  canvas.dataset.drawn = "1";
}
// the image's attention, from its own lowest weight (clear) to its highest (orange)
function paintAttention(figure) {
  const canvas = figure.querySelector("canvas.a");
  const map = MAPS.attention[figure.querySelector("img").dataset.t];
  const [height, width, weights] = map, low = Math.min(...weights), high = Math.max(...weights);
  paint(canvas, width, height, weights.map((w) => (w - low) / (high - low || 1)),
        [255, 120, 0], [255, 120, 0]);
  figure.querySelector(".m").title =
    `attention weights ${low / 100} to ${high / 100} (orange: this image's highest)`;
}
// where the cosine of the row's query and a candidate comes from, in this figure's image:
// the candidate's figure against the query, the query's against the selected candidate
function paintSimilarity(figure) {
  const row = figure.closest("[data-row]"), pool = MAPS.pool, cells = pool * pool;
  const isQuery = figure.dataset.k === "q", k = isQuery ? row.dataset.sel : figure.dataset.k;
  const pair = MAPS.pairs[row.dataset.row][k];  // query cells, candidate cells, their rests
  const scale = Math.max(1e-9, ...pair.slice(0, 2 * cells).map(Math.abs));
  const own = isQuery ? pair.slice(0, cells) : pair.slice(cells, 2 * cells);
  const rest = pair[2 * cells + (isQuery ? 0 : 1)];
  const sum = own.reduce((a, b) => a + b, 0);
  paint(figure.querySelector("canvas.s"), pool, pool, own.map((v) => v / scale),
        [220, 30, 30], [30, 80, 230]);
  const other = isQuery ? row.querySelector(`figure[data-k="${k}"] img`).alt : "the query";
  figure.querySelector(".m").title = `cosine ${((sum + rest) / 1000).toFixed(3)} with ${
    other}: cells ${(sum / 1000).toFixed(3)} + rest (vector inputs, bias, whitening) ${
    (rest / 1000).toFixed(3)}`;
}
if (MAPS) {
  for (const figure of document.querySelectorAll("figure[data-k]")) {
    if (MAPS.attention) paintAttention(figure);
    if (MAPS.pool) paintSimilarity(figure);
  }
  for (const row of document.querySelectorAll("[data-row]")) {
    row.querySelector(`figure[data-k="${row.dataset.sel}"]`)?.classList.add("sel");
    row.addEventListener("click", (event) => {
      const figure = event.target.closest("figure[data-k]");
      if (!figure || figure.dataset.k === "q" || !MAPS.pool) return;
      row.querySelector("figure.sel")?.classList.remove("sel");
      figure.classList.add("sel");
      row.dataset.sel = figure.dataset.k;
      paintSimilarity(row.querySelector('figure[data-k="q"]'));
    });
    row.querySelector("input.rowmaps")?.addEventListener("change", (event) =>
      row.classList.toggle("nomaps", !event.target.checked));
  }
  for (const input of document.querySelectorAll("input[name=maps]")) {
    input.addEventListener("change", () => { document.body.dataset.maps = input.value; });
  }
}
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
                      truth: np.ndarray | None = None, maps: ImageMaps | None = None) -> Path:
    """Write the error-analysis page for `queries`; returns `path`.

    summary: what produced the scores (model, trunk, data, assignment...), shown as given.
    images: key -> file. scores (Q, K) plain; assigned_scores (Q, K) after one-to-one
    assignment, or None; truth (Q,) the true candidate's index, or None (the test split).
    Ranks and figures use the assigned scores where given, like `python -m infer` does.
    maps: every shown image's maps (`infer.maps`), or None for a page without overlays.
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
                     scores, assigned_scores, truth,
                     None if maps is None else page_maps(maps, queries, keys, order, truth))
    return write_text(Path(path), lambda f: f.write(page))


def _thousandths(grid: np.ndarray, rest: float) -> tuple[list[int], int]:
    """A grid's cell parts (pool, pool) and its rest in thousandths, the rest taking up the
    cells' rounding: they sum to the cosine rounded, the figure the page writes beside it."""
    cells = np.rint(1000 * grid).astype(int).ravel()  # (pool * pool,)
    return cells.tolist(), int(np.rint(1000 * (grid.sum() + rest))) - int(cells.sum())


def page_maps(maps: ImageMaps, queries: list[Query], keys: list[str], order: np.ndarray,
              truth: np.ndarray | None) -> dict:
    """What the page's script paints, as JSON-ready integers: "attention", per thumbnail (in
    `keys` order) [h, w, its weights in hundredths, row by row], or None where the model has no
    spatial attention; "pool", the side of the cell grid; "pairs", per query, for each shown
    candidate k (`order` (Q, SHOWN), and the truth): [the query's pool x pool cell parts of
    its cosine with k, k's parts of it, the query's rest, k's rest], in thousandths, each
    side's summing to the cosine rounded."""
    attention = None
    if maps.attention is not None:
        attention = []
        for key in keys:
            weights = maps.attention[maps.row[key]]  # (h, w)
            attention.append([*weights.shape, np.rint(100 * weights).astype(int).ravel().tolist()])
    pairs = []
    for q, query in enumerate(queries):
        left = maps.cells[maps.row[query.left]]  # (P, D)
        shown = [*order[q]] + ([truth[q]] if truth is not None else [])
        row = {}
        for k in dict.fromkeys(int(k) for k in shown):
            right = maps.cells[maps.row[query.candidates[k]]]  # (P, D)
            left_grid, left_rest = similarity_grid(left, right.sum(axis=0), maps.terms,
                                                   maps.pool)
            right_grid, right_rest = similarity_grid(right, left.sum(axis=0), maps.terms,
                                                     maps.pool)
            left_cells, left_rest = _thousandths(left_grid, left_rest)
            right_cells, right_rest = _thousandths(right_grid, right_rest)
            row[k] = [*left_cells, *right_cells, left_rest, right_rest]
        pairs.append(row)
    return {"attention": attention, "pool": maps.pool, "pairs": pairs}


def page_html(summary: dict[str, str], queries: list[Query], thumbnail_index: dict[str, int],
              thumbnails: list[str], scores: np.ndarray, assigned_scores: np.ndarray | None,
              truth: np.ndarray | None, maps: dict | None = None) -> str:
    """The page as text; `thumbnail_index` maps each shown image's key into `thumbnails`;
    `maps`: `page_maps`' numbers, or None for a page without overlays."""
    ranked = assigned_scores if assigned_scores is not None else scores  # (Q, K)
    n_queries, n_candidates = ranked.shape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{REPORT_TITLE}</title>", f"<style>{STYLE}</style></head>",
             f'<body data-maps="{"similarity" if maps else "off"}">',
             "<h1>Error analysis</h1>", _summary_table(summary)]
    order = np.argsort(-ranked, axis=1, kind="stable")  # (Q, K) best candidate first
    with_attention = bool(maps and maps["attention"])
    with_cells = bool(maps and maps["pool"])

    def figure(q: int, k: int | None, label: str, details: str = "", css: str = "") -> str:
        """Query q's image (k None) or its candidate k, with its map overlays."""
        key = queries[q].left if k is None else queries[q].candidates[k]
        name = html.escape(image_id(key))
        css = f' class="{css}"' if css else ""
        details = f"<br>{details}" if details else ""
        overlays = ('<canvas class="a"></canvas>' if with_attention else "") + \
                   ('<canvas class="s"></canvas>' if with_cells else "")
        return (f'<figure{css} data-k="{"q" if k is None else k}"><div class="m">'
                f'<img data-t="{thumbnail_index[key]}" alt="{name}">{overlays}</div>'
                f"<figcaption>{label} {name}{details}</figcaption></figure>")

    def score_text(q: int, k: int) -> str:
        if assigned_scores is None:
            return f"{scores[q, k]:.3f}"
        return f"{assigned_scores[q, k]:.2f}<br>cos {scores[q, k]:.3f}"

    if truth is None:
        rows = np.arange(n_queries)  # the file's order
    else:
        plain_ranks = truth_ranks(scores, truth)  # (Q,)
        ranks = truth_ranks(ranked, truth)  # (Q,)
        true_scores = ranked[np.arange(n_queries), truth]  # (Q,)
        best_other = np.where(np.arange(n_candidates) == truth[:, None], -np.inf, ranked).max(1)
        margins = true_scores - best_other  # (Q,) below 0: a wrong candidate above the truth
        rows = np.lexsort((margins, -ranks))  # worst rank first, then widest gap
        parts += [_figures_table(scores, assigned_scores, truth),
                  "<h2>Where the true match ranks</h2>",
                  _rank_chart(plain_ranks, ranks if assigned_scores is not None else None,
                              n_candidates)]
        wrong = [q for q in np.argsort(margins, kind="stable") if ranks[q] > 1][:GALLERY]
        right = [q for q in np.argsort(-margins, kind="stable") if ranks[q] == 1][:GALLERY]
        parts.append("<h2>At a glance</h2>")
        for title, chosen in (("Most confidently wrong: the top candidate furthest above the "
                               "truth", wrong),
                              ("Most confidently right: the truth furthest above the rest", right)):
            items = []
            for q in chosen:
                top, t = int(order[q, 0]), int(truth[q])
                gap = f"{'+' if margins[q] >= 0 else ''}{margins[q]:.3f}"
                shown = [figure(q, None, f"#{q + 1}"),
                         figure(q, top, "1.", score_text(q, top), "hit" if top == t else "")]
                if top != t:
                    shown.append(figure(q, t, "truth", score_text(q, t), "truth"))
                items.append(f'<div class="g" data-row="{q}" data-sel="{top}">'
                             f'<div class="n"><a href="#q{q + 1}">#{q + 1}</a><br>margin '
                             f'{gap}</div>{"".join(shown)}</div>')
            parts.append(f"<h3>{html.escape(title)} ({len(chosen)})</h3>"
                         f'<div class="strip">{"".join(items) or "none"}</div>')
    parts.append(f"<h2>Queries ({n_queries}{', worst first' if truth is not None else ''})</h2>")
    parts.append(_maps_controls(with_attention, with_cells) if maps else
                 '<p class="legend">No maps: this model does not give them (a whitening head, '
                 "or a file exported before them).</p>")

    for q in rows:
        toggle = ('<label><input type="checkbox" class="rowmaps" checked> maps</label>'
                  if maps else "")
        cells = [f'<div class="n">#{q + 1}{toggle}</div>', figure(q, None, "query")]
        if truth is not None:
            t = truth[q]
            rank = f"rank {ranks[q]}" + (f" (plain {plain_ranks[q]})"
                                         if assigned_scores is not None else "")
            cells.append(figure(q, t, "truth", f"{rank}<br>{score_text(q, t)}", "truth"))
        cells.append('<span class="sep"></span>')
        for place, k in enumerate(order[q, :SHOWN], start=1):
            hit = truth is not None and k == truth[q]
            cells.append(figure(q, k, f"{place}.", score_text(q, k), "hit" if hit else ""))
        parts.append(f'<div class="q" id="q{q + 1}" data-row="{q}" data-sel="{order[q, 0]}">'
                     f'{"".join(cells)}</div>')
    parts += ['<p id="rendered">thumbnails not counted yet (needs JavaScript)</p>',
              f"<script>const THUMBNAILS = {json.dumps(thumbnails)};\n"
              f"const MAPS = {json.dumps(maps, separators=(',', ':'))};{SCRIPT}</script>",
              "</body></html>"]
    return "\n".join(parts)


def _maps_controls(with_attention: bool, with_cells: bool) -> str:
    """The page's switch between the overlays, and how to read them."""
    choices = [("similarity", with_cells), ("attention", with_attention), ("off", True)]
    buttons = " ".join(f'<label><input type="radio" name="maps" value="{value}"'
                       f'{" checked" if value == ("similarity" if with_cells else "off") else ""}'
                       f"> {value}</label>" for value, offered in choices if offered)
    return (f'<div class="controls">maps: {buttons}</div><p class="legend">'
            "<b>similarity</b>: where the cosine of the query and a candidate comes from, in "
            "each image's grid of pooled cells: red raises it, blue lowers it, the deeper the "
            "more (against the pair's largest cell); on a candidate, its cosine with the query; "
            "on the query, its cosine with the outlined candidate (click another to compare). "
            "The cells' parts and the rest (vector inputs, the bias and a fused whitening's "
            "share), shown on hover, sum to the cosine. <b>attention</b>: the weight the "
            "head's spatial attention gives each position of the image, orange where it is "
            "this image's highest. A row's <i>maps</i> box hides its overlays.</p>")


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
