"""What every stage shares: the package logger, the project's version, the path and number
types of every command's options, and the rule that bad input ends in one clear message and a
non-zero exit (`UserError`, `user_errors`); beside it the Kaggle data layer (`tll.data`: the
dataset layout, image loading, validation splits and folds), files written whole (`tll.files`)
and the device (`tll.device`). Nothing here imports torch at import time, so that `infer/` runs
with onnxruntime alone."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import re
import sys
from pathlib import Path

import click

logger = logging.getLogger("tll")

try:
    __version__ = importlib.metadata.version("tll")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "unknown"


class UserError(Exception):
    """Bad input the user can fix. Commands print its message alone and exit with status 1."""


def first_line(error: BaseException) -> str:
    """The first line of a library's error, for a one-line message that quotes it (its type
    where it has no text)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: torch's on CUDA (OutOfMemoryError), its
    CPU allocator's (a RuntimeError), or Python's own. torch is looked up only if loaded."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, MemoryError) or isinstance(error, RuntimeError) and (
        "DefaultCPUAllocator: can't allocate memory" in text or "not enough memory" in text)


def setup_logging() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class UserPath(click.Path):
    """click.Path giving a pathlib.Path with `~` expanded (a shell leaves `--out=~/x` as is)."""

    def __init__(self, **options):
        super().__init__(path_type=Path, **options)

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            value = str(Path(value).expanduser())
        return super().convert(value, param, ctx)


class FiniteFloat(click.FloatRange):
    """click.FloatRange that refuses inf and nan (exit 2). A plain FloatRange lets `inf` through
    and `nan` too (every comparison with nan is false, so no bound catches it): a temperature or
    margin of either gives flat scores or a loss that is nan from the first step."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; give one in {self._describe_range()}.",
                      param, ctx)
        return super().convert(number, param, ctx)


# the units a size takes (any case): a bare letter is binary, as in `ulimit` and docker
BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10 ** 3, "kib": 1 << 10, "m": 1 << 20,
              "mb": 10 ** 6, "mib": 1 << 20, "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30,
              "t": 1 << 40, "tb": 10 ** 12, "tib": 1 << 40}


class ByteSize(click.ParamType):
    """A number of bytes written with a unit: 4GiB, 500MB, 1.5G (G: GiB), 1000000B (bytes); 0
    needs none. A bare number is refused: `--memory-budget 8` meant 8 GiB, not 8 bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([a-z]*)\s*", str(value), re.IGNORECASE)
        unit = BYTE_UNITS.get(match[2].lower()) if match else None
        if unit is None:
            self.fail(f"{value!r} is not a size: give a number and a unit, e.g. 4GiB, 500MB or "
                      "8G (G, M, K: binary units)", param, ctx)
        number, written = float(match[1]), match[1]
        if not math.isfinite(number * unit):
            self.fail(f"{value!r} is too large a size", param, ctx)
        if not match[2] and number:
            self.fail(f"{value!r} has no unit: write e.g. {written}GiB, {written}MiB, or "
                      f"{written}B for bytes", param, ctx)
        return int(number * unit)


def format_bytes(size: float) -> str:
    """`size` bytes in words, a decimal below 100 of a unit (2.3 MiB and 2.0 MiB, not both
    "2 MiB"): 11.2 GiB, 480 MiB, 2.3 MiB, 56.0 KiB, 100 B."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 100 or unit == "GiB" else f"{value:.0f} {unit}"
    return f"{size:.0f} B"


@contextlib.contextmanager
def user_errors(interrupted: str = "interrupted; nothing was written",
                out_of_memory: str = "lower --batch-size and rerun"):
    """For click commands: a UserError becomes `Error: <message>` and exit 1, not a traceback;
    so do Ctrl-C (with `interrupted`, which says what is left), running out of memory (with
    `out_of_memory`, what to lower) and a full disk."""
    from tll.files import is_disk_full

    setup_logging()
    try:
        yield
    except UserError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        raise click.ClickException(interrupted) from None
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        raise click.ClickException(f"out of memory ({first_line(error)}); "
                                   f"{out_of_memory}") from None
    except OSError as error:
        if error.filename and is_disk_full(error, Path(error.filename).parent):
            raise click.ClickException(
                f"no space left on device while writing {error.filename}") from None
        raise
