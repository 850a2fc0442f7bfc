"""Stage 1, `python -m extract`: the cache it writes (schema, contents against a brute-force
recomputation), reuse and refusal of an existing cache, resuming after a kill or Ctrl-C, and the
clean errors a user gets for bad images, a missing folder and unavailable weights."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from conftest import REPO_ROOT, invoke_cli, python_path, slowed_down

from extract.backbones import Trunk, TrunkSpec, WeightsUnavailable
from extract.cache import (
    CacheError,
    CacheInfo,
    CacheWriter,
    partial_path,
    read_features,
    read_image_digests,
    read_info,
    read_keys,
)
from extract.extract_features import cli, default_cache_path, main
from tll import UserError
from tll.data import DataError, load_image, read_dataset
from tll.device import compute_precision, native_bfloat16

SIZE = (64, 64)
CHANNELS = {"vgg16": 512, "resnet50": 2048}
DEFAULT_LAYER = {"vgg16": "features", "resnet50": "layer4"}


def extract(data: Path, out: Path, backbone: str = "resnet50", **options) -> Path:
    """`main` with the small, fast settings these tests use unless told otherwise."""
    settings = dict(weights="none", input_size=SIZE, batch_size=8, workers=0, device="cpu",
                    hflip=False)
    return main(backbone, data, out=out, **{**settings, **options})


def invoke(*arguments: str):
    return invoke_cli(cli, *arguments)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def brute_force(trunk: Trunk, paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    """The trunk run by hand, image by image, on what `load_image` gives."""
    with torch.inference_mode():
        return np.concatenate(
            [trunk(torch.from_numpy(load_image(path, size))[None]).numpy() for path in paths]
        )


# relative (Frobenius) error of a row's bfloat16-autocast map against its float32 one: 0.7-1.1%
# measured (resnet50 layer4, random init, 32 x 32 and 245 x 200); 3x that, and far below what
# a wrong row would show
BFLOAT16_TOLERANCE = 0.03


def relative_errors(maps: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N,) |maps[i] - reference[i]| / |reference[i]|, each flattened, in float64."""
    maps = maps.reshape(len(maps), -1).astype(np.float64)
    reference = reference.reshape(len(reference), -1).astype(np.float64)
    return np.linalg.norm(maps - reference, axis=1) / np.linalg.norm(reference, axis=1)


@pytest.fixture(scope="module")
def data_for(synthetic: Path, tiny: Path) -> dict[str, Path]:
    """The dataset each backbone's cache is built from: the slow vgg16 gets the tiny one."""
    return {"resnet50": synthetic, "vgg16": tiny}


