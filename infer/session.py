"""ONNX Runtime sessions for exported models: provider choice and the model's own description
(`infer.model_info`).

`cuda` must really run on the CUDA provider (ONNX Runtime silently falls back to the CPU when
CUDA libraries are missing, so that is checked after the session exists); `auto` takes CUDA where
it works and keeps ONNX Runtime's noise about missing CUDA libraries out of the way.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from infer.model_info import ModelInfo
from tll import UserError, logger

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# ONNX Runtime's logger severities: 3 = error, 4 = fatal
QUIET, ERRORS_ONLY = 4, 3


def open_session(path: str | Path, device: str = "auto") -> tuple[ort.InferenceSession, ModelInfo]:
    """A session on the asked device and the model's description; refuses a CPU fallback."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model {path} does not exist")
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"unknown device {device!r}; choose auto, cuda or cpu")
    wants_cuda = device != "cpu" and CUDA in ort.get_available_providers()
    if device == "cuda" and not wants_cuda:
        raise UserError("--device cuda asked for, but this onnxruntime has no CUDA provider "
                        "(install onnxruntime-gpu, and not onnxruntime beside it)")
    # on `auto`, a machine without CUDA libraries is normal: silence the load errors
    ort.set_default_logger_severity(ERRORS_ONLY if device == "cuda" else QUIET)
    if wants_cuda and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # finds CUDA/cuDNN installed as pip packages (nvidia-*)
    providers = [CUDA, CPU] if wants_cuda else [CPU]
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as error:  # onnxruntime raises its own untyped errors on a bad file
        raise UserError(f"{path} is not a usable ONNX model: {error}") from None
    running = session.get_providers()[0]
    if device == "cuda" and running != CUDA:
        raise UserError("--device cuda asked for, but ONNX Runtime could not start its CUDA "
                        "provider (see the error above: usually missing CUDA or cuDNN libraries)")
    logger.info("onnxruntime %s runs %s on %s", ort.__version__, path.name, running)
    info = ModelInfo.from_props(path, session.get_modelmeta().custom_metadata_map)
    graph_size = tuple(session.get_inputs()[0].shape[2:])  # (N, 3, H, W): H, W fixed at export
    if graph_size != info.input_size:
        raise UserError(f"{path}: its metadata says input size {info.input_size}, its graph "
                        f"takes {graph_size}; export it again with `python -m head.export`")
    return session, info
