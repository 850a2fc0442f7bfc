"""Shared fixtures: small synthetic datasets (generated once per session) and the real data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from extract import logger
from extract.synth import main as make_synthetic

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "tll"

SMALL_PAIRS, SMALL_QUERIES = 24, 20  # 88 images
RESUME_PAIRS, RESUME_QUERIES = 60, 20  # 160 images: an extraction that takes a few seconds


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset; read-only (copy it with `dataset_copy` to change it)."""
    return make_synthetic(tmp_path_factory.mktemp("synth") / "data", SMALL_PAIRS, SMALL_QUERIES)


@pytest.fixture(scope="session")
def synthetic_resume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger synthetic dataset for the kill-and-resume tests; read-only."""
    return make_synthetic(tmp_path_factory.mktemp("synth-resume") / "data", RESUME_PAIRS,
                          RESUME_QUERIES, seed=1)


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
def _fresh_log_handlers():
    """`setup_logging` binds its handler to the sys.stderr of the moment, which under click's
    CliRunner is a throwaway stream; drop any handler a test added so the next test starts clean."""
    before = list(logger.handlers)
    yield
    for handler in logger.handlers[:]:
        if handler not in before:
            logger.removeHandler(handler)
