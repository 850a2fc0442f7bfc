"""A prepared GPU check: every CUDA path of the project run once, timed, pass or fail per check.

GPU machines are at hand only now and then, for a few minutes, so this is one command that needs
nothing but the checkout (`benchmarks/gpu_check.sh` puts it on PYTHONPATH; no install step) and
finishes in a few minutes. It writes a synthetic set with `extract.synth` into a temporary
folder (or a fresh folder inside --workdir) and, for each backbone (`--weights none`), calls the
stages' own `main(...)`:

- extract: images/s of `extract.extract_features.main` with autocast (`--amp`: float16 on CUDA,
  bfloat16 on a CPU that has it natively) on and off, against the bare trunk's forward pass on
  the same device, same batches (channels_last, inference_mode, autocast to match), and on CUDA
  with autocast and each block's device-to-host copy made blocking again (the pipeline before
  it overlapped the copy with the next block), interleaved round by round; the target
  (pipeline / trunk >= 0.8) is reported, never failed. Every cache must be whole and finite,
  record the precision it was computed in, and refuse a rerun in the other precision.
- autocast agreement: the autocast cache against the float32 one, cosine similarity of each
  image's flattened feature map; the least of them must reach FP16_MIN_COSINE.
- decode workers: the command's default (on CUDA: up to 8 DataLoader workers, pinned memory,
  the usable CPUs (sched_getaffinity) shared) against the other setting (inline on CUDA, 2
  workers on a CPU), which must agree to WORKERS_MIN_COSINE.
- head.train on the default cache: seconds per epoch from the run's metrics.jsonl; on CUDA the
  peak GPU memory must hold the train features (head.train keeps them on the device), float32
  matrix products must be allowed TF32, and one more `train_epoch` under
  `torch.cuda.set_sync_debug_mode("warn")` must wait for the GPU fewer times than it has
  batches (the loss is read once per epoch, not per step).
- head.export of that run: it checks its own parity against ONNX Runtime on the CPU and raises
  on a mismatch.
- infer with `--device auto`: the ONNX Runtime provider that runs, and a valid submission.
- torchrun: `torchrun --standalone --nproc-per-node 1 -m extract` (a subprocess: NCCL on CUDA,
  gloo on a CPU) with the default cache's settings, against that cache: the backend it used,
  and each image's map within TORCHRUN_MIN_COSINE (byte-identical is reported, not required).

One table, then exit status 1 if any check failed (a slow figure is not a failure). With
`--device cpu --quick` the same checks run on a small set at a small input size; the autocast
ones are n/a there unless the CPU computes bfloat16 natively. tests/test_gpu_check.py runs that.

    PYTHONPATH=. bash benchmarks/gpu_check.sh [--device cpu --quick] [--workdir DIR]
"""

from __future__ import annotations

import csv
import importlib.metadata
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import click
import common  # sets TQDM_DISABLE: before the project's modules import tqdm
import numpy as np
import onnxruntime as ort
import torch

import tll
from extract import extract_features as extract_module
from extract.backbones import Trunk, TrunkSpec
from extract.cache import CacheError, read_features, read_info, read_keys
from extract.extract_features import default_workers
from extract.extract_features import main as extract_features
from extract.synth import main as make_synthetic
from head.config import TrainConfig
from head.export import PARITY_TOLERANCE
from head.export import main as export
from head.folds import prepare
from head.train import Trainer, train_epoch
from head.train import main as train
from infer.predict import main as predict
from infer.session import open_session
from tll import setup_logging
from tll.data import (
    CANDIDATE_COLUMNS,
    DEFAULT_INPUT_SIZE,
    Dataset,
    Query,
    image_id,
    read_dataset,
)
from tll.device import compute_precision

