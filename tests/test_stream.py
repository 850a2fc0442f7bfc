"""Training on caches larger than memory (head.stream): the memory budget, the rows read from the
cache as training asks for them (extract.cache.FeatureRows), read ahead in the background, and
a run within its budget with the figures of one in memory."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import h5py
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from extract.cache import (
    CacheInfo,
    CacheWriter,
    FeatureRows,
    read_features,
    read_info,
    read_keys,
)
from extract.synth import main as make_synthetic
from head import stream
from head.folds import load_pairs
from head.stream import (
    StreamedFeatures,
    budget_share,
    features_bytes,
    fits_in_memory,
    read_ahead,
)
from head.sweep import main as sweep
from head.sweep import parse_param
from head.train import main as train
from tll import ByteSize, UserError, format_bytes
from tll.data import read_dataset

MiB = 1 << 20


def random_cache(data: Path, path: Path, shape: tuple[int, ...], seed: int = 0,
                 views: tuple[str, ...] = ("identity", "hflip")) -> Path:
    """A complete cache of `data` whose features are random (uniform in [0, 1)), written a
    block of rows at a time: as large as a test needs, without a trunk."""
    dataset = read_dataset(data)
    keys = dataset.keys()
    info = CacheInfo(backbone="resnet18", layer="layer4", weights="none",
                     weights_id="random-init seed 0", mean=(0.5, 0.5, 0.5),
                     std=(0.25, 0.25, 0.25), input_size=(64, 64), feature_shape=shape,
                     dataset=str(data.resolve()), dataset_fingerprint=dataset.fingerprint(),
                     torch_version=str(torch.__version__), torchvision_version="none",
                     views=views, precision="float32")
    writer = CacheWriter(path, keys, dataset.digests(), info)
    rng = np.random.default_rng(seed)
    for start in range(0, len(keys), 32):
        rows = np.arange(start, min(start + 32, len(keys)))
        writer.write(rows, rng.random((len(rows), len(views), *shape),
                                      dtype=np.float32).astype(np.float16))
    return writer.finish()


def epoch_figures(run: Path) -> list[dict]:
    """Every epoch's record in the run's metrics.jsonl, but for its time."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 16 x 3 x 3 maps of a synthetic set of 60 pairs (enough for a validation split),
    two views; read-only."""
    folder = tmp_path_factory.mktemp("stream")
    return random_cache(make_synthetic(folder / "data", 60, 20), folder / "small.h5",
                        (16, 3, 3))


@pytest.mark.parametrize(("text", "size"), [
    ("4GiB", 4 << 30), ("500MB", 500 * 10 ** 6), ("1.5G", 3 << 29), ("1000000b", 10 ** 6),
    ("12 mib", 12 << 20), (".5k", 512), ("2TB", 2 * 10 ** 12), ("0", 0)])
def test_a_size_takes_a_unit(text: str, size: int) -> None:
    assert ByteSize().convert(text, None, None) == size


@pytest.mark.parametrize("text", ["4 lots", "GiB", "-1G", "1e9", ""])
def test_a_size_without_a_unit_it_knows_is_refused(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a size"):
        ByteSize().convert(text, None, None)


def test_a_size_too_large_for_a_float_is_refused() -> None:
    with pytest.raises(click.BadParameter, match="is too large a size"):
        ByteSize().convert("9" * 400 + "GiB", None, None)


@pytest.mark.parametrize(("size", "text"), [
    (11.24 * (1 << 30), "11.2 GiB"), (2048 * (1 << 30), "2048.0 GiB"), (480 << 20, "480 MiB"),
    (2.3 * (1 << 20), "2.3 MiB"), (2 << 20, "2.0 MiB"), (56 << 10, "56.0 KiB"), (100, "100 B")])
def test_sizes_are_written_with_a_decimal_below_100_of_a_unit(size: float, text: str) -> None:
    assert format_bytes(size) == text


@pytest.mark.parametrize("text", ["8", "1000000", "0.5"])
def test_a_size_other_than_0_needs_its_unit(text: str) -> None:
    with pytest.raises(click.BadParameter, match=f"'{text}' has no unit: write e.g. {text}GiB"):
        ByteSize().convert(text, None, None)


def test_each_sweep_job_gets_its_share_of_the_budget() -> None:
    assert budget_share(10 << 20, 3) == 3495253  # floor(10 MiB / 3)
    assert budget_share(math.inf, 2) is None  # where the system does not say how much is free


def test_the_smallest_caches_are_kept_in_memory_while_they_fit() -> None:
    assert fits_in_memory([5, 1, 3], 9) == [True, True, True]
    assert fits_in_memory([5, 1, 3], 8.5) == [False, True, True]  # 1 + 3, then 5 is too many
    assert fits_in_memory([5, 1, 3], 3.9) == [False, True, False]
    assert fits_in_memory([5, 1, 3], 0) == [False, False, False]
    assert fits_in_memory([2, 2], float("inf")) == [True, True]


def test_features_bytes_as_held_in_memory(small_cache: Path) -> None:
    """What `load_pairs` holds: the train images in every view, float16."""
    info = read_info(small_cache)
    pairs = load_pairs([small_cache], [info], None, "cpu", budget=10 ** 12)
    assert features_bytes(info, len(pairs.row), 2) == pairs.features[0].nbytes


def test_feature_rows_read_any_order_with_repeats(small_cache: Path, tmp_path: Path) -> None:
    """Rows read by position (any order, repeats) are read_features' rows, in each view, from a
    contiguous cache (positional reads) and from one rewritten chunked (through h5py)."""
    keys = read_keys(small_cache)[::-1]
    positions = np.array([5, 0, 5, len(keys) - 1, 3, 2, 1], dtype=np.int64)
    chunked = tmp_path / "chunked.h5"
    with h5py.File(small_cache, "r") as source, h5py.File(chunked, "w") as copy:
        for name in source:
            data = source[name][:]
            copy.create_dataset(name, data=data, chunks=(3, *data.shape[1:])
                                if name.startswith("features") else None)
        copy.attrs.update(source.attrs)
    for cache in (small_cache, chunked):
        rows = FeatureRows(cache, keys, ("identity", "hflip"))
        assert (rows._offsets["identity"] is None) == (cache == chunked)
        for view in ("identity", "hflip"):
            expected = read_features(small_cache, [keys[p] for p in positions], view)
            assert rows.read(positions, view).tobytes() == expected.tobytes()
            assert rows.read(np.zeros(0, dtype=np.int64), view).shape == (0, 16, 3, 3)
        rows.close()


def test_a_read_error_names_the_cache_as_damaged(small_cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rows = FeatureRows(small_cache, read_keys(small_cache), ("identity",))

    def failing(*_):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(UserError, match=r"small\.h5 is damaged \(.*Input/output error\); "
                                        r"rebuild it with .*--overwrite"):
        rows.read(np.array([4]), "identity")


@pytest.mark.parametrize("change", ["truncated", "rewritten in place"])
def test_a_cache_changed_while_streamed_is_named(change: str, small_cache: Path,
                                                 tmp_path: Path) -> None:
    """Another program truncating the file, or writing other features into it at the same
    places (its size unchanged), while a run streams from it: the next read says so, rather
    than training on whatever the file now holds."""
    changed = tmp_path / "changed.h5"
    changed.write_bytes(small_cache.read_bytes())
    keys = read_keys(changed)
    rows = FeatureRows(changed, keys, ("identity",))
    first = rows.read(np.array([4]), "identity")
    time.sleep(0.05)  # past the clock tick that file modification times advance by
    with open(changed, "r+b") as f:
        if change == "truncated":
            f.truncate(rows._offsets["identity"] + 2 * rows.row_bytes + 7)
        else:
            f.seek(rows._offsets["identity"] + 4 * rows.row_bytes)
            f.write((first + 1).tobytes())
    with pytest.raises(UserError, match=r"changed\.h5 was changed while it was being read"):
        rows.read(np.array([4]), "identity")


def test_streamed_features_index_like_the_tensor(small_cache: Path) -> None:
    """Each way training indexes the features gives the in-memory tensor's result, whether the
    reads were announced (read ahead), announced otherwise (read then) or not at all."""
    pairs = load_pairs([small_cache], [read_info(small_cache)], None, "cpu", budget=10 ** 12)
    tensor = pairs.features[0]  # (N, 2, 16, 3, 3)
    streamed = load_pairs([small_cache], [read_info(small_cache)], None, "cpu",
                          budget=0).features[0]
    assert isinstance(streamed, StreamedFeatures) and streamed.shape == tensor.shape
    rows = torch.tensor([7, 2, 2, 30, 0])
    one_view = [(rows,), (rows, 0), (rows, torch.zeros_like(rows))]
    cases = [(streamed, tensor, [*one_view, (rows, 1), (rows, torch.tensor([1, 0, 1, 1, 0]))]),
             (streamed[:, :1], tensor[:, :1], one_view),  # --no-flip: the images as they are
             (streamed[:, 1:], tensor[:, 1:], one_view)]
    for announced in ("no", "yes", "other"):
        for f, t, keys in cases:
            if announced == "yes":
                read_ahead([f], lambda keys=keys: keys)
            elif announced == "other":
                read_ahead([f], lambda: [(rows + 1,)])
            for key in keys:
                got = f[key if len(key) > 1 else key[0]]
                assert got.dtype == torch.float16
                assert torch.equal(got, t[key if len(key) > 1 else key[0]]), (announced, key)


def test_training_reads_its_batches_ahead_in_the_background(
        small_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """With a budget the cache does not fit, the log says so, and every batch a training step
    and validation ask for was read by the read-ahead thread, not by the loop waiting for it."""
    threads = []
    read = stream._Reader.read

    def recorded(self, request):
        threads.append((threading.current_thread().name, isinstance(request[1], tuple)))
        return read(self, request)

    monkeypatch.setattr(stream._Reader, "read", recorded)
    monkeypatch.setattr(stream, "POOL_BYTES", 0)  # baselines: one row at a time, unannounced
    caplog.set_level("INFO", logger="tll")
    train(small_cache, name="s", runs_dir=tmp_path, epochs=2, batch_size=8, device="cpu",
          memory_budget=100, val_fraction=0.5)
    assert "> --memory-budget 100 B: streaming batches from" in caplog.text
    training = [name for name, all_views in threads if not all_views]
    assert len(training) >= 2 * 2 * 2  # lefts and rights, 2 batches at least, 2 epochs
    assert all(name.startswith("tll-read-ahead") for name in training)
    pooled_in_loop = [name for name, all_views in threads
                      if all_views and not name.startswith("tll-read-ahead")]
    assert pooled_in_loop  # the baselines' blocks, which are not announced
    assert len(pooled_in_loop) < len([t for t in threads if t[1]])  # validation is


def test_a_run_that_fits_says_so(small_cache: Path, tmp_path: Path,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="tll")
    train(small_cache, name="m", runs_dir=tmp_path, epochs=1, device="cpu", val_fraction=0.5,
          memory_budget=1 << 30)
    assert "fit the --memory-budget 1.0 GiB: held in memory" in caplog.text


def test_a_sweep_streams_beyond_its_budget_to_the_same_scores(
        small_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every trial and fold of a sweep share the one reader; the study's scores are those of
    the sweep held in memory."""
    caplog.set_level("INFO", logger="tll")
    scores = {}
    for mode, budget in (("streamed", 0), ("in-memory", None)):
        out = sweep(small_cache, trials=2, folds=2, runs_dir=tmp_path / mode, sampler_seed=3,
                    params=("epochs=2", "batch_size=8"), device="cpu", memory_budget=budget)
        with open(out / "trials.csv", newline="") as f:
            scores[mode] = [{k: v for k, v in row.items() if k != "seconds"}
                            for row in csv.DictReader(f)]
        assert ("streaming batches from" in caplog.text) == (mode == "streamed")
        caplog.clear()
    assert scores["streamed"] == scores["in-memory"]


