"""`torchrun -m extract` on the CPU (gloo): two processes, one killed midway then resumed with one,
two or no torchrun, and two "machines" on localhost all write the very cache one process writes;
bad input stops every rank with one message. Below them, the shard logic of extract.cache on its
own: which shard rows count, what is refused, what is deleted."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO_ROOT, python_path, slowed_down
from test_extract import WRITE_DELAY, assert_same_cache, done_rows, stop_midway

from extract import cache
from extract.cache import (
    CacheError,
    CacheWriter,
    ShardWriter,
    partial_path,
    read_features,
    read_image_digests,
    read_info,
    read_keys,
    shard_path,
    shard_paths,
)
from extract.extract_features import blocks_to_do, main
from tll import UserError
from tll.data import read_dataset
from tll.files import lock_file, lock_holder

SIZE = (32, 32)
BATCH = 4  # 88 images: 22 blocks, 11 for each of two ranks


def extract_arguments(data: Path, out: Path) -> list[str]:
    return ["--backbone", "resnet50", "--weights", "none", "--data", str(data), "--out", str(out),
            "--input-size", *map(str, SIZE), "--batch-size", str(BATCH), "--workers", "0",
            "--device", "cpu", "--no-hflip"]


def start(launcher: list[str], data: Path, out: Path, log: Path,
          first_on_path: Path | None = None) -> subprocess.Popen:
    """`torchrun LAUNCHER -m extract ...` (no launcher: plain `python -m extract`), output into
    `log`; OMP_NUM_THREADS=1 (set by conftest) is inherited, so every process computes each block
    with the same arithmetic. `first_on_path`: a `slowed_down` folder put first on PYTHONPATH."""
    torchrun = ["-m", "torch.distributed.run", *launcher] if launcher else []
    command = [sys.executable, *torchrun, "-m", "extract", *extract_arguments(data, out)]
    env = {**os.environ, "PYTHONPATH": python_path(*[first_on_path] if first_on_path else [])}
    with log.open("w") as handle:  # a file, not a pipe: a full pipe would stall the children
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT)


def on_one_machine(processes: int) -> list[str]:
    return ["--standalone", "--nproc-per-node", str(processes)]


def finished(process: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """Wait for `process` (killed if it overruns: a hang must fail, not stall the suite); its
    output."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"still running after {timeout} s:\n{log.read_text()}")
    return log.read_text()


