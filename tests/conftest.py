"""Shared fixtures: small synthetic datasets (generated once per session) and the real data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from extract import logger
from extract.synth import main as make_synthetic

# Before torch is imported, here and in the `python -m extract` subprocesses (which inherit it):
# the tests' small batches gain nothing from intra-op threads, and on a busy 2-core machine
# OpenMP threads waiting on each other make a forward pass 10-30 times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "tll"

SMALL_PAIRS, SMALL_QUERIES = 24, 20  # 88 images
TINY_PAIRS, TINY_QUERIES = 1, 20  # 42 images: the fewest a synthetic set can have


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
