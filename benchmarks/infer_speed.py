"""Images/s of the exported ONNX model under ONNX Runtime (CPU) against the same network in
eager torch.

For each backbone a tiny run is made the way users make one: a 121-image subset of the data
(../shared/tll, else extract.synth's; 245 x 200), a cache of it (random float16 feature maps of the
trunk's shape written with CacheWriter: only speed matters here, and it spares running the
trunk), `head.train.main` for one epoch, then `head.export.main` (trunk + head -> model.onnx,
parity-checked). The file is opened with `infer.session.open_session(path, "cpu")`, exactly as
`python -m infer` does; the eager side is `head.export.build_network` under inference_mode.
Both embed the same pre-decoded batch (16 x 3 x 245 x 200); they alternate round by round and
the ratio ONNX / torch is the median of the per-round ratios. Target >= 1.3.
`--tune` adds ONNX Runtime SessionOptions variants (and channels_last eager torch) to the race.

The file also gives the page's maps (cell embeddings, attention) as outputs that `infer` asks
for only when it writes the page. Two more rows price them: the same session asked for every
output ("+ maps"), and the file cut to its embedding alone with `onnx.utils.Extractor` (the
graph of a file without maps, "cut to embedding"): the embedding alone must cost what it costs
there (ratio ~1). ONNX Runtime runs the whole graph whatever outputs are asked, so the maps are
computed either way; their nodes' share of the kernel time, from ONNX Runtime's profiler over
the same batches, is printed too: a figure steadier than img/s on a busy machine.

    python benchmarks/infer_speed.py [--data DIR] [--quick] [--tune]
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
import common
import numpy as np
import onnxruntime as ort
import torch

from extract.backbones import Trunk, TrunkSpec
from extract.cache import CacheInfo, CacheWriter
from head.export import build_network
from head.export import main as export
from head.train import main as train
from infer.session import open_session
from tll.data import DEFAULT_INPUT_SIZE, read_dataset

TARGET = 1.3
BATCHES = {"resnet50": 4, "vgg16": 2}  # batches per measurement (~2-5 s each here)
SUBSET = 121  # images: 50 train pairs, so that a 0.5 validation split holds >= 20 queries


def make_run(backbone: str, data: Path, scratch: Path) -> Path:
    """A run folder with model.onnx for `backbone`, made by head.train and head.export."""
    dataset = read_dataset(data)
    spec = TrunkSpec.resolve(backbone, None, "none")
    trunk = Trunk(spec)
    info = CacheInfo(
        **dataclasses.asdict(spec), feature_shape=trunk.output_shape(),
        dataset=str(dataset.root.resolve()), dataset_fingerprint=dataset.fingerprint(),
        torch_version=str(torch.__version__), torchvision_version="-")
    keys = dataset.keys()
    writer = CacheWriter(scratch / f"{backbone}.h5", keys, dataset.digests(), info)
    try:
        rng = np.random.default_rng(0)
        writer.write(np.arange(len(keys)),
                     rng.random((len(keys), 1, *info.feature_shape), dtype=np.float32))
        cache = writer.finish()
    finally:
        writer.close()
    run = train(cache, name=backbone, data=data, runs_dir=scratch / "runs", epochs=1,
                val_fraction=0.5, device="cpu")
    export(run)
    return run


def onnx_measure(session: ort.InferenceSession, images: np.ndarray, batches: int,
                 outputs: tuple[str, ...] = ("embedding",)):
    def measure() -> float:
        with common.Timer() as timer:
            for _ in range(batches):
                session.run(list(outputs), {"image": images})  # (B, D), ...
        return batches * len(images) / timer.seconds

    return measure


def embedding_only(path: Path, options: ort.SessionOptions | None = None
                   ) -> ort.InferenceSession:
    """A session on the file cut to the nodes its embedding needs: the graph without maps."""
    import onnx

    cut = onnx.utils.Extractor(onnx.load(str(path))).extract_model(["image"], ["embedding"])
    return ort.InferenceSession(cut.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def maps_share(path: Path, images: np.ndarray, batches: int, scratch: Path) -> float:
    """The share of ONNX Runtime's kernel time (its profiler, default optimisations) spent in
    the nodes the file cut to its embedding does not have: what the maps cost a call that asks
    for the embedding alone."""
    import json
    from collections import Counter

    def kernel_times(make: Callable[[ort.SessionOptions], ort.InferenceSession],
                     prefix: str) -> Counter:
        options = ort.SessionOptions()
        options.enable_profiling, options.profile_file_prefix = True, str(scratch / prefix)
        session = make(options)
        for _ in range(batches + 1):
            session.run(["embedding"], {"image": images})
        times = Counter()
        for event in json.loads(Path(session.end_profiling()).read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                times[event["name"].removesuffix("_kernel_time")] += event["dur"]
        return times

    full = kernel_times(lambda o: ort.InferenceSession(
        str(path), o, providers=["CPUExecutionProvider"]), "full")
    cut = kernel_times(lambda o: embedding_only(path, o), "cut")
    return sum(t for node, t in full.items() if node not in cut) / sum(full.values())


def torch_measure(net: torch.nn.Module, images: torch.Tensor, batches: int):
    def measure() -> float:
        with common.Timer() as timer, torch.inference_mode():
            for _ in range(batches):
                net(images)  # (B, D)
        return batches * len(images) / timer.seconds

    return measure


def session_variants(path: Path) -> dict[str, ort.InferenceSession]:
    """SessionOptions worth trying on a small CPU, beside open_session's defaults."""

    def make(configure: Callable[[ort.SessionOptions], None]) -> ort.InferenceSession:
        options = ort.SessionOptions()
        configure(options)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def no_spin(o: ort.SessionOptions) -> None:
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def one_thread(o: ort.SessionOptions) -> None:
        o.intra_op_num_threads = 1

    def extended(o: ort.SessionOptions) -> None:
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED

    return {"onnx no-spin": make(no_spin), "onnx 1 thread": make(one_thread),
            "onnx level EXTENDED": make(extended)}