BACKBONES = ("resnet50", "vgg16")
BATCH_SIZE = 32  # the extract command's default; the bare trunk gets the same batches
EXTRACT_TARGET = 0.8  # pipeline img/s / bare trunk img/s
# Random-init feature maps of two *different* synthetic images reach a cosine of 0.996
# (resnet50 layer4, 245 x 200), so 0.99 would not tell a wrong row from the right one; a pure
# float16 forward pass on the CPU stays above 0.99999 against float32, a bfloat16 autocast one
# above 0.9999.
FP16_MIN_COSINE = 0.999
# Same arithmetic, other loading path: a copy that raced its pinned buffer, or a batch landing on
# the wrong rows, drops far below this; only the order of float sums may differ.
WORKERS_MIN_COSINE = 0.99999
CPU_WORKERS = 2  # the workers check's setting on a CPU, where the command decodes inline
# The same blocks through the same trunk in another process: only cuDNN's choice of algorithm
# may differ, and a block landing on the wrong rows drops far below this.
TORCHRUN_MIN_COSINE = WORKERS_MIN_COSINE
TORCHRUN_TIMEOUT = 600  # seconds: a process group that hangs fails the check, not the script
# what the stages import beyond torch; onnxscript is torch.onnx.export(dynamo=True)'s own need
PACKAGES = ("torchvision", "h5py", "scikit-learn", "scipy", "matplotlib", "onnx", "onnxscript")


@dataclass(frozen=True)
class Sizes:
    pairs: int
    queries: int
    input_size: tuple[int, int]  # (H, W) fed to the trunk
    val_fraction: float  # must hold out >= 20 pairs: a validation query needs 20 candidates
    rounds: int  # of interleaved extract timing
    epochs: int


FULL = Sizes(pairs=140, queries=20, input_size=DEFAULT_INPUT_SIZE, val_fraction=0.2, rounds=3,
             epochs=5)  # 320 images, 28 validation queries
QUICK = Sizes(pairs=24, queries=20, input_size=(64, 64), val_fraction=0.85, rounds=1,
              epochs=2)  # 88 images, 20 validation queries

PASS, FAIL, NOT_APPLICABLE, NOT_RUN = "pass", "FAIL", "n/a on cpu", "not run"
NO_AUTOCAST = "n/a: float32 only here"


@dataclass
class Figure:
    label: str
    value: object
    target: str = ""
    verdict: str = ""  # met / MISSED for speed, pass / FAIL for a tolerance


@dataclass
class Outcome:
    status: str
    figures: list[Figure] = field(default_factory=list)
    note: str = ""  # why it failed or did not run


class NotRun(Exception):
    """A check cannot run: the earlier check it builds on failed."""


@dataclass
class Setup:
    """What every check reads, and the files earlier checks leave for later ones."""

    device: torch.device
    sizes: Sizes
    dataset: Dataset  # the synthetic set
    work: Path
    fp16_min_cosine: float
    workers_min_cosine: float
    caches: dict[tuple[str, bool], Path] = field(default_factory=dict)  # (backbone, autocast)
    runs: dict[str, Path] = field(default_factory=dict)  # backbone -> head.train's run folder
    models: dict[str, Path] = field(default_factory=dict)  # backbone -> model.onnx

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_precision(self) -> str:
        """What the extract command computes in here by default (--amp)."""
        return compute_precision(self.device, amp=True)

    @property
    def autocasts(self) -> tuple[bool, ...]:
        """The --amp settings that differ here: with and without autocast, or only without."""
        return (True, False) if self.amp_precision != "float32" else (False,)

    @property
    def data(self) -> Path:
        return self.dataset.root

    @property
    def images(self) -> int:
        return len(self.dataset.keys())

    def default_cache(self, backbone: str) -> Path:
        """The cache the extract command writes by default here (autocast where it has one)."""
        return needs(self.caches, (backbone, self.autocasts[0]), f"extract {backbone}")


def needs(artefacts: dict, key, check: str) -> Path:
    """The file an earlier check left under `key`; NotRun if that check did not leave it."""
    if key not in artefacts:
        raise NotRun(f"needs {check}")
    return artefacts[key]


def judged(figures: list[Figure], problems: Sequence[str] = ()) -> Outcome:
    """PASS unless there is a problem or a figure out of its tolerance (which its own row
    shows, so only the problems become the note)."""
    failed = bool(problems) or any(f.verdict == FAIL for f in figures)
    return Outcome(FAIL if failed else PASS, figures, "; ".join(problems))


def at_least(label: str, value: float, bound: float) -> Figure:
    """A figure with a tolerance, shown to 6 digits: a cosine's 0.999999 is not 1."""
    return Figure(label, f"{value:.6g}", f">= {bound:g}", PASS if value >= bound else FAIL)


# --- the checks: each a function of the setup and a backbone, returning an Outcome ---------------

