"""The feature cache: one HDF5 file per (backbone, layer, weights, input size, dataset).
This is the only module that imports h5py.

Schema (version 1)::

    /keys       (N,)          utf-8 str   "split/side/id" of every image, sorted: the row order
    /features   (N, C, h, w)  float16     the trunk's feature map of each image, contiguous
                                          (fast fancy-index and slice reads)
    /done       (N,)          uint8       1 once a row's features are written (resume, shards)

    attributes: schema_version, backbone, layer, weights ("imagenet" | "none" | a path),
    weights_id (enum name, random-init seed, or sha256 of the file), mean, std (3,),
    input_size (H, W), feature_shape (C, h, w), dtype, torch_version, torchvision_version,
    dataset (absolute path), dataset_fingerprint (sha256 of keys and file sizes), complete.

A cache in progress lives at ``<name>.h5.partial``; it is renamed to ``<name>.h5`` only once every
row is done and ``complete`` is set, so a file under the final name is always whole. Rows are
written before their ``done`` flag, so a killed run loses at most the rows in flight.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from extract import UserError, logger

SCHEMA_VERSION = 1
FEATURE_DTYPE = np.float16
# the fields that make two caches interchangeable; a resume or a reuse must match all of them
IDENTITY_FIELDS = ("backbone", "layer", "weights_id", "mean", "std", "input_size",
                   "feature_shape", "dataset_fingerprint")


class CacheError(UserError, ValueError):
    """A cache that is missing, incomplete, or does not match what was asked for."""


@dataclass(frozen=True)
class CacheInfo:
    backbone: str
    layer: str
    weights: str
    weights_id: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int]  # (H, W)
    feature_shape: tuple[int, int, int]  # (C, h, w)
    dataset: str
    dataset_fingerprint: str
    torch_version: str
    torchvision_version: str
    dtype: str = "float16"
    schema_version: int = SCHEMA_VERSION

    def mismatches(self, other: CacheInfo, ignore: tuple[str, ...] = ()) -> list[str]:
        return [f"{name}: {getattr(other, name)} (cache) vs {getattr(self, name)} (asked)"
                for name in IDENTITY_FIELDS
                if name not in ignore and getattr(self, name) != getattr(other, name)]


def _write_info(file: h5py.File, info: CacheInfo) -> None:
    for name, value in dataclasses.asdict(info).items():
        file.attrs[name] = list(value) if isinstance(value, tuple) else value


def _read_info(file: h5py.File, path: Path) -> CacheInfo:
    attrs = file.attrs
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{path}: schema version {attrs.get('schema_version')}, "
                         f"expected {SCHEMA_VERSION}; rebuild it with --overwrite")
    values = {}
    for field in dataclasses.fields(CacheInfo):
        value = attrs[field.name]
        if isinstance(value, np.ndarray):
            value = tuple(value.tolist())
        elif isinstance(value, np.generic):
            value = value.item()
        values[field.name] = value
    return CacheInfo(**values)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class CacheWriter:
    """Creates or resumes the cache at `path` for `keys`; `write` rows, then `finish`."""

    def __init__(self, path: str | Path, keys: list[str], info: CacheInfo, overwrite: bool = False):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.info = info
        self.keys = keys
        self.file: h5py.File | None = None
        if self.path.exists() and not overwrite:
            _check_matches(self.path, info, keys)
            self.missing = np.zeros(0, dtype=np.int64)
            return
        if self.partial.exists() and not overwrite:
            try:
                self.file = h5py.File(self.partial, "r+")
            except OSError as error:  # killed while the file's own structure was being written
                logger.warning("%s is unreadable (%s); starting it over", self.partial, error)
        if self.file is not None:
            # same keys, same trunk: resume even if an image was repaired since (its size, and
            # so the fingerprint, changed); the finished cache records the current fingerprint
            _check_matches(self.partial, info, keys, file=self.file,
                           ignore=("dataset_fingerprint",))
            self.file.attrs["dataset_fingerprint"] = info.dataset_fingerprint
            self.missing = np.flatnonzero(self.file["done"][:] == 0)
            logger.info("resuming %s: %d of %d images left", self.partial, len(self.missing),
                        len(keys))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = h5py.File(self.partial, "w")
            _write_info(self.file, info)
            self.file.attrs["complete"] = False
            self.file.create_dataset("keys", data=np.array(keys, dtype=object),
                                     dtype=h5py.string_dtype())
            self.file.create_dataset("done", data=np.zeros(len(keys), dtype=np.uint8))
            self.file.create_dataset("features", shape=(len(keys), *info.feature_shape),
                                     dtype=FEATURE_DTYPE)
            self.file.flush()
            self.missing = np.arange(len(keys))

    def write(self, rows: np.ndarray, features: np.ndarray) -> None:
        """Store features (n, C, h, w) for the ascending row indices `rows` (n,)."""
        assert self.file is not None
        try:
            if rows[-1] - rows[0] + 1 == len(rows):  # contiguous: one slice write
                self.file["features"][rows[0]:rows[-1] + 1] = features
                self.file["done"][rows[0]:rows[-1] + 1] = 1
            else:
                self.file["features"][rows] = features
                self.file["done"][rows] = 1
            self.file.flush()
        except OSError as error:
            if getattr(error, "errno", None) == errno.ENOSPC or "No space" in str(error):
                raise CacheError(f"disk full while writing {self.partial}; free some space and "
                                 "rerun the same command to resume") from None
            raise

    def finish(self) -> Path:
        """Check every row is done, mark the file complete and move it to its final name."""
        if self.file is not None:
            left = int((self.file["done"][:] == 0).sum())
            if left:
                raise CacheError(f"{self.partial}: {left} images still missing")
            self.file.attrs["complete"] = True
            self.file.close()
            self.file = None
            os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _check_matches(path: Path, info: CacheInfo, keys: list[str], file: h5py.File | None = None,
                   ignore: tuple[str, ...] = ()):
    own = file is None
    file = file if file is not None else h5py.File(path, "r")
    try:
        existing = _read_info(file, path)
        problems = info.mismatches(existing, ignore)
        if not problems and [k.decode() for k in file["keys"][:]] != keys:
            problems = ["the image list differs"]
    finally:
        if own:
            file.close()
    if problems:
        raise CacheError(f"{path} was built for something else ({'; '.join(problems)}); pass "
                         "--overwrite to rebuild it, or --out to write another file")


def read_info(path: str | Path) -> CacheInfo:
    """The metadata of a complete cache; refuses a missing or unfinished one."""
    path = Path(path)
    with _open_complete(path) as file:
        return _read_info(file, path)


def read_keys(path: str | Path) -> list[str]:
    with _open_complete(Path(path)) as file:
        return [k.decode() for k in file["keys"][:]]


def read_features(path: str | Path, keys: list[str]) -> np.ndarray:
    """Feature maps (len(keys), C, h, w) float16 for `keys`, in their order."""
    path = Path(path)
    with _open_complete(path) as file:
        row_of = {k.decode(): i for i, k in enumerate(file["keys"][:])}
        missing = [k for k in keys if k not in row_of]
        if missing:
            raise CacheError(f"{path} lacks {len(missing)} of the {len(keys)} images asked for "
                             f"(e.g. {', '.join(missing[:3])}); was it built from this dataset?")
        features = np.empty((len(keys), *file["features"].shape[1:]), dtype=FEATURE_DTYPE)
        if not keys:
            return features
        rows = np.array([row_of[k] for k in keys], dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        # read runs of consecutive rows as slices: h5py's fancy indexing is slow on long lists
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        for run in np.split(np.arange(len(sorted_rows)), breaks):
            first, last = sorted_rows[run[0]], sorted_rows[run[-1]]
            features[order[run]] = file["features"][first:last + 1]
        return features


def _open_complete(path: Path) -> h5py.File:
    if not path.exists():
        hint = " (an unfinished extraction is there: rerun it to finish)" \
            if partial_path(path).exists() else ""
        raise CacheError(f"cache {path} does not exist{hint}")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise CacheError(f"{path} is not a readable HDF5 cache ({error})") from None
    if not file.attrs.get("complete", False) or not file["done"][:].all():
        file.close()
        raise CacheError(f"{path} is incomplete; rerun `python -m extract` to finish it")
    return file
