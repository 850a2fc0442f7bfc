"""`python -m infer`: embed every image once with the exported model, score candidates by
cosine, optionally re-score the whole pool one-to-one (`--assign`), and write a Kaggle submission
(`--split test`) or a validation report with its error-analysis page (`--split val`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from infer.maps import ImageMaps, image_maps, map_outputs
from infer.model_info import ModelInfo
from infer.report import REPORT_TITLE, write_report_page
from infer.scoring import (
    ASSIGN_METHODS,
    DEFAULT_ASSIGN,
    DEFAULT_TEMPERATURE,
    assign,
    assignment_premise,
    candidate_similarities,
    ranking_metrics,
    uninformative,
)
from infer.session import open_session
from tll import FiniteFloat, UserError, UserPath, logger, user_errors
from tll.data import (
    CANDIDATE_COLUMNS,
    Query,
    image_id,
    load_image,
    read_dataset,
    validation_split,
)
from tll.files import check_output, file_kind, file_start, write_text

DEFAULT_OUT = {"test": Path("submission.csv"), "val": Path("val-report.json")}


def embed_images(session, paths: list[Path], input_size: tuple[int, int], interpolation: str,
                 batch_size: int, workers: int = 4, outputs: tuple[str, ...] = ("embedding",)
                 ) -> dict[str, np.ndarray]:
    """The model's `outputs` for `paths` by name, each (N, ...): by default the unit embeddings
    (N, D) alone. Images are resized as the model was trained (`load_image` with its input size
    and interpolation), the next batch decoded while this one runs."""
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    out: list[list[np.ndarray]] = []  # per batch, each output
    with ThreadPoolExecutor(workers) as decoders, ThreadPoolExecutor(1) as prefetch, \
            tqdm(total=len(paths), unit="img", desc="embed", dynamic_ncols=True) as bar:

        def decode(batch: list[Path]) -> np.ndarray:
            return np.stack(list(decoders.map(
                lambda p: load_image(p, input_size, interpolation), batch)))

        pending = prefetch.submit(decode, batches[0])
        for number in range(len(batches)):
            images = pending.result()  # (B, 3, H, W)
            if number + 1 < len(batches):
                pending = prefetch.submit(decode, batches[number + 1])
            out.append(session.run(list(outputs), {"image": images}))  # each (B, ...)
            bar.update(len(images))
    by_output = zip(*out, strict=True)  # each output's batches
    return {name: np.concatenate(arrays)
            for name, arrays in zip(outputs, by_output, strict=True)}


def score_candidates(session, info: ModelInfo, images: dict[str, Path], queries: list[Query],
                     batch_size: int, maps: bool = False) -> tuple[np.ndarray, ImageMaps | None]:
    """Cosine scores (Q, 20) of each query's candidates, and with `maps` every image's maps
    for the page where the model gives them (else None); each unique image is embedded once."""
    keys = sorted({q.left for q in queries} | {c for q in queries for c in q.candidates})
    row = {key: i for i, key in enumerate(keys)}
    logger.info("%d queries, %d unique images", len(queries), len(keys))
    extra = map_outputs(info) if maps else []
    outputs = embed_images(session, [images[k] for k in keys], info.input_size,
                           info.interpolation, batch_size, outputs=("embedding", *extra))
    scores = candidate_similarities(outputs["embedding"], np.array([row[q.left] for q in queries]),
                                    np.array([[row[c] for c in q.candidates] for q in queries]))
    return scores, image_maps(info, keys, outputs) if extra else None


def candidate_pool(queries: list[Query]) -> tuple[np.ndarray, int]:
    """Each query's candidates (Q, 20) as indices into the pool of every candidate image, and
    the pool's size."""
    pool = sorted({c for q in queries for c in q.candidates})
    column = {key: i for i, key in enumerate(pool)}
    return np.array([[column[c] for c in q.candidates] for q in queries]), len(pool)