def checks_for(backbones: tuple[str, ...],
               stop_after: str) -> list[tuple[str, Callable[[Setup], Outcome]]]:
    """The checks in the order they run: for each backbone, STEPS up to `stop_after`. Later
    steps use what earlier ones leave in the setup (caches -> runs -> models), so a failure
    upstream marks its dependants as not run."""
    steps = list(STEPS)[:list(STEPS).index(stop_after) + 1]
    return [(f"{step} {backbone}", partial(STEPS[step], backbone=backbone))
            for backbone in backbones for step in steps]


def check_extract(setup: Setup, backbone: str) -> Outcome:
    trunk = Trunk(TrunkSpec.resolve(backbone, None, "none")).to(
        setup.device, memory_format=torch.channels_last)
    batches = random_batches(setup)
    autocasts = setup.autocasts
    measures = {}
    for autocast in autocasts:
        measures[f"pipeline {on_off(autocast)}"] = pipeline_measure(setup, backbone, autocast)
        precision = setup.amp_precision if autocast else "float32"
        measures[f"trunk {on_off(autocast)}"] = trunk_measure(trunk, batches, precision)
    if setup.on_cuda:
        measures["pipeline on, blocking copy"] = blocking_copy(
            pipeline_measure(setup, backbone, True, "blocking"))
    results = common.interleave(measures, setup.sizes.rounds, log=progress)
    figures = [Figure("autocast (--amp)", setup.amp_precision if len(autocasts) > 1
                      else NO_AUTOCAST)]
    for autocast in autocasts:
        pipeline = results[f"pipeline {on_off(autocast)}"]
        bare = results[f"trunk {on_off(autocast)}"]
        ratio = common.median([p / t for p, t in zip(pipeline, bare, strict=True)])
        figures += [
            Figure(f"pipeline img/s, autocast {on_off(autocast)}", common.median(pipeline)),
            Figure(f"bare trunk img/s, autocast {on_off(autocast)}", common.median(bare)),
            # fixed costs (building the trunk, starting workers, the file) over the whole run
            Figure("  pipeline's extra s", setup.images / common.median(pipeline)
                   - setup.images / common.median(bare)),
            Figure("  pipeline / trunk", ratio, f">= {EXTRACT_TARGET}",
                   common.verdict(ratio, EXTRACT_TARGET)),
        ]
    if setup.on_cuda:
        blocking = results["pipeline on, blocking copy"]
        figures.append(Figure("  overlapped copy / blocking copy, autocast on", common.median(
            [p / b for p, b in zip(results["pipeline on"], blocking, strict=True)])))
    problems = [p for autocast in autocasts
                for p in cache_problems(setup.caches[backbone, autocast], setup.images)]
    problems += precision_problems(setup, backbone)
    return judged(figures, problems)


def precision_problems(setup: Setup, backbone: str) -> list[str]:
    """What is wrong with how the caches record their precision: each must name its own, and
    a rerun of the default cache in the other precision must be refused, never mix rows."""
    problems = []
    for autocast in setup.autocasts:
        expected = setup.amp_precision if autocast else "float32"
        if (recorded := read_info(setup.caches[backbone, autocast]).precision) != expected:
            problems.append(f"a cache computed in {expected} records {recorded}")
    if len(setup.autocasts) == 1:
        return problems
    default = setup.default_cache(backbone)
    try:
        extract_features(backbone, setup.data, out=default, weights="none",
                         input_size=setup.sizes.input_size, device=setup.device.type,
                         batch_size=BATCH_SIZE, amp=False)
        problems.append(f"a rerun with --no-amp over the {setup.amp_precision} cache went through")
    except CacheError as error:
        if "precision" not in str(error):
            problems.append(f"a rerun with --no-amp was refused for another reason: {error}")
    return problems


def check_autocast(setup: Setup, backbone: str) -> Outcome:
    if len(setup.autocasts) == 1:
        return Outcome(NOT_APPLICABLE if not setup.on_cuda else NO_AUTOCAST)
    reference = cached_maps(needs(setup.caches, (backbone, False), f"extract {backbone}"))
    autocast = cached_maps(needs(setup.caches, (backbone, True), f"extract {backbone}"))
    return judged([
        at_least(f"least cosine, {setup.amp_precision} autocast vs float32",
                 row_cosines(autocast, reference).min(), setup.fp16_min_cosine),
        # what a wrong row would score: the threshold must lie above it to mean anything
        Figure("  control: most similar neighbouring images",
               row_cosines(reference, np.roll(reference, 1, axis=0)).max(),
               f"< {setup.fp16_min_cosine}"),
    ])


