"""The feature cache: one HDF5 file per (backbone, layer, weights, input size, dataset).
This is the only module that imports h5py.

Schema (version 4)::

    /keys            (N,)          utf-8 str  "split/side/id" of every image, sorted: row order
    /features        (N, C, h, w)  float16    the trunk's feature map of each image, contiguous
                     or (N, D)                (fast fancy-index and slice reads; one row, one
                                              read); or its vector (a global embedding,
                                              `--layer global`)
    /features_hflip  like features            only in a two-view cache (`extract --hflip`): the
                                              features of each image flipped left to right
    /done            (N,)          uint8      1 once a row's features are written (resume)
    /image_sha256    (N,)          utf-8 str  sha256 of the image file each row was computed from

    attributes: schema_version, backbone (a torchvision name or timm:<model>.<tag>), layer,
    weights ("imagenet" | "pretrained" | "none" | an absolute path), weights_id (enum name, hub
    id, random-init seed, or sha256 of the file), mean, std (3,), input_size (H, W),
    interpolation (how images were resized to it: bilinear | bicubic), feature_shape (C, h, w)
    or (D,), views ("identity" [, "hflip"]), precision (what the trunk computed in: float32,
    or autocast to bfloat16 on a CPU or float16 on CUDA), dtype (what the rows are stored in),
    torch_version, torchvision_version, timm_version, dataset (absolute path),
    dataset_fingerprint (sha256 of keys and image contents), complete.

Every cache tll has written stores its features contiguous (not chunked): row i of a view is
the bytes at a fixed offset, so `FeatureRows` reads a row where training needs it with one
positional read (`os.preadv`, which releases the GIL; ten times h5py's fancy indexing on
64 scattered 229 KB rows) and no chunk cache is involved. A view is its own dataset because a
training step needs one view of each image (drawn per image), validation both: one read per
row and view either way. A cache rewritten chunked (say by h5repack) is read through h5py
instead, with a chunk cache sized for a batch, slower.

Schema 3 is schema 4 without precision; schema 2 is schema 3 without interpolation,
timm_version and views, and maps only: they read as bilinear, one view and precision
"unrecorded". A complete one trains as before, but no extraction resumes, updates or reuses it
(it was computed in float32, or float16 on CUDA: nobody can tell), so that no cache mixes rows
of two precisions; `--overwrite` rebuilds it.

A cache in progress lives at ``<name>.h5.partial``; it is renamed to ``<name>.h5`` only once every
row is done, ``complete`` is set and the closed file reads back whole, so a file under the final
name is always whole. Rows are written before their ``done`` flag, so a killed run loses at most
the rows in flight. One process writes a cache at a time: the writer holds ``.<name>.h5.lock``
(`tll.files.exclusive`) before it opens anything. A row whose image has changed since it was
computed (its sha256 differs) is computed again on resume or on a rerun over a complete cache.
Schema 1 (before per-row image hashes) is refused with a hint to rebuild.

Shards (an extraction under torchrun, one per rank): rank r writes only its own
``.<name>.h5.shard-<r>`` beside the cache, holding that file's lock ``..<name>.h5.shard-<r>.lock``.
A shard has the cache's schema and attributes (``complete`` always false) with every row present
but only that rank's rows done, and its features chunked by row, so that rows it never writes
take no space. The cache's writer (rank 0, holding the cache's lock) copies every shard's done
rows into ``<name>.h5.partial`` and deletes the shard: after all ranks have finished, and at the
start of every run (with or without torchrun, with any number of processes) for the shards an
interrupted run left. A shard row counts only if its ``image_sha256`` is still its image's; a
shard built for something else is refused like the cache, one that cannot be read is deleted.
The shards' lock files stay, hidden and empty, like the cache's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re
import shutil
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from extract.trunk_spec import TrunkSpec
from tll import UserError, logger
from tll.files import (
    HDF5_SIGNATURE,
    exclusive,
    file_kind,
    file_start,
    is_disk_full,
    no_link,
    no_space,
)

SCHEMA_VERSION = 4
READABLE_SCHEMAS = (2, 3, SCHEMA_VERSION)
# the precision of a cache written before it was recorded (schema 2 and 3)
UNRECORDED = "unrecorded"
FEATURE_DTYPE = np.float16
# each view of the images a cache can hold, and the dataset that holds its maps
VIEW_DATASETS = {"identity": "features", "hflip": "features_hflip"}
# what makes two caches interchangeable apart from the images' contents, which are compared
# row by row (image_sha256); a resume or a reuse must match all of them
IDENTITY_FIELDS = ("backbone", "layer", "weights_id", "mean", "std", "input_size",
                   "interpolation", "feature_shape", "views", "precision")
DATASETS = ("keys", "features", "done", "image_sha256")
# at most this many bytes of feature maps in memory at once while a shard is copied in
MERGE_BYTES = 64 << 20


class CacheError(UserError, ValueError):
    """A cache that is missing, incomplete, damaged, or does not match what was asked for."""


@dataclass(frozen=True, kw_only=True)
class CacheInfo(TrunkSpec):
    """A cache's attributes: the trunk it was cut from (`TrunkSpec`'s fields), what its rows
    hold, and from what."""

    feature_shape: tuple[int, ...]  # (C, h, w) of a map or (D,) of a vector
    dataset: str
    dataset_fingerprint: str
    torch_version: str
    torchvision_version: str
    timm_version: str = ""  # absent in schema 2
    views: tuple[str, ...] = ("identity",)  # the image as it is [, flipped left to right]
    precision: str = UNRECORDED  # tll.device.PRECISIONS; absent before schema 4
    dtype: str = "float16"
    schema_version: int = SCHEMA_VERSION

    def mismatches(self, other: CacheInfo) -> list[str]:
        """`field: theirs (cache) vs ours (asked)` for each identity field that differs."""
        return [f"{name}: {getattr(other, name)} (cache) vs {getattr(self, name)} (asked)"
                for name in IDENTITY_FIELDS if getattr(self, name) != getattr(other, name)]


def _write_info(file: h5py.File, info: CacheInfo) -> None:
    for name, value in dataclasses.asdict(info).items():
        file.attrs[name] = list(value) if isinstance(value, tuple) else value


def _read_info(file: h5py.File, path: Path) -> CacheInfo:
    attrs = file.attrs
    version = attrs.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise CacheError(f"{path}: cache schema version {version}, this tll reads "
                         f"{' and '.join(map(str, READABLE_SCHEMAS))}; rebuild it with "
                         "`python -m extract ... --overwrite`")
    missing = [f.name for f in dataclasses.fields(CacheInfo)
               if f.name not in attrs and f.default is dataclasses.MISSING]
    views = tuple(attrs.get("views", ["identity"]))
    missing += [name for name in (*DATASETS, *(VIEW_DATASETS.get(v, v) for v in views))
                if name not in file]
    if missing:
        raise CacheError(f"{path} is damaged (it lacks {', '.join(dict.fromkeys(missing))}); "
                         "rebuild it with `python -m extract ... --overwrite`")
    # numpy's arrays and scalars as Python's; a field absent (schema 2) takes its default
    return CacheInfo.from_metadata({
        name: value.tolist() if isinstance(value, np.ndarray | np.generic) else value
        for name, value in attrs.items()})


def foreign_cache(path: Path) -> str | None:
    """What the file at a cache's path is where it is not a tll cache (for `check_output`);
    None for a cache, even a damaged one (--overwrite rebuilds it), and for an empty file."""
    start = file_start(path)
    if not start:
        return None
    if not start.startswith(HDF5_SIGNATURE):
        return f"not a tll cache ({file_kind(start)})"
    try:
        with h5py.File(path, "r") as file:
            return None if "schema_version" in file.attrs else \
                "not a tll cache (an HDF5 file without a tll cache's attributes)"
    except OSError:  # too damaged to open: a cache that a crash cut short
        return None


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def shard_path(path: Path, rank: int) -> Path:
    """The file that rank `rank` of a torchrun extraction writes its rows of the cache `path` to."""
    return path.with_name(f".{path.name}.shard-{rank}")


def shard_paths(path: Path) -> list[Path]:
    """The shards beside the cache `path`, whichever run left them, in rank order."""
    name = re.compile(rf"\.{re.escape(path.name)}\.shard-(\d+)")
    found = [(int(match[1]), shard)
             for shard in path.parent.glob(f".{glob.escape(path.name)}.shard-*")
             if (match := name.fullmatch(shard.name))]
    return [shard for _, shard in sorted(found)]


def _open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as error:
        raise CacheError(f"{path} is damaged or not an HDF5 cache ({error}); rebuild it with "
                         "`python -m extract ... --overwrite`") from None


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [value.decode() for value in dataset[:]]


def _create(path: Path, keys: list[str], info: CacheInfo, row_chunks: bool = False) -> h5py.File:
    """A new file of the schema at `path`, no row done; features contiguous, or (`row_chunks`)
    stored one row per chunk, so that only the rows written take space."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = h5py.File(path, "w")
    _write_info(file, info)
    file.attrs["complete"] = False
    strings = h5py.string_dtype()
    file.create_dataset("keys", data=np.array(keys, dtype=object), dtype=strings)
    file.create_dataset("done", data=np.zeros(len(keys), dtype=np.uint8))
    for view in info.views:
        file.create_dataset(VIEW_DATASETS[view], shape=(len(keys), *info.feature_shape),
                            dtype=FEATURE_DTYPE,
                            chunks=(1, *info.feature_shape) if row_chunks else None)
    file.create_dataset("image_sha256", shape=(len(keys),), dtype=strings)
    file.flush()
    return file