def resolve_assignment(asked: str | None, default: str, candidates: np.ndarray,
                       n_images: int) -> str:
    """The assignment to run: `asked`, or `default` where the pool is one-to-one.

    An explicit sinkhorn or hungarian on a pool that is not one-to-one is refused; the default
    falls back to none with one log line.
    """
    method = asked or default
    if method == "none":
        return method
    reason = assignment_premise(candidates, n_images)
    if reason is None:
        return method
    if asked:
        raise UserError(f"--assign {asked} needs every candidate image to be the match of exactly "
                        f"one query, and this split's pool is not like that: {reason}")
    logger.info("no %s assignment (the default) for this split: %s; ranking by plain scores",
                method, reason)
    return "none"


def write_submission(path: Path, queries: list[Query], scores: np.ndarray) -> Path:
    """The Kaggle file: left,c0..c19, one row per query in order, one score per candidate."""
    if not np.isfinite(scores).all():
        raise UserError("the model produced non-finite scores; no submission written")

    def write(f):
        writer = csv.writer(f)
        writer.writerow(CANDIDATE_COLUMNS)
        for query, row in zip(queries, scores, strict=True):
            writer.writerow([image_id(query.left)] + [f"{s:.9g}" for s in row])

    return write_text(path, write)


def write_report(path: Path, queries: list[Query], scores: np.ndarray,
                 assigned_scores: np.ndarray | None, figures: dict) -> Path:
    """`figures` and, per query, its candidates, truth and scores: plain, and after the
    assignment where one ran."""
    entries = []
    for q, row in enumerate(scores):
        entry = {"left": image_id(queries[q].left),
                 "candidates": [image_id(c) for c in queries[q].candidates],
                 "truth": queries[q].truth, "scores": [round(float(s), 6) for s in row]}
        if assigned_scores is not None:
            entry["assigned_scores"] = [round(float(s), 6) for s in assigned_scores[q]]
        entries.append(entry)
    return write_text(path, lambda f: json.dump({**figures, "queries": entries}, f, indent=1))


def _foreign_output(path: Path) -> str | None:
    """What the file at an output's path is where it is none of infer's (a submission, a
    validation report, an error-analysis page), which a rerun replaces; None for those."""
    start = file_start(path)
    if not start or start.splitlines()[0].strip() == ",".join(CANDIDATE_COLUMNS).encode():
        return None
    if REPORT_TITLE.encode() in start:
        return None
    if start.lstrip().startswith(b"{"):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(report, dict) and "queries" in report:
                return None
        except (ValueError, TypeError):
            pass
    return f"not a submission or report of tll ({file_kind(start)})"


