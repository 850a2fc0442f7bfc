"""`python -m infer`: embed every image once with the exported model, score candidates by
cosine, and write a Kaggle submission (`--split test`) or a validation report (`--split val`).
"""

from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from extract import UserError, UserPath, logger, user_errors
from extract.data import (
    CANDIDATE_COLUMNS,
    Query,
    image_id,
    load_image,
    read_dataset,
    validation_split,
)
from extract.files import atomic_output, check_output
from infer.scoring import candidate_scores, ranking_metrics, score_matrix
from infer.session import ModelInfo, open_session

DEFAULT_OUT = {"test": Path("submission.csv"), "val": Path("val-report.json")}


def embed_images(session, paths: list[Path], input_size: tuple[int, int], batch_size: int,
                 workers: int = 4) -> np.ndarray:
    """Unit embeddings (N, D) of `paths`, decoding the next batch while this one runs."""
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    out = []
    with ThreadPoolExecutor(workers) as decoders, ThreadPoolExecutor(1) as prefetch, \
            tqdm(total=len(paths), unit="img", desc="embed", dynamic_ncols=True) as bar:

        def decode(batch: list[Path]) -> np.ndarray:
            return np.stack(list(decoders.map(lambda p: load_image(p, input_size), batch)))

        pending = prefetch.submit(decode, batches[0])
        for number in range(len(batches)):
            images = pending.result()  # (B, 3, H, W)
            if number + 1 < len(batches):
                pending = prefetch.submit(decode, batches[number + 1])
            out.append(session.run(["embedding"], {"image": images})[0])  # (B, D)
            bar.update(len(images))
    return np.concatenate(out)


def rank(session, info: ModelInfo, images: dict[str, Path], queries: list[Query],
         batch_size: int) -> np.ndarray:
    """Scores (Q, 20) of each query's candidates; each unique image is embedded exactly once."""
    keys = sorted({q.left for q in queries} | {c for q in queries for c in q.candidates})
    column = {key: i for i, key in enumerate(keys)}
    logger.info("%d queries, %d unique images", len(queries), len(keys))
    embeddings = embed_images(session, [images[k] for k in keys], info.input_size, batch_size)
    scores = score_matrix(embeddings[[column[q.left] for q in queries]], embeddings)  # (Q, M)
    candidates = np.array([[column[c] for c in q.candidates] for q in queries])  # (Q, 20)
    return candidate_scores(scores, candidates)


def _write_text(path: Path, write) -> Path:
    """Call `write(file)` on a text file that appears at `path` only once it is whole."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        write(f)
    return path


def write_submission(path: Path, queries: list[Query], scores: np.ndarray) -> Path:
    """The Kaggle file: left,c0..c19, one row per query in order, one score per candidate."""
    if not np.isfinite(scores).all():
        raise UserError("the model produced non-finite scores; no submission written")

    def write(f):
        writer = csv.writer(f)
        writer.writerow(CANDIDATE_COLUMNS)
        for query, row in zip(queries, scores, strict=True):
            writer.writerow([image_id(query.left)] + [f"{s:.9g}" for s in row])

    return _write_text(path, write)


def write_report(path: Path, queries: list[Query], scores: np.ndarray, metrics: dict) -> Path:
    """The validation figures and, per query, its candidates, scores and truth."""
    report = {"metrics": metrics, "queries": [
        {"left": image_id(q.left), "candidates": [image_id(c) for c in q.candidates],
         "truth": q.truth, "scores": [round(float(s), 6) for s in row]}
        for q, row in zip(queries, scores, strict=True)]}
    return _write_text(path, lambda f: json.dump(report, f, indent=1))


def main(onnx: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
         device: str = "auto", batch_size: int = 32) -> Path:
    """Rank the split's candidates; returns the submission (test) or report (val) written."""
    dataset = read_dataset(data)
    if split not in DEFAULT_OUT:
        raise UserError(f"unknown split {split!r}; choose test or val")
    out = Path(out) if out else DEFAULT_OUT[split]
    check_output(out, "output", inputs=[Path(onnx), *dataset.files()])
    session, info = open_session(onnx, device)
    if split == "test":
        queries = dataset.test_queries
    elif split == "val":
        if not info.val_fraction:
            raise UserError(f"{onnx} was trained without a validation split (--val-fraction 0)")
        if info.dataset_fingerprint != dataset.fingerprint():
            raise UserError(f"{onnx} was trained on another dataset than {dataset.root}: its "
                            "validation split cannot be rebuilt here")
        queries = validation_split(dataset, info.val_fraction, info.split_seed)[1]
    scores = rank(session, info, dataset.images, queries, batch_size)
    if split == "test":
        return write_submission(out, queries, scores)
    metrics = ranking_metrics(scores, np.array([q.truth for q in queries]))
    logger.info("validation, %d queries: top-1 %.3f  top-2 %.3f  MRR %.3f", len(queries),
                metrics["top1"], metrics["top2"], metrics["mrr"])
    if info.val_metrics:
        logger.info("head.train reported for this model: top-2 %.3f", info.val_metrics["top2"])
    return write_report(out, queries, scores, metrics)


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
def cli(**options) -> None:
    """Rank each query's 20 candidates with an exported model under ONNX Runtime."""
    with user_errors():
        path = main(**options)
    click.echo(path)
