"""Fusion: several caches (trunks or layers of the same images) into one head, one run and one
exported model; caches of other images or another input size are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from extract.extract_features import main as extract
from head.export import main as export
from head.model import load_checkpoint
from head.train import cli as train_cli
from head.train import main as train
from infer.predict import main as infer

SIZE = (64, 64)
SETTINGS = dict(epochs=2, batch_size=32, lr=3e-4, val_fraction=0.2, device="cpu")


@pytest.fixture(scope="module")
def vgg16_cache(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vgg16 (features: 512 x 2 x 2) over the images of the conftest's train_cache."""
    return extract("vgg16", train_data, out=tmp_path_factory.mktemp("vgg") / "vgg16.h5",
                   weights="none", input_size=SIZE, device="cpu", batch_size=32, workers=0)


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
                      input_size=(32, 32), device="cpu", batch_size=64, workers=0)
        fragment = "its input_size is (32, 32), not (64, 64)"
    else:
        odd = extract("resnet50", tiny, out=tmp_path / "tiny.h5", weights="none",
                      input_size=SIZE, device="cpu", batch_size=64, workers=0)
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