def check_workers(setup: Setup, backbone: str) -> Outcome:
    default = setup.default_cache(backbone)
    workers = 0 if setup.on_cuda else CPU_WORKERS
    other = extract_features(backbone, setup.data, out=setup.work / "caches" /
                             f"{backbone}-{workers}-workers.h5", weights="none",
                             input_size=setup.sizes.input_size, device=setup.device.type,
                             batch_size=BATCH_SIZE, workers=workers, hflip=False)
    default_label = "up to 8 workers, pinned" if setup.on_cuda else "inline"
    return judged([
        Figure("pinned memory", "yes" if setup.on_cuda else NOT_APPLICABLE),
        Figure("default workers (CPUs this process may use, of the machine's)",
               f"{default_workers(setup.device)} ({len(os.sched_getaffinity(0))} of "
               f"{os.cpu_count()})"),
        at_least(f"least cosine, {workers} workers vs default ({default_label})",
                 row_cosines(cached_maps(other), cached_maps(default)).min(),
                 setup.workers_min_cosine),
    ], cache_problems(other, setup.images))


def check_train(setup: Setup, backbone: str) -> Outcome:
    cache = setup.default_cache(backbone)
    if setup.on_cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
        held_before = torch.cuda.memory_allocated(setup.device)
    run = train(cache, name=f"{backbone}-{setup.device.type}", data=setup.data,
                runs_dir=setup.work / "runs", epochs=setup.sizes.epochs,
                val_fraction=setup.sizes.val_fraction, device=setup.device.type)
    setup.runs[backbone] = run
    seconds = [json.loads(line)["seconds"]
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    figures = [Figure("epoch 1 s (warm-up)", seconds[0])]
    if len(seconds) > 1:
        figures.append(Figure("s/epoch after it (median)", common.median(seconds[1:])))
    if not setup.on_cuda:
        return judged(figures + [Figure("peak GPU memory", NOT_APPLICABLE)])
    train_images = sum(key.startswith("train/") for key in setup.dataset.keys())
    features_mib = train_images * math.prod(read_info(cache).feature_shape) * 2 / 2**20  # fp16
    peak_mib = (torch.cuda.max_memory_allocated(setup.device) - held_before) / 2**20
    tf32 = torch.backends.cuda.matmul.allow_tf32  # set by head.train, for the process
    syncs, batches = epoch_syncs(cache, setup)
    return judged(figures + [
        at_least("peak GPU memory MiB (holds the train features)", peak_mib,
                 round(features_mib, 1)),
        Figure("float32 matmuls may use TF32", tf32, "True", PASS if tf32 else FAIL),
        Figure("device syncs in one epoch", syncs, f"< {batches} (its batches)",
               PASS if syncs < batches else FAIL)])


def epoch_syncs(cache: Path, setup: Setup) -> tuple[int, int]:
    """(how many times one `train_epoch` waits for the GPU, as
    `torch.cuda.set_sync_debug_mode("warn")` counts them, how many batches it has). Batches of
    8 make many steps (14 on the full set): a wait per step shows above the few an epoch takes
    in all (the shuffled order to the device, the losses and the collapse test back)."""
    config = TrainConfig(caches=(str(cache),), name="syncs", val_fraction=setup.sizes.val_fraction,
                         batch_size=8, device="cuda")
    prepared = prepare([cache], config, setup.data, setup.device)
    trainer = Trainer(prepared.folds[0], prepared.head_config(config), config, progress=False)
    trainer.epoch(1)  # untimed, unwatched: cuBLAS and cuDNN set themselves up
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_epoch(trainer.head, trainer.optimizer, trainer.fold, config, 2,
                        trainer.generator, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    batches = sum(len(batch) > 1 for batch in torch.arange(len(trainer.fold.train_left))
                  .split(config.batch_size))
    return sum("synchroniz" in str(w.message) for w in caught), batches


def check_export(setup: Setup, backbone: str) -> Outcome:
    run = needs(setup.runs, backbone, f"head.train {backbone}")
    with common.Timer() as timer:  # raises if ONNX Runtime disagrees with torch
        setup.models[backbone] = export(run, out=setup.work / "models" / f"{backbone}.onnx")
    return judged([Figure("export and parity check s", timer.seconds,
                          f"parity <= {PARITY_TOLERANCE:.0e}", PASS)])


def check_infer(setup: Setup, backbone: str) -> Outcome:
    model = needs(setup.models, backbone, f"head.export {backbone}")
    # the session predict opens: same file, same device, so the same provider
    provider = open_session(model, "auto")[0].get_providers()[0]
    with common.Timer() as timer:
        submission = predict(onnx=model, data=setup.data, split="test", device="auto",
                             out=setup.work / f"submission-{backbone}.csv")
    queries = setup.dataset.test_queries
    return judged([Figure("provider (--device auto)", provider),
                   Figure(f"s for {len(queries)} queries", timer.seconds)],
                  submission_problems(submission, queries))


def check_torchrun(setup: Setup, backbone: str) -> Outcome:
    single = setup.default_cache(backbone)
    out = setup.work / "caches" / f"{backbone}-torchrun.h5"
    project = str(Path(tll.__file__).resolve().parents[1])  # the checkout this script runs
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "1", "-m", "extract", "--backbone", backbone,
               "--weights", "none", "--data", str(setup.data), "--out", str(out),
               "--input-size", *map(str, setup.sizes.input_size), "--device", setup.device.type,
               "--batch-size", str(BATCH_SIZE), "--no-hflip"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [project, *filter(None, [os.environ.get("PYTHONPATH")])])}
    # a session of its own: on a timeout the launcher and its worker go together
    with common.Timer() as timer, subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True) as launcher:
        try:
            log = launcher.communicate(timeout=TORCHRUN_TIMEOUT)[1]
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            raise
    if launcher.returncode != 0:
        errors = [line for line in log.splitlines() if line.startswith("Error:")]
        return Outcome(FAIL, note=f"torchrun exited {launcher.returncode}: "
                                  f"{errors[0] if errors else log[-500:]}")
    backend = re.search(r"dealt out to 1 process \((\w+)\)", log)
    expected = "nccl" if setup.on_cuda else "gloo"
    problems = cache_problems(out, setup.images)
    if not backend or backend[1] != expected:
        problems.append(f"the log does not say it ran on {expected}")
    if read_keys(out) != read_keys(single):
        return judged([], problems + ["its rows are not the single-process cache's"])
    maps, reference = cached_maps(out), cached_maps(single)
    return judged([
        Figure("backend", backend[1] if backend else "?"),
        Figure("s, launcher and extraction", timer.seconds),
        Figure("byte-identical to the single-process cache",
               "yes" if maps.tobytes() == reference.tobytes() else "no"),
        at_least("least cosine, torchrun vs single process",
                 row_cosines(maps, reference).min(), TORCHRUN_MIN_COSINE),
    ], problems)


