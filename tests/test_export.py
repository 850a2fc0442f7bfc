"""`python -m head.export`: the ONNX file against eager torch in ONNX Runtime for both backbones,
what it says about itself, its dynamic batch axis, and the refusals (parity failure, no head.pt)
that leave no file behind."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import invoke_cli

from extract.extract_features import main as extract
from head import export as export_module
from head.export import build_network, cli
from head.export import main as export
from head.train import main as train
from infer.model_info import ModelInfo
from tll import UserError
from tll.device import compute_precision

RUN_FILES = {"head.pt", "config.json", "metrics.jsonl", "curves.png"}
METADATA = {"backbone", "layer", "weights", "input_size", "embedding_dim", "tll_version",
            "val_fraction", "split_seed", "folds", "assign", "assign_temperature", "caches",
            "trunks", "views"}


@pytest.fixture(scope="module")
def vgg16_run(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vgg16 run at 32 x 32 (features: 512 x 1 x 1): random-init trunk, one epoch on the small
    synthetic set (24 pairs; 0.85 holds out the 20 a validation split needs); read-only."""
    folder = tmp_path_factory.mktemp("vgg16")
    cache = extract("vgg16", synthetic, out=folder / "vgg16.h5", weights="none",
                    input_size=(32, 32), device="cpu", batch_size=32, workers=0, hflip=False)
    return train(cache, name="vgg16", runs_dir=folder / "runs", epochs=1, batch_size=8,
                 val_fraction=0.85, seed=1, device="cpu", embedding_dim=64)


@pytest.fixture(scope="module")
def vgg16_model(vgg16_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vgg16_run exported to a folder of its own."""
    return export(vgg16_run, out=tmp_path_factory.mktemp("vgg16-onnx") / "model.onnx")


@pytest.fixture
def models(exported_run: Path, vgg16_run: Path, vgg16_model: Path) -> dict[str, tuple]:
    """backbone -> (run folder, its model.onnx)."""
    return {"resnet50": (exported_run, exported_run / "model.onnx"),
            "vgg16": (vgg16_run, vgg16_model)}


def invoke(*arguments):
    return invoke_cli(cli, *arguments)


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
def test_onnx_runtime_matches_eager_torch(models: dict, backbone: str) -> None:
    run, model = models[backbone]
    net, checkpoint = build_network(run / "head.pt")
    assert checkpoint["caches"][0]["backbone"] == backbone
    height, width = checkpoint["caches"][0]["input_size"]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(7)
    for batch in (1, 5):
        images = torch.rand(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = net(images).numpy()
        got = session.run(["embedding"], {"image": images.numpy()})[0]
        assert got.shape == expected.shape == (batch, checkpoint["head_config"]["embedding_dim"])
        assert np.abs(got - expected).max() <= 1e-4
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    # images that differ get embeddings that differ
    assert np.abs(got[0] - got[1]).max() > 1e-4


def test_a_head_trained_on_an_autocast_cache_exports_in_float32(models: dict) -> None:
    """The vgg16 run is trained on a cache in the command's default precision (bfloat16 on a
    CPU that has it natively): the checkpoint says so, and the model exported from it (its
    parity check passed, or there would be no file) is float32 throughout."""
    run, model = models["vgg16"]
    checkpoint = torch.load(run / "head.pt", map_location="cpu", weights_only=True)
    assert checkpoint["caches"][0]["precision"] == compute_precision(torch.device("cpu"),
                                                                     amp=True)
    graph = onnx.load(str(model)).graph
    assert {t.type.tensor_type.elem_type for t in [*graph.input, *graph.output]} \
        == {onnx.TensorProto.FLOAT}
    assert not {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16} \
        & {tensor.data_type for tensor in graph.initializer}


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
def test_file_describes_itself(models: dict, backbone: str) -> None:
    run, model = models[backbone]
    summary = json.loads((run / "config.json").read_text())
    (cache,), config = summary["caches"], summary["config"]
    proto = onnx.load(str(model))  # would fail on a missing external data file
    props = {entry.key: entry.value for entry in proto.metadata_props}
    assert METADATA <= set(props)
    assert props["backbone"] == backbone == cache["backbone"]
    assert props["layer"] == cache["layer"] and props["weights"] == cache["weights"] == "none"
    assert json.loads(props["input_size"]) == cache["input_size"]
    assert int(props["embedding_dim"]) == config["embedding_dim"]
    assert float(props["val_fraction"]) == config["val_fraction"]
    assert int(props["split_seed"]) == config["split_seed"]
    assert int(props["folds"]) == config["folds"] == 0
    assert props["tll_version"] == importlib.metadata.version("tll")
    assert props["dataset_fingerprint"] == cache["dataset_fingerprint"]
    metrics = json.loads(props["val_metrics"])
    assert metrics == {k: summary["best"][k] for k in metrics}
    assert {"top1", "top2", "mrr"} <= set(metrics)
    assert json.loads(props["caches"]) == config["caches"]
    assert props["assign"] == config["assign"]
    assert float(props["assign_temperature"]) == config["assign_temperature"]

    # self-contained: every weight is inside the file
    for tensor in proto.graph.initializer:
        assert tensor.data_location != onnx.TensorProto.EXTERNAL, tensor.name
    # dynamic batch axis, fixed image size
    (image,) = proto.graph.input
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [3, *cache["input_size"]]


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
def test_infer_reads_back_what_export_writes(models: dict, backbone: str) -> None:
    """One description of the model, one writer, one reader: the metadata read back writes the
    same keys, in the same order, with the same values."""
    _, model = models[backbone]
    props = [(entry.key, entry.value) for entry in onnx.load(str(model)).metadata_props]
    info = ModelInfo.from_props(model, dict(props))
    assert list(info.to_props().items()) == props
    assert info.trunk == f"{backbone} {info.trunks[0]['layer']} none"


def test_export_writes_only_the_model(exported_run: Path, vgg16_model: Path) -> None:
    assert {p.name for p in exported_run.iterdir()} == RUN_FILES | {"model.onnx"}
    assert [p.name for p in vgg16_model.parent.iterdir()] == ["model.onnx"]


def test_cli_exports_into_the_run_folder(vgg16_run: Path, tmp_path: Path) -> None:
    """`--run` alone writes <run>/model.onnx and prints its path (on a copy of the run)."""
    run = Path(shutil.copytree(vgg16_run, tmp_path / "run"))
    result = invoke("--run", run)
    assert result.exit_code == 0, result.text
    assert result.stdout.strip().splitlines()[-1] == str(run / "model.onnx")
    assert {p.name for p in run.iterdir()} == RUN_FILES | {"model.onnx"}


def test_parity_failure_leaves_no_file(vgg16_run: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)  # nothing can pass
    out = tmp_path / "onnx" / "model.onnx"
    with pytest.raises(UserError, match="disagrees with torch at batch 1.*not written"):
        export(vgg16_run, out=out)
    assert list(out.parent.iterdir()) == []  # neither the model nor its temp file
    assert {p.name for p in vgg16_run.iterdir()} == RUN_FILES


def test_run_without_checkpoint_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    result = invoke("--run", run)
    assert result.exit_code == 1, result.text
    assert f"{run} has no head.pt" in result.text and "Traceback" not in result.text
    assert [p.name for p in run.iterdir()] == ["config.json"]

    result = invoke("--run", tmp_path / "missing")
    assert result.exit_code == 1, result.text
    assert "has no head.pt" in result.text
    assert not (tmp_path / "missing").exists()
