"""Images/s of the whole extract pipeline against the bare trunk forward pass, for each
backbone of the curated list (`python -m extract --list-backbones`).

The pipeline is `extract.extract_features.main` on a small Kaggle-layout subset (`IMAGES`, each
backbone at its own default input size and cut): reading the dataset, building the trunk,
decoding in DataLoader workers, the forward pass, writing the HDF5 cache. The baseline is
what the pipeline would do with free decoding and writing: `Trunk(spec)` on pre-decoded random
tensors of the same batch size, channels_last, under inference_mode. The two alternate round
by round; the ratio pipeline / trunk is the median of the per-round ratios. Target >= 0.9.
Both run in float32 (`--no-amp`).

On a CPU that computes bfloat16 natively (`tll.device.native_bfloat16`) the same rounds also
run the pipeline as the command does by default there (`--amp`: bfloat16 autocast), and the
speedup bfloat16 / float32 pipeline is the median of the per-round ratios. Target >= 1.7 (the
bare trunk gives about 1.9x on the 2-core AVX512-BF16 machine). Elsewhere that column is n/a.

    python benchmarks/extract_speed.py [--data DIR] [--quick]
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import click
import common
import torch

from extract.backbones import CURATED, Trunk, TrunkSpec
from extract.extract_features import main as extract
from tll.device import native_bfloat16

TARGET = 0.9
BFLOAT16_TARGET = 1.7
# about 10 s of forward passes per measurement on the 2-core CPU (the subset needs >= 23)
IMAGES = {"vgg16": 64, "resnet50": 192, "densenet201": 128, "convnext_tiny": 128,
          "timm:vit_base_patch16_clip_quickgelu_224.openai": 48,
          "timm:vit_small_patch14_dinov2.lvd142m": 24}
QUICK_IMAGES = dict.fromkeys(IMAGES, 24)
assert list(IMAGES) == [c.backbone for c in CURATED]


def pipeline_measure(backbone: str, data: Path, scratch: Path, images: int, batch_size: int,
                     workers: int, amp: bool = False):
    """A measure for `common.interleave`: one whole extraction into a fresh file -> images/s;
    `amp`: in bfloat16 autocast (where the CPU has it)."""
    runs = itertools.count()

    def measure() -> float:
        out = scratch / f"{backbone}-{next(runs)}.h5"
        with common.Timer() as timer:
            extract(backbone, data, out=out, weights="none", device="cpu",
                    batch_size=batch_size, workers=workers, amp=amp, hflip=False,
                    overwrite=True)
        out.unlink()
        return images / timer.seconds

    return measure


def trunk_measure(trunk: Trunk, images: int, batch_size: int):
    """A measure: the bare forward pass over as many pre-decoded images, same batches."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(min(batch_size, images - i), 3, *trunk.spec.input_size,
                          generator=generator).contiguous(memory_format=torch.channels_last)
               for i in range(0, images, batch_size)]  # each (B, 3, H, W)

    def measure() -> float:
        with common.Timer() as timer, torch.inference_mode():
            for batch in batches:
                trunk(batch)  # (B, C, h, w) or (B, D)
        return images / timer.seconds

    return measure


def bench(backbone: str, source: Path, scratch: Path, images: int, rounds: int,
          batch_size: int, workers: int) -> list:
    data = common.kaggle_subset(source, scratch / f"subset-{backbone}", images)
    spec = TrunkSpec.resolve(backbone, None, "none")
    with common.Timer() as build:
        trunk = Trunk(spec)  # the pipeline builds one too, inside its timing
    trunk.to(memory_format=torch.channels_last)
    with torch.inference_mode():  # warm both paths up once (allocator, oneDNN kernels)
        trunk(torch.rand(2, 3, *spec.input_size).contiguous(memory_format=torch.channels_last))
    click.echo(f"{backbone}: {images} images at {spec.input_size[0]} x {spec.input_size[1]}, "
               f"batch {batch_size}, {workers} decode workers, {rounds} rounds")
    measures = {
        "pipeline": pipeline_measure(backbone, data, scratch, images, batch_size, workers),
        "trunk": trunk_measure(trunk, images, batch_size),
    }
    bfloat16 = native_bfloat16()
    if bfloat16:
        measures["pipeline bfloat16"] = pipeline_measure(backbone, data, scratch, images,
                                                         batch_size, workers, amp=True)
    results = common.interleave(measures, rounds, log=click.echo)
    ratios = [p / t for p, t in zip(results["pipeline"], results["trunk"], strict=True)]
    pipeline, trunk_speed = common.median(results["pipeline"]), common.median(results["trunk"])
    # where the pipeline's extra time goes, in seconds for the whole run
    extra = images / pipeline - images / trunk_speed
    row = [backbone, images, pipeline, common.spread(results["pipeline"]), trunk_speed,
           common.spread(results["trunk"]), extra, build.seconds, common.median(ratios),
           common.verdict(common.median(ratios), TARGET)]
    if not bfloat16:
        return [*row, "n/a", "n/a", "n/a (no native bfloat16)"]
    speedups = [b / p for b, p in zip(results["pipeline bfloat16"], results["pipeline"],
                                      strict=True)]
    return [*row, common.median(results["pipeline bfloat16"]), common.median(speedups),
            common.verdict(common.median(speedups), BFLOAT16_TARGET)]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", type=click.Path(path_type=Path, file_okay=False, exists=True),
              default=None, help="Kaggle-layout dataset to take images from "
              "[default: ../shared/tll if present, else a synthetic set].")
@click.option("--quick", is_flag=True, help="Fewer images and rounds (a smoke run).")
@click.option("--backbone", "backbones", multiple=True, type=click.Choice(list(IMAGES)),
              default=tuple(IMAGES), help="Repeat for several [default: the curated list].")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="Alternations of the two measurements [default: 3, --quick 2].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32,
              help="The extract command's default.")
@click.option("--workers", type=click.IntRange(min=0), default=0,
              help="DataLoader decode processes (the extract command's default on a CPU).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads [default: torch's own choice].")
def cli(data: Path | None, quick: bool, backbones: tuple[str, ...], rounds: int | None,
        batch_size: int, workers: int, threads: int | None) -> None:
    """Extract pipeline images/s vs the bare trunk forward pass (target ratio >= 0.9), and in
    bfloat16 vs float32 where the CPU has bfloat16 (target >= 1.7)."""
    common.set_threads(threads)
    counts = QUICK_IMAGES if quick else IMAGES
    rounds = rounds or (2 if quick else 3)
    click.echo(common.environment())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as scratch:
        scratch = Path(scratch)
        source, label = common.source_dataset(data, scratch, max(counts.values()))
        click.echo(f"images from: {label}")
        for backbone in backbones:
            rows.append(bench(backbone, source, scratch, counts[backbone], rounds, batch_size,
                              workers))
    click.echo()
    click.echo(common.table(
        ["backbone", "images", "pipeline img/s", "(range)", "trunk img/s", "(range)",
         "extra s", "trunk build s", "ratio", f"target >= {TARGET}", "bfloat16 img/s",
         "bfloat16 speedup", f"target >= {BFLOAT16_TARGET}"], rows))
    click.echo("ratio: median over rounds of pipeline img/s / trunk img/s; extra s: the "
               "pipeline's time beyond the bare forward passes over the whole run (trunk build "
               "s is the part of it spent building the trunk, timed once); bfloat16 speedup: "
               "median over rounds of the pipeline's img/s in bfloat16 autocast (--amp) / in "
               "float32")


if __name__ == "__main__":
    cli()