def _view_names(file: h5py.File) -> list[str]:
    """The datasets of the file's views, in the order of its `views`."""
    return [VIEW_DATASETS[view] for view in file.attrs.get("views", ["identity"])]


def _write_rows(file: h5py.File, path: Path, rows: np.ndarray, features: np.ndarray,
                digests: np.ndarray) -> None:
    """Store features (n, V, C, h, w) (one map per view) and image digests (n,) for the
    ascending row indices `rows` (n,) of `file` (at `path`), then mark them done."""
    try:
        if rows[-1] - rows[0] + 1 == len(rows):  # contiguous: one slice write
            block = slice(rows[0], rows[-1] + 1)
        else:
            block = rows
        for view, name in enumerate(_view_names(file)):
            file[name][block] = features[:, view]
        file["image_sha256"][block] = digests
        file.flush()
        file["done"][block] = 1  # only once its features are on disk
        file.flush()
    except OSError as error:
        if is_disk_full(error, path.parent):
            raise no_space(path) from None
        raise


def _runs(rows: np.ndarray, longest: int) -> Iterator[np.ndarray]:
    """The ascending `rows` cut into runs of consecutive rows, each at most `longest` long."""
    for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1):
        for start in range(0, len(run), longest):
            yield run[start:start + longest]


class CacheWriter:
    """Creates, resumes or updates the cache at `path` for `keys` (whose image files have the
    sha256 `digests`), taking in what shards beside it hold (`take_shards`); `write` rows, then
    `finish`. `missing`: the rows still to compute. The caller holds the cache's lock."""

    def __init__(self, path: str | Path, keys: list[str], digests: list[str], info: CacheInfo,
                 overwrite: bool = False):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.info = info
        self.keys = keys
        self.digests = np.array(digests, dtype=object)
        self.file: h5py.File | None = None
        self.missing = np.zeros(0, dtype=np.int64)
        self._start(overwrite)
        try:
            self.take_shards(discard=overwrite)
        except BaseException:
            self.close()
            raise

    @property
    def is_complete(self) -> bool:
        """Nothing left to write: the cache was complete and up to date when opened, or
        `finish` has run (no partial file is open; a writer `close`d unfinished is not asked)."""
        return self.file is None

    def _start(self, overwrite: bool) -> None:
        """Open the cache to write, with `missing` set (file None: complete and up to date)."""
        no_link(self.partial)
        if self.path.exists() and not overwrite:
            changed = self._changed_rows(self.path)
            if not len(changed):
                return
            # copy, so that the complete cache stays in place until its update is complete
            logger.info("%d images of %s have changed since it was built (e.g. %s); "
                        "computing them again", len(changed), self.path, self.keys[changed[0]])
            shutil.copyfile(self.path, self.partial)
            self.file = _open(self.partial, "r+")
            self.file.attrs["dataset_fingerprint"] = self.info.dataset_fingerprint
            self._mark_to_do(changed)
            return
        if self.partial.exists() and not overwrite:
            self.file = self._resumable_partial()
        if self.file is not None:
            self.file.attrs["dataset_fingerprint"] = self.info.dataset_fingerprint
            self.missing = np.flatnonzero(self.file["done"][:] == 0)
            logger.info("resuming %s: %d of %d images left", self.partial, len(self.missing),
                        len(self.keys))
            return
        self.file = _create(self.partial, self.keys, self.info)
        self.missing = np.arange(len(self.keys))

    def _changed_rows(self, path: Path) -> np.ndarray:
        """Rows of a complete cache whose image has changed; refuses one built for other
        images or another trunk."""
        with _open(path, "r") as file:
            self._refuse_other(file, path)
            return np.flatnonzero(np.array(_strings(file["image_sha256"]), dtype=object)
                                  != self.digests)

    def _resumable_partial(self) -> h5py.File | None:
        """The unfinished cache opened for writing, its changed rows marked to do again; None
        if it cannot be read (killed while its own structure was being written)."""
        try:
            file = h5py.File(self.partial, "r+")
        except OSError as error:
            logger.warning("%s is unreadable (%s); starting it over", self.partial, error)
            return None
        try:
            _read_info(file, self.partial)
        except CacheError as error:  # damaged, or left by an older tll
            file.close()
            logger.warning("%s; starting it over", error)
            return None
        try:
            self._refuse_other(file, self.partial)
        except CacheError:
            file.close()
            raise
        self.file = file
        done = file["done"][:].astype(bool)
        stored = np.array(_strings(file["image_sha256"]), dtype=object)
        changed = np.flatnonzero(done & (stored != self.digests))
        if len(changed):
            logger.info("%d images have changed since they were extracted (e.g. %s); computing "
                        "them again", len(changed), self.keys[changed[0]])
            self._mark_to_do(changed)
        return file

    def _refuse_other(self, file: h5py.File, path: Path) -> None:
        problems = self.info.mismatches(_read_info(file, path))
        if not problems and _strings(file["keys"]) != self.keys:
            problems = ["the image list differs"]
        if problems:
            raise CacheError(f"{path} was built for something else ({'; '.join(problems)}); pass "
                             "--overwrite to rebuild it, or --out to write another file")

    def _mark_to_do(self, rows: np.ndarray) -> None:
        assert self.file is not None
        self.file.attrs["complete"] = False
        self.file["done"][rows] = 0
        self.file.flush()
        self.missing = np.flatnonzero(self.file["done"][:] == 0)

    def write(self, rows: np.ndarray, features: np.ndarray) -> None:
        """Store features (n, V, *feature_shape), one per view, for the ascending row indices
        `rows` (n,)."""
        assert self.file is not None
        _write_rows(self.file, self.partial, rows, features, self.digests[rows])

    def take_shards(self, discard: bool = False) -> None:
        """Copy in every row that a shard beside the cache holds done, for an image unchanged
        since (the same sha256) and still missing here, then delete the shard; with `discard`,
        only delete it. Each shard's lock is held meanwhile: a shard still being written (by a
        live process, here or on another machine) is refused."""
        shards = shard_paths(self.path)
        taken = 0
        for shard in shards:
            with exclusive(shard):
                if no_link(shard).exists() and not discard:
                    taken += self._take(shard)
                # only once its rows are in the cache (each write is flushed)
                shard.unlink(missing_ok=True)
        if taken:
            assert self.file is not None
            self.missing = np.flatnonzero(self.file["done"][:] == 0)
        if shards:
            logger.info("%s %d images from %d shards (%s); %d of %d images left",
                        "discarded" if discard else "took", taken, len(shards),
                        ", ".join(s.name for s in shards), len(self.missing), len(self.keys))

    def _take(self, shard: Path) -> int:
        """Copy `shard`'s usable rows into the cache; how many it gave."""
        try:
            file = h5py.File(shard, "r")
        except OSError as error:  # killed while its own structure was being written
            logger.warning("%s is unreadable (%s); deleting it", shard, error)
            return 0
        with file:
            try:
                _read_info(file, shard)
            except CacheError as error:  # damaged, or left by an older tll
                logger.warning("%s; deleting it", error)
                return 0
            self._refuse_other(file, shard)
            if self.is_complete:  # and up to date: nothing to take
                return 0
            stored = np.array(_strings(file["image_sha256"]), dtype=object)
            usable = np.flatnonzero((file["done"][:] == 1) & (self.file["done"][:] == 0)
                                    & (stored == self.digests))
            row_bytes = math.prod(self.info.feature_shape) * 2 * len(self.info.views)
            for run in _runs(usable, max(1, MERGE_BYTES // row_bytes)):
                block = slice(run[0], run[-1] + 1)
                self.write(run, np.stack([file[name][block] for name in _view_names(file)],
                                         axis=1))  # (n, V, C, h, w)
            return len(usable)

    def finish(self) -> Path:
        """Check every row is done, mark the file complete, read it back whole and only then
        move it to its final name."""
        if self.file is not None:
            left = int((self.file["done"][:] == 0).sum())
            if left:
                raise CacheError(f"{self.partial}: {left} images still missing")
            self.file.attrs["complete"] = True
            self.file.close()
            self.file = None
            with _open_complete(self.partial, check_name=False) as file:
                _read_info(file, self.partial)
                for name in _view_names(file):
                    if file[name].shape != (len(self.keys), *self.info.feature_shape):
                        raise CacheError(f"{self.partial} reads back with {name} of shape "
                                         f"{file[name].shape}; not moved to {self.path}")
            os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class ShardWriter:
    """Rank `rank`'s rows of the cache `path` (for `keys`, whose image files have the sha256
    `digests`), in a new shard (`shard_path`) whose lock it holds from start to `close`; use it
    in a `with` block. Rank 0's `CacheWriter.take_shards` copies the rows into the cache."""

    def __init__(self, path: str | Path, rank: int, keys: list[str], digests: list[str],
                 info: CacheInfo):
        self.path = shard_path(Path(path), rank)
        self.digests = np.array(digests, dtype=object)
        self.written = False
        with contextlib.ExitStack() as held:
            held.enter_context(exclusive(self.path))
            self.file = _create(no_link(self.path), keys, info, row_chunks=True)
            self._held = held.pop_all()  # the lock, until `close`

    def write(self, rows: np.ndarray, features: np.ndarray) -> None:
        """Store features (n, V, C, h, w), a map per view, for the ascending row indices
        `rows` (n,)."""
        _write_rows(self.file, self.path, rows, features, self.digests[rows])
        self.written = True

    def close(self) -> None:
        """Close the shard, and delete it if it holds no row (this rank stopped, or had no
        block): it would only be left behind. Its lock is released last."""
        self.file.close()
        if not self.written:
            self.path.unlink(missing_ok=True)
        self._held.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exception) -> None:
        self.close()


def read_info(path: str | Path) -> CacheInfo:
    """The metadata of a complete cache; refuses a missing, unfinished or damaged one."""
    path = Path(path)
    with _open_complete(path) as file:
        return _read_info(file, path)


def read_keys(path: str | Path) -> list[str]:
    with _open_complete(Path(path)) as file:
        return _strings(file["keys"])


def read_image_digests(path: str | Path, keys: list[str]) -> list[str]:
    """The sha256 of the image file each of `keys`' rows was computed from."""
    path = Path(path)
    with _open_complete(path) as file:
        digest_of = dict(zip(_strings(file["keys"]), _strings(file["image_sha256"]), strict=True))
    _refuse_missing(path, keys, digest_of)
    return [digest_of[key] for key in keys]


def _refuse_missing(path: Path, keys: list[str], rows: dict) -> None:
    missing = [k for k in keys if k not in rows]
    if missing:
        raise CacheError(f"{path} lacks {len(missing)} of the {len(keys)} images asked for "
                         f"(e.g. {', '.join(missing[:3])}); was it built from this dataset?")


def read_features(path: str | Path, keys: list[str], view: str = "identity",
                  out: np.ndarray | None = None) -> np.ndarray:
    """Features (len(keys), *feature_shape) float16 for `keys`, in their order, of `view` (the
    image as it is, or "hflip": flipped left to right, in a two-view cache); written into `out`
    where given (say one view's slice of a larger array), with at most MERGE_BYTES read at a
    time beside it."""
    path = Path(path)
    with _open_complete(path) as file:
        if view not in file.attrs.get("views", ["identity"]):
            raise CacheError(f"{path} holds no {view!r} view (it holds "
                             f"{', '.join(file.attrs.get('views', ['identity']))}); extract "
                             "with --hflip for flipped views")
        dataset = file[VIEW_DATASETS[view]]
        row_of = {k: i for i, k in enumerate(_strings(file["keys"]))}
        _refuse_missing(path, keys, row_of)
        features = np.empty((len(keys), *dataset.shape[1:]), dtype=FEATURE_DTYPE) \
            if out is None else out
        if not keys:
            return features
        rows = np.array([row_of[k] for k in keys], dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        # read runs of consecutive rows as slices: h5py's fancy indexing is slow on long lists
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        longest = max(1, MERGE_BYTES // (math.prod(dataset.shape[1:]) * dataset.dtype.itemsize))
        try:
            for run in np.split(np.arange(len(sorted_rows)), breaks):
                for start in range(0, len(run), longest):
                    part = run[start:start + longest]
                    first, last = sorted_rows[part[0]], sorted_rows[part[-1]]
                    features[order[part]] = dataset[first:last + 1]
        except OSError as error:  # a file truncated or damaged after it was finished
            raise CacheError(f"{path} is damaged ({error}); rebuild it with "
                             "`python -m extract ... --overwrite`") from None
        return features


def _open_complete(path: Path, check_name: bool = True) -> h5py.File:
    if not path.exists():
        hint = " (an unfinished extraction is there: rerun it to finish)" \
            if check_name and partial_path(path).exists() else ""
        raise CacheError(f"cache {path} does not exist{hint}")
    file = _open(path, "r")
    try:
        _read_info(file, path)
        if not file.attrs["complete"] or not file["done"][:].all():
            raise CacheError(f"{path} is incomplete; rerun `python -m extract` to finish it")
    except BaseException:
        file.close()
        raise
    return file


# room for this many bytes of chunks in the chunk cache of a chunked cache read row by row
# (h5py's default, 1 MiB, holds fewer than five 229 KB ResNet50 rows)
CHUNK_CACHE_BYTES = 64 << 20


def _stamp(fd: int) -> tuple[int, int]:
    """What changes when a file is written: its size and modification time."""
    status = os.fstat(fd)
    return status.st_size, status.st_mtime_ns


class FeatureRows:
    """The features of `keys` (in their order) in each of `views` of a complete cache, read on
    demand and never loaded whole: `read(positions, view)` gives (n, *feature_shape) float16
    for positions into `keys`, in any order, repeats allowed. What head training streams from
    when the features do not fit in memory (head.stream).

    Safe to call from several threads at once: a contiguous view (every cache tll writes) is
    read a row at a time with positional reads on one descriptor, which share no file position
    and release the GIL; a chunked one through h5py, each thread opening its own handle with a
    chunk cache of CHUNK_CACHE_BYTES."""

    def __init__(self, path: str | Path, keys: list[str], views: tuple[str, ...]):
        self.path = Path(path)
        with _open_complete(self.path) as file:
            held = tuple(file.attrs.get("views", ["identity"]))
            if set(views) - set(held):
                raise CacheError(f"{self.path} holds no {' or '.join(set(views) - set(held))} "
                                 f"view (it holds {', '.join(held)})")
            row_of = {k: i for i, k in enumerate(_strings(file["keys"]))}
            _refuse_missing(self.path, keys, row_of)
            self.rows = np.array([row_of[k] for k in keys], dtype=np.int64)  # (len(keys),)
            self.feature_shape = tuple(file["features"].shape[1:])
            self.row_bytes = math.prod(self.feature_shape) * np.dtype(FEATURE_DTYPE).itemsize
            # where each view's rows start in the file; None: read through h5py
            self._offsets = {view: _contiguous_offset(file[VIEW_DATASETS[view]], self.path)
                             for view in views}
        self._fd = os.open(self.path, os.O_RDONLY)
        self._closed = weakref.finalize(self, os.close, self._fd)
        self._stamp = _stamp(self._fd)
        self._handles = threading.local()  # a chunked view's h5py file, one per thread

    def read(self, positions: np.ndarray, view: str = "identity") -> np.ndarray:
        """Features (len(positions), *feature_shape) float16 of keys[positions] in `view`."""
        rows = self.rows[positions]  # (n,) rows of the file
        out = np.empty((len(rows), *self.feature_shape), dtype=FEATURE_DTYPE)
        offset = self._offsets[view]
        if _stamp(self._fd) != self._stamp:  # tll never writes a finished cache in place
            raise CacheError(f"{self.path} was changed while it was being read (written in "
                             "place by another program?): rerun once nothing writes it")
        try:
            if offset is not None:
                flat = out.reshape(len(rows), self.row_bytes // out.itemsize).view(np.uint8)
                for i, row in enumerate(rows):
                    if os.preadv(self._fd, [flat[i]], offset + int(row) * self.row_bytes) \
                            != self.row_bytes:
                        raise OSError(f"row {row} ends early")
            elif len(rows):
                # h5py reads ascending unique indices only: read those, then put them in order
                unique, where = np.unique(rows, return_inverse=True)
                out[...] = self._dataset(view)[unique][where]
        except OSError as error:  # a file truncated or damaged after it was finished
            raise CacheError(f"{self.path} is damaged ({error}); rebuild it with "
                             "`python -m extract ... --overwrite`") from None
        return out

    def _dataset(self, view: str) -> h5py.Dataset:
        file = getattr(self._handles, "file", None)
        if file is None:
            file = self._handles.file = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
        return file[VIEW_DATASETS[view]]

    def close(self) -> None:
        self._closed()


def _contiguous_offset(dataset: h5py.Dataset, path: Path) -> int | None:
    """Where a contiguous float16 dataset's first row starts in the file, checked by reading
    that row both ways; None for any other layout (chunked, filtered, external)."""
    plist = dataset.id.get_create_plist()
    offset = dataset.id.get_offset()
    if (plist.get_layout() != h5py.h5d.CONTIGUOUS or offset is None
            or plist.get_external_count() or not hasattr(os, "preadv")
            or dataset.dtype != np.dtype(FEATURE_DTYPE).newbyteorder("<")):
        return None
    first = dataset[0]
    with open(path, "rb") as raw:
        raw.seek(offset)
        return offset if raw.read(first.nbytes) == first.tobytes() else None
