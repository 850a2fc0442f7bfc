"""The torch device a command runs on, the precision it computes in, and the memory it has
free."""

from __future__ import annotations

import contextlib
import os
import platform

import torch

from tll import UserError

# what `compute_precision` can answer, the name of a torch dtype each
PRECISIONS = ("float32", "bfloat16", "float16")


def resolve_device(name: str, tf32: bool = False) -> torch.device:
    """`auto` -> cuda where there is one, else cpu; `cuda` without one is an error. With `tf32`
    (training a head, whose float32 rounding noise is far below SGD's) float32 matrix products
    and convolutions on CUDA may run in TF32, several times faster on Ampere and later; extract
    does not ask for it, so that a float32 cache is float32."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    if tf32 and name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86: AVX512-BF16 or AMX; Arm: the BF16
    extension) for oneDNN. Elsewhere torch emulates it, slower than float32: oneDNN's own check
    (`_is_mkldnn_bf16_supported`) also says yes for plain AVX-512 on x86, so it serves on Arm
    only."""
    if not torch.backends.mkldnn.is_available():
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    # a torch too old to tell (these came in 2.5 or so) gets float32
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def compute_precision(device: torch.device, amp: bool) -> str:
    """The precision a trunk runs in on `device` (one of PRECISIONS): with `amp` float16
    autocast on CUDA, bfloat16 autocast on a CPU that has it natively, else float32."""
    if amp and device.type == "cuda":
        return "float16"
    if amp and device.type == "cpu" and native_bfloat16():
        return "bfloat16"
    return "float32"


def training_autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Where a head trains in lower precision: with `amp`, bfloat16 autocast on a CPU that has
    it natively (its matrix products, most of an epoch, run about twice as fast); float32
    elsewhere (CUDA trains in TF32 already, and float16 would need loss scaling)."""
    if amp and device.type == "cpu" and native_bfloat16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """The bytes that new data can take on `device` now, and what they are in words: on CUDA
    the GPU's free memory, else the RAM that Linux counts available (MemAvailable: free memory
    plus the page cache it can reclaim), else (other systems) the free RAM; None where the
    system does not say."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, "free GPU memory"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"  # in kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"
