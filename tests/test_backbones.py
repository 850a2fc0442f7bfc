"""Backbones from torchvision and timm: the curated list (each trunk's features against what the
list says, a cache of each), the default cuts, `--layer global` as each model defines its
embedding, input sizes a model does not take, weights offline or from a file, unknown names,
the interpolation travelling from the weights to the cache, checkpoint, ONNX file and infer, and
extract -> train -> export -> infer end to end for a CNN map, a ViT map and a ViT vector. Every
trunk is random-init (`--weights none`): nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
import safetensors.torch
import timm
import torch
from conftest import REPO_ROOT, invoke_cli
from PIL import Image

from extract.backbones import (
    CURATED,
    PINNED,
    SPEEDS_MEASURED,
    Trunk,
    TrunkSpec,
    WeightsUnavailable,
    _default_cut,
    resolve_backbone,
)
from extract.cache import read_features, read_info, read_keys
from extract.extract_features import cli
from extract.extract_features import main as extract
from head.export import build_network
from head.export import main as export
from head.train import main as train
from infer.model_info import ModelInfo
from infer.predict import main as infer
from tll import UserError
from tll.data import DataError, load_image, read_dataset

CLIP = "timm:vit_base_patch16_clip_quickgelu_224.openai"
TINY_VIT = "timm:vit_tiny_patch16_224"  # 5.7M parameters: the end-to-end ViT
# the smallest input each curated trunk takes that still gives a 2 x 2 map (or more)
SMALL = {"vgg16": (64, 64), "resnet50": (64, 64), "densenet201": (64, 64),
         "convnext_tiny": (64, 64), CLIP: (32, 32),
         "timm:vit_small_patch14_dinov2.lvd142m": (28, 28)}


def invoke(*arguments):
    return invoke_cli(cli, *arguments)


def embed(trunk: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return trunk(images)


# --- the curated list --------------------------------------------------------------------------


@pytest.mark.parametrize("row", CURATED, ids=[c.backbone for c in CURATED])
def test_curated_backbone_gives_what_the_list_says(row, tiny: Path, tmp_path: Path) -> None:
    """Its default cut and input size, the shape at that size, `global`'s vector, and a cache
    of the tiny set at a small input: the right shape, finite, different per image."""
    spec = TrunkSpec.resolve(row.backbone, None, "none")
    assert (spec.layer, spec.input_size) == (row.layer, row.input_size)
    assert Trunk(spec).output_shape() == row.shape
    if row.global_shape:
        vector = Trunk(TrunkSpec.resolve(row.backbone, "global", "none", SMALL[row.backbone]))
        assert vector.output_shape() == row.global_shape

    # the cut given from here on: densenet201's is found on probes, which take seconds
    cache = extract(row.backbone, tiny, out=tmp_path / "x.h5", layer=row.layer, weights="none",
                    input_size=SMALL[row.backbone], device="cpu", batch_size=16, workers=0,
                    hflip=False)
    info = read_info(cache)
    small = Trunk(TrunkSpec.resolve(row.backbone, row.layer, "none", SMALL[row.backbone]))
    assert info.feature_shape == small.output_shape()
    assert len(info.feature_shape) == 3 and min(info.feature_shape[1:]) >= 2
    assert info.backbone == spec.backbone and info.interpolation == spec.interpolation
    features = read_features(cache, read_keys(cache)).astype(np.float32)
    assert features.shape == (42, *info.feature_shape)
    assert np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 0


def test_list_backbones_prints_the_curated_list() -> None:
    result = invoke("--list-backbones")  # no --backbone needed
    assert result.exit_code == 0, result.text
    for row in CURATED:
        line = next(line for line in result.output.splitlines()
                    if line.startswith(row.backbone + " "))
        assert " x ".join(map(str, row.shape)) in line and f"{row.images_per_s:.1f}" in line
        assert ("Hugging Face hub" if row.backbone.startswith("timm:") else "torchvision") in line
    assert "benchmarks/extract_speed.py" in result.output


def test_list_backbones_says_where_and_when_its_speeds_were_measured() -> None:
    """The speeds are a snapshot: the list says which benchmark made them, on what, and when."""
    result = invoke("--list-backbones")
    assert result.exit_code == 0, result.text
    assert f"measured by benchmarks/extract_speed.py {SPEEDS_MEASURED};" in result.output
    assert "2026-11-27" in SPEEDS_MEASURED and "2-core CPU" in SPEEDS_MEASURED


def test_vgg16_and_resnet50_are_as_before() -> None:
    """Their own cut, weights, input size and preprocessing; and the generic rule for other
    torchvision models finds the same cuts."""
    for name, cut in (("vgg16", "features"), ("resnet50", "layer4")):
        entry = resolve_backbone(name)
        assert (entry.layer, entry.input_size, entry.interpolation) == (cut, (245, 200),
                                                                       "bilinear")
        assert entry.weights_id == f"{type(PINNED[name].weights).__name__}." \
                                   f"{PINNED[name].weights.name}"
        assert entry.mean == pytest.approx((0.485, 0.456, 0.406))
        assert _default_cut(entry) == cut


def test_a_transformer_without_maps_needs_timm_or_a_layer() -> None:
    with pytest.raises(UserError, match="token sequences.*timm.*--layer NODE"):
        TrunkSpec.resolve("vit_b_16", None, "none")


# --- global embeddings -------------------------------------------------------------------------


def timm_model(name: str, **options) -> torch.nn.Module:
    """The timm model as `--weights none` builds it (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(name, **options).eval()


@pytest.mark.parametrize(("backbone", "projected"), [(CLIP, True), (TINY_VIT, False)],
                         ids=["clip-projection", "imagenet-classifier"])
def test_global_is_the_models_own_embedding(backbone: str, projected: bool) -> None:
    """CLIP's image embedding is its head's projection (512-d); an ImageNet classifier's is
    the pooled features before its logits (192-d, not 1000)."""
    trunk = Trunk(TrunkSpec.resolve(backbone, "global", "none", (32, 32)))
    model = timm_model(backbone.removeprefix("timm:"), img_size=(32, 32))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    normalised = (images - trunk.mean) / trunk.std
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(normalised),
                                      pre_logits=not projected)  # (3, D)
    assert expected.shape == (3, 512 if projected else 192)
    torch.testing.assert_close(embed(trunk, images), expected)


