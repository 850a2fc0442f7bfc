"""ONNX Runtime sessions for exported models: provider choice and the model's own description.

`cuda` must really run on the CUDA provider (ONNX Runtime silently falls back to the CPU when
CUDA libraries are missing, so that is checked after the session exists); `auto` takes CUDA where
it works and keeps ONNX Runtime's noise about missing CUDA libraries out of the way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from tll import UserError, logger
from tll.data import DEFAULT_INTERPOLATION, INTERPOLATIONS

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# ONNX Runtime's logger severities: 3 = error, 4 = fatal
QUIET, ERRORS_ONLY = 4, 3


@dataclass(frozen=True)
class ModelInfo:
    """What an exported file says about itself (its metadata_props)."""

    input_size: tuple[int, int]  # (H, W)
    interpolation: str  # how images are resized to input_size; bilinear where not recorded
    trunk: str  # backbone, layer and weights, for people to read
    caches: str  # the caches the head was trained on, for people to read
    val_fraction: float | None
    split_seed: int | None
    dataset_fingerprint: str | None
    val_metrics: dict
    assign: str | None  # the assignment training chose its epoch with, infer's default
    assign_temperature: float | None

    @classmethod
    def from_metadata(cls, path: Path, props: dict[str, str]) -> ModelInfo:
        """Read and check the metadata; anything damaged is refused naming the file."""
        if "input_size" not in props:
            raise UserError(f"{path} has no input_size in its metadata; export it with "
                            "`python -m head.export`")
        try:
            height, width = (int(n) for n in json.loads(props["input_size"]))
            val_fraction = float(props["val_fraction"]) if props.get("val_fraction") else None
            split_seed = int(props["split_seed"]) if props.get("split_seed") else None
            val_metrics = json.loads(props.get("val_metrics", "{}"))
            temperature = (float(props["assign_temperature"])
                           if props.get("assign_temperature") else None)
        except (ValueError, TypeError) as error:  # not JSON, not numbers, not two of them
            raise UserError(f"{path} has damaged metadata ({error}); export it again with "
                            "`python -m head.export`") from None
        interpolation = props.get("interpolation", DEFAULT_INTERPOLATION)
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"{path} has damaged metadata (interpolation {interpolation!r}); "
                            "export it again with `python -m head.export`")
        return cls(
            input_size=(height, width), interpolation=interpolation,
            trunk=" ".join(props.get(k, "?") for k in ("backbone", "layer", "weights")),
            caches=", ".join(json.loads(props.get("caches", "[]"))) or "?",
            val_fraction=val_fraction, split_seed=split_seed,
            dataset_fingerprint=props.get("dataset_fingerprint"), val_metrics=val_metrics,
            assign=props.get("assign"), assign_temperature=temperature,
        )


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
    info = ModelInfo.from_metadata(path, session.get_modelmeta().custom_metadata_map)
    graph_size = tuple(session.get_inputs()[0].shape[2:])  # (N, 3, H, W): H, W fixed at export
    if graph_size != info.input_size:
        raise UserError(f"{path}: its metadata says input size {info.input_size}, its graph "
                        f"takes {graph_size}; export it again with `python -m head.export`")
    return session, info
