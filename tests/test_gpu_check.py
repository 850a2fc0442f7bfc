"""benchmarks/gpu_check.sh in its CPU form (`--device cpu --quick`), run the way a GPU machine runs
it: through the wrapper, the packages taken from the checkout. Every check must pass (or be n/a
on a CPU) and be named in the table, nothing may land in the checkout's cache/ or runs/, and a
check out of its tolerance must make the command exit 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tll.device import native_bfloat16

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"
CHECKS = ("extract", "autocast agreement", "decode workers", "head.train", "head.export",
          "infer", "torchrun")
# extract autocasts on a CPU only where it has native bfloat16; elsewhere these are n/a
AUTOCAST_CHECKS = () if native_bfloat16() else ("autocast agreement",)


def run_gpu_check(*arguments: str) -> subprocess.CompletedProcess:
    # PYTHON: this interpreter, whose packages stand in for the GPU machine's; OMP_NUM_THREADS=1
    # (set by conftest) is inherited
    return subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--quick", *arguments],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT.parent)


def status_of(stdout: str, check: str) -> str | None:
    """The result the table gives `check`, or None if it is not in the table."""
    match = re.search(rf"^{re.escape(check)} +(\S.*?)\s*$", stdout, re.MULTILINE)
    return match and match.group(1)


def checkout_outputs() -> set[Path]:
    return {p for folder in ("cache", "runs") for p in (REPO_ROOT / folder).rglob("*")}


@pytest.mark.slow
def test_cpu_form_passes_every_check(tmp_path: Path) -> None:
    before = checkout_outputs()
    result = run_gpu_check("--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for backbone in ("resnet50", "vgg16"):
        for check in CHECKS:
            expected = "n/a on cpu" if check in AUTOCAST_CHECKS else "pass"
            assert status_of(result.stdout, f"{check} {backbone}") == expected, result.stdout
    assert "no GPU used" in result.stdout and "CPUExecutionProvider" in result.stdout
    assert f"project from {REPO_ROOT}" in result.stdout  # the checkout, not an installed copy
    (work,) = tmp_path.iterdir()  # a fresh folder inside --workdir, kept
    assert sorted(p.name for p in (work / "models").iterdir()) == ["resnet50.onnx", "vgg16.onnx"]
    assert checkout_outputs() == before


@pytest.mark.slow
def test_a_check_out_of_tolerance_fails_the_command() -> None:
    # the two decode settings give identical maps on a CPU (cosine 1), never 1.01
    result = run_gpu_check("--backbone", "resnet50", "--workers-min-cosine", "1.01",
                           "--stop-after", "head.train")
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert status_of(result.stdout, "extract resnet50") == "pass"
    assert status_of(result.stdout, "decode workers resnet50") == "FAIL"
    assert re.search(r"least cosine, 2 workers vs default \(inline\) +1 +>= 1\.01 +FAIL$",
                     result.stdout, re.MULTILINE)
    assert status_of(result.stdout, "head.train resnet50") == "pass"  # a failure stops nothing
    assert status_of(result.stdout, "head.export resnet50") is None  # --stop-after
    assert "vgg16" not in result.stdout