def test_vit_map_is_the_patch_grid(tmp_path: Path) -> None:
    """A ViT's map is its last block's patch tokens after the final norm, class token dropped,
    laid out row by row on the grid."""
    trunk = Trunk(TrunkSpec.resolve(TINY_VIT, None, "none", (32, 48)))
    model = timm_model(TINY_VIT.removeprefix("timm:"), img_size=(32, 48))
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        tokens = model.forward_features((images - trunk.mean) / trunk.std)  # (2, 1 + 6, 192)
    grid = embed(trunk, images)
    assert grid.shape == (2, 192, 2, 3)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens[:, 1:])


def test_random_init_is_deterministic() -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    first, second = (Trunk(TrunkSpec.resolve(TINY_VIT, None, "none", (32, 32)))
                     for _ in range(2))
    assert torch.equal(embed(first, images), embed(second, images))


# --- input sizes --------------------------------------------------------------------------------


def test_input_size_a_model_does_not_take_is_refused() -> None:
    """torchvision's ViT takes 224 x 224 only; its `heads` node is a vector at that size."""
    trunk = Trunk(TrunkSpec.resolve("vit_b_16", "heads", "none", (64, 64)))
    with pytest.raises(UserError, match=r"vit_b_16 heads does not take input size 64 x 64 "
                                        r"\(Wrong image height.*leave --input-size out"):
        trunk.output_shape()


def test_timm_vit_takes_another_input_size() -> None:
    """Rebuilt for it (its position embedding on the new grid): 32 x 64 -> a 2 x 4 map."""
    assert Trunk(TrunkSpec.resolve(TINY_VIT, None, "none", (32, 64))).output_shape() \
        == (192, 2, 4)


# --- weights -------------------------------------------------------------------------------------


