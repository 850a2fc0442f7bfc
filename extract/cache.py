"""The feature cache: one HDF5 file per (backbone, layer, weights, input size, dataset).
This is the only module that imports h5py.

Schema (version 3)::

    /keys          (N,)          utf-8 str   "split/side/id" of every image, sorted: the row order
    /features      (N, C, h, w)  float16     the trunk's feature map of each image, contiguous
                   or (N, D)                 (fast fancy-index and slice reads); or its vector
                                             (a global embedding, `--layer global`)
    /done          (N,)          uint8       1 once a row's features are written (resume)
    /image_sha256  (N,)          utf-8 str   sha256 of the image file each row was computed from

    attributes: schema_version, backbone (a torchvision name or timm:<model>.<tag>), layer,
    weights ("imagenet" | "pretrained" | "none" | an absolute path), weights_id (enum name, hub
    id, random-init seed, or sha256 of the file), mean, std (3,), input_size (H, W),
    interpolation (how images were resized to it: bilinear | bicubic), feature_shape (C, h, w)
    or (D,), dtype, torch_version, torchvision_version, timm_version, dataset (absolute path),
    dataset_fingerprint (sha256 of keys and image contents), complete.

Schema 2 is schema 3 without interpolation and timm_version, and maps only: it reads as
bilinear, and a resume of it stays schema 2.

A cache in progress lives at ``<name>.h5.partial``; it is renamed to ``<name>.h5`` only once every
row is done, ``complete`` is set and the closed file reads back whole, so a file under the final
name is always whole. Rows are written before their ``done`` flag, so a killed run loses at most
the rows in flight. One process writes a cache at a time: the writer holds ``.<name>.h5.lock``
(`extract.files.exclusive`) before it opens anything. A row whose image has changed since it was
computed (its sha256 differs) is computed again on resume or on a rerun over a complete cache.
Schema 1 (before per-row image hashes) is refused with a hint to rebuild.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from extract import UserError, logger
from extract.data import DEFAULT_INTERPOLATION
from extract.files import no_space

SCHEMA_VERSION = 3
READABLE_SCHEMAS = (2, SCHEMA_VERSION)
FEATURE_DTYPE = np.float16
# what makes two caches interchangeable apart from the images' contents, which are compared
# row by row (image_sha256); a resume or a reuse must match all of them
IDENTITY_FIELDS = ("backbone", "layer", "weights_id", "mean", "std", "input_size",
                   "interpolation", "feature_shape")
DATASETS = ("keys", "features", "done", "image_sha256")


class CacheError(UserError, ValueError):
    """A cache that is missing, incomplete, damaged, or does not match what was asked for."""


@dataclass(frozen=True)
class CacheInfo:
    backbone: str
    layer: str
    weights: str
    weights_id: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int]  # (H, W)
    feature_shape: tuple[int, ...]  # (C, h, w) of a map or (D,) of a vector
    dataset: str
    dataset_fingerprint: str
    torch_version: str
    torchvision_version: str
    interpolation: str = DEFAULT_INTERPOLATION  # absent in schema 2
    timm_version: str = ""  # absent in schema 2
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
    missing += [name for name in DATASETS if name not in file]
    if missing:
        raise CacheError(f"{path} is damaged (it lacks {', '.join(missing)}); rebuild it with "
                         "`python -m extract ... --overwrite`")
    values = {}
    for field in dataclasses.fields(CacheInfo):
        if field.name not in attrs:
            continue
        value = attrs[field.name]
        if isinstance(value, np.ndarray):
            value = tuple(value.tolist())
        elif isinstance(value, np.generic):
            value = value.item()
        values[field.name] = value
    return CacheInfo(**values)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as error:
        raise CacheError(f"{path} is damaged or not an HDF5 cache ({error}); rebuild it with "
                         "`python -m extract ... --overwrite`") from None


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [value.decode() for value in dataset[:]]


class CacheWriter:
    """Creates, resumes or updates the cache at `path` for `keys` (whose image files have the
    sha256 `digests`); `write` rows, then `finish`. The caller holds the cache's lock."""

    def __init__(self, path: str | Path, keys: list[str], digests: list[str], info: CacheInfo,
                 overwrite: bool = False):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.info = info
        self.keys = keys
        self.digests = np.array(digests, dtype=object)
        self.file: h5py.File | None = None
        self.missing = np.zeros(0, dtype=np.int64)
        if self.path.exists() and not overwrite:
            changed = self._changed_rows(self.path)
            if not len(changed):
                return
            # copy, so that the complete cache stays in place until its update is complete
            logger.info("%d images of %s have changed since it was built (e.g. %s); "
                        "computing them again", len(changed), self.path, keys[changed[0]])
            shutil.copyfile(self.path, self.partial)
            self.file = _open(self.partial, "r+")
            self.file.attrs["dataset_fingerprint"] = info.dataset_fingerprint
            self._mark_to_do(changed)
            return
        if self.partial.exists() and not overwrite:
            self.file = self._resumable_partial()
        if self.file is not None:
            self.file.attrs["dataset_fingerprint"] = info.dataset_fingerprint
            self.missing = np.flatnonzero(self.file["done"][:] == 0)
            logger.info("resuming %s: %d of %d images left", self.partial, len(self.missing),
                        len(keys))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.partial, "w")
        _write_info(self.file, info)
        self.file.attrs["complete"] = False
        strings = h5py.string_dtype()
        self.file.create_dataset("keys", data=np.array(keys, dtype=object), dtype=strings)
        self.file.create_dataset("done", data=np.zeros(len(keys), dtype=np.uint8))
        self.file.create_dataset("features", shape=(len(keys), *info.feature_shape),
                                 dtype=FEATURE_DTYPE)
        self.file.create_dataset("image_sha256", shape=(len(keys),), dtype=strings)
        self.file.flush()
        self.missing = np.arange(len(keys))

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
        """Store features (n, *feature_shape) for the ascending row indices `rows` (n,)."""
        assert self.file is not None
        try:
            if rows[-1] - rows[0] + 1 == len(rows):  # contiguous: one slice write
                block = slice(rows[0], rows[-1] + 1)
            else:
                block = rows
            self.file["features"][block] = features
            self.file["image_sha256"][block] = self.digests[rows]
            self.file.flush()
            self.file["done"][block] = 1  # only once its features are on disk
            self.file.flush()
        except OSError as error:
            if getattr(error, "errno", None) == errno.ENOSPC or "No space" in str(error):
                raise no_space(self.partial) from None
            raise

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
                if file["features"].shape != (len(self.keys), *self.info.feature_shape):
                    raise CacheError(f"{self.partial} reads back with features of shape "
                                     f"{file['features'].shape}; not moved to {self.path}")
            os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


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


def read_features(path: str | Path, keys: list[str]) -> np.ndarray:
    """Features (len(keys), *feature_shape) float16 for `keys`, in their order."""
    path = Path(path)
    with _open_complete(path) as file:
        row_of = {k: i for i, k in enumerate(_strings(file["keys"]))}
        _refuse_missing(path, keys, row_of)
        features = np.empty((len(keys), *file["features"].shape[1:]), dtype=FEATURE_DTYPE)
        if not keys:
            return features
        rows = np.array([row_of[k] for k in keys], dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        # read runs of consecutive rows as slices: h5py's fancy indexing is slow on long lists
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        try:
            for run in np.split(np.arange(len(sorted_rows)), breaks):
                first, last = sorted_rows[run[0]], sorted_rows[run[-1]]
                features[order[run]] = file["features"][first:last + 1]
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
