"""Fusion: several caches (trunks or layers of the same images) into one head, one run and one
exported model; caches of other images or another input size are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from extract.cache import read_features, read_info, read_keys
from extract.extract_features import main as extract
from head.export import main as export
from head.model import load_checkpoint
from head.train import cli as train_cli
from head.train import main as train
from infer.predict import main as infer
from tll import UserError

SIZE = (64, 64)
SETTINGS = dict(epochs=2, batch_size=32, lr=3e-4, val_fraction=0.2, device="cpu")


@pytest.fixture(scope="module")
def vgg16_cache(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vgg16 (features: 512 x 2 x 2) over the images of the conftest's train_cache."""
    return extract("vgg16", train_data, out=tmp_path_factory.mktemp("vgg") / "vgg16.h5",
                   weights="none", input_size=SIZE, device="cpu", batch_size=32, workers=0,
                   hflip=False)


@pytest.fixture(scope="module")
def fused_run(train_cache: Path, vgg16_cache: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train([train_cache, vgg16_cache], name="fused",
                 runs_dir=tmp_path_factory.mktemp("runs"), **SETTINGS)


def test_a_fused_run_has_a_branch_per_cache(fused_run: Path, train_cache: Path,
                                            vgg16_cache: Path) -> None:
    head, checkpoint = load_checkpoint(fused_run / "head.pt")
    assert head.config.feature_shapes == ((2048, 2, 2), (512, 2, 2))
    assert len(head.branches) == 2
    assert [c["backbone"] for c in checkpoint["caches"]] == ["resnet50", "vgg16"]
    summary = json.loads((fused_run / "config.json").read_text())
    assert summary["config"]["caches"] == [str(train_cache), str(vgg16_cache)]
    assert [c["layer"] for c in summary["caches"]] == ["layer4", "features"]


def test_a_fused_model_exports_with_parity_and_infers(fused_run: Path, train_data: Path,
                                                       tmp_path: Path) -> None:
    run = Path(shutil.copytree(fused_run, tmp_path / "fused"))
    model = export(run)  # refuses a model that disagrees with torch at batch 1 or 7
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert props["backbone"] == "resnet50+vgg16" and props["layer"] == "layer4+features"
    assert [t["backbone"] for t in json.loads(props["trunks"])] == ["resnet50", "vgg16"]
    submission = infer(model, train_data, out=tmp_path / "submission.csv", device="cpu")
    assert len(submission.read_text().splitlines()) == 1 + 20


@pytest.mark.parametrize("other", ["input size", "images"])
def test_caches_that_do_not_fit_are_refused(other: str, train_cache: Path, train_data: Path,
                                            tiny: Path, tmp_path: Path) -> None:
    if other == "input size":
        odd = extract("resnet50", train_data, out=tmp_path / "small.h5", weights="none",
                      input_size=(32, 32), device="cpu", batch_size=64, workers=0, hflip=False)
        fragment = "its input_size is (32, 32), not (64, 64)"
    else:
        odd = extract("resnet50", tiny, out=tmp_path / "tiny.h5", weights="none",
                      input_size=SIZE, device="cpu", batch_size=64, workers=0, hflip=False)
        fragment = "its dataset_fingerprint is"
    runs = tmp_path / "runs"
    result = CliRunner().invoke(train_cli, ["--cache", str(train_cache), "--cache", str(odd),
                                            "--runs-dir", str(runs), "--name", "x",
                                            "--device", "cpu"])
    text = result.output + (getattr(result, "stderr", "") or "")
    assert result.exit_code == 1, text
    assert f"{odd} cannot be fused with {train_cache}" in text and fragment in text
    assert "Traceback" not in text and not runs.exists()


def test_the_same_cache_twice_is_refused(train_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="given twice"):
        train([train_cache, train_cache], name="x", runs_dir=tmp_path / "runs", **SETTINGS)


# --- several layers of one trunk: one pass to extract, one pass in the exported graph ---------


@pytest.fixture(scope="module")
def two_layers(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """vgg16's conv4_3 block (features.22: 512 x 8 x 8) and pool5 (features: 512 x 2 x 2) of
    the small synthetic set at 64 x 64, from one extract pass."""
    folder = tmp_path_factory.mktemp("layers")
    return extract("vgg16", synthetic, layer=["features.22", "features"],
                   out=[folder / "conv4_3.h5", folder / "pool5.h5"], weights="none",
                   input_size=SIZE, device="cpu", batch_size=16, workers=0, hflip=False)


def test_two_layers_from_one_pass_equal_two_extractions(two_layers: list[Path], synthetic: Path,
                                                        tmp_path: Path) -> None:
    for path, layer in zip(two_layers, ["features.22", "features"], strict=True):
        alone = extract("vgg16", synthetic, layer=layer, out=tmp_path / f"{layer}.h5",
                        weights="none", input_size=SIZE, device="cpu", batch_size=16, workers=0,
                        hflip=False)
        keys = read_keys(alone)
        assert read_keys(path) == keys
        assert read_features(path, keys).tobytes() == read_features(alone, keys).tobytes()
        info, alone_info = read_info(path), read_info(alone)
        assert info.layer == layer and info.feature_shape == alone_info.feature_shape
    assert [read_info(p).feature_shape for p in two_layers] == [(512, 8, 8), (512, 2, 2)]


def test_two_layers_of_one_trunk_export_as_one_pass(two_layers: list[Path], synthetic: Path,
                                                    tmp_path: Path) -> None:
    """The fused model of two layers of one trunk runs the trunk once: vgg16's 13 convolutions,
    not 26 (the head's attention and features layer are off, so every Conv in the graph is the
    trunk's)."""
    run = train(two_layers, name="layers", runs_dir=tmp_path / "runs", epochs=1, batch_size=8,
                val_fraction=0.85, device="cpu", attention="none", features_dim=0,
                embedding_dim=16)
    model = export(run)  # with its parity check at batch 1 and 7
    graph = onnx.load(str(model)).graph
    convs = [node for node in graph.node if node.op_type == "Conv"]
    nested = [node for function in onnx.load(str(model)).functions for node in function.node
              if node.op_type == "Conv"]
    assert len(convs) + len(nested) == 13
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert props["layer"] == "features.22+features"
    assert infer(model, synthetic, out=tmp_path / "s.csv", device="cpu").is_file()


def test_layers_and_outs_must_match(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="2 layers and 1 --out"):
        extract("vgg16", tiny, layer=["features.22", "features"], out=[tmp_path / "a.h5"],
                weights="none", input_size=SIZE, device="cpu")
    with pytest.raises(UserError, match="a layer is given twice"):
        extract("vgg16", tiny, layer=["features", "features"], weights="none",
                input_size=SIZE, device="cpu")
    assert list(tmp_path.iterdir()) == []
