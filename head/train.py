"""`python -m head.train`: train the head on a feature cache, in seconds.

The train images' features (maps or vectors) are loaded once into one tensor (on the GPU when
training there) and batches are gathered from it by index. Every epoch is validated on the
seeded split laid out like the Kaggle test; the frozen trunk's own score (global-average-pooled
features, cosine) is printed first, so each run shows the head's lift over it. The run folder
``runs/<name>/`` holds head.pt (the best epoch by the validation top-2 that `python -m infer`
will give by default: after the one-to-one assignment `--assign`, unless that is none), config.json,
metrics.jsonl and curves.png; it appears only once training has finished.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from extract import UserError, UserPath, logger, user_errors
from extract.backbones import resolve_device
from extract.cache import CacheInfo, read_features, read_image_digests, read_info
from extract.data import N_CANDIDATES, read_dataset, validation_split
from extract.files import atomic_output, check_output
from head.loss import NEGATIVES, cosine_triplet_loss
from head.model import ATTENTIONS, Head, HeadConfig, save_checkpoint
from infer.scoring import (
    ASSIGN_METHODS,
    DEFAULT_ASSIGN,
    DEFAULT_TEMPERATURE,
    assign,
    candidate_similarities,
    ranking_metrics,
)

DEFAULT_RUNS_DIR = Path("runs")
MAX_NAME_LENGTH = 100
MAX_LR = 1.0  # AdamW moves each weight by about lr a step: beyond 1 nothing is learnt


@dataclass(frozen=True)
class TrainConfig:
    cache: str
    name: str
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    margin: float = 0.2
    embedding_dim: int = 256
    pool: int = 2
    attention: str = "spatial"
    negatives: str = "all"
    assign: str = DEFAULT_ASSIGN
    assign_temperature: float = DEFAULT_TEMPERATURE
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"


@dataclass
class CachedSplit:
    """The train images' features in memory and the pairs and queries as row indices."""

    features: torch.Tensor  # (N, C, h, w) or (N, D) float16, every train image once
    train_left: torch.Tensor  # (P,) rows of each training pair's left
    train_right: torch.Tensor  # (P,) rows of its right
    val_images: torch.Tensor  # (M,) rows of every image the validation queries use
    val_queries: np.ndarray  # (Q,) positions in val_images of each query's left
    val_candidates: np.ndarray  # (Q, 20) positions in val_images of its candidates
    val_truth: np.ndarray  # (Q,) index of the true candidate


def load_split(cache: Path, info: CacheInfo, dataset_path: Path | None, val_fraction: float,
               seed: int, device: torch.device) -> CachedSplit:
    """The train images' features (checked to be of these very images) and the split."""
    dataset = read_dataset(dataset_path or info.dataset)
    keys = sorted({f"train/left/{left}" for left, _ in dataset.train_pairs}
                  | {f"train/right/{right}" for _, right in dataset.train_pairs})
    changed = [key for key, cached, now in zip(keys, read_image_digests(cache, keys),
                                               dataset.digests(keys), strict=True)
               if cached != now]
    if changed:
        raise UserError(f"{cache} was built from other images than {dataset.root}: "
                        f"{len(changed)} of its {len(keys)} train images differ (e.g. "
                        f"{changed[0]}); another dataset, or images changed since: rerun "
                        "`python -m extract` on this dataset")
    pairs, queries = validation_split(dataset, val_fraction, seed)
    row = {key: i for i, key in enumerate(keys)}
    features = torch.from_numpy(read_features(cache, keys)).to(device)
    val_keys = sorted({q.left for q in queries} | {c for q in queries for c in q.candidates})
    position = {key: i for i, key in enumerate(val_keys)}
    return CachedSplit(
        features=features,
        train_left=torch.tensor([row[f"train/left/{left}"] for left, _ in pairs], device=device),
        train_right=torch.tensor([row[f"train/right/{right}"] for _, right in pairs],
                                 device=device),
        val_images=torch.tensor([row[key] for key in val_keys], dtype=torch.long, device=device),
        val_queries=np.array([position[q.left] for q in queries], dtype=np.int64),
        val_candidates=np.array([[position[c] for c in q.candidates] for q in queries],
                                dtype=np.int64).reshape(len(queries), N_CANDIDATES),
        val_truth=np.array([q.truth for q in queries], dtype=np.int64),
    )


