"""What a training run is given: `TrainConfig`, its check, the head it builds, the run's name,
and the command-line options of the training settings.

`TRAIN_OPTIONS` is the one table of those options: `python -m head.train` offers them
(`training_options`), and `python -m head.sweep` checks every `--param` value with the very
option (type and range) and `check_config` that head.train applies.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from head.loss import LOSSES, NEGATIVES
from head.model import ATTENTIONS, HeadConfig
from infer.scoring import ASSIGN_METHODS, DEFAULT_ASSIGN, DEFAULT_TEMPERATURE
from tll import ByteSize, FiniteFloat, UserError
from tll.files import check_output

DEFAULT_RUNS_DIR = Path("runs")
MAX_NAME_LENGTH = 100
MAX_LR = 1.0  # AdamW moves each weight by about lr a step: beyond 1 nothing is learnt


@dataclass(frozen=True)
class TrainConfig:
    caches: tuple[str, ...]  # one or more (fusion: one branch of the head per cache)
    name: str
    # Measured (README, "Training levers"): with flip views, the source report's head (triplet
    # loss, no features layer, no dropout) scored best on both random-init backbones, 5-fold; the
    # sweep's InfoNCE head tied it on VGG16 and fell behind on ResNet50.
    epochs: int = 10
    patience: int = 0  # stop once the selection figure has not risen for this many epochs; 0: never
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    margin: float = 0.2  # the triplet loss's
    embedding_dim: int = 256
    pool: int = 2
    attention: str = "spatial"
    features_dim: int = 0  # the 1x1 features layer's channels; 0: none
    dropout: float = 0.0  # before the fully connected layer
    loss: str = "triplet"
    negatives: str = "all"  # the triplet loss's
    temperature: float = 0.07  # InfoNCE's
    flip: bool = True  # train on the cache's flipped views too, where it has them
    amp: bool = True  # training steps in bfloat16 autocast on a CPU that has it natively
    assign: str = DEFAULT_ASSIGN
    assign_temperature: float = DEFAULT_TEMPERATURE
    val_fraction: float = 0.1  # used without --folds
    folds: int = 0  # 0: one split of val_fraction; K >= 2: K-fold cross-validation
    split_seed: int = 0  # draws the validation split or the folds
    seed: int = 0  # draws the initialisation and the batch order
    seeds: int = 1  # heads trained, seeds seed .. seed + seeds - 1, kept as one ensemble
    keep_fold_heads: bool = False  # with folds: the folds' heads join the final one(s)
    # the whitened cosine's share w: the run's head is the trained one fused with a PCA
    # whitening of its training images (head.model.Fused), validated as such; 0: the head alone
    whitened_weight: float = 0.0
    device: str = "auto"
    # bytes of train features held in memory on the device, beyond which a cache is streamed
    # (head.stream); None: a share of the memory available. Never changes the figures
    memory_budget: int | None = None


def check_config(config: TrainConfig) -> None:
    if (config.negatives not in NEGATIVES or config.attention not in ATTENTIONS
            or config.assign not in ASSIGN_METHODS or config.loss not in LOSSES):
        raise UserError(f"--negatives takes {NEGATIVES}, --attention takes {ATTENTIONS}, "
                        f"--assign takes {ASSIGN_METHODS}, --loss takes {LOSSES}")
    if not 0 <= config.dropout < 1 or config.features_dim < 0 or not config.temperature > 0:
        raise UserError("--dropout takes [0, 1), --features-dim 0 or more, --temperature "
                        "more than 0")
    for option, value in (("--margin", config.margin), ("--temperature", config.temperature),
                          ("--assign-temperature", config.assign_temperature)):
        if not math.isfinite(value):
            raise UserError(f"{option} {value}: give a finite number")
    if config.folds == 1 or config.folds < 0:
        raise UserError(f"--folds {config.folds}: cross-validation takes at least 2 folds "
                        "(0 for one split of --val-fraction)")
    if config.seeds < 1:
        raise UserError(f"--seeds {config.seeds}: train at least 1 head")
    if config.keep_fold_heads and not config.folds:
        raise UserError("--keep-fold-heads keeps the heads of --folds K: give --folds too")
    if not 0 <= config.whitened_weight < 1:  # NaN too
        raise UserError(f"--whitened-weight {config.whitened_weight}: give the whitened "
                        "cosine's share in [0, 1) (0: the trained head alone)")


def head_config_for(feature_shapes: Sequence[tuple[int, ...]],
                    config: TrainConfig) -> HeadConfig:
    """The head for these features (one branch per cache's feature shape) and this config."""
    return HeadConfig(feature_shapes=tuple(feature_shapes),
                      embedding_dim=config.embedding_dim,
                      pool=config.pool, attention=config.attention,
                      features_dim=config.features_dim, dropout=config.dropout)


def check_run_name(name: str, option: str = "--name") -> None:
    """A run name (or a sweep's study name, `option`) is one plain folder name: it can never
    point outside the runs folder."""
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
        raise UserError(f"{option} {name!r} is not a plain folder name: {problem}")


def new_run(cache: str | Path | list[str | Path], name: str | None, runs_dir: str | Path,
            overwrite: bool, kind: str = "") -> tuple[list[Path], str, Path]:
    """The caches as a list, the run's name (default `<caches>[-kind]-<time>`) and its folder,
    checked before any work: a plain name, a folder that can be written, and one that does not
    exist yet unless `overwrite`."""
    caches = [Path(c) for c in ([cache] if isinstance(cache, str | Path) else cache)]
    if not caches:
        raise UserError("no cache given: pass --cache (repeat it to fuse several)")
    stem = "+".join(c.stem for c in caches) + (f"-{kind}" if kind else "")
    name = name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_run_name(name)
    run = Path(runs_dir) / name
    check_output(run, "run folder", folder=True)
    if (run.exists() or run.is_symlink()) and not overwrite:
        raise UserError(f"run folder {run} exists; pass --overwrite to replace it, or choose "
                        "another --name")
    return caches, name, run


def refuse_val_fraction_with_folds(context: click.Context, options: dict) -> None:
    """For a command with --folds and --val-fraction: both given is a usage error (the folds hold
    out 1/K each), while --val-fraction's default alone is fine."""
    if options["folds"] and context.get_parameter_source("val_fraction") \
            == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--val-fraction and --folds exclude each other: the folds hold "
                               "out 1/K of the pairs each")