STEPS: dict[str, Callable[..., Outcome]] = {
    "extract": check_extract, "autocast agreement": check_autocast,
    "decode workers": check_workers,
    "head.train": check_train, "head.export": check_export, "infer": check_infer,
    "torchrun": check_torchrun,
}


# --- measuring and reading back ------------------------------------------------------------------

def on_off(autocast: bool) -> str:
    return "on" if autocast else "off"


def pipeline_measure(setup: Setup, backbone: str, autocast: bool,
                     variant: str = "") -> Callable[[], float]:
    """A measure for `common.interleave`: one whole extraction into a fresh file -> images/s.
    The last file written stays in `setup.caches` for the checks that follow (a `variant`'s
    only in its own folder)."""
    runs = itertools.count()

    def measure() -> float:
        out = (setup.work / "caches" / variant
               / f"{backbone}-autocast-{on_off(autocast)}-{next(runs)}.h5")
        with common.Timer() as timer:
            extract_features(backbone, setup.data, out=out, weights="none",
                             input_size=setup.sizes.input_size, device=setup.device.type,
                             batch_size=BATCH_SIZE, amp=autocast, hflip=False)
        if not variant:
            setup.caches[backbone, autocast] = out
        return setup.images / timer.seconds

    return measure


def blocking_copy(measure: Callable[[], float]) -> Callable[[], float]:
    """`measure` run with each block's features copied to the host before the next block
    starts, as the pipeline did before it overlapped the two."""

    def blocking(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], None]:
        return [tensor.cpu() for tensor in tensors], None

    def measured() -> float:
        overlapped = extract_module._to_host
        extract_module._to_host = blocking
        try:
            return measure()
        finally:
            extract_module._to_host = overlapped

    return measured


