"""Hostile input under torchrun, one row each: ranks given different commands, a rank's bad
image, a rank killed. Each rank is a plain `python -m extract` with the variables torchrun sets
(so that each can be given its own arguments); every row asserts the exit code of every rank, no
traceback, the message's culprit and fix, and what is left where the cache goes: nothing for a
refused plan, no shard without rows, the rows written kept for a resume.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_extract import assert_same_cache, done_rows
from test_torchrun import free_port

from extract.cache import shard_path, shard_paths
from extract.extract_features import cli as extract_cli
from extract.extract_features import main
from tll.data import read_dataset
from tll.device import native_bfloat16

BATCH = 4


def arguments(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--backbone", "resnet18", "--weights", "none", "--data", str(data), "--out",
            str(out), "--input-size", "32", "32", "--batch-size", str(BATCH), "--workers", "0",
            "--device", "cpu", "--no-hflip", *extra]


def _rank(rank: int, world: int, port: int, args: list[str], log: Path) -> None:
    """A forked rank: `python -m extract ARGS` in-process as torchrun's rank `rank` would run
    it; its output (and the traceback of any exception but SystemExit) into `log`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    result = CliRunner().invoke(extract_cli, args)
    text = result.output + (getattr(result, "stderr", "") or "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += "".join(traceback.format_exception(result.exception))
    log.write_text(text)
    os._exit(result.exit_code)


def start_ranks(per_rank: list[list[str]], logs: list[Path]) -> list[BaseProcess]:
    """One rank per argument list, forked from this process (torch is imported already: a
    rank starts in a fraction of a second rather than a fresh interpreter's seconds)."""
    port = free_port()
    processes = [multiprocessing.get_context("fork").Process(
        target=_rank, args=(rank, len(per_rank), port, args, log))
        for rank, (args, log) in enumerate(zip(per_rank, logs, strict=True))]
    for process in processes:
        process.start()
    return processes


def outputs(processes: list[BaseProcess], logs: list[Path]) -> list[str]:
    for process in processes:
        process.join(timeout=120)
        if process.exitcode is None:
            for other in processes:
                other.kill()
            pytest.fail("a rank still ran after 120 s:\n" + "\n".join(
                log.read_text() for log in logs if log.exists()))
    return [log.read_text() if log.exists() else "" for log in logs]


@dataclass(frozen=True)
class Ranked:
    """A row: rank 1's arguments, given the dataset and its copy with one image changed, and
    the output folder (rank 0 runs `arguments(data, folder / "x.h5")`); the message every rank
    prints."""

    rank_1: object  # (data, changed copy, folder) -> list[str]
    says: str


RANKS_DIFFER = {
    "#69 --data: another version of the dataset": Ranked(
        lambda data, other, out: arguments(other, out / "x.h5"),
        "Error: rank 1 was given --data {other} (images "),
    "#70 --input-size": Ranked(
        lambda data, other, out: [*arguments(data, out / "x.h5"), "--input-size", "64", "64"],
        "Error: rank 1 was given --input-size 64 x 64, rank 0 32 x 32: every rank must run "
        "the same command"),
    "#71 --backbone": Ranked(
        lambda data, other, out: [*arguments(data, out / "x.h5"), "--backbone", "resnet34"],
        "Error: rank 1 was given --backbone resnet34, rank 0 resnet18: every rank must run "
        "the same command"),
    "#74 --layer": Ranked(
        lambda data, other, out: [*arguments(data, out / "x.h5"), "--layer", "layer3"],
        "Error: rank 1 was given --layer layer3, rank 0 layer4: every rank must run the same "
        "command"),
    "#73 --out elsewhere": Ranked(
        lambda data, other, out: arguments(data, out / "elsewhere" / "x.h5"),
        "Error: rank 1 was given --out {out}/elsewhere/x.h5, rank 0 {out}/x.h5: every rank "
        "must run the same command"),
}
if native_bfloat16():  # elsewhere --amp and --no-amp both compute in float32, as they should
    RANKS_DIFFER["--no-amp: another precision"] = Ranked(
        lambda data, other, out: [*arguments(data, out / "x.h5"), "--no-amp"],
        "Error: rank 1 computes (by --amp/--no-amp and its hardware) in float32, rank 0 "
        "bfloat16: every rank must run the same command")


@pytest.fixture(scope="module")
def changed_copy(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset at another path with one image's bytes changed: another version."""
    import shutil

    copy = Path(shutil.copytree(tiny, tmp_path_factory.mktemp("changed") / "data"))
    image = read_dataset(copy).images[read_dataset(copy).keys()[0]]
    image.write_bytes(image.read_bytes() + b"\0")
    return copy


@pytest.mark.parametrize("row", RANKS_DIFFER.values(), ids=RANKS_DIFFER.keys())
def test_ranks_given_different_commands_are_refused(
    tiny: Path, changed_copy: Path, tmp_path: Path, row: Ranked
) -> None:
    out = tmp_path / "out"
    logs = [tmp_path / f"rank-{rank}.log" for rank in (0, 1)]
    processes = start_ranks([arguments(tiny, out / "x.h5"), row.rank_1(tiny, changed_copy, out)],
                            logs)
    said = row.says.format(other=changed_copy.resolve(), out=out)
    for process, output in zip(processes, outputs(processes, logs), strict=True):
        assert process.exitcode == 1, output
        assert "Traceback" not in output, output
        assert said in output, output  # every rank stops, with the same message
        assert "every rank must run the same command" in output
    # refused before anything was written: no cache, partial, shard or lock anywhere
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_a_bad_image_on_rank_1_leaves_no_empty_shard(dataset_copy: Path, tmp_path: Path) -> None:
    """#67: garbage in place of the 6th image, in block 1 (rows 4-7): rank 1's first block;
    rank 0 writes its first block meanwhile."""
    image = read_dataset(dataset_copy).images[read_dataset(dataset_copy).keys()[5]]
    image.write_bytes(b"this is not a JPEG" * 10)
    out = tmp_path / "out" / "x.h5"
    logs = [tmp_path / f"rank-{rank}.log" for rank in (0, 1)]
    processes = start_ranks([arguments(dataset_copy, out)] * 2, logs)
    texts = outputs(processes, logs)
    for process, output in zip(processes, texts, strict=True):
        assert process.exitcode == 1, output
        assert "Traceback" not in output, output
        assert image.name in output, output
    assert f"Error: rank 1: {image}" in texts[0]
    # rank 1's shard, without a row, is gone; rank 0's first block is kept for the rerun
    assert shard_paths(out) == [shard_path(out, 0)]
    assert done_rows(shard_path(out, 0)) == BATCH
    assert not out.exists()


def test_rank_0_killed_the_survivor_says_rerun(synthetic: Path, tmp_path: Path) -> None:
    """#75: rank 0 killed (-9) midway; rank 1 says so in one line, and the rerun resumes from
    the rows written to the same cache one process writes."""
    out = tmp_path / "out" / "x.h5"
    logs = [tmp_path / f"rank-{rank}.log" for rank in (0, 1)]
    window = range(BATCH, len(read_dataset(synthetic).keys()) // 2 - BATCH)
    for _ in range(3):  # should rank 0 finish before it is seen midway, start over
        for leftover in (tmp_path / "out").glob("*"):
            leftover.unlink()
        processes = start_ranks([arguments(synthetic, out)] * 2, logs)
        deadline = time.monotonic() + 120
        while processes[0].is_alive() and time.monotonic() < deadline:
            if (done_rows(shard_path(out, 0)) if shard_path(out, 0).exists() else None) in window:
                processes[0].kill()  # SIGKILL
                break
            time.sleep(0.01)
        output = outputs(processes, logs)[1]
        if processes[0].exitcode == -9:
            break
    else:
        pytest.fail(f"rank 0 always ended before it could be killed:\n{output}")
    assert processes[1].exitcode == 1, output
    assert "Traceback" not in output, output
    assert "Error: rank 0 stopped (" in output, output
    assert "the rows written so far are kept: rerun the same command to resume" in output
    assert shard_paths(out)
    reference = main("resnet18", synthetic, out=tmp_path / "reference.h5", weights="none",
                     input_size=(32, 32), batch_size=BATCH, workers=0, device="cpu",
                     hflip=False)
    assert main("resnet18", synthetic, out=out, weights="none", input_size=(32, 32),
                batch_size=BATCH, workers=0, device="cpu", hflip=False) == out
    assert_same_cache(out, reference)
    assert not shard_paths(out)