def test_timm_weights_offline_name_the_model_cache_and_options(tiny: Path,
                                                               tmp_path: Path) -> None:
    """No network and an empty hub cache: one message with the model, the cache folder and
    what to pass instead; nothing written."""
    hf_home = tmp_path / "hf-home"
    out = tmp_path / "out" / "x.h5"
    backbone = "timm:vit_tiny_patch16_224.augreg_in21k"
    process = subprocess.run(
        [sys.executable, "-m", "extract", "--backbone", backbone, "--data", str(tiny),
         "--out", str(out), "--input-size", "32", "32", "--device", "cpu", "--no-hflip"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home),
             "TORCH_HOME": str(tmp_path / "torch-home"), "OMP_NUM_THREADS": "1"})
    output = process.stdout + process.stderr
    assert process.returncode == 1, output
    assert "Traceback" not in output
    for fragment in (f"Error: cannot get the pretrained weights of {backbone}",
                     str(hf_home / "hub"), "--weights none", "--weights PATH"):
        assert fragment in output
    assert not (tmp_path / "out").exists()


def test_timm_weights_from_a_file(tmp_path: Path) -> None:
    """A local .safetensors file is loaded through timm (checked by its sha256); a file of
    another model is refused."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        state = timm.create_model("vit_tiny_patch16_224").state_dict()
    path = tmp_path / "vit-tiny-seed123.safetensors"
    safetensors.torch.save_file(state, path)
    spec = TrunkSpec.resolve(TINY_VIT, None, str(path), (32, 32))
    assert spec.weights == str(path) and spec.weights_id.startswith("sha256:")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    loaded = embed(Trunk(spec), images)
    model = timm.create_model("vit_tiny_patch16_224", img_size=(32, 32)).eval()
    # the file's position embedding resampled to the 2 x 2 grid, as timm's loading does
    model.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(state, model))
    with torch.inference_mode():
        expected = model.forward_intermediates((images - 0.5) / 0.5, indices=[11], norm=True,
                                               intermediates_only=True)[0]
    torch.testing.assert_close(loaded, expected)
    random_init = embed(Trunk(TrunkSpec.resolve(TINY_VIT, None, "none", (32, 32))), images)
    assert not torch.allclose(loaded, random_init)

    other = tmp_path / "resnet.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(WeightsUnavailable, match="resnet.pt is not a state dict that fits"):
        Trunk(TrunkSpec.resolve(TINY_VIT, None, str(other), (32, 32)))


# --- unknown names -------------------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "fragments"), [
    ("densenet2011", ("did you mean densenet201", "list_models", "timm:<model>",
                      "--list-backbones")),
    ("timm:vit_tiny_patch16_2244", ("did you mean timm:vit_tiny_patch16_224",
                                    "timm.list_pretrained", "--list-backbones")),
    ("timm:vit_tiny_patch16_224.nope", ("no weights 'nope' for vit_tiny_patch16_224",
                                        ".augreg_in21k_ft_in1k")),
])
def test_unknown_backbone_says_how_to_find_valid_names(backbone: str, fragments: tuple,
                                                       tiny: Path, tmp_path: Path) -> None:
    result = invoke("--backbone", backbone, "--data", tiny, "--out", tmp_path / "x.h5",
                    "--weights", "none", "--device", "cpu")
    assert result.exit_code == 1, result.text
    assert "Error:" in result.text and "Traceback" not in result.text
    for fragment in fragments:
        assert fragment in result.text
    assert list(tmp_path.iterdir()) == []


def test_timm_unknown_layer_lists_the_stages() -> None:
    with pytest.raises(UserError, match="no feature stage 'blocks.12'.*blocks.11, global"):
        Trunk(TrunkSpec.resolve(TINY_VIT, "blocks.12", "none", (32, 32)))


# --- interpolation --------------------------------------------------------------------------------


def test_load_image_resizes_with_the_interpolation_asked(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    for name, method in (("bilinear", Image.Resampling.BILINEAR),
                         ("bicubic", Image.Resampling.BICUBIC)):
        expected = np.asarray(Image.fromarray(pixels).resize((20, 30), method), dtype=np.float32)
        np.testing.assert_array_equal(load_image(path, (30, 20), name),
                                      expected.transpose(2, 0, 1) / 255)
    assert not np.array_equal(load_image(path, (30, 20), "bicubic"), load_image(path, (30, 20)))
    with pytest.raises(DataError, match="unknown interpolation 'lanczos'.*bilinear, bicubic"):
        load_image(path, (30, 20), "lanczos")


def test_what_was_written_before_interpolation_reads_as_bilinear(tiny: Path,
                                                                 tmp_path: Path) -> None:
    """A schema 2 cache (no interpolation, no timm_version), a checkpoint's cache metadata and
    an ONNX file's metadata from before."""
    cache = extract("resnet50", tiny, out=tmp_path / "x.h5", weights="none",
                    input_size=(32, 32), device="cpu", workers=0, hflip=False)
    with h5py.File(cache, "r+") as file:
        del file.attrs["interpolation"], file.attrs["timm_version"]
        file.attrs["schema_version"] = 2
    info = read_info(cache)
    assert info.interpolation == "bilinear" and info.feature_shape == (2048, 1, 1)
    old = {k: v for k, v in vars(info).items() if k != "interpolation"}
    assert TrunkSpec.from_metadata(old).interpolation == "bilinear"
    props = {"input_size": "[32, 32]"}
    assert ModelInfo.from_props(tmp_path / "m.onnx", props).interpolation == "bilinear"
    with pytest.raises(UserError, match="damaged metadata.*'cubic'"):
        ModelInfo.from_props(tmp_path / "m.onnx", {**props, "interpolation": "cubic"})


