"""The torch device a command runs on."""

from __future__ import annotations

import torch

from tll import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda where there is one, else cpu; `cuda` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)