def test_fused_maps_and_vectors_streamed_or_not_train_alike(
        small_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A map cache fused with a vector cache under one budget: all held, the vectors held and
    the maps streamed, or both streamed; the same figures and weights each time."""
    data = Path(read_info(small_cache).dataset)
    vectors = random_cache(data, tmp_path / "vectors.h5", (24,), seed=1)
    vector_bytes = features_bytes(read_info(vectors), 120, 2)
    caplog.set_level("INFO", logger="tll")
    runs = {}
    for mode, budget in (("held", None), ("mixed", vector_bytes), ("streamed", 0)):
        runs[mode] = train([small_cache, vectors], name=mode, runs_dir=tmp_path, epochs=2,
                           batch_size=8, val_fraction=0.5, device="cpu", memory_budget=budget)
    assert f"vectors.h5 ({format_bytes(vector_bytes)}) held in memory" in caplog.text
    held = torch.load(runs["held"] / "head.pt", weights_only=True)
    for mode in ("mixed", "streamed"):
        assert epoch_figures(runs[mode]) == epoch_figures(runs["held"])
        other = torch.load(runs[mode] / "head.pt", weights_only=True)
        assert other["metrics"] == held["metrics"] and other["baseline"] == held["baseline"]
        assert all(torch.equal(other["state_dict"][k], v) for k, v in held["state_dict"].items())


def test_the_memory_budget_is_not_a_sweep_parameter() -> None:
    with pytest.raises(UserError, match="memory_budget is the same for every trial, set by "
                                        "the sweep's own --memory-budget"):
        parse_param("memory_budget=1GiB")


# --- a run several times larger than its budget, in a process of its own ---------------------

BUDGET = 16 * MiB
# what a streamed run may hold beyond the budget: the baselines' pooling blocks (POOL_BYTES,
# 32 MiB), the read-ahead (4 requests of 4 rows of 512 KiB), the batch trained on, its
# activations and gradients (4 x 4096 x 8 x 8 float32 maps, 4 MiB each, a few of them)
OVERHEAD = 64 * MiB
SHAPE = (4096, 8, 8)  # 512 KiB a row: 200 train images x 2 views = 200 MiB
# Trains a warm-up run on a tiny cache of the same images, so that what every run keeps once it
# has run (torch's runtime after a backward pass, scikit-learn, glibc's arenas) is in place; then
# the run streamed and the run in memory, each measured as its peak RSS (VmHWM, which writing 5
# to /proc/self/clear_refs sets back to the RSS of the moment) less the RSS before it.
CHILD = """
import json, sys
from head.train import main
from tll import setup_logging

def memory(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

setup_logging()
warm, cache, runs, budget = sys.argv[1:]
settings = dict(runs_dir=runs, epochs=1, batch_size=4, embedding_dim=8, val_fraction=0.2,
                device="cpu")
main(warm, name="warm-up", **settings)
grew = {}
for name, memory_budget in (("streamed", int(budget)), ("in-memory", 1 << 40)):
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak from here
    before = memory("VmRSS:")
    main(cache, name=name, memory_budget=memory_budget, **settings)
    grew[name] = memory("VmHWM:") - before
print(json.dumps(grew))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self: Linux")
def test_a_cache_larger_than_the_budget_trains_within_it_to_the_same_figures(
        tmp_path: Path) -> None:
    """A run whose features (200 MiB) are 12 times its budget peaks within the budget plus
    OVERHEAD above the RSS it starts from, and writes the figures and weights of the same run
    held in memory, which holds the features (its peak grows by at least their size)."""
    data = make_synthetic(tmp_path / "data", 100, 20)
    cache = random_cache(data, tmp_path / "big.h5", SHAPE)
    warm = random_cache(data, tmp_path / "warm.h5", (8, 2, 2))
    size = features_bytes(read_info(cache), 200, 2)
    assert size >= 12 * BUDGET
    # glibc keeps freed blocks below its mmap threshold, which it raises up to 32 MiB as large
    # blocks are freed, in the heap: held at 1 MiB, the RSS counts what is held, not what was
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": str(MiB), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(warm), str(cache), str(tmp_path),
                           str(BUDGET)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    grew = json.loads(done.stdout.strip().splitlines()[-1])
    assert "streaming batches from" in done.stderr
    assert grew["streamed"] <= BUDGET + OVERHEAD, {k: format_bytes(v) for k, v in grew.items()}
    assert grew["in-memory"] >= size, format_bytes(grew["in-memory"])  # the measure sees them

    assert epoch_figures(tmp_path / "streamed") == epoch_figures(tmp_path / "in-memory")
    streamed, held = (torch.load(tmp_path / name / "head.pt", weights_only=True)
                      for name in ("streamed", "in-memory"))
    assert streamed["baseline"] == held["baseline"]
    assert all(torch.equal(streamed["state_dict"][k], held["state_dict"][k])
               for k in held["state_dict"])
    assert streamed["train_config"]["memory_budget"] == BUDGET
