"""Shared fixtures: small synthetic datasets (generated once per session) and the real data."""

from __future__ import annotations

import csv
import math
import os
import shutil
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from extract.synth import main as make_synthetic
from tll import logger

# Before torch is imported, here and in the `python -m extract` subprocesses (which inherit it):
# the tests' small batches gain nothing from intra-op threads, and on a busy 2-core machine
# OpenMP threads waiting on each other make a forward pass 10-30 times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "tll"

SMALL_PAIRS, SMALL_QUERIES = 24, 20  # 88 images
TINY_PAIRS, TINY_QUERIES = 1, 20  # 42 images: the fewest a synthetic set can have


def invoke_cli(cli: click.Command, *arguments) -> Result:
    """`cli ARGUMENTS` in-process (each argument as text); `result.text` is its stdout and stderr
    together, which click < 8.2 mixes into `output` and click >= 8.2 keeps apart."""
    result = CliRunner().invoke(cli, [str(a) for a in arguments])
    result.text = result.output + (getattr(result, "stderr", "") or "")
    return result


def slowed_down(folder: Path, module: str, method: str, seconds: float,
                rank: int | None = None) -> Path:
    """`folder`, made to hold a sitecustomize.py that makes `module`'s `method` ("Class.name")
    sleep `seconds` before each call in every Python process started with `folder` first on
    PYTHONPATH (`python_path`); under torchrun in rank `rank` only, if given. A test that must
    catch a child midway, or a race between ranks, so gets a window of a known length whatever
    the machine's speed and load, and the computation is unchanged."""
    owner, name = method.split(".")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""\
        import os
        if {rank!r} is None or os.environ.get("RANK") == str({rank!r}):
            import functools
            import time
            from {module} import {owner} as owner
            original = owner.{name}
            @functools.wraps(original)
            def slowed(*args, **kwargs):
                time.sleep({seconds!r})
                return original(*args, **kwargs)
            owner.{name} = slowed
        """))
    return folder


def python_path(*first: Path) -> str:
    """PYTHONPATH for a subprocess of the tests: the folders `first`, then the repository."""
    return os.pathsep.join(map(str, [*first, REPO_ROOT]))


def check_submission(path: Path, data: Path) -> None:
    """`path` is a valid submission for `data`: the header, one row per test query in
    test_candidates.csv's order, 20 finite scores each."""
    with open(data / "test_candidates.csv", newline="") as f:
        lefts = [row["left"] for row in csv.DictReader(f)]
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["left"] + [f"c{i}" for i in range(20)]
    assert [row[0] for row in rows[1:]] == lefts
    assert all(len(row) == 21 and all(math.isfinite(float(v)) for v in row[1:])
               for row in rows[1:])


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset; read-only (copy it with `dataset_copy` to change it)."""
    return make_synthetic(tmp_path_factory.mktemp("synth") / "data", SMALL_PAIRS, SMALL_QUERIES)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest synthetic dataset, for the slow vgg16 trunk; read-only."""
    return make_synthetic(
        tmp_path_factory.mktemp("tiny") / "data", TINY_PAIRS, TINY_QUERIES, seed=1
    )


@pytest.fixture
def dataset_copy(synthetic: Path, tmp_path: Path) -> Path:
    """A private copy of the small synthetic dataset that a test may damage."""
    return Path(shutil.copytree(synthetic, tmp_path / "data"))


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "train.csv").is_file():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(autouse=True)
def _fresh_logger():
    """`setup_logging` (run by every command) binds its handler to the sys.stderr of the moment,
    which under click's CliRunner is a throwaway stream, and stops propagation (which caplog
    needs); undo both after each test so the next one starts clean."""
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


# --- one trained run, shared by the head, export and infer tests -------------------------------
# 300 pairs (val_fraction 0.2: 60 validation queries) through a random-init resnet50 at 64 x 64
# (layer4: 2048 x 2 x 2). With these settings the head's validation top-2 beat the frozen trunk's
# by 0.20-0.35 for every training seed 0-2 on synthetic sets of seeds 0-2 (e.g. 0.78 vs 0.48).

TRAIN_PAIRS, TRAIN_QUERIES = 300, 20  # 640 images
TRAIN_SIZE = (64, 64)
TRAIN_SETTINGS = dict(epochs=6, batch_size=32, lr=3e-4, val_fraction=0.2, seed=0, device="cpu")


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic dataset the shared run is trained on; read-only."""
    return make_synthetic(tmp_path_factory.mktemp("train-data") / "data", TRAIN_PAIRS,
                          TRAIN_QUERIES)


@pytest.fixture(scope="session")
def train_cache(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete resnet50 cache (random init, 64 x 64) of `train_data`, one view, in float32
    (`amp=False`): the exported model runs the trunk in float32, and tests/test_infer.py checks
    that infer gives back head.train's figures to the last rank; read-only."""
    from extract.extract_features import main as extract  # torch: after OMP_NUM_THREADS

    return extract("resnet50", train_data, out=tmp_path_factory.mktemp("train-cache") / "r50.h5",
                   weights="none", input_size=TRAIN_SIZE, device="cpu", batch_size=32, workers=0,
                   hflip=False, amp=False)


@pytest.fixture(scope="session")
def trained_run(train_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/r50 as `head.train` leaves it (TRAIN_SETTINGS); read-only."""
    from head.train import main as train

    return train(train_cache, name="r50", runs_dir=tmp_path_factory.mktemp("runs"),
                 **TRAIN_SETTINGS)


@pytest.fixture(scope="session")
def exported_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `trained_run` with `head.export`'s model.onnx written into it; read-only."""
    from head.export import main as export

    run = Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("exported") / "r50"))
    export(run)
    return run
