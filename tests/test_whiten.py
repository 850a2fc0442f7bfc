"""`head.whiten`: the PCA whitening against a brute-force reference, and a whitening-only run
through head.export (parity) and `python -m infer` (a valid submission, the figures it reported)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import check_submission

from extract.extract_features import main as extract
from head.export import build_network
from head.export import main as export
from head.model import load_checkpoint
from head.whiten import (
    DEFAULT_COMPONENTS,
    fit_whitening,
    fused_with_whitening,
    whitened_embeddings,
)
from head.whiten import main as whiten
from infer import predict


def brute_force_pooled(features: list[np.ndarray]) -> np.ndarray:
    """Each image's pooled vector, written out: per cache, per view, the mean over positions,
    L2-normalised; caches concatenated; views averaged. (N, W)."""
    parts = []
    for f in features:  # (N, V, C, ...)
        pooled = f.reshape(*f.shape[:3], -1).mean(axis=3) if f.ndim > 3 else f  # (N, V, C)
        parts.append(pooled / np.linalg.norm(pooled, axis=2, keepdims=True))
    return np.concatenate(parts, axis=2).mean(axis=1)


def test_whitening_matches_an_eigendecomposition() -> None:
    generator = torch.Generator().manual_seed(0)
    # a map cache and a vector cache, two views, with one dominant shared direction as trunks
    # have (width 64 + 8); 100 images, 90 of them for training
    shared = torch.randn(1, 1, 64, 1, 1, generator=generator) * 5
    maps = (torch.randn(100, 2, 64, 3, 2, generator=generator) + shared).half()
    vectors = torch.randn(100, 2, 8, generator=generator).half()
    rows = torch.arange(3, 93)
    head = fit_whitening([maps, vectors], rows, components=4)

    x = brute_force_pooled([maps[rows].double().numpy(), vectors[rows].double().numpy()])
    mean = x.mean(axis=0)
    values, vectors_ = np.linalg.eigh(np.cov(x - mean, rowvar=False))  # ascending
    order = np.argsort(values)[::-1][:4]
    expected = vectors_[:, order] / np.sqrt(values[order])  # (W, 4)
    projection = head.projection.double().numpy()
    signs = np.sign((projection * expected).sum(axis=0))  # a component's sign is arbitrary
    np.testing.assert_allclose(head.mean.double().numpy(), mean, atol=1e-5)
    np.testing.assert_allclose(projection * signs, expected, rtol=1e-3, atol=1e-3)
    # the whitened train features: identity covariance on the kept components
    whitened = (x - mean) @ projection
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(4), atol=1e-4)

    # the embedding: each view whitened and normalised, the views' mean normalised again
    embeddings = whitened_embeddings(head, [maps, vectors], torch.tensor([0, 99]))
    views = [head(maps[[0, 99], v].float(), vectors[[0, 99], v].float()) for v in range(2)]
    expected_embeddings = torch.nn.functional.normalize(sum(views) / 2, dim=1).numpy()
    np.testing.assert_allclose(embeddings, expected_embeddings, atol=1e-6)

    # the default: 64 components where the images span them, n - 1 where they do not
    assert head.config.embedding_dim == 4
    assert fit_whitening([maps, vectors], rows).config.embedding_dim == DEFAULT_COMPONENTS == 64
    assert fit_whitening([maps, vectors], rows[:10]).config.embedding_dim == 9


@pytest.fixture(scope="module")
def whitened_run(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whitening-only run on a two-view resnet18 cache at 32 x 32 of the small synthetic set
    (24 pairs; 0.85 holds out the 20 a validation split needs); read-only."""
    folder = tmp_path_factory.mktemp("whiten")
    cache = extract("resnet18", synthetic, out=folder / "r18.h5", weights="none",
                    input_size=(32, 32), device="cpu", batch_size=32, workers=0)  # flips: default
    return whiten(cache, name="w", runs_dir=folder / "runs", val_fraction=0.85, device="cpu")


def test_a_whitening_run_exports_and_writes_a_submission(whitened_run: Path, synthetic: Path,
                                                          tmp_path: Path) -> None:
    head, checkpoint = load_checkpoint(whitened_run / "head.pt")
    assert checkpoint["format_version"] == 6 and checkpoint["head_kind"] == "whitening"
    assert checkpoint["views"] == ["identity", "hflip"]
    summary = json.loads((whitened_run / "config.json").read_text())
    # 8 training pairs are 16 images: 15 components
    assert head.config.embedding_dim == summary["components"] == 7
    net, _ = build_network(whitened_run / "head.pt")
    assert net.head.kind == "whitening" and net.views == ("identity", "hflip")

    model = export(whitened_run, out=tmp_path / "model.onnx")  # refused unless parity holds
    out = predict.main(model, synthetic, out=tmp_path / "submission.csv", device="cpu")
    check_submission(out, synthetic)

    # infer on the run's validation split gives the figures head.whiten reported (float16
    # features there, float32 images through the trunk here)
    report = predict.main(model, synthetic, split="val", out=tmp_path / "val.json", device="cpu")
    figures = json.loads(report.read_text())["metrics"]
    assert figures["top2"] == pytest.approx(summary["whitened"]["top2"], abs=1 / 20 + 1e-9)


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_fused_cosine_is_the_weighted_mean_of_the_two_cosines(weight: float) -> None:
    generator = np.random.default_rng(0)
    trained = generator.normal(size=(7, 5))  # (M, D)
    whitened = generator.normal(size=(7, 3))  # (M, k), another width
    trained /= np.linalg.norm(trained, axis=1, keepdims=True)
    whitened /= np.linalg.norm(whitened, axis=1, keepdims=True)
    fused = fused_with_whitening(trained, whitened, weight)  # (M, D + k)
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, atol=1e-12)
    for i in range(7):
        for j in range(7):
            expected = (1 - weight) * trained[i] @ trained[j] + weight * whitened[i] @ whitened[j]
            assert fused[i] @ fused[j] == pytest.approx(expected, abs=1e-12)


def test_fusion_refuses_a_weight_outside_0_1() -> None:
    unit = np.eye(2)
    with pytest.raises(ValueError, match="1.5"):
        fused_with_whitening(unit, unit, 1.5)
