"""`python -m extract` under torchrun: which process this is, the process group, and the rule
that an error on one rank stops every rank with its message.

torchrun starts one process per rank with RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in its
environment (nanoGPT's test: `int(os.environ.get("RANK", -1)) != -1`); without them nothing here
is used. The group only coordinates: the ranks exchange a few numbers per block and rank 0's plan
once, while features go through the shared folder (extract.cache's shards). It is NCCL where the
trunk runs on CUDA, each rank on cuda:LOCAL_RANK, and gloo on the CPU.

Errors: every stretch of work that can fail on some ranks only ends in a collective that every
rank reaches whatever happened to it (`together`, `agree`), so bad input ends every rank at the
same point with the same message, rather than leaving the others waiting. A rank that dies
outright (killed, out of memory) leaves the others in a collective: gloo sees the closed
connection at once; NCCL gives up after GROUP_TIMEOUT at the latest; and torchrun stops the rest
of the job as soon as one of its processes has failed. A survivor that sees it first says so in
one line (`PeerLost`): the shards keep every row written, so a rerun resumes.

Before any row is computed the ranks compare their plans (`same_everywhere`): a rank given other
options would otherwise write other features under rank 0's description.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from tll import UserError, first_line

# the longest a rank waits for the others in one collective; the longest wait is for rank 0
# while it copies every shard into the cache (about the time to copy the cache's bytes)
GROUP_TIMEOUT = timedelta(minutes=30)

T = TypeVar("T")


class PeerFailed(UserError):
    """Another rank stopped on an error; the message is its own, prefixed with its rank."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's."""

    rank: int  # among every process of the job, on every machine
    world: int  # processes in the job
    local_rank: int  # among this machine's processes: its GPU
    local_world: int  # processes on this machine

    @property
    def master(self) -> bool:
        """Rank 0: it holds the cache, logs, and shows the progress bar."""
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Ranks | None:
        """This process's ranks as torchrun set them; None when it was not started by torchrun."""
        if int(os.environ.get("RANK", -1)) == -1:
            return None
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                   int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]))


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the `with` block (and leave it, also on an error);
    yields the device this rank runs on: cuda:LOCAL_RANK (NCCL) if `device` is CUDA, else the
    CPU (gloo)."""
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)  # NCCL's own tensors, and the object collectives', go here
        dist.init_process_group("nccl", timeout=GROUP_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    try:
        yield device
    finally:
        dist.destroy_process_group()


class PeerLost(UserError):
    """Another rank is gone (killed, crashed): a collective with it failed."""


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    """Turn the error of a collective whose peer is gone (gloo: "Connection closed by peer";
    NCCL: a timeout, torch's RuntimeError either way) into PeerLost."""
    try:
        yield
    except RuntimeError as error:
        rank, world = dist.get_rank(), dist.get_world_size()
        peer = f"rank {1 - rank}" if world == 2 else f"another of the {world} ranks"
        # gloo's first line: "[<its source file>] Connection closed by peer [host]:port. This..."
        cause = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". ")[0]
        raise PeerLost(f"{peer} stopped ({cause}); the rows written so far are kept: rerun "
                       "the same command to resume") from None


def same_everywhere(plan: dict[str, tuple[str, object]]) -> None:
    """Collective, on every rank: `plan` maps what a rank was given (e.g. "was given
    --input-size") to (how to show it, the value that must be equal on every rank). If a rank's
    plan differs from rank 0's, every rank raises the same UserError naming the first such
    rank and entry."""
    plans: list[dict | None] = [None] * dist.get_world_size()
    with _collective():
        dist.all_gather_object(plans, plan)
    for rank, theirs in enumerate(plans[1:], start=1):
        for entry, (shown, value) in plans[0].items():
            if theirs[entry][1] != value:
                raise UserError(f"rank {rank} {entry} {theirs[entry][0]}, rank 0 {shown}: "
                                "every rank must run the same command")


def agree(error: Exception | None, count: int = 0) -> int:
    """Collective, on every rank: the sum of `count` over the ranks. If any rank passes an
    error, every rank raises instead: that rank its own error, the others PeerFailed with the
    message of the lowest rank that failed."""
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    totals = torch.tensor([count, error is not None], dtype=torch.int64, device=device)
    with _collective():
        dist.all_reduce(totals)
    if not totals[1]:
        return int(totals[0])
    messages: list[str | None] = [None] * dist.get_world_size()
    with _collective():
        dist.all_gather_object(messages, None if error is None else _message(error))
    if error is not None:
        raise error
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise PeerFailed(f"rank {rank}: {message}")


def _message(error: Exception) -> str:
    """The line a user sees for `error`: a UserError's message alone, as the commands print it."""
    return str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Run the `with` block on every rank, then `agree`: if it raised on any rank, it raises
    on every rank."""
    error = None
    try:
        yield
    except Exception as caught:
        error = caught
    agree(error)


def share(value: T) -> T:
    """Collective, on every rank: rank 0's `value` (the others pass anything, e.g. None)."""
    box = [value]
    with _collective():
        dist.broadcast_object_list(box, src=0)
    return box[0]