@pytest.fixture(scope="module")
def reference(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache one process writes with these settings; read-only."""
    return main("resnet50", synthetic, out=tmp_path_factory.mktemp("reference") / "x.h5",
                weights="none", input_size=SIZE, batch_size=BATCH, workers=0, device="cpu",
                hflip=False)


# --- torchrun on this CPU ------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_write_the_single_process_cache(
    synthetic: Path, reference: Path, tmp_path: Path
) -> None:
    out, log = tmp_path / "x.h5", tmp_path / "run.log"
    total = len(read_dataset(synthetic).keys())
    output = finished(start(on_one_machine(2), synthetic, out, log), log)
    assert output.splitlines().count(str(out)) == 2, output  # each rank returns the path
    assert_same_cache(out, reference)
    # no shard or partial left; the locks that were held stay, hidden and empty
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "..x.h5.shard-0.lock", "..x.h5.shard-1.lock", ".x.h5.lock", "run.log", "x.h5"]
    assert output.count("extract resnet50") == 1  # rank 0 alone logs
    assert output.count("extract:   0%") == 1  # and shows the one progress bar, of the whole job
    assert f"{total}/{total} [" in output
    assert "22 blocks of up to 4 images dealt out to 2 processes (gloo)" in output
    assert f"took {total} images from 2 shards" in output


@pytest.mark.slow
def test_the_shards_are_taken_in_once_every_rank_has_closed_its_own(
    synthetic: Path, reference: Path, tmp_path: Path
) -> None:
    # rank 1 closes its shard 2 s late: rank 0 must wait for it before taking the shard in
    slow = slowed_down(tmp_path / "slow", "extract.cache", "ShardWriter.close", 2, rank=1)
    out, log = tmp_path / "x.h5", tmp_path / "run.log"
    output = finished(start(on_one_machine(2), synthetic, out, log, first_on_path=slow), log)
    assert output.splitlines().count(str(out)) == 2, output
    assert_same_cache(out, reference)


def kill_rank_midway(data: Path, out: Path, log: Path) -> subprocess.Popen:
    """Start `torchrun --nproc-per-node 2 -m extract`, rank 1's block writes each delayed by
    WRITE_DELAY, and SIGKILL rank 1 once it has written a block to its shard but has blocks left:
    a window of several seconds whatever the CPU (undelayed, 11 blocks of 4 take about one)."""
    shard = shard_path(out, 1)
    share = len(read_dataset(data).keys()) // 2
    slow = slowed_down(log.with_name("slow-shard-writes"), "extract.cache", "ShardWriter.write",
                       WRITE_DELAY, rank=1)

    def start_afresh() -> subprocess.Popen:
        for leftover in (out, partial_path(out), *shard_paths(out)):
            leftover.unlink(missing_ok=True)
        return start(on_one_machine(2), data, out, log, first_on_path=slow)

    def stop(process: subprocess.Popen) -> None:
        # rank 1 holds its shard's lock: that names its process
        holder = re.match(r"pid (\d+)", lock_holder(lock_file(shard)))
        assert holder, lock_holder(lock_file(shard))
        os.kill(int(holder[1]), signal.SIGKILL)
        finished(process, log)

    return stop_midway(start_afresh, lambda: done_rows(shard) if shard.exists() else None,
                       range(BATCH, share - BATCH), stop, log, "rank 1 could be killed")


@pytest.fixture(scope="module")
def killed(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache's folder as a two-process run leaves it when rank 1 is killed midway; read-only
    (each test resumes a copy)."""
    folder = tmp_path_factory.mktemp("killed")
    process = kill_rank_midway(synthetic, folder / "x.h5",
                               tmp_path_factory.mktemp("killed-log") / "killed.log")
    assert process.returncode != 0
    return folder


RERUNS = {"1 process": on_one_machine(1), "2 processes": on_one_machine(2), "no torchrun": []}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", RERUNS.values(), ids=RERUNS.keys())
def test_resume_after_a_rank_is_killed(
    synthetic: Path, reference: Path, killed: Path, tmp_path: Path, launcher: list[str]
) -> None:
    out = Path(shutil.copytree(killed, tmp_path / "cache")) / "x.h5"
    total = len(read_dataset(synthetic).keys())
    assert not out.exists()
    shards = shard_paths(out)
    assert shard_path(out, 1) in shards
    done = sum(done_rows(shard) for shard in shards)  # rank 0 takes them in only at the end
    assert 0 < done < total

    rerun = start(launcher, synthetic, out, tmp_path / "rerun.log")
    output = finished(rerun, tmp_path / "rerun.log")
    assert rerun.returncode == 0, output
    assert f"took {done} images from {len(shards)} shards" in output  # resumed from the shards
    assert f"{total - done}/{total - done} [" in output  # and computed only the rest
    assert output.splitlines()[-1] == str(out)
    assert not partial_path(out).exists() and not shard_paths(out)
    assert_same_cache(out, reference)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_machines_on_localhost(synthetic: Path, reference: Path, tmp_path: Path) -> None:
    """Two torchrun launchers meeting through a c10d rendezvous, one process each, as two
    machines sharing the cache folder would."""
    out, port = tmp_path / "x.h5", free_port()
    launchers = [["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                  "--rdzv-id", "tll-test"] for node in (0, 1)]
    logs = [tmp_path / f"node-{node}.log" for node in (0, 1)]
    processes = [start(launcher, synthetic, out, log)
                 for launcher, log in zip(launchers, logs, strict=True)]
    outputs = [finished(process, log) for process, log in zip(processes, logs, strict=True)]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output
        assert output.splitlines()[-1] == str(out)
    assert "dealt out to 2 processes (gloo)" in "".join(outputs)
    assert_same_cache(out, reference)
    assert not shard_paths(out)


def break_an_image_of_rank_1(data: Path, out: Path) -> str:
    """Garbage in place of the 6th image, in block 1 (rows 4-7): rank 1's first block. Returns
    what the message must name."""
    image = read_dataset(data).images[read_dataset(data).keys()[5]]
    image.write_bytes(b"this is not a JPEG" * 10)
    return image.name


def cache_for_another_size(data: Path, out: Path) -> str:
    """A complete cache of these images at another input size where the cache goes."""
    main("resnet50", data, out=out, weights="none", input_size=(48, 48), batch_size=44,
         workers=0, device="cpu", hflip=False)
    return "input_size"


# what goes wrong (it returns what the message must name), and the rank that finds it
BAD_INPUT = {
    "bad image, found by rank 1": (break_an_image_of_rank_1, 1),
    "cache built for something else, found by rank 0": (cache_for_another_size, 0),
}


@pytest.mark.slow
@pytest.mark.parametrize(("spoil", "rank"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_stops_every_rank_with_one_message(
    dataset_copy: Path, tmp_path: Path, spoil, rank: int
) -> None:
    out, log = tmp_path / "out" / "x.h5", tmp_path / "run.log"
    out.parent.mkdir()
    named = spoil(dataset_copy, out)
    before = out.read_bytes() if out.exists() else None
    started = time.monotonic()
    process = start(on_one_machine(2), dataset_copy, out, log)
    output = finished(process, log, timeout=120)
    assert process.returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2, output  # one line from each rank (torchrun's own report aside)
    own = [line for line in errors if not line.startswith("Error: rank ")]
    assert len(own) == 1 and named in own[0], output
    assert f"Error: rank {rank}: {own[0].removeprefix('Error: ')}" in errors
    assert time.monotonic() - started < 100  # nobody waited for a timeout
    assert (out.read_bytes() if out.exists() else None) == before


# --- the shards, in one process ----------------------------------------------------------------


def test_blocks_to_do() -> None:
    blocks = blocks_to_do(10, 4, np.array([1, 9]))
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [8, 9]]
    assert blocks_to_do(10, 4, np.array([], dtype=np.int64)) == []


@pytest.fixture
def written(reference: Path) -> tuple[list[str], list[str], np.ndarray]:
    """The reference cache's keys, image digests and features (N, C, h, w)."""
    keys = read_keys(reference)
    return keys, read_image_digests(reference, keys), read_features(reference, keys)


def test_shard_rows_are_taken_in_unless_their_image_changed(
    reference: Path, written, tmp_path: Path
) -> None:
    keys, digests, features = written
    info = read_info(reference)
    out = tmp_path / "x.h5"
    blocks = blocks_to_do(len(keys), BATCH, np.arange(len(keys)))
    for rank in (0, 1, 2):  # a run of 3 processes, each killed after two blocks
        with ShardWriter(out, rank, keys, digests, info) as shard:
            for block in blocks[rank::3][:2]:
                shard.write(block, features[block, None])  # (n, 1 view, C, h, w)
    assert shard_paths(out) == [shard_path(out, r) for r in (0, 1, 2)]
    with h5py.File(shard_path(out, 1), "r") as file:
        assert file["features"].chunks == (1, *info.feature_shape)
        assert file["done"][:].sum() == 2 * BATCH
    shard_rows = np.concatenate([b for rank in (0, 1, 2) for b in blocks[rank::3][:2]])

    changed = int(shard_rows[3])  # its image has changed since its shard row was written
    now = list(digests)
    now[changed] = "0" * 64
    writer = CacheWriter(out, keys, now, info)
    try:
        assert not shard_paths(out)
        assert sorted(p.name for p in tmp_path.iterdir() if "lock" in p.name) == [
            "..x.h5.shard-0.lock", "..x.h5.shard-1.lock", "..x.h5.shard-2.lock"]
        expected = sorted(set(range(len(keys))) - set(shard_rows.tolist()) | {changed})
        assert writer.missing.tolist() == expected
        writer.write(np.array(expected), features[expected, None])
        assert writer.finish() == out
    finally:
        writer.close()
    assert read_features(out, keys).tobytes() == features.tobytes()


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7])
def test_a_merge_in_many_chunks_gives_the_single_process_cache(
    reference: Path, written, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    rows_per_chunk: int
) -> None:
    """Shards are copied in a bounded number of rows at a time (MERGE_BYTES); with room for only
    a few rows, the merge crosses many chunk boundaries, inside runs of consecutive rows and at
    their ends, and still gives, row for row, the cache one process writes."""
    keys, digests, features = written
    info = read_info(reference)
    row_bytes = int(np.prod(info.feature_shape)) * 2 * len(info.views)  # float16
    monkeypatch.setattr(cache, "MERGE_BYTES", rows_per_chunk * row_bytes + row_bytes // 2)
    out = tmp_path / "x.h5"
    # rank 0 holds runs of 20 and 29 rows, rank 1 the rest (38 rows) and row 20
    held = {0: np.r_[0:20, 21:50], 1: np.r_[20, 50:len(keys)]}
    for rank, rows in held.items():
        with ShardWriter(out, rank, keys, digests, info) as shard:
            shard.write(rows, features[rows, None])  # (n, 1 view, C, h, w)
    copied = []  # the rows of each block copied in
    write = CacheWriter.write

    def recorded(self: CacheWriter, rows: np.ndarray, block: np.ndarray) -> None:
        copied.append(rows.tolist())
        write(self, rows, block)

    monkeypatch.setattr(CacheWriter, "write", recorded)
    writer = CacheWriter(out, keys, digests, info)
    try:
        assert writer.missing.size == 0 and not shard_paths(out)
        assert writer.finish() == out
    finally:
        writer.close()
    assert max(map(len, copied)) == rows_per_chunk
    assert len(copied) >= (len(keys) - 1) // rows_per_chunk  # many chunks, none lost
    assert sorted(sum(copied, [])) == list(range(len(keys)))  # each row copied once
    assert_same_cache(out, reference)


def test_a_shard_built_for_something_else_is_refused(
    reference: Path, written, tmp_path: Path
) -> None:
    keys, digests, features = written
    out = tmp_path / "x.h5"
    other = dataclasses.replace(read_info(reference), layer="layer3")
    with ShardWriter(out, 0, keys, digests, other) as shard:
        shard.write(np.arange(BATCH), features[:BATCH, None])
    with pytest.raises(CacheError, match="layer.*--overwrite"):
        CacheWriter(out, keys, digests, read_info(reference))
    assert shard_paths(out) == [shard_path(out, 0)]  # refused, not deleted
    CacheWriter(out, keys, digests, read_info(reference), overwrite=True).close()
    assert not shard_paths(out)  # --overwrite discards it


def test_an_unreadable_shard_is_deleted(
    reference: Path, written, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys, digests, _ = written
    out = tmp_path / "x.h5"
    shard_path(out, 3).write_bytes(b"killed while being created")
    writer = CacheWriter(out, keys, digests, read_info(reference))
    writer.close()
    assert "unreadable" in caplog.text and not shard_paths(out)
    assert len(writer.missing) == len(keys)


def test_a_shard_being_written_is_not_touched(
    reference: Path, written, tmp_path: Path
) -> None:
    keys, digests, features = written
    out = tmp_path / "x.h5"
    with ShardWriter(out, 0, keys, digests, read_info(reference)) as shard:
        shard.write(np.arange(BATCH), features[:BATCH, None])
        with pytest.raises(UserError, match="being written by another process"):
            CacheWriter(out, keys, digests, read_info(reference))
    assert shard_paths(out) == [shard_path(out, 0)]


def test_a_complete_cache_drops_leftover_shards(
    reference: Path, written, tmp_path: Path
) -> None:
    """Killed after the cache was finished, before its shards were deleted."""
    keys, digests, features = written
    out = Path(shutil.copy(reference, tmp_path / "x.h5"))
    with ShardWriter(out, 1, keys, digests, read_info(reference)) as shard:
        shard.write(np.arange(BATCH), features[:BATCH, None])
    before = out.read_bytes()
    writer = CacheWriter(out, keys, digests, read_info(reference))
    assert writer.finish() == out
    assert out.read_bytes() == before and not shard_paths(out)
