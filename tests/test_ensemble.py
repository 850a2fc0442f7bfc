"""Ensembles (`head.train --seeds N`, `--keep-fold-heads`): the ensemble's cosine is the mean of
its members' (with views too), its checkpoint round trip, `--seeds 1` as the one head it always
was, and an ensemble run through head.export (parity) and `python -m infer`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_SETTINGS, check_submission, invoke_cli
from torch import nn

from extract.cache import read_info
from head import sweep
from head import train as train_module
from head.config import TrainConfig
from head.export import build_network, describe
from head.export import main as export
from head.figures import evaluate, summarize
from head.folds import load_pairs, validation_folds
from head.model import (
    Ensemble,
    EnsembleConfig,
    Head,
    HeadConfig,
    TLLNet,
    load_checkpoint,
    save_checkpoint,
)
from head.train import Trainer, cli, cross_validate, embed
from head.train import main as train
from infer import predict
from tll import UserError

SHAPES = ((16, 3, 3), (6,))  # a map and a vector input


def trained_looking_heads(count: int, embedding_dim: int = 8) -> list[Head]:
    """`count` heads of one config, each with its own weights and batch-norm statistics."""
    config = HeadConfig(feature_shapes=SHAPES, embedding_dim=embedding_dim, pool=2)
    heads = []
    for seed in range(count):
        torch.manual_seed(seed)
        head = Head(config).train()
        with torch.no_grad():
            for _ in range(2):  # move the running statistics away from their defaults
                head(torch.randn(5, *SHAPES[0]) * 2 + 1, torch.randn(5, *SHAPES[1]))
        heads.append(head.eval())
    return heads


def ensemble_of_three() -> Ensemble:
    members = tuple({"seed": seed, "fold": None} for seed in range(3))
    return Ensemble(EnsembleConfig(trained_looking_heads(1)[0].config, members),
                    trained_looking_heads(3)).eval()


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B, D), (B, D) -> (B,)
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


class TinyTrunk(nn.Module):
    """A stand-in trunk: an image -> one (16, 3, 3) map and one (6,) vector, of the image's
    left columns only, so that its views differ."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv, self.linear = nn.Conv2d(3, 16, 3), nn.Linear(3, 6)

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:  # (N, 3, 5, 5)
        return [self.conv(image) * 3, self.linear(image[..., :2].mean(dim=(2, 3))) * 30]


def test_the_ensembles_cosine_is_the_mean_of_its_members_cosines() -> None:
    ensemble = ensemble_of_three()
    generator = torch.Generator().manual_seed(0)
    left = [torch.randn(4, *shape, generator=generator) for shape in SHAPES]
    right = [torch.randn(4, *shape, generator=generator) for shape in SHAPES]
    with torch.no_grad():
        got = ensemble(*left), ensemble(*right)  # each (4, 3 * 8)
        expected = torch.stack([cosines(m(*left), m(*right)) for m in ensemble.members]).mean(0)
    assert got[0].shape == (4, 24)
    torch.testing.assert_close(got[0].norm(dim=1), torch.ones(4))
    torch.testing.assert_close((got[0] * got[1]).sum(dim=1), expected)

    # with two views, in the exported network: each member's views averaged and normalised
    # before the members are joined
    trunk, images = TinyTrunk().eval(), torch.rand(2, 4, 3, 5, 5, generator=generator)
    nets = [TLLNet([trunk], head, ("identity", "hflip"), inputs=((0, 0), (0, 1)))
            for head in (ensemble, *ensemble.members)]
    with torch.no_grad():
        got, *each = [cosines(net(images[0]), net(images[1])) for net in nets]
    torch.testing.assert_close(got, torch.stack(each).mean(dim=0))

    # and in head.train's validation (`embed`, on cached views)
    cached = [torch.randn(6, 2, *shape, generator=generator) for shape in SHAPES]  # (N, V, ...)
    rows = torch.tensor([0, 2, 4, 1, 3, 5])
    got = embed(ensemble, cached, rows, batch_size=4)  # (6, 24)
    each = [embed(m, cached, rows, batch_size=4) for m in ensemble.members]  # 3 x (6, 8)
    np.testing.assert_allclose((got[:3] * got[3:]).sum(axis=1),
                               np.mean([(e[:3] * e[3:]).sum(axis=1) for e in each], axis=0),
                               atol=1e-6)


def test_ensemble_checkpoint_round_trip_and_older_formats(tmp_path: Path) -> None:
    ensemble = ensemble_of_three()
    save_checkpoint(tmp_path / "head.pt", ensemble, best_epoch=3)
    loaded, checkpoint = load_checkpoint(tmp_path / "head.pt")
    assert checkpoint["format_version"] == 6 and checkpoint["head_kind"] == "ensemble"
    assert isinstance(loaded, Ensemble) and loaded.config == ensemble.config
    assert loaded.config.embedding_dim == checkpoint["head_config"]["embedding_dim"] == 24
    assert [m["seed"] for m in checkpoint["head_config"]["members"]] == [0, 1, 2]
    features = [torch.randn(3, *shape) for shape in SHAPES]
    with torch.no_grad():
        assert torch.equal(loaded(*features), ensemble(*features))

    # format 4 (a trained head, before ensembles) still loads
    head = trained_looking_heads(1)[0]
    torch.save({"format_version": 4, "head_kind": "trained",
                "head_config": dataclasses.asdict(head.config), "state_dict": head.state_dict(),
                "caches": [], "views": ["identity"]}, tmp_path / "old.pt")
    old, _ = load_checkpoint(tmp_path / "old.pt")
    with torch.no_grad():
        assert type(old) is Head and torch.equal(old(*features), head(*features))

    # a checkpoint whose members and weights disagree is refused as damaged
    damaged = torch.load(tmp_path / "head.pt", weights_only=True)
    damaged["head_config"]["members"] = damaged["head_config"]["members"][:2]
    damaged["head_config"]["embedding_dim"] = 16
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(tmp_path / "damaged.pt")