def evaluate(embeddings: np.ndarray, split: CachedSplit, assign_method: str = "none",
             temperature: float = DEFAULT_TEMPERATURE) -> dict[str, float]:
    """Validation figures from unit embeddings (M, D) of the validation images: top1, top2,
    mrr, and the same with `_assigned` after the one-to-one assignment (unless none)."""
    scores = candidate_similarities(embeddings, split.val_queries, split.val_candidates)
    metrics = ranking_metrics(scores, split.val_truth)
    if assign_method != "none":
        assigned = assign(scores, split.val_candidates, assign_method, temperature)  # (Q, K)
        metrics |= {f"{k}_assigned": v
                    for k, v in ranking_metrics(assigned, split.val_truth).items()}
    return metrics


def selection_figure(config: TrainConfig) -> str:
    """The figure the kept epoch is chosen by: what `python -m infer` reports by default."""
    return "top2" if config.assign == "none" else "top2_assigned"


@torch.no_grad()
def embed(head: Head, features: torch.Tensor, rows: torch.Tensor, batch_size: int) -> np.ndarray:
    head.eval()
    out = [head(features[rows[i:i + batch_size]].float())
           for i in range(0, len(rows), batch_size)]  # each (b, D)
    return torch.cat(out).cpu().numpy()


def frozen_baseline(split: CachedSplit, config: TrainConfig) -> dict[str, float]:
    """The trunk alone: global-average-pooled feature maps, or the vectors as they are,
    compared by cosine."""
    features = split.features[split.val_images].float()  # (M, C, h, w) or (M, D)
    pooled = features.mean(dim=(2, 3)) if features.dim() == 4 else features  # (M, C)
    return evaluate(torch.nn.functional.normalize(pooled, dim=1).cpu().numpy(), split,
                    config.assign, config.assign_temperature)


def train_epoch(head: Head, optimizer: torch.optim.Optimizer, split: CachedSplit,
                config: TrainConfig, epoch: int, generator: torch.Generator) -> float:
    """One pass over the training pairs in shuffled batches; returns the mean batch loss.
    Refuses an epoch that diverges, or ends with every embedding in one point (the head has
    collapsed: the loss then sits at the margin and nothing can move it again)."""
    head.train()
    order = torch.randperm(len(split.train_left), generator=generator).to(
        split.features.device)
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    batches = [b for b in batches if len(b) > 1]  # a lone pair has no in-batch negative
    if not batches:
        raise UserError(f"{len(order)} training pair(s) make no batch of two; an epoch would "
                        "take no step")
    total = 0.0
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True)
    for number, batch in enumerate(bar, start=1):
        anchors = head(split.features[split.train_left[batch]].float())  # (B, D)
        positives = head(split.features[split.train_right[batch]].float())  # (B, D)
        loss = cosine_triplet_loss(anchors, positives, config.margin, config.negatives)
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at epoch {epoch}, batch {number}; "
                            "try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    if embeddings_collapsed(torch.cat([anchors, positives]).detach()):
        raise UserError(f"the head collapsed in epoch {epoch}: every embedding is the same "
                        "point, so the loss sits at the margin; try a lower --lr")
    return total / len(batches)


def embeddings_collapsed(embeddings: torch.Tensor, tolerance: float = 1e-4) -> bool:
    """Whether unit embeddings (N, D) all lie within `tolerance` of their mean: one point."""
    spread = (embeddings - embeddings.mean(dim=0)).norm(dim=1)  # (N,)
    return bool(spread.max() < tolerance)


def check_run_name(name: str) -> None:
    """A run name is one plain folder name: it can never point outside the runs folder."""
    problem = None
    if not name or name in (".", ".."):
        problem = "it names no folder of its own"
    elif "/" in name or "\\" in name:
        problem = "it holds a path separator"
    elif name.startswith("."):
        problem = "it starts with a dot (hidden names are kept for temporary files)"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"it is longer than {MAX_NAME_LENGTH} characters"
    elif not name.isprintable():
        problem = "it holds a control character"
    if problem:
        raise UserError(f"--name {name!r} is not a plain folder name: {problem}")