# --- extract -> train -> export -> infer ----------------------------------------------------------

END_TO_END = {
    "cnn-map": ("timm:convnext_atto", None, (64, 64), (320, 2, 2)),
    "vit-map": (TINY_VIT, None, (32, 32), (192, 2, 2)),
    "vit-vector": (TINY_VIT, "global", (32, 32), (192,)),
}


@pytest.mark.parametrize("case", END_TO_END, ids=END_TO_END)
def test_end_to_end(case: str, synthetic: Path, tmp_path: Path) -> None:
    """Extract, train, export (its parity check at batch 1 and 7 inside), and infer's
    validation scores against the eager network fed bicubic-resized images: the
    interpolation the timm weights ask for, recorded in the cache, the run and the model."""
    backbone, layer, size, shape = END_TO_END[case]
    cache = extract(backbone, synthetic, out=tmp_path / "x.h5", layer=layer, weights="none",
                    input_size=size, device="cpu", batch_size=32, workers=0, hflip=False)
    info = read_info(cache)
    assert info.feature_shape == shape and info.interpolation == "bicubic"
    run = train(cache, name="run", runs_dir=tmp_path / "runs", epochs=2, batch_size=8,
                val_fraction=0.85, seed=1, device="cpu", embedding_dim=32)
    summary = json.loads((run / "config.json").read_text())
    assert np.isfinite(summary["baseline"]["top2"]) and np.isfinite(summary["best"]["top2"])
    model = export(run)
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert props["interpolation"] == "bicubic" and props["layer"] == info.layer

    report = infer(model, synthetic, split="val", out=tmp_path / "val.json", device="cpu")
    query = json.loads(report.read_text())["queries"][0]
    dataset = read_dataset(synthetic)
    net, _ = build_network(run / "head.pt")

    def scores(interpolation: str) -> np.ndarray:
        keys = [f"train/left/{query['left']}"] + [f"train/right/{c}"
                                                  for c in query["candidates"]]
        images = np.stack([load_image(dataset.images[k], size, interpolation) for k in keys])
        with torch.inference_mode():
            embeddings = net(torch.from_numpy(images)).numpy()  # (21, D)
        return embeddings[1:] @ embeddings[0]  # (20,)

    np.testing.assert_allclose(query["scores"], scores("bicubic"), atol=1e-4)
    assert np.abs(np.array(query["scores"]) - scores("bilinear")).max() > 1e-3