def _config(cache: Path, **changes) -> TrainConfig:
    return TrainConfig(caches=(str(cache),), name="x", **{**TRAIN_SETTINGS, **changes})


def test_seeds_validate_the_ensemble_and_one_seed_is_the_one_head(train_cache: Path) -> None:
    """--seeds 1 is the one Trainer's loop of before, figure for figure; with --seeds 2 each
    fold's record is the ensemble of the heads of seeds --seed and --seed + 1, each trained as
    that one seed alone would train it."""
    pairs = load_pairs([train_cache], [read_info(train_cache)], None, torch.device("cpu"))
    head_config = HeadConfig(feature_shapes=(read_info(train_cache).feature_shape,))
    one, two = (_config(train_cache, epochs=2, folds=2, seed=3, seeds=n) for n in (1, 2))
    folds = validation_folds(pairs, one)

    plain = [Trainer(fold, head_config, one) for fold in folds]
    expected = [summarize([t.epoch(number) for t in plain]) for number in (1, 2)]
    history = cross_validate(folds, head_config, one, progress=False)
    for record, figures in zip(history, expected, strict=True):
        assert {k: record[k] for k in figures} == figures

    members = [[Trainer(fold, head_config, dataclasses.replace(one, seed=seed))
                for seed in (3, 4)] for fold in folds]
    for number in (1, 2):
        for fold_members in members:
            for trainer in fold_members:
                trainer.train(number)
    history = cross_validate(folds, head_config, two, progress=False)
    for fold, fold_members, record in zip(folds, members, history[-1]["folds"], strict=True):
        ensemble = Ensemble(EnsembleConfig(head_config, ({}, {})), [t.head for t in fold_members])
        figures = evaluate(embed(ensemble, fold.features, fold.val_images, 64), fold,
                           two.assign, two.assign_temperature)
        assert {k: record[k] for k in figures} == figures
    # the ensemble's figures are not any one member's
    alone = evaluate(embed(members[0][0].head, folds[0].features, folds[0].val_images, 64),
                     folds[0], two.assign, two.assign_temperature)
    assert alone != {k: history[-1]["folds"][0][k] for k in alone}


@pytest.fixture(scope="module")
def ensemble_run(train_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-fold, 2 seeds, the folds' heads kept: an ensemble of 2 final + 2 x 2 fold heads, the
    first of 2 epochs chosen (whatever the figures), so that the fold heads kept are not the
    last epoch's; read-only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "best_epoch", lambda history, config: history[0])
        return train(train_cache, name="ens", runs_dir=tmp_path_factory.mktemp("runs"),
                     **{**TRAIN_SETTINGS, "epochs": 2, "folds": 2, "seeds": 2,
                        "keep_fold_heads": True})


def test_an_ensemble_run_keeps_its_members(ensemble_run: Path, train_cache: Path) -> None:
    head, checkpoint = load_checkpoint(ensemble_run / "head.pt")
    assert isinstance(head, Ensemble)
    assert list(head.config.members) == [
        {"seed": 0, "fold": None}, {"seed": 1, "fold": None}, {"seed": 0, "fold": 0},
        {"seed": 1, "fold": 0}, {"seed": 0, "fold": 1}, {"seed": 1, "fold": 1}]
    assert head.config.embedding_dim == 6 * 256
    assert checkpoint["best_epoch"] == 1
    # the fold heads as they were at the chosen epoch
    config = _config(train_cache, epochs=2, folds=2, seeds=2, keep_fold_heads=True)
    pairs = load_pairs([train_cache], [read_info(train_cache)], None, torch.device("cpu"))
    fold = validation_folds(pairs, config)[1]
    trainer = Trainer(fold, head.config.member, dataclasses.replace(config, seed=1))
    for number in range(1, checkpoint["best_epoch"] + 1):
        trainer.train(number)
    for key, value in trainer.head.state_dict().items():
        assert torch.equal(head.members[5].state_dict()[key], value), key


def test_an_ensemble_run_exports_and_writes_a_submission(ensemble_run: Path, train_data: Path,
                                                         tmp_path: Path) -> None:
    net, checkpoint = build_network(ensemble_run / "head.pt")
    assert net.head.kind == "ensemble"
    described = describe(checkpoint)
    assert described["embedding_dim"] == str(6 * 256)
    assert len(json.loads(described["head_config"])["members"]) == 6

    model = export(ensemble_run, out=tmp_path / "model.onnx")  # refused unless parity holds
    out = predict.main(model, train_data, out=tmp_path / "submission.csv", device="cpu")
    check_submission(out, train_data)


def test_fold_heads_need_folds_and_are_no_sweep_setting(train_cache: Path,
                                                        tmp_path: Path) -> None:
    result = invoke_cli(cli, "--cache", train_cache, "--runs-dir", tmp_path,
                        "--keep-fold-heads", "--device", "cpu")
    assert result.exit_code != 0 and "--keep-fold-heads" in result.text
    assert "give --folds" in result.text and not list(tmp_path.iterdir())
    result = invoke_cli(cli, "--cache", train_cache, "--runs-dir", tmp_path, "--seeds", "0")
    assert result.exit_code != 0 and "--seeds" in result.text
    with pytest.raises(UserError, match="keep_fold_heads is the same for every trial"):
        sweep.parse_param("keep_fold_heads=true")
    assert sweep.parse_param("seeds=1,3") == ("seeds", sweep.Space(choices=(1, 3)))