def main(cache: str | Path, name: str | None = None, data: str | Path | None = None,
         runs_dir: str | Path = DEFAULT_RUNS_DIR, overwrite: bool = False, **options) -> Path:
    """Train a head on `cache`; returns the run folder `runs_dir/name`, which appears only once
    training has finished. An existing run folder is refused unless `overwrite`.
    `options` are TrainConfig's fields."""
    cache = Path(cache)
    name = name or f"{cache.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_run_name(name)
    run = Path(runs_dir) / name
    check_output(run, "run folder", folder=True)
    if (run.exists() or run.is_symlink()) and not overwrite:
        raise UserError(f"run folder {run} exists; pass --overwrite to replace it, or choose "
                        "another --name")
    info = read_info(cache)
    config = TrainConfig(cache=str(cache), name=name, **options)
    if (config.negatives not in NEGATIVES or config.attention not in ATTENTIONS
            or config.assign not in ASSIGN_METHODS):
        raise UserError(f"--negatives takes {NEGATIVES}, --attention takes {ATTENTIONS}, "
                        f"--assign takes {ASSIGN_METHODS}")
    device = resolve_device(config.device)
    logger.info("train %s on %s (%s %s, weights %s) on %s", name, cache, info.backbone,
                info.layer, info.weights_id, device)
    logger.info("config %s", json.dumps(asdict(config)))
    split = load_split(cache, info, Path(data) if data else None, config.val_fraction,
                       config.seed, device)
    if len(split.train_left) < 2:
        raise UserError(f"{len(split.train_left)} training pair(s) left after holding out "
                        f"{len(split.val_truth)} for validation: training needs at least 2; "
                        "lower --val-fraction")
    has_val = len(split.val_truth) > 0
    baseline = frozen_baseline(split, config) if has_val else None
    if baseline:
        logger.info("frozen trunk (pooled, cosine) on %d validation queries:%s",
                    len(split.val_truth), "".join(f"  {k} {v:.3f}" for k, v in baseline.items()))

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    head_config = HeadConfig(feature_shapes=(info.feature_shape,),
                             embedding_dim=config.embedding_dim, pool=config.pool,
                             attention=config.attention)
    head = Head(head_config).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)

    with atomic_output(run, folder=True, overwrite=overwrite) as work:
        history = []
        best = None
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            loss = train_epoch(head, optimizer, split, config, epoch, generator)
            metrics = {}
            if has_val:
                embeddings = embed(head, split.features, split.val_images, config.batch_size)
                if not np.isfinite(embeddings).all():  # the last step can diverge unseen
                    raise UserError(f"the weights diverged in epoch {epoch} (non-finite "
                                    "embeddings); try a lower --lr")
                metrics = evaluate(embeddings, split, config.assign, config.assign_temperature)
            record = {"epoch": epoch, "loss": loss, **metrics,
                      "seconds": time.perf_counter() - started}
            history.append(record)
            with open(work / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            logger.info("epoch %2d  loss %.4f%s  (%.1f s)", epoch, loss,
                        "".join(f"  {k} {metrics[k]:.3f}" for k in metrics), record["seconds"])
            chosen_by = selection_figure(config)
            if best is None or not has_val or metrics[chosen_by] > best[chosen_by]:
                best = record
                save_checkpoint(work / "head.pt", head, cache=asdict(info),
                                train_config=asdict(config), best_epoch=epoch, metrics=metrics,
                                baseline=baseline)
        summary = {"config": asdict(config), "cache": asdict(info), "baseline": baseline,
                   "best": best}
        (work / "config.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(history, baseline, work / "curves.png")
    log_summary(history, baseline, best, config)
    return run


def plot_curves(history: list[dict], baseline: dict | None, path: Path) -> None:
    """Training loss, and validation top-2 per epoch (plain, and assigned where it was run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["loss"] for r in history], marker="o")
    left.set(xlabel="epoch", ylabel="triplet loss", title="training loss")
    if baseline:
        for key, label in (("top2", "head"), ("top2_assigned", "head, assigned")):
            if key in baseline:
                line, = right.plot(epochs, [r[key] for r in history], marker="o", label=label)
                right.axhline(baseline[key], color=line.get_color(), linestyle="--",
                              label=f"frozen trunk{label[4:]}")
        right.set(xlabel="epoch", ylabel="top-2 accuracy", title="validation top-2")
        right.legend()
    else:
        right.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def log_summary(history: list[dict], baseline: dict | None, best: dict,
                config: TrainConfig) -> None:
    columns = [c for c in ("top1", "top2", "mrr", "top1_assigned", "top2_assigned",
                           "mrr_assigned") if c in best]
    names = [c.replace("_assigned", "+a") for c in columns]
    lines = ["epoch   loss    " + "".join(f"{c:>8}" for c in names)]
    if baseline:
        lines.append("frozen  -       " + "".join(f"{baseline[c]:8.3f}" for c in columns))
    for r in history:
        mark = "  <- kept" if r is best else ""
        lines.append(f"{r['epoch']:<7} {r['loss']:<7.4f} "
                     + "".join(f"{r[c]:8.3f}" for c in columns) + mark)
    if "top2_assigned" in columns:
        lines.append(f"+a: after {config.assign} assignment"
                     + (f" at temperature {config.assign_temperature:g}"
                        if config.assign == "sinkhorn" else "")
                     + f"; the kept epoch is the best by {selection_figure(config)}")
    logger.info("summary\n%s", "\n".join(lines))


_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--cache", type=UserPath(), required=True,
              help="Feature cache written by `python -m extract`.")
@click.option("--name", default=None,
              help="Run folder name, a plain folder name [default: <cache>-<time>].")
@click.option("--overwrite", is_flag=True,
              help="Replace the run folder <runs-dir>/<name> if it exists (it is refused "
                   "otherwise).")
@click.option("--data", type=UserPath(), default=None,
              help="Dataset folder [default: the one the cache was built from].")
@click.option("--runs-dir", type=UserPath(), default=DEFAULT_RUNS_DIR)
@click.option("--epochs", type=click.IntRange(min=1), default=_defaults["epochs"])
@click.option("--batch-size", type=click.IntRange(min=2), default=_defaults["batch_size"],
              help="Pairs per batch; each anchor gets batch-size - 1 in-batch negatives.")
@click.option("--lr", type=click.FloatRange(min=0, max=MAX_LR, min_open=True),
              default=_defaults["lr"])
@click.option("--weight-decay", type=click.FloatRange(min=0), default=_defaults["weight_decay"])
@click.option("--margin", type=click.FloatRange(min=0), default=_defaults["margin"])
@click.option("--embedding-dim", type=click.IntRange(min=1), default=_defaults["embedding_dim"])
@click.option("--pool", type=click.IntRange(min=1), default=_defaults["pool"],
              help="Max-pool each feature map to a pool x pool grid.")
@click.option("--attention", type=click.Choice(ATTENTIONS), default=_defaults["attention"])
@click.option("--negatives", type=click.Choice(NEGATIVES), default=_defaults["negatives"],
              help="In-batch negatives: all, the hardest, or the semi-hard ones.")
@click.option("--assign", type=click.Choice(ASSIGN_METHODS), default=_defaults["assign"],
              help="One-to-one assignment that validation also reports and that picks the "
                   "kept epoch; recorded in the exported model as infer's default.")
@click.option("--assign-temperature", type=click.FloatRange(min=0, min_open=True),
              default=_defaults["assign_temperature"], help="Sinkhorn's temperature.")
@click.option("--val-fraction", type=click.FloatRange(min=0, max=1, max_open=True),
              default=_defaults["val_fraction"],
              help="Train pairs held out for validation (0: train on all, keep the last epoch).")
@click.option("--seed", type=int, default=_defaults["seed"])
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default=_defaults["device"])
def cli(**options) -> None:
    """Train the attention / max-pool / FC head with a cosine triplet loss on a feature cache."""
    with user_errors(interrupted="interrupted; no run folder was written (training does not "
                                 "resume: rerun to train again)"):
        run = main(**options)
    click.echo(run)


if __name__ == "__main__":
    cli(prog_name="python -m head.train")