def random_batches(setup: Setup) -> list[torch.Tensor]:
    """As many pre-decoded images as the dataset holds, in the pipeline's batches, on the
    device, channels_last: each (B, 3, H, W)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(min(BATCH_SIZE, setup.images - start), 3, *setup.sizes.input_size,
                       generator=generator).to(setup.device)
            .contiguous(memory_format=torch.channels_last)
            for start in range(0, setup.images, BATCH_SIZE)]


def trunk_measure(trunk: Trunk, batches: list[torch.Tensor],
                  precision: str) -> Callable[[], float]:
    """A measure: the bare forward pass over the batches in `precision` (autocast unless
    float32) -> images/s, waiting for the device."""
    device = batches[0].device

    def forward_all(batches: list[torch.Tensor]) -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=getattr(torch, precision),
                                                    enabled=precision != "float32"):
            for batch in batches:
                trunk(batch)  # (B, C, h, w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    forward_all(batches[:1])  # untimed: CUDA context, cuDNN's kernels for this precision

    def measure() -> float:
        with common.Timer() as timer:
            forward_all(batches)
        return sum(len(b) for b in batches) / timer.seconds

    return measure


def cached_maps(cache: Path) -> np.ndarray:
    """Every feature map of a cache, (N, C, h, w) float16, in row order."""
    return read_features(cache, read_keys(cache))


def cache_problems(cache: Path, images: int) -> list[str]:
    maps = cached_maps(cache)
    problems = [] if len(maps) == images else [f"{cache.name} holds {len(maps)} of {images} images"]
    if not np.isfinite(maps).all():  # float16 overflows to inf past 65504
        problems.append(f"{cache.name} holds non-finite features")
    return problems


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) cosine similarity of a[i] and b[i], each flattened, in float64."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def submission_problems(path: Path, queries: list[Query]) -> list[str]:
    """What makes `path` an invalid submission for `queries`: header left,c0..c19, one row per
    query in order, 20 finite scores each."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    problems = [] if rows[:1] == [CANDIDATE_COLUMNS] else [f"header {rows[:1]}"]
    if [row[0] for row in rows[1:]] != [image_id(q.left) for q in queries]:
        problems.append("the rows are not one per query, in order")
    for number, row in enumerate(rows[1:], start=2):
        try:
            scores = np.array(row[1:], dtype=np.float64)
        except ValueError:
            scores = np.array([np.nan])
        if len(scores) != len(CANDIDATE_COLUMNS) - 1 or not np.isfinite(scores).all():
            problems.append(f"line {number} does not hold 20 finite scores")
            break
    return problems


# --- running and reporting -----------------------------------------------------------------------

STARTED = time.perf_counter()  # once the libraries are imported


