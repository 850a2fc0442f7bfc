"""Stage 1: the Kaggle-layout data layer, the synthetic look-alike set, and the frozen-trunk
feature cache. This package's top level imports no torch, so that `infer/` can use the data layer
with onnxruntime alone. It also holds what every command shares: the package logger and the
rule that bad input ends in one clear message and a non-zero exit."""

from __future__ import annotations

import contextlib
import logging
import sys

logger = logging.getLogger("tll")


class UserError(Exception):
    """Bad input the user can fix. Commands print its message alone and exit with status 1."""


def setup_logging() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@contextlib.contextmanager
def user_errors():
    """For click commands: a UserError becomes `Error: <message>` and exit 1, not a traceback."""
    import click

    setup_logging()
    try:
        yield
    except UserError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; rerun the same command to resume") from None