def main(onnx: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
         device: str = "auto", batch_size: int = 32, assign_method: str | None = None,
         assign_temperature: float | None = None, report: str | Path | None = None) -> Path:
    """Rank the split's candidates; returns the submission (test) or report (val) written.

    assign_method: none, sinkhorn or hungarian; None: the model's own (what its epoch was chosen
    with; DEFAULT_ASSIGN for a model that does not say) where the split's pool is one-to-one,
    else none. assign_temperature: None for the model's own. report: the error-analysis page;
    for val it defaults to `out` with .html, for test it is written only when given.
    """
    if assign_method not in (None, *ASSIGN_METHODS):
        raise UserError(f"unknown assignment {assign_method!r}: choose "
                        f"{', '.join(ASSIGN_METHODS)}")
    if assign_temperature is not None and not 0 < assign_temperature < math.inf:
        raise UserError(f"--assign-temperature {assign_temperature}: give a finite number "
                        "above 0")
    dataset = read_dataset(data)
    if split not in DEFAULT_OUT:
        raise UserError(f"unknown split {split!r}; choose test or val")
    out = Path(out) if out else DEFAULT_OUT[split]
    report = Path(report) if report else (out.with_suffix(".html") if split == "val" else None)
    for output in (out, report) if report else (out,):
        check_output(output, "output", inputs=[Path(onnx), *dataset.files()],
                     foreign=_foreign_output)
    if report and os.path.realpath(report) == os.path.realpath(out):
        raise UserError(f"--report {report} is the same file as --out; choose another name")
    session, info = open_session(onnx, device)
    if split == "test":
        queries = dataset.test_queries
    elif split == "val":
        if not info.val_fraction:
            raise UserError(f"{onnx} was trained on every train pair (--val-fraction 0, or the "
                            "final head of --folds): it has no held-out split to score")
        if info.dataset_fingerprint != dataset.fingerprint():
            raise UserError(f"{onnx} was trained on another dataset than {dataset.root}: its "
                            "validation split cannot be rebuilt here")
        queries = validation_split(dataset, info.val_fraction, info.split_seed)[1]
    candidates, n_images = candidate_pool(queries)  # (Q, 20)
    method = resolve_assignment(assign_method, info.assign or DEFAULT_ASSIGN, candidates,
                                n_images)  # before the slow part
    if assign_temperature is None:
        assign_temperature = info.assign_temperature or DEFAULT_TEMPERATURE
        if method == "sinkhorn" and not 0 < assign_temperature < math.inf:
            raise UserError(f"{onnx} records Sinkhorn temperature {assign_temperature} in its "
                            "metadata (an older tll let it through): pass --assign-temperature "
                            f"(the default is {DEFAULT_TEMPERATURE}), or export a run trained "
                            "with a finite one")
    scores, maps = score_candidates(session, info, dataset.images, queries, batch_size,
                                    maps=report is not None)  # (Q, 20)
    if method != "none" and (reason := uninformative(scores)):
        logger.warning("no %s assignment: %s; ranking by plain scores", method, reason)
        method = "none"
    assigned = None
    if method != "none":
        try:
            assigned = assign(scores, candidates, method, assign_temperature)  # (Q, 20)
        except ValueError as error:  # the pool was checked: the temperature flattens rows
            raise UserError(f"--assign-temperature: {error}") from None
    described = method + (f", temperature {assign_temperature:g}" if method == "sinkhorn" else "")

    truth = None
    if split == "test":
        written = write_submission(out, queries, scores if assigned is None else assigned)
    else:
        truth = np.array([q.truth for q in queries])  # (Q,)
        figures = {"metrics": ranking_metrics(scores, truth), "assignment": {"method": method}}
        logger.info("validation, %d queries: %s", len(queries), _figures_text(figures["metrics"]))
        if assigned is not None:
            if method == "sinkhorn":
                figures["assignment"]["temperature"] = assign_temperature
            figures["assignment"]["metrics"] = ranking_metrics(assigned, truth)
            logger.info("after %s assignment: %s", described,
                        _figures_text(figures["assignment"]["metrics"]))
        if info.val_metrics:
            logger.info("head.train reported for this model: top-2 %.3f",
                        info.val_metrics["top2"])
        written = write_report(out, queries, scores, assigned, figures)
    if report:
        summary = {"model": str(onnx), "trunk": info.trunk, "cache": info.caches_text,
                   "data": str(dataset.root),
                   "split": f"{split}, {len(queries)} queries", "assignment": described}
        write_report_page(report, summary, queries, dataset.images, scores, assigned, truth,
                          maps)
        logger.info("error-analysis page: %s", report)
    return written


def _figures_text(metrics: dict[str, float]) -> str:
    return f"top-1 {metrics['top1']:.3f}  top-2 {metrics['top2']:.3f}  MRR {metrics['mrr']:.3f}"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--onnx", type=UserPath(), required=True,
              help="Model exported by `python -m head.export`.")
@click.option("--data", type=UserPath(), default=Path("data"),
              help="Dataset folder in the Kaggle layout.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test",
              help="test: write the submission; val: score the training run's validation split.")
@click.option("--out", type=UserPath(), default=None,
              help="[default: submission.csv for test, val-report.json for val]")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto")
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--assign", "assign_method", type=click.Choice(ASSIGN_METHODS), default=None,
              help="Re-score the whole pool so that every candidate image is used once: sinkhorn "
              "(soft) or hungarian (hard). Only for a pool like Kaggle's test, where each "
              "candidate image is the match of exactly one query.  [default: the one the "
              "model's training chose its epoch with, where the pool allows, else none]")
@click.option("--assign-temperature", type=FiniteFloat(min=0, min_open=True),
              default=None, help="Sinkhorn's temperature on cosine scores.  [default: the "
              "model's]")
@click.option("--report", type=UserPath(), default=None,
              help="Write the error-analysis page (HTML) here.  [default: for val, --out with "
              ".html; for test, none]")
def cli(**options) -> None:
    """Rank each query's 20 candidates with an exported model under ONNX Runtime."""
    with user_errors():
        path = main(**options)
    click.echo(path)