def progress(message: str) -> None:
    click.echo(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", err=True)


def run_checks(checks: list[tuple[str, Callable[[Setup], Outcome]]],
               setup: Setup) -> list[tuple[str, Outcome]]:
    """Every check, whatever happened to the ones before: one run shows every broken path."""
    results = []
    for name, check in checks:
        progress(name)
        try:
            outcome = check(setup)
        except NotRun as reason:
            outcome = Outcome(NOT_RUN, note=str(reason))
        except Exception as error:  # a failed check, not a failed script: the others still run
            traceback.print_exc()
            outcome = Outcome(FAIL, note=f"{type(error).__name__}: {error}")
        results.append((name, outcome))
    return results


def header(device: torch.device) -> list[str]:
    if device.type == "cuda":
        gpu = (f"GPU {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
               f"cuDNN {torch.backends.cudnn.version()} (at the end, float32 convolutions may "
               f"use TF32: {torch.backends.cudnn.allow_tf32}, matmuls: "
               f"{torch.backends.cuda.matmul.allow_tf32})")
    else:
        gpu = "no GPU used: --device cpu"
    return [common.environment(), gpu,
            f"onnxruntime providers built in: {', '.join(ort.get_available_providers())}",
            "packages: " + ", ".join(f"{name} {installed_version(name)}" for name in PACKAGES),
            f"project from {Path(tll.__file__).resolve().parents[1]}"]


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "MISSING"



def summary(results: list[tuple[str, Outcome]]) -> str:
    rows = []
    for name, outcome in results:
        rows.append([name, "", "", outcome.status])
        rows += [[f"  {f.label}", f.value, f.target, f.verdict] for f in outcome.figures]
        if outcome.note:
            rows.append([f"  {outcome.note}", "", "", ""])
    counts = {status: sum(o.status == status for _, o in results)
              for status in (PASS, FAIL, NOT_APPLICABLE, NOT_RUN)}
    return (common.table(["check / figure", "value", "target", "result"], rows) + "\n"
            + ", ".join(f"{n} {status}" for status, n in counts.items() if n)
            + f"; {time.perf_counter() - STARTED:.0f} s after the imports")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda",
              help="Where extract and head.train run (infer always takes --device auto).")
@click.option("--quick", is_flag=True,
              help=f"{2 * (QUICK.pairs + QUICK.queries)} images at {QUICK.input_size[0]} x "
                   f"{QUICK.input_size[1]}, {QUICK.rounds} timing round, {QUICK.epochs} epochs "
                   f"[default: {2 * (FULL.pairs + FULL.queries)} images at "
                   f"{FULL.input_size[0]} x {FULL.input_size[1]}, {FULL.rounds} rounds, "
                   f"{FULL.epochs} epochs].")
@click.option("--backbone", "backbones", multiple=True, type=click.Choice(BACKBONES),
              default=BACKBONES, help="Repeat for several.")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep everything in a fresh folder inside DIR [default: a temporary folder, "
                   "deleted at the end].")
@click.option("--fp16-min-cosine", type=float, default=FP16_MIN_COSINE,
              help="Least cosine of each image's autocast (float16 or bfloat16) map to its "
                   "float32 one.")
@click.option("--workers-min-cosine", type=float, default=WORKERS_MIN_COSINE,
              help="Least cosine of each image's map between the two decode settings.")
@click.option("--stop-after", type=click.Choice(list(STEPS)), default=list(STEPS)[-1],
              help="Run the steps up to this one only (each builds on the ones before).")
@click.option("--verbose", is_flag=True, help="Also show the stages' own log.")
def cli(device: str, quick: bool, backbones: tuple[str, ...], workdir: Path | None,
        fp16_min_cosine: float, workers_min_cosine: float, stop_after: str,
        verbose: bool) -> None:
    """Run every CUDA path of the project once (extract with and without autocast,
    decode workers and pinned memory, head.train, head.export's parity, infer's provider,
    extract under torchrun with NCCL), time them, and print one table. Exits 1 if a check fails;
    a missed speed target is reported only.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("torch sees no CUDA device; on a CPU pass --device cpu")
    if verbose:
        setup_logging()
    sizes = QUICK if quick else FULL
    if workdir is None:
        scratch = tempfile.TemporaryDirectory(prefix="gpu-check-")
        work = Path(scratch.name)
    else:
        scratch = None
        workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=workdir))
    try:
        progress(f"synthetic set: {2 * (sizes.pairs + sizes.queries)} images in {work}")
        data = make_synthetic(work / "data", pairs=sizes.pairs, queries=sizes.queries, seed=0)
        setup = Setup(torch.device(device), sizes, read_dataset(data), work, fp16_min_cosine,
                      workers_min_cosine)
        results = run_checks(checks_for(backbones, stop_after), setup)
    finally:
        if scratch is not None:
            scratch.cleanup()
    click.echo("\n".join(header(torch.device(device))))
    click.echo(f"{2 * (sizes.pairs + sizes.queries)} synthetic images at {sizes.input_size[0]} "
               f"x {sizes.input_size[1]}, batch {BATCH_SIZE}, weights none"
               + ("" if scratch is not None else f", files kept in {work}"))
    click.echo(summary(results))
    if any(outcome.status == FAIL for _, outcome in results):
        raise SystemExit(1)


if __name__ == "__main__":
    cli()
