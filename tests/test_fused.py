"""A trained head fused with a PCA whitening (`head.train --whitened-weight w`,
`head.model.Fused`): its cosine is (1 - w) x the head's + w x the whitened one (with an ensemble,
with views), its checkpoint round trip, a 2-fold run whose figures are the fused model's, and that
run through head.export (parity, maps) and `python -m infer`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_SETTINGS, check_submission, invoke_cli
from test_ensemble import SHAPES, TinyTrunk, cosines, ensemble_of_three, trained_looking_heads

from extract.cache import read_info
from head import train as head_train
from head import whiten as head_whiten
from head.config import TrainConfig
from head.export import build_network, describe
from head.export import main as export
from head.figures import evaluate
from head.folds import all_pairs_fold, load_pairs, validation_folds, views_used
from head.model import (
    Ensemble,
    Fused,
    FusedConfig,
    TLLNet,
    load_checkpoint,
    save_checkpoint,
    with_whitening,
)
from head.train import Trainer, cli, embed
from head.train import main as train
from head.whiten import WhiteningHead, fit_whitening, training_rows
from infer import predict
from infer.session import open_session

WEIGHT = 0.25


def whitening_of(shapes: tuple[tuple[int, ...], ...], components: int = 5) -> WhiteningHead:
    """A whitening of inputs of `shapes`, fitted on random features of 30 images."""
    generator = torch.Generator().manual_seed(11)
    features = [torch.randn(30, 1, *shape, generator=generator) for shape in shapes]
    return fit_whitening(features, torch.arange(30), components)


@pytest.mark.parametrize("inner", ["head", "ensemble"])
def test_the_fused_cosine_is_the_weighted_mean_of_the_parts(inner: str) -> None:
    """Brute force: the fused cosine against (1 - w) x the trained cosine (an ensemble's: the
    mean of its members') + w x the whitened cosine, each part computed alone; on features, with
    two views in the exported network, and in head.train's validation (`embed`)."""
    trained = trained_looking_heads(1)[0] if inner == "head" else ensemble_of_three()
    members = list(trained.members) if isinstance(trained, Ensemble) else [trained]
    whitening = whitening_of(SHAPES)
    fused = with_whitening(trained, whitening, WEIGHT).eval()
    assert isinstance(fused, Fused) and fused.config.weight == WEIGHT
    assert with_whitening(trained, whitening, 0) is trained

    def expected(parts_cosine) -> torch.Tensor:  # parts_cosine(part) -> (B,)
        return ((1 - WEIGHT) * torch.stack([parts_cosine(m) for m in members]).mean(dim=0)
                + WEIGHT * parts_cosine(whitening))

    generator = torch.Generator().manual_seed(0)
    left = [torch.randn(4, *shape, generator=generator) for shape in SHAPES]
    right = [torch.randn(4, *shape, generator=generator) for shape in SHAPES]
    with torch.no_grad():
        a, b = fused(*left), fused(*right)  # (4, D + k)
        assert a.shape == (4, trained.config.embedding_dim + 5)
        torch.testing.assert_close(a.norm(dim=1), torch.ones(4))
        torch.testing.assert_close((a * b).sum(dim=1),
                                   expected(lambda part: cosines(part(*left), part(*right))))

    # two views: each part's (each member's) views averaged and normalised before the join
    trunk, images = TinyTrunk().eval(), torch.rand(2, 4, 3, 5, 5, generator=generator)

    def net(head: torch.nn.Module) -> TLLNet:
        return TLLNet([trunk], head, ("identity", "hflip"), inputs=((0, 0), (0, 1)))

    with torch.no_grad():
        got = cosines(net(fused)(images[0]), net(fused)(images[1]))
        torch.testing.assert_close(got, expected(
            lambda part: cosines(net(part)(images[0]), net(part)(images[1]))))

    # head.train's validation on cached views
    cached = [torch.randn(6, 2, *shape, generator=generator) for shape in SHAPES]  # (N, V, ...)
    rows = torch.tensor([0, 2, 4, 1, 3, 5])
    got = embed(fused, cached, rows, batch_size=4)
    parts = {id(part): embed(part, cached, rows, batch_size=4) for part in (*members, whitening)}
    np.testing.assert_allclose((got[:3] * got[3:]).sum(axis=1), expected(
        lambda part: torch.from_numpy((parts[id(part)][:3] * parts[id(part)][3:]).sum(axis=1))
    ).numpy(), atol=1e-6)


def test_fused_checkpoint_round_trip(tmp_path: Path) -> None:
    fused = with_whitening(ensemble_of_three(), whitening_of(SHAPES), WEIGHT).eval()
    save_checkpoint(tmp_path / "head.pt", fused, best_epoch=2)
    loaded, checkpoint = load_checkpoint(tmp_path / "head.pt")
    assert checkpoint["format_version"] == 6 and checkpoint["head_kind"] == "fused"
    assert checkpoint["head_config"]["inner_kind"] == "ensemble"
    assert checkpoint["head_config"]["embedding_dim"] == 3 * 8 + 5
    assert isinstance(loaded, Fused) and isinstance(loaded.inner, Ensemble)
    assert isinstance(loaded.whitening, WhiteningHead) and loaded.config == fused.config
    features = [torch.randn(3, *shape) for shape in SHAPES]
    with torch.no_grad():
        assert torch.equal(loaded(*features), fused(*features))
    # format 5 (before fused heads) still loads
    ensemble = ensemble_of_three()
    torch.save({"format_version": 5, "head_kind": "ensemble",
                "head_config": dataclasses.asdict(ensemble.config),
                "state_dict": ensemble.state_dict(), "caches": [], "views": ["identity"]},
               tmp_path / "old.pt")
    old, _ = load_checkpoint(tmp_path / "old.pt")
    with torch.no_grad():
        assert type(old) is Ensemble and torch.equal(old(*features), ensemble(*features))
    # the config refuses a weight that would not fuse anything
    for weight in (0.0, 1.0):
        with pytest.raises(ValueError, match="weight"):
            FusedConfig("ensemble", fused.config.inner, fused.config.whitening, weight)


# --- a run ---------------------------------------------------------------------------------------

RUN_SETTINGS = {**TRAIN_SETTINGS, "epochs": 2, "folds": 2, "keep_fold_heads": True,
                "whitened_weight": WEIGHT}


@pytest.fixture(scope="module")
def fused_run_and_fits(train_cache: Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> tuple[Path, list[int]]:
    """2-fold, 2 epochs, the folds' heads kept, fused with the whitening at 0.25: a Fused of an
    ensemble of 3 heads (the final one and the 2 folds') and the whitening of every train
    pair; read-only. And the number of images each whitening fitted in the run was fitted on."""
    fits = []

    def counted(features, rows, components=None):
        fits.append(len(rows))
        return fit_whitening(features, rows, components)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(head_whiten, "fit_whitening", counted)
        patch.setattr(head_train, "fit_whitening", counted)
        run = train(train_cache, name="fused", runs_dir=tmp_path_factory.mktemp("runs"),
                    **RUN_SETTINGS)
    return run, fits


@pytest.fixture(scope="module")
def fused_run(fused_run_and_fits: tuple[Path, list[int]]) -> Path:
    return fused_run_and_fits[0]


def test_each_whitening_is_fitted_once(fused_run_and_fits: tuple[Path, list[int]],
                                       train_cache: Path) -> None:
    """The baseline's whitening of each fold is the one fused with its head (not fitted again),
    then the final head's, on every train pair."""
    pairs = load_pairs([train_cache], [read_info(train_cache)], None, torch.device("cpu"))
    config = TrainConfig(caches=(str(train_cache),), name="x", **RUN_SETTINGS)
    expected = [len(training_rows(fold)) for fold in validation_folds(pairs, config)]
    assert fused_run_and_fits[1] == [*expected, len(training_rows(all_pairs_fold(pairs)))]


def test_a_fused_runs_figures_are_the_fused_models(fused_run: Path, train_cache: Path) -> None:
    """Each fold's figures are those of its head fused with the whitening of its own training
    images; the run keeps the final and fold heads fused with the whitening of every pair."""
    head, checkpoint = load_checkpoint(fused_run / "head.pt")
    assert isinstance(head, Fused) and isinstance(head.inner, Ensemble)
    assert head.config.weight == WEIGHT and len(head.inner.members) == 3
    assert checkpoint["train_config"]["whitened_weight"] == WEIGHT
    history = [json.loads(line) for line in (fused_run / "metrics.jsonl").read_text().splitlines()]
    best = checkpoint["best_epoch"]

    config = TrainConfig(caches=(str(train_cache),), name="x", **RUN_SETTINGS)
    pairs = load_pairs([train_cache], [read_info(train_cache)], None, torch.device("cpu"))
    fold = views_used(validation_folds(pairs, config)[1], config)
    trainer = Trainer(fold, head.inner.config.member, config)
    for number in range(1, best + 1):
        trainer.train(number)
    for key, value in trainer.head.state_dict().items():  # the fold head kept
        assert torch.equal(head.inner.members[2].state_dict()[key], value), key
    whitening = fit_whitening(fold.features, training_rows(fold))
    fused = with_whitening(trainer.head, whitening, WEIGHT)
    figures = evaluate(embed(fused, fold.features, fold.val_images, 64), fold, config.assign,
                       config.assign_temperature)
    assert {k: history[best - 1]["folds"][1][k] for k in figures} == pytest.approx(figures)
    alone = evaluate(embed(trainer.head, fold.features, fold.val_images, 64), fold,
                     config.assign, config.assign_temperature)
    assert alone["mrr"] != pytest.approx(figures["mrr"])  # the figures are not the head's alone

    every = all_pairs_fold(pairs)
    expected = fit_whitening(every.features, training_rows(every))
    assert head.whitening.config == expected.config
    torch.testing.assert_close(head.whitening.projection, expected.projection)


def test_a_fused_run_exports_with_maps_and_writes_a_submission(
        fused_run: Path, train_data: Path, tmp_path: Path) -> None:
    net, checkpoint = build_network(fused_run / "head.pt")
    assert net.head.kind == "fused" and net.has_maps()
    assert describe(checkpoint)["embedding_dim"] == str(3 * 256 + 64)

    model = export(fused_run, out=tmp_path / "model.onnx")  # refused unless parity holds
    session, info = open_session(model, "cpu")
    assert info.maps["terms"][-1] == [None, None, None]  # the whitened share
    assert [tuple(t) for t in info.maps["terms"]] == net.terms()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    embedding, cells = session.run(["embedding", "cell_embeddings"], {"image": images.numpy()})
    assert cells.shape == (3, len(net.terms()), 3 * 256 + 64)
    np.testing.assert_allclose(cells.sum(axis=1), embedding, atol=1e-5)

    out = predict.main(model, train_data, out=tmp_path / "submission.csv", device="cpu",
                       report=tmp_path / "page.html")
    check_submission(out, train_data)
    assert "<canvas" in (tmp_path / "page.html").read_text()


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_a_whitened_weight_outside_0_1_is_refused(value: str, train_cache: Path,
                                                  tmp_path: Path) -> None:
    result = invoke_cli(cli, "--cache", train_cache, "--runs-dir", tmp_path,
                        "--whitened-weight", value, "--device", "cpu")
    assert result.exit_code == 2 and "--whitened-weight" in result.text
    assert "0<=x<1" in result.text and not list(tmp_path.iterdir())