# --- the training settings on the command line --------------------------------------------------

_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

# one click option per TrainConfig field the command line sets (all but caches and name), in
# --help order; head.sweep checks each --param value with its option's type
TRAIN_OPTIONS: dict[str, click.Option] = {option.name: option for option in [
    click.Option(["--epochs"], type=click.IntRange(min=1), default=_defaults["epochs"],
                 help="The most epochs trained (fewer with --patience)."),
    click.Option(["--patience"], type=click.IntRange(min=0), default=_defaults["patience"],
                 help="Stop once the validation figure that picks the kept epoch (the k-fold "
                      "mean with --folds) has not risen for this many epochs; the best epoch is "
                      "kept as ever. 0: train every epoch."),
    click.Option(["--batch-size"], type=click.IntRange(min=2), default=_defaults["batch_size"],
                 help="Pairs per batch; each anchor gets batch-size - 1 in-batch negatives."),
    click.Option(["--lr"], type=click.FloatRange(min=0, max=MAX_LR, min_open=True),
                 default=_defaults["lr"]),
    click.Option(["--weight-decay"], type=click.FloatRange(min=0),
                 default=_defaults["weight_decay"]),
    click.Option(["--margin"], type=FiniteFloat(min=0), default=_defaults["margin"]),
    click.Option(["--embedding-dim"], type=click.IntRange(min=1),
                 default=_defaults["embedding_dim"]),
    click.Option(["--pool"], type=click.IntRange(min=1), default=_defaults["pool"],
                 help="Max-pool each feature map to a pool x pool grid."),
    click.Option(["--attention"], type=click.Choice(ATTENTIONS), default=_defaults["attention"]),
    click.Option(["--features-dim"], type=click.IntRange(min=0),
                 default=_defaults["features_dim"],
                 help="Channels of a 1x1 conv + batch norm + ReLU features layer before the "
                      "attention; 0: none."),
    click.Option(["--dropout"], type=click.FloatRange(min=0, max=1, max_open=True),
                 default=_defaults["dropout"], help="Dropout before the fully connected layer."),
    click.Option(["--loss"], type=click.Choice(LOSSES), default=_defaults["loss"],
                 help="Cosine triplet loss, or symmetric InfoNCE over the in-batch pairs."),
    click.Option(["--negatives"], type=click.Choice(NEGATIVES), default=_defaults["negatives"],
                 help="The triplet loss's in-batch negatives: all, the hardest, or the "
                      "semi-hard ones."),
    click.Option(["--temperature"], type=FiniteFloat(min=0, min_open=True),
                 default=_defaults["temperature"], help="InfoNCE's temperature."),
    click.Option(["--flip/--no-flip"], default=_defaults["flip"],
                 help="With a two-view cache (extract's default): draw an image's flipped view "
                      "half the time, and average both at validation and in the exported "
                      "model."),
    click.Option(["--amp/--no-amp"], default=_defaults["amp"],
                 help="Training steps in bfloat16 autocast on a CPU that computes it natively "
                      "(AVX512-BF16, AMX), the maps through the head in bfloat16 too: about "
                      "1.7-2x the epoch speed of float32; validation and the "
                      "exported model stay float32. Elsewhere, or with --no-amp, float32 (TF32 "
                      "matrix products on CUDA)."),
    click.Option(["--assign"], type=click.Choice(ASSIGN_METHODS), default=_defaults["assign"],
                 help="One-to-one assignment that validation also reports and that picks the "
                      "kept epoch; recorded in the exported model as infer's default."),
    click.Option(["--assign-temperature"], type=FiniteFloat(min=0, min_open=True),
                 default=_defaults["assign_temperature"], help="Sinkhorn's temperature."),
    click.Option(["--val-fraction"], type=click.FloatRange(min=0, max=1, max_open=True),
                 default=_defaults["val_fraction"],
                 help="Train pairs held out for validation (0: train on all, keep the last "
                      "epoch). Not with --folds."),
    click.Option(["--folds"], type=click.IntRange(min=0), default=_defaults["folds"],
                 help="K >= 2: K-fold cross-validation (mean and standard error per epoch; the "
                      "final head trained on all pairs for the best number of epochs). 0: one "
                      "split of --val-fraction."),
    click.Option(["--split-seed"], type=int, default=_defaults["split_seed"],
                 help="Draws the validation split or the folds."),
    click.Option(["--seed"], type=int, default=_defaults["seed"],
                 help="Draws the initialisation and the batch order."),
    click.Option(["--seeds"], type=click.IntRange(min=1), default=_defaults["seeds"],
                 help="Heads to train, with seeds --seed, --seed + 1, ...: the run keeps them as "
                      "one ensemble (embeddings concatenated, cosine the mean of theirs). With "
                      "--folds each fold trains as many and validates their ensemble."),
    click.Option(["--keep-fold-heads/--no-keep-fold-heads"],
                 default=_defaults["keep_fold_heads"],
                 help="With --folds K: add the K folds' heads, at the chosen epoch, to the "
                      "final head(s) in the run's ensemble. Its figures cannot be validated: each "
                      "fold head trained on the other folds' validation pairs."),
    click.Option(["--whitened-weight"], type=click.FloatRange(min=0, max=1, max_open=True),
                 default=_defaults["whitened_weight"],
                 help="w > 0: fuse the trained head (or its ensemble) with a PCA whitening of "
                      "the pooled trunk features (head.whiten's, its default components), fitted "
                      "on the "
                      "same training images: the run's cosine is (1 - w) x the head's + w x the "
                      "whitened one. Validation scores the fused model every epoch (each fold "
                      "with its own whitening), so it also picks the kept epoch; the exported "
                      "model holds both. 0: the trained head alone."),
    click.Option(["--device"], type=click.Choice(["auto", "cuda", "cpu"]),
                 default=_defaults["device"]),
    click.Option(["--memory-budget"], type=ByteSize(), default=_defaults["memory_budget"],
                 help="Memory the train images' features may take on the device (e.g. 4GiB, "
                      "500MB); caches beyond it are streamed from the file batch by batch, "
                      "with the same figures [default: 60% of the memory available: RAM, or "
                      "the GPU's free memory]."),
]}


def training_options(command: click.Command) -> click.Command:
    """Gives a click command the training settings' options, after its own (TRAIN_OPTIONS, the
    same option objects)."""
    command.params.extend(TRAIN_OPTIONS.values())
    return command
