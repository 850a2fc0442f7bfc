"""Training on caches larger than memory: the memory budget, and the train images' features
read from the cache batch by batch where they do not fit it.

`head.folds.load_pairs` keeps the train features of as many caches in memory as fit the budget
(`--memory-budget`; by default BUDGET_SHARE of the memory available on the device that trains:
the RAM, or the GPU's free memory), the smallest first, one tensor each as always. A cache that
does not fit becomes `StreamedFeatures`, which stands for that (N, V, *feature_shape) float16
tensor: it is indexed the ways training indexes it and reads just those rows from the file
(`extract.cache.FeatureRows`), so that a run gives the same figures as in memory, bit for bit,
with the same seeds. `read_ahead` tells it what the next batches will ask, in order: one
background thread per cache reads them while the head trains on the current batch. A sweep's
trials and folds, and validation, share the one reader of each cache.

What streaming costs in memory beyond the budget: READ_AHEAD requests (two batches) per
streamed cache, and the batch being trained on. The baselines (head.figures, head.whiten) pool
features a block of at most POOL_BYTES at a time, in memory or streamed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from extract.cache import CacheInfo, FeatureRows
from tll import format_bytes, logger
from tll.device import available_memory

BUDGET_SHARE = 0.6  # of the memory available when training starts: the rest is for the head,
# its optimiser, the batches' activations and whatever else runs on the machine
READ_AHEAD = 4  # requests read ahead of the one asked for: a batch's lefts and rights, twice
POOL_BYTES = 32 << 20  # what the baselines' pooling holds at once, however large the cache


def memory_budget(asked: int | None, device: torch.device) -> tuple[float, str]:
    """The bytes of features that may be held in memory on `device`, and where that figure
    comes from in words: `asked` (--memory-budget), else BUDGET_SHARE of the memory available
    there now (unlimited where the system does not say)."""
    if asked is not None:
        return asked, f"--memory-budget {format_bytes(asked)}"
    available, what = available_memory(device)
    if available is None:
        return math.inf, "no memory budget (the system does not say how much memory is free)"
    budget = BUDGET_SHARE * available
    return budget, (f"memory budget {format_bytes(budget)} ({BUDGET_SHARE:.0%} of "
                    f"{format_bytes(available)} {what})")


def budget_share(budget: float, jobs: int) -> int | None:
    """Each of `jobs` processes' share of `budget` as a --memory-budget: None (each process
    finds its own, unlimited again) where the budget is unlimited."""
    return None if math.isinf(budget) else int(budget // jobs)


def features_bytes(info: CacheInfo, images: int, views: int) -> int:
    """What `images` images' features take in memory in `views` views, as the cache stores
    them."""
    return images * views * math.prod(info.feature_shape) * np.dtype(info.dtype).itemsize


def fits_in_memory(sizes: list[int], budget: float) -> list[bool]:
    """Which caches (their features' `sizes` in bytes) are kept in memory: the smallest first,
    while together they fit `budget`; the others are streamed."""
    kept, used = [False] * len(sizes), 0
    for i in sorted(range(len(sizes)), key=lambda i: sizes[i]):
        if used + sizes[i] > budget:
            break
        kept[i], used = True, used + sizes[i]
    return kept


def log_memory_plan(caches: list[Path], sizes: list[int], kept: list[bool], budget: str) -> None:
    """The one line that says where the features are held, and why."""
    total = format_bytes(sum(sizes))
    if all(kept):
        logger.info("features %s fit the %s: held in memory", total, budget)
        return
    streamed = [f"{c} ({format_bytes(s)})" for c, s, k in zip(caches, sizes, kept, strict=True)
                if not k]
    held = [f"{c} ({format_bytes(s)})" for c, s, k in zip(caches, sizes, kept, strict=True) if k]
    logger.info("features %s > %s: streaming batches from %s, read ahead in the background%s",
                total, budget, " and ".join(streamed),
                f"; {' and '.join(held)} held in memory" if held else "")


class _Reader:
    """One cache's rows (`FeatureRows`, its views in the order of `views`) and one thread that
    reads the announced requests ahead of them being asked for. A request: (positions (n,),
    views) with views a tuple of view indices (every one of them: (n, V, ...)) or an array (n,)
    of one view index per row ((n, ...))."""

    def __init__(self, rows: FeatureRows, views: tuple[str, ...]):
        self.rows, self.views = rows, views
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tll-read-ahead")
        self.pending: deque = deque()  # announced requests not yet being read
        self.ahead: deque[tuple[tuple, Future]] = deque()  # being read or read, in order

    def read(self, request: tuple) -> np.ndarray:
        positions, views = request
        if isinstance(views, tuple):
            out = np.empty((len(positions), len(views), *self.rows.feature_shape),
                           dtype=np.float16)  # (n, V, ...)
            for i, view in enumerate(views):
                out[:, i] = self.rows.read(positions, self.views[view])
            return out
        out = np.empty((len(positions), *self.rows.feature_shape), dtype=np.float16)  # (n, ...)
        for view in np.unique(views):
            chosen = views == view
            out[chosen] = self.rows.read(positions[chosen], self.views[view])
        return out

    def announce(self, requests: list[tuple]) -> None:
        self.ahead.clear()  # whatever was read for an earlier announcement is dropped
        self.pending = deque(requests)
        self._fill()

    def fetch(self, request: tuple) -> np.ndarray:
        if self.ahead and _same(self.ahead[0][0], request):
            _, future = self.ahead.popleft()
            self._fill()
            return future.result()
        if self.ahead or self.pending:  # asked for something else: the plan no longer holds
            logger.debug("%s: rows asked for out of the announced order; reading them now",
                         self.rows.path)
            self.ahead.clear()
            self.pending.clear()
        return self.read(request)

    def _fill(self) -> None:
        while self.pending and len(self.ahead) < READ_AHEAD:
            request = self.pending.popleft()
            self.ahead.append((request, self.pool.submit(self.read, request)))


def _same(a: tuple, b: tuple) -> bool:
    if isinstance(a[1], tuple) != isinstance(b[1], tuple):
        return False
    return np.array_equal(a[0], b[0]) and (a[1] == b[1] if isinstance(a[1], tuple)
                                           else np.array_equal(a[1], b[1]))


class StreamedFeatures:
    """Stands for the (N, V, *feature_shape) float16 tensor of a cache's train images that
    `load_pairs` would hold in memory, on `device`, read from the cache as it is indexed, in
    the three ways training does: `f[rows]` (b, V, ...), `f[rows, views]` with one view index
    (or one per row) (b, ...), and `f[:, a:b]` (the same features in fewer views, sharing the
    reader)."""

    def __init__(self, reader: _Reader, views: tuple[int, ...], device: torch.device):
        self.reader, self.view_indices, self.device = reader, views, device
        self.dtype = torch.float16
        self.shape = torch.Size((len(reader.rows.rows), len(views), *reader.rows.feature_shape))

    @classmethod
    def open(cls, path: Path, keys: list[str], views: tuple[str, ...],
             device: torch.device) -> StreamedFeatures:
        """The features of `keys` (rows in their order) in `views` of the cache at `path`."""
        reader = _Reader(FeatureRows(path, keys, views), views)
        return cls(reader, tuple(range(len(views))), device)

    def __getitem__(self, key) -> torch.Tensor | StreamedFeatures:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice):
            return StreamedFeatures(self.reader, self.view_indices[key[1]], self.device)
        features = self.reader.fetch(self._request(key))
        return torch.from_numpy(features).to(self.device)

    def _request(self, key: tuple) -> tuple:
        """A key as a request of the reader: positions, and views as indices of its own."""
        if len(key) not in (1, 2):
            raise TypeError(f"StreamedFeatures takes [rows] or [rows, views], not {key!r}")
        positions = torch.as_tensor(key[0]).cpu().numpy().astype(np.int64, copy=False)
        if len(key) == 1:
            return positions, self.view_indices
        views = np.broadcast_to(torch.as_tensor(key[1]).cpu().numpy(), positions.shape)
        return positions, np.asarray(self.view_indices)[views]

    def expect(self, keys: Iterable) -> None:
        """The keys this will be indexed with next, in order, to read in the background."""
        self.reader.announce([self._request(k if isinstance(k, tuple) else (k,))
                              for k in keys])


def pooling_blocks(rows: torch.Tensor, features: list) -> tuple[torch.Tensor, ...]:
    """`rows` cut into blocks whose features (float16, and float32 once converted; every cache
    and view) take at most POOL_BYTES together, for the baselines that pool them."""
    row_bytes = sum(math.prod(f.shape[1:]) for f in features) * (2 + 4)
    return rows.split(max(1, POOL_BYTES // row_bytes))


def read_ahead(features: list, keys: Callable[[], Iterable]) -> None:
    """Tells each streamed cache among `features` the keys (`keys()`, built only if one is
    streamed) it will be indexed with next, in order; nothing for features in memory."""
    streamed = [f for f in features if isinstance(f, StreamedFeatures)]
    if streamed:
        keys = list(keys())
        for f in streamed:
            f.expect(keys)