def bench(backbone: str, data: Path, scratch: Path, batch: int, rounds: int,
          batches: int, tune: bool) -> list[list]:
    with common.Timer() as made:
        run = make_run(backbone, data, scratch)
    session, _ = open_session(run / "model.onnx", "cpu")
    net, _ = build_network(run / "head.pt")
    images = torch.rand(batch, 3, *DEFAULT_INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    outputs = tuple(o.name for o in session.get_outputs())
    measures = {"onnx (open_session)": onnx_measure(session, images.numpy(), batches),
                "onnx + maps": onnx_measure(session, images.numpy(), batches, outputs),
                "onnx cut to embedding": onnx_measure(embedding_only(run / "model.onnx"),
                                                      images.numpy(), batches),
                "torch eager": torch_measure(net, images, batches)}
    if tune:
        for name, variant in session_variants(run / "model.onnx").items():
            measures[name] = onnx_measure(variant, images.numpy(), batches)
        measures["torch channels_last"] = torch_measure(
            build_network(run / "head.pt")[0].to(memory_format=torch.channels_last),
            images.contiguous(memory_format=torch.channels_last), batches)
    click.echo(f"{backbone}: run made and exported in {made.seconds:.0f} s; batch {batch}, "
               f"{batches} batches per measurement, {rounds} rounds")
    for measure in measures.values():  # warm-up
        measure()
    results = common.interleave(measures, rounds, log=click.echo)
    rows = []
    for name, speeds in results.items():
        if name == "torch eager" or name.startswith("torch channels_last"):
            ratio = verdict = ""
        else:
            ratio = common.median([o / t for o, t in zip(speeds, results["torch eager"],
                                                         strict=True)])
            verdict = common.verdict(ratio, TARGET)
        rows.append([backbone, name, common.median(speeds), common.spread(speeds), ratio,
                     verdict])
    cut = results["onnx cut to embedding"]
    for name in ("onnx (open_session)", "onnx + maps"):
        ratio = common.median([o / c for o, c in zip(results[name], cut, strict=True)])
        click.echo(f"{backbone}: {name} / onnx cut to embedding: {ratio:.3f} (median over "
                   "rounds)")
    share = maps_share(run / "model.onnx", images.numpy(), batches, scratch)
    click.echo(f"{backbone}: the maps' nodes take {100 * share:.2f}% of ONNX Runtime's kernel "
               "time on a call for the embedding alone (its profiler)")
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", type=click.Path(path_type=Path, file_okay=False, exists=True),
              default=None, help="Kaggle-layout dataset to take the tiny run's images from "
              "[default: ../shared/tll if present, else a synthetic set; speed does not "
              "depend on it].")
@click.option("--quick", is_flag=True, help="Fewer rounds and batches.")
@click.option("--backbone", "backbones", multiple=True, type=click.Choice(sorted(BATCHES)),
              default=("resnet50", "vgg16"))
@click.option("--batch-size", type=click.IntRange(min=1), default=16)
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="Alternations of the measurements [default: 5, --quick 2].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads [default: torch's own choice].")
@click.option("--tune", is_flag=True,
              help="Also race ONNX Runtime SessionOptions variants and channels_last torch.")
def cli(data: Path | None, quick: bool, backbones: tuple[str, ...], batch_size: int,
        rounds: int | None, threads: int | None, tune: bool) -> None:
    """ONNX Runtime (CPU) images/s vs eager torch, same network and batch (target >= 1.3)."""
    common.set_threads(threads)
    rounds = rounds or (2 if quick else 5)
    click.echo(common.environment())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as scratch:
        scratch = Path(scratch)
        source, label = common.source_dataset(data, scratch, SUBSET)
        data = common.kaggle_subset(source, scratch / "subset", SUBSET)
        click.echo(f"tiny runs trained on {SUBSET} images from: {label}")
        for backbone in backbones:
            batches = 1 if quick else BATCHES[backbone]
            rows += bench(backbone, data, scratch, batch_size, rounds, batches, tune)
    click.echo()
    click.echo(common.table(["backbone", "runtime", "img/s", "(range)", "ratio vs eager",
                             f"target >= {TARGET}"], rows))
    click.echo("ratio: median over rounds of ONNX img/s / eager torch img/s (same batch, "
               "same process)")


if __name__ == "__main__":
    cli()