@pytest.fixture(scope="module")
def caches(data_for: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One complete cache per backbone at 64 x 64 (batches of 8); read-only."""
    folder = tmp_path_factory.mktemp("caches")
    return {name: extract(data, folder / f"{name}.h5", name) for name, data in data_for.items()}


@pytest.fixture
def resnet_cache(caches: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the resnet50 cache."""
    return Path(shutil.copy(caches["resnet50"], tmp_path / "x.h5"))


@pytest.fixture(scope="module")
def state_dict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet50 state dict of random weights other than the `--weights none` ones."""
    path = tmp_path_factory.mktemp("weights") / "resnet50-seed123.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


# --- the cache that is written -----------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_cache_schema_and_contents(
    caches: dict[str, Path], data_for: dict[str, Path], backbone: str
) -> None:
    path, data = caches[backbone], data_for[backbone]
    dataset = read_dataset(data)
    keys = dataset.keys()
    spec = TrunkSpec.resolve(backbone, None, "none", SIZE)
    trunk = Trunk(spec)
    feature_shape = trunk.output_shape()
    assert feature_shape[0] == CHANNELS[backbone]

    # each cache and the hidden lock file its writer held, nothing else
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [f"{b}.h5" for b in CHANNELS] + [f".{b}.h5.lock" for b in CHANNELS])
    with h5py.File(path, "r") as file:
        assert set(file) == {"keys", "features", "done", "image_sha256"}
        assert [k.decode() for k in file["keys"][:]] == keys
        assert h5py.check_string_dtype(file["keys"].dtype).encoding == "utf-8"
        assert file["features"].dtype == np.float16
        assert file["features"].shape == (len(keys), *feature_shape)
        assert file["features"].chunks is None  # contiguous
        assert file["done"].dtype == np.uint8
        assert file["done"].shape == (len(keys),)
        assert (file["done"][:] == 1).all()
        assert [d.decode() for d in file["image_sha256"][:]] == dataset.digests()
        attrs = dict(file.attrs)
        features = file["features"][:]

    complete = attrs.pop("complete")
    assert isinstance(complete, bool | np.bool_) and complete
    expected = {
        "schema_version": 4,
        "views": ["identity"],
        "precision": compute_precision(torch.device("cpu"), amp=True),
        "backbone": backbone,
        "layer": DEFAULT_LAYER[backbone],
        "weights": "none",
        "weights_id": "random-init seed 0",
        "input_size": list(SIZE),
        "interpolation": "bilinear",
        "feature_shape": list(feature_shape),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "dtype": "float16",
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
        "timm_version": str(timm.__version__),
        "dataset": str(data.resolve()),
        "dataset_fingerprint": dataset.fingerprint(),
    }
    assert set(attrs) == set(expected)
    for name, value in expected.items():
        stored = attrs[name]
        stored = stored.tolist() if isinstance(stored, np.ndarray) else stored
        if name in ("mean", "std"):
            assert stored == pytest.approx(value), name
        else:
            assert stored == value, name
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    assert spec.std == pytest.approx((0.229, 0.224, 0.225))

    info = read_info(path)
    assert info.backbone == backbone and info.layer == DEFAULT_LAYER[backbone]
    assert info.input_size == SIZE and info.feature_shape == feature_shape
    assert info.dataset_fingerprint == dataset.fingerprint()
    assert read_keys(path) == keys

    # the stored rows are the trunk's output for those very images
    assert np.isfinite(features).all()
    assert features.astype(np.float32).std() > 0
    rows = [0, 1, 21, 40, len(keys) - 1]
    reference = brute_force(trunk, [dataset.images[keys[r]] for r in rows], SIZE)
    if info.precision == "float32":
        np.testing.assert_allclose(features[rows].astype(np.float32), reference, rtol=1e-2,
                                   atol=1e-2)
    else:  # bfloat16 autocast (--amp, the default on a CPU that has it): close, not equal
        assert relative_errors(features[rows], reference).max() < BFLOAT16_TOLERANCE
    assert not np.allclose(features[0], features[1])  # different images, different features


def test_vgg16_layer_before_last_pool(tiny: Path, caches: dict[str, Path], tmp_path: Path) -> None:
    out = extract(tiny, tmp_path / "x.h5", "vgg16", layer="features.29")
    assert out == tmp_path / "x.h5"
    info = read_info(out)
    assert info.layer == "features.29"
    assert info.feature_shape == (512, 4, 4)
    assert read_keys(out) == read_keys(caches["vgg16"])
    with h5py.File(out, "r") as file:
        conv5_3 = torch.from_numpy(file["features"][:].astype(np.float32))
    assert conv5_3.shape == (42, 512, 4, 4)
    assert conv5_3.min() >= 0  # after its ReLU
    # the default layer, `features`, is this map after vgg16's last 2 x 2 max-pool
    pooled = torch.nn.functional.max_pool2d(conv5_3, 2).numpy()
    with h5py.File(caches["vgg16"], "r") as file:
        np.testing.assert_allclose(pooled, file["features"][:].astype(np.float32), rtol=1e-3)


def test_default_cache_name_says_what_is_in_it() -> None:
    spec = TrunkSpec.resolve("vgg16", "features.29", "none")
    assert default_cache_path(spec) == Path("cache/vgg16-features.29-none.h5")
    small = TrunkSpec.resolve("vgg16", "features.29", "none", (64, 32))
    assert default_cache_path(small) == Path("cache/vgg16-features.29-none-64x32.h5")
    assert default_cache_path(TrunkSpec.resolve("resnet50", None, "imagenet")) == Path(
        "cache/resnet50-layer4-imagenet.h5")  # as before backbones came from the libraries
    assert default_cache_path(TrunkSpec.resolve("resnet50")) == Path(
        "cache/resnet50-layer4-imagenet.h5")  # pretrained is imagenet for torchvision
    clip = TrunkSpec.resolve("timm:vit_base_patch16_clip_quickgelu_224.openai", "global")
    assert default_cache_path(clip) == Path(
        "cache/timm-vit_base_patch16_clip_quickgelu_224.openai-global-pretrained.h5")
    dino = TrunkSpec.resolve("timm:vit_small_patch14_dinov2", None, "none", (224, 224))
    assert default_cache_path(dino) == Path(
        "cache/timm-vit_small_patch14_dinov2.lvd142m-blocks.11-none-224x224.h5")


# --- reuse, refusal, overwrite ------------------------------------------------------------------


def test_rerun_on_complete_cache_does_nothing(synthetic: Path, resnet_cache: Path) -> None:
    before = (sha256(resnet_cache), resnet_cache.stat().st_mtime_ns)
    assert extract(synthetic, resnet_cache) == resnet_cache
    assert (sha256(resnet_cache), resnet_cache.stat().st_mtime_ns) == before
    assert sorted(p.name for p in resnet_cache.parent.iterdir()) == [".x.h5.lock", "x.h5"]


MISMATCHES = {
    "layer": (["--layer", "layer3"], "layer"),
    "input-size": (["--input-size", "32", "32"], "input_size"),
    "backbone": (["--backbone", "vgg16"], "backbone"),
}


@pytest.mark.parametrize(("options", "field"), MISMATCHES.values(), ids=MISMATCHES.keys())
def test_cli_refuses_cache_built_for_something_else(
    synthetic: Path, resnet_cache: Path, options: list[str], field: str
) -> None:
    before = sha256(resnet_cache)
    arguments = [
        "--backbone",
        "resnet50",
        "--data",
        str(synthetic),
        "--out",
        str(resnet_cache),
        "--weights",
        "none",
        "--input-size",
        "64",
        "64",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-hflip",
    ]
    result = invoke(*arguments, *options)  # a later option overrides an earlier one
    assert result.exit_code == 1, result.text
    assert "Error:" in result.text and "Traceback" not in result.text
    assert "--overwrite" in result.text
    assert field in result.text
    assert sha256(resnet_cache) == before
    assert not resnet_cache.with_name("x.h5.partial").exists()


def test_refuses_other_weights_and_other_images(
    synthetic: Path, tiny: Path, resnet_cache: Path, state_dict: Path
) -> None:
    before = sha256(resnet_cache)
    with pytest.raises(CacheError, match="weights_id.*--overwrite"):
        extract(synthetic, resnet_cache, weights=str(state_dict))
    with pytest.raises(CacheError, match="image list differs.*--overwrite"):
        extract(tiny, resnet_cache)
    assert sha256(resnet_cache) == before


def _swap_two_images(data: Path) -> tuple[str, str]:
    """Give the 4th train left the 5th one's bytes (and the reverse); returns their keys."""
    first, second = sorted((data / "train" / "left").iterdir())[3:5]
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(first_bytes)
    return f"train/left/{first.stem}", f"train/left/{second.stem}"


def test_rerun_recomputes_the_images_that_changed(
    dataset_copy: Path, resnet_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A complete cache whose images have since changed is brought up to date, row by row."""
    keys = read_keys(resnet_cache)
    before = read_features(resnet_cache, keys)
    first, second = _swap_two_images(dataset_copy)
    with caplog.at_level(logging.INFO, logger="tll"):
        extract(dataset_copy, resnet_cache)
    assert "2 images of" in caplog.text and "computing them again" in caplog.text
    after = read_features(resnet_cache, keys)
    i, j = keys.index(first), keys.index(second)
    assert after[i].tobytes() == before[j].tobytes() and after[j].tobytes() == before[i].tobytes()
    unchanged = np.ones(len(keys), dtype=bool)
    unchanged[[i, j]] = False
    assert after[unchanged].tobytes() == before[unchanged].tobytes()
    dataset = read_dataset(dataset_copy)
    assert read_info(resnet_cache).dataset_fingerprint == dataset.fingerprint()
    assert read_image_digests(resnet_cache, keys) == dataset.digests()
    assert not partial_path(resnet_cache).exists()


# --- the precision the trunk computed in -----------------------------------------------------

@pytest.mark.skipif(not native_bfloat16(), reason="this CPU has no native bfloat16")
def test_bfloat16_cache_records_it_agrees_with_float32_and_never_mixes(
        tiny: Path, tmp_path: Path) -> None:
    """By default (--amp) a CPU with native bfloat16 autocasts to it: the cache says so, each
    row is within BFLOAT16_TOLERANCE of float32's (yet not float32's), and a rerun in float32
    over it is refused (what --overwrite does: the next test)."""
    small = dict(input_size=(32, 32))
    bfloat16 = extract(tiny, tmp_path / "bf16.h5", **small)
    float32 = extract(tiny, tmp_path / "f32.h5", amp=False, **small)
    assert read_info(bfloat16).precision == "bfloat16"
    assert read_info(float32).precision == "float32"
    keys = read_keys(float32)
    errors = relative_errors(read_features(bfloat16, keys), read_features(float32, keys))
    assert errors.max() < BFLOAT16_TOLERANCE
    assert errors.min() > 0  # computed in bfloat16, not float32 under another name

    with pytest.raises(CacheError, match=r"precision: bfloat16 \(cache\) vs float32 \(asked\)"
                                         ".*--overwrite"):
        extract(tiny, bfloat16, amp=False, **small)


def test_a_resume_or_rerun_in_another_precision_is_refused(
        caches: dict[str, Path], tmp_path: Path) -> None:
    """On any machine: a writer asked for another precision than the cache's, complete or
    unfinished, refuses it with the --overwrite advice, and with overwrite starts every row
    afresh in its own."""
    info = read_info(caches["resnet50"])
    assert info.precision == compute_precision(torch.device("cpu"), amp=True)  # the default
    keys = read_keys(caches["resnet50"])
    digests = read_image_digests(caches["resnet50"], keys)
    other = dataclasses.replace(info, precision="float16" if info.precision != "float16"
                                else "float32")
    mismatch = (rf"precision: {info.precision} \(cache\) vs {other.precision} \(asked\)"
                ".*--overwrite")
    complete = Path(shutil.copy(caches["resnet50"], tmp_path / "complete.h5"))
    with pytest.raises(CacheError, match=mismatch):
        CacheWriter(complete, keys, digests, other)

    unfinished = tmp_path / "unfinished.h5"
    writer = CacheWriter(unfinished, keys, digests, info)
    writer.write(np.arange(8), read_features(caches["resnet50"], keys[:8])[:, None])
    writer.close()  # interrupted: 8 rows done
    with pytest.raises(CacheError, match=mismatch):
        CacheWriter(unfinished, keys, digests, other)
    writer = CacheWriter(unfinished, keys, digests, other, overwrite=True)
    try:
        assert writer.missing.tolist() == list(range(len(keys)))  # none of the 8 kept
        assert writer.file.attrs["precision"] == other.precision
    finally:
        writer.close()


def test_a_cache_from_before_precision_was_recorded(resnet_cache: Path) -> None:
    """Schema 3 (no precision) reads, so it still trains, as "unrecorded"; an extraction will
    not resume or reuse it (it may hold float16 rows from CUDA) and says to --overwrite."""
    asked = read_info(resnet_cache)
    with h5py.File(resnet_cache, "r+") as file:
        del file.attrs["precision"]
        file.attrs["schema_version"] = 3
    info = read_info(resnet_cache)
    assert info.precision == "unrecorded" and info.schema_version == 3
    keys = read_keys(resnet_cache)
    with pytest.raises(CacheError, match=rf"precision: unrecorded \(cache\) vs "
                                         rf"{asked.precision} \(asked\).*--overwrite"):
        CacheWriter(resnet_cache, keys, read_image_digests(resnet_cache, keys), asked)


def test_overwrite_rebuilds(tiny: Path, resnet_cache: Path) -> None:
    """Other images at another size: `overwrite` replaces the cache rather than refusing."""
    out = extract(tiny, resnet_cache, input_size=(32, 32), overwrite=True)
    assert out == resnet_cache
    info = read_info(out)
    assert info.input_size == (32, 32)
    assert info.feature_shape == (2048, 1, 1)
    assert info.dataset_fingerprint == read_dataset(tiny).fingerprint()
    assert read_keys(out) == read_dataset(tiny).keys()
    with h5py.File(out, "r") as file:
        assert file["features"].shape == (42, 2048, 1, 1)
    assert sorted(p.name for p in out.parent.iterdir()) == [".x.h5.lock", "x.h5"]


# --- resuming after a kill or Ctrl-C ------------------------------------------------------------


def _extract_arguments(data: Path, out: Path) -> list[str]:
    return [
        "--backbone",
        "resnet50",
        "--data",
        str(data),
        "--out",
        str(out),
        "--weights",
        "none",
        "--input-size",
        *map(str, SIZE),
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-hflip",
    ]


def start_extract(data: Path, out: Path, log: Path, slow: Path | None = None) -> subprocess.Popen:
    """`python -m extract` with the settings of `caches["resnet50"]`, output into `log`; `slow`: a
    `slowed_down` folder put first on its PYTHONPATH."""
    command = [sys.executable, "-m", "extract", *_extract_arguments(data, out)]
    env = {**os.environ, "PYTHONPATH": python_path(*[slow] if slow else [])}
    with log.open("w") as handle:  # a file, not a pipe: a full pipe would stall the child
        # Ctrl-C as a terminal delivers it, whatever this test process inherited: a child
        # that inherits SIGINT ignored (Python then installs no handler) would never stop
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
        )


def done_rows(partial: Path) -> int | None:
    """How many rows a cache in progress has done, or None while it cannot be read. Reads
    without HDF5's file lock, which the writing process holds."""
    try:
        with h5py.File(partial, "r", locking=False) as file:
            return int(file["done"][:].sum())
    except (OSError, KeyError, ValueError):
        return None


def progress_rows(log: Path) -> int | None:
    """How many images an extraction's progress bar (in its `log`) last showed done, or None
    before it shows any. The bar moves after a batch's rows are written and flushed; reading it
    never races the writer as reading the HDF5 file being written can."""
    counts = re.findall(r"(\d+)/\d+ \[", log.read_text(errors="replace"))
    return int(counts[-1]) if counts else None


def stop_midway(start: Callable[[], subprocess.Popen], rows_done: Callable[[], int | None],
                window: range, stop: Callable[[subprocess.Popen], None], log: Path,
                what: str) -> subprocess.Popen:
    """`start()` an extraction and `stop` it once `rows_done()` is in `window`; the stopped
    process. Should the run end first (this process descheduled for the whole window, or the
    signal landing late), start over: up to 5 tries."""
    for _ in range(5):
        process = start()
        deadline = time.monotonic() + 180
        try:
            while process.poll() is None and time.monotonic() < deadline:
                if rows_done() in window:
                    stop(process)
                    if process.returncode == 0:  # it finished before the signal landed
                        break
                    return process
                time.sleep(0.02)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert time.monotonic() < deadline, f"no progress within 180 s:\n{log.read_text()}"
    pytest.fail(f"the extraction always ended before {what}:\n{log.read_text()}")


# seconds each block's write waits in an extraction to be interrupted: 11 blocks of 8 take about a
# second in all on an idle CPU, and a loaded one can deschedule the watching test for longer
WRITE_DELAY = 0.5


def interrupt_midway(data: Path, out: Path, log: Path, sig: int) -> subprocess.Popen:
    """Start `python -m extract`, each block's write delayed by WRITE_DELAY, and send it `sig`
    once it has written a block and has more than half its blocks left: a window of at least 2 s,
    whatever the CPU."""
    partial = partial_path(out)
    total = len(read_dataset(data).keys())
    slow = slowed_down(log.with_name("slow-writes"), "extract.cache", "CacheWriter.write",
                       WRITE_DELAY)

    def start_afresh() -> subprocess.Popen:
        out.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        return start_extract(data, out, log, slow)

    def stop(process: subprocess.Popen) -> None:
        process.send_signal(sig)
        process.wait(timeout=120)

    # in its first half, so that the signal lands with most of the work still to do
    return stop_midway(start_afresh, lambda: progress_rows(log), range(8, total // 2), stop,
                       log, "it could be interrupted")


def assert_same_cache(path: Path, reference: Path) -> None:
    with h5py.File(path, "r") as file, h5py.File(reference, "r") as expected:
        for name in ("keys", "done", "features"):
            assert file[name].dtype == expected[name].dtype
            assert file[name].shape == expected[name].shape
        assert file["keys"][:].tolist() == expected["keys"][:].tolist()
        assert file["done"][:].tobytes() == expected["done"][:].tobytes()
        assert file["features"][:].tobytes() == expected["features"][:].tobytes()
        assert sorted(file.attrs) == sorted(expected.attrs)
        for name, value in expected.attrs.items():
            assert np.array_equal(file.attrs[name], value), name


@pytest.mark.slow
def test_resume_after_sigkill(synthetic: Path, caches: dict[str, Path], tmp_path: Path) -> None:
    total = len(read_dataset(synthetic).keys())
    out, partial = tmp_path / "x.h5", tmp_path / "x.h5.partial"

    process = interrupt_midway(synthetic, out, tmp_path / "killed.log", signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    done = done_rows(partial)
    assert done is not None and 0 < done < total

    process = start_extract(synthetic, out, tmp_path / "rerun.log")
    process.wait(timeout=300)
    output = (tmp_path / "rerun.log").read_text()
    assert process.returncode == 0, output
    assert f"{total - done} of {total} images left" in output  # resumed, not started over
    assert f"{total - done}/{total - done} [" in output  # and computed only those
    assert output.splitlines()[-1] == str(out)  # prints the path it wrote
    assert not partial.exists()
    assert_same_cache(out, caches["resnet50"])


@pytest.mark.slow
def test_resume_after_ctrl_c(
    synthetic: Path, caches: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    total = len(read_dataset(synthetic).keys())
    out, partial = tmp_path / "x.h5", tmp_path / "x.h5.partial"

    process = interrupt_midway(synthetic, out, tmp_path / "interrupted.log", signal.SIGINT)
    output = (tmp_path / "interrupted.log").read_text()
    assert process.returncode == 1, output
    assert "Error: interrupted" in output and "resume" in output
    assert "Traceback" not in output
    assert not out.exists()
    done = done_rows(partial)
    assert done is not None and 0 < done < total

    with caplog.at_level(logging.INFO, logger="tll"):
        assert extract(synthetic, out) == out  # the same settings, in this process this time
    assert f"{total - done} of {total} images left" in caplog.text
    assert not partial.exists()
    assert_same_cache(out, caches["resnet50"])


# --- errors a user can fix ----------------------------------------------------------------------


def _break_an_image(data: Path) -> tuple[str, bytes]:
    """Overwrite the 10th image (in the second batch of 8) with garbage; return its key and
    original bytes."""
    key = "test/left/" + sorted(p.stem for p in (data / "test" / "left").iterdir())[9]
    image = data / f"{key}.jpg"
    original = image.read_bytes()
    image.write_bytes(b"this is not a JPEG" * 10)
    return key, original


def test_bad_image_stops_with_its_name(dataset_copy: Path, tmp_path: Path) -> None:
    key, _ = _break_an_image(dataset_copy)
    out = tmp_path / "out" / "x.h5"
    result = invoke(*_extract_arguments(dataset_copy, out))
    assert result.exit_code == 1, result.text
    assert "Error:" in result.text and "Traceback" not in result.text
    assert f"{key}.jpg" in result.text
    assert not out.exists()
    # the batches before the bad image's are kept for the rerun
    keys = read_dataset(dataset_copy).keys()
    assert keys.index(key) == 9
    assert done_rows(out.with_name("x.h5.partial")) == 8


def test_rerun_after_repairing_a_bad_image_completes(
    dataset_copy: Path, caches: dict[str, Path], tmp_path: Path
) -> None:
    key, original = _break_an_image(dataset_copy)
    out = tmp_path / "out" / "x.h5"
    assert invoke(*_extract_arguments(dataset_copy, out)).exit_code == 1

    (dataset_copy / f"{key}.jpg").write_bytes(original)
    result = invoke(*_extract_arguments(dataset_copy, out))
    assert result.exit_code == 0, result.text
    assert not out.with_name("x.h5.partial").exists()
    with h5py.File(out, "r") as file, h5py.File(caches["resnet50"], "r") as expected:
        assert file["features"][:].tobytes() == expected["features"][:].tobytes()


def test_bad_image_with_workers_names_it(dataset_copy: Path, tmp_path: Path) -> None:
    image = sorted((dataset_copy / "test" / "right").iterdir())[2]
    image.write_bytes(image.read_bytes()[:300])  # truncated
    with pytest.raises(DataError, match=image.name):
        extract(dataset_copy, tmp_path / "x.h5", input_size=(32, 32), workers=1)
    assert not (tmp_path / "x.h5").exists()


def test_missing_data_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        extract(tmp_path / "nowhere", tmp_path / "x.h5")
    assert list(tmp_path.iterdir()) == []


def test_unknown_layer_names_it_and_writes_nothing(synthetic: Path, tmp_path: Path) -> None:
    result = invoke(
        "--backbone",
        "resnet50",
        "--layer",
        "layer9",
        "--data",
        str(synthetic),
        "--out",
        str(tmp_path / "x.h5"),
        "--weights",
        "none",
        "--device",
        "cpu",
    )
    assert result.exit_code == 1, result.text
    assert "Error:" in result.text and "'layer9'" in result.text
    assert "Traceback" not in result.text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("backbone", "valid"),
    [("resnet50", ["layer1", "layer2", "layer3", "layer4"]), ("vgg16", ["features"])],
)
def test_unknown_layer_hint_lists_the_usable_layers(backbone: str, valid: list[str]) -> None:
    with pytest.raises(UserError) as raised:
        Trunk(TrunkSpec.resolve(backbone, "layer9", "none"))
    hint = str(raised.value).split("nodes include:", 1)[1]
    for layer in valid:
        assert layer in [name.strip() for name in hint.split(",")]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty torch hub cache and a network that refuses every download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_imagenet_weights_unavailable(offline: None, synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "x.h5"
    with pytest.raises(WeightsUnavailable) as raised:
        extract(synthetic, out, weights="imagenet")
    message = str(raised.value)
    assert "--weights none" in message and "--weights PATH" in message
    assert "no network" in message
    assert not (tmp_path / "out").exists()

    result = invoke(
        "--backbone",
        "resnet50",
        "--data",
        str(synthetic),
        "--out",
        str(out),
        "--input-size",
        "32",
        "32",
        "--device",
        "cpu",
    )  # imagenet is the default
    assert result.exit_code == 1, result.text
    assert "Error:" in result.text and "--weights none" in result.text
    assert "Traceback" not in result.text
    assert not (tmp_path / "out").exists()


def test_weights_from_a_file(tiny: Path, state_dict: Path, tmp_path: Path) -> None:
    size = (32, 32)
    out = extract(tiny, tmp_path / "x.h5", weights=str(state_dict), input_size=size, amp=False)
    info = read_info(out)
    assert info.weights == str(state_dict)
    assert info.weights_id == "sha256:" + sha256(state_dict)

    dataset = read_dataset(tiny)
    keys = dataset.keys()[:3]
    paths = [dataset.images[k] for k in keys]
    features = read_features(out, keys).astype(np.float32)
    loaded = brute_force(Trunk(TrunkSpec.resolve("resnet50", None, str(state_dict))), paths, size)
    np.testing.assert_allclose(features, loaded, rtol=1e-2, atol=1e-2)
    random_init = brute_force(Trunk(TrunkSpec.resolve("resnet50", None, "none")), paths, size)
    assert not np.allclose(features, random_init, rtol=1e-2, atol=1e-2)  # the file was used


def test_missing_weights_file(synthetic: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="nope.pt"):
        extract(synthetic, tmp_path / "x.h5", weights=str(tmp_path / "nope.pt"))
    assert list(tmp_path.iterdir()) == []


# --- reading the cache -------------------------------------------------------------------------


def test_read_features_in_the_order_asked(caches: dict[str, Path]) -> None:
    path = caches["resnet50"]
    keys = read_keys(path)
    rng = np.random.default_rng(0)
    asked = [keys[i] for i in rng.permutation(len(keys))[:50]] + [keys[5], keys[5], keys[6]]
    features = read_features(path, asked)
    assert features.dtype == np.float16
    with h5py.File(path, "r") as file:
        row_of = {k.decode(): i for i, k in enumerate(file["keys"][:])}
        one_by_one = np.stack([file["features"][row_of[k]] for k in asked])
    assert features.tobytes() == one_by_one.tobytes()


def test_read_features_of_no_keys(caches: dict[str, Path]) -> None:
    path = caches["resnet50"]
    assert read_features(path, []).shape == (0, *read_info(path).feature_shape)


def test_read_features_names_a_missing_key(caches: dict[str, Path]) -> None:
    keys = read_keys(caches["resnet50"])
    with pytest.raises(CacheError, match="train/left/zzz"):
        read_features(caches["resnet50"], [keys[0], "train/left/zzz"])


def test_rows_written_out_of_order_read_back(caches: dict[str, Path], tmp_path: Path) -> None:
    """A writer fed scattered rows (as a shard would be) ends with the same cache."""
    info = read_info(caches["resnet50"])
    keys = read_keys(caches["resnet50"])
    expected = read_features(caches["resnet50"], keys)
    out = tmp_path / "x.h5"
    writer = CacheWriter(out, keys, read_image_digests(caches["resnet50"], keys), info)
    for rows in (np.arange(1, len(keys), 2), np.arange(0, len(keys), 2)):  # odd rows, then even
        writer.write(rows, expected[rows, None])  # (n, 1 view, C, h, w)
    assert writer.finish() == out
    assert read_features(out, keys).tobytes() == expected.tobytes()


def test_a_writer_says_whether_it_is_complete(caches: dict[str, Path], tmp_path: Path) -> None:
    """is_complete: nothing left to write, for a cache complete and up to date when opened or
    once finished; extraction writes only to writers that are not."""
    info = read_info(caches["resnet50"])
    keys = read_keys(caches["resnet50"])
    digests = read_image_digests(caches["resnet50"], keys)
    out = tmp_path / "x.h5"
    writer = CacheWriter(out, keys, digests, info)
    assert not writer.is_complete
    writer.write(np.arange(len(keys)), read_features(caches["resnet50"], keys)[:, None])
    assert not writer.is_complete  # every row done, but not yet finished
    writer.finish()
    assert writer.is_complete
    again = CacheWriter(out, keys, digests, info)
    try:
        assert again.is_complete and again.missing.size == 0
    finally:
        again.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["disk full", "quota"])
def test_a_full_disk_or_quota_while_writing_rows_says_so(
    code: int, caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that cannot be stored for want of space, the disk's or the user's quota, give the
    one message that says so, not HDF5's traceback."""
    info = read_info(caches["resnet50"])
    keys = read_keys(caches["resnet50"])
    writer = CacheWriter(tmp_path / "x.h5", keys, read_image_digests(caches["resnet50"], keys),
                         info)

    def full(self: h5py.File) -> None:
        raise OSError(code, os.strerror(code))

    try:
        monkeypatch.setattr(h5py.File, "flush", full)
        with pytest.raises(UserError, match="no space left on device while writing .*x.h5"):
            writer.write(np.arange(8), np.zeros((8, 1, *info.feature_shape), dtype=np.float16))
    finally:
        monkeypatch.undo()
        writer.close()


def test_unfinished_cache_is_refused(
    synthetic: Path, caches: dict[str, Path], tmp_path: Path
) -> None:
    info = read_info(caches["resnet50"])
    keys = read_keys(caches["resnet50"])
    out = tmp_path / "x.h5"
    writer = CacheWriter(out, keys, read_image_digests(caches["resnet50"], keys), info)
    writer.write(np.arange(8), np.zeros((8, 1, *info.feature_shape), dtype=np.float16))
    with pytest.raises(CacheError, match="missing"):
        writer.finish()
    writer.close()
    partial = tmp_path / "x.h5.partial"
    assert partial.exists() and not out.exists()

    for read in (read_info, read_keys, lambda p: read_features(p, keys[:1])):
        with pytest.raises(CacheError, match="does not exist.*unfinished"):
            read(out)
        with pytest.raises(CacheError, match="incomplete"):
            read(partial)

    not_hdf5 = tmp_path / "junk.h5"
    not_hdf5.write_bytes(b"junk" * 100)
    with pytest.raises(CacheError, match="junk.h5"):
        read_info(not_hdf5)


def test_cache_info_round_trips(caches: dict[str, Path], tiny: Path) -> None:
    info = read_info(caches["vgg16"])
    assert isinstance(info, CacheInfo)
    assert info.input_size == SIZE and isinstance(info.input_size, tuple)
    assert info.feature_shape == (512, 2, 2) and isinstance(info.feature_shape, tuple)
    dataset = read_dataset(tiny)
    assert info.dataset == str(tiny.resolve())
    assert info.dataset_fingerprint == dataset.fingerprint()


def test_cache_info_mismatches_name_the_identity_fields_only(caches: dict[str, Path]) -> None:
    info = read_info(caches["vgg16"])
    other = dataclasses.replace(info, layer="features.22", input_size=(32, 32),
                                torch_version="0.0", dataset="/elsewhere")
    problems = other.mismatches(info)
    assert problems == ["layer: features (cache) vs features.22 (asked)",
                        "input_size: (64, 64) (cache) vs (32, 32) (asked)"]
    assert dataclasses.replace(info, torch_version="0.0").mismatches(info) == []


# --- the command line ------------------------------------------------------------------------


def test_help_lists_the_options() -> None:
    result = CliRunner().invoke(cli, ["--help"], prog_name="python -m extract")
    assert result.exit_code == 0, result.output
    assert "Usage: python -m extract [OPTIONS]" in result.output
    for option in (
        "--backbone",
        "--data",
        "--out",
        "--layer",
        "--weights",
        "--input-size",
        "--device",
        "--batch-size",
        "--workers",
        "--amp / --no-amp",
        "--hflip / --no-hflip",
        "--overwrite",
        "--help",
    ):
        assert option in result.output
    assert "--list-backbones" in result.output and "timm:<model>" in result.output
    assert "resume" in result.output
