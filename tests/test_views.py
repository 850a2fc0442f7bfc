"""Two-view caches (`extract --hflip`): the flipped maps are the trunk's on flipped images, a
schema-2 (one-view) cache still trains, head.train draws views and averages them at
validation, and the exported model averages them inside the graph, with parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
import torch

from extract.backbones import Trunk, TrunkSpec
from extract.cache import (
    CacheWriter,
    ShardWriter,
    read_features,
    read_image_digests,
    read_info,
    read_keys,
)
from extract.extract_features import default_cache_path
from extract.extract_features import main as extract
from head.config import TrainConfig
from head.export import build_network
from head.export import main as export
from head.folds import Fold
from head.model import Head, HeadConfig, TLLNet, load_checkpoint
from head.train import Trainer, embed
from head.train import main as train
from tll.data import load_image, read_dataset

SIZE = (64, 64)


@pytest.fixture(scope="module")
def two_view_cache(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's train_cache settings (float32), with flipped views; read-only."""
    return extract("resnet50", train_data, out=tmp_path_factory.mktemp("hflip") / "r50.h5",
                   weights="none", input_size=SIZE, device="cpu", batch_size=32, workers=0,
                   hflip=True, amp=False)


@pytest.fixture(scope="module")
def flip_run(two_view_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(two_view_cache, name="flip", runs_dir=tmp_path_factory.mktemp("runs"),
                 epochs=2, batch_size=32, lr=3e-4, val_fraction=0.2, device="cpu")


def test_flipped_maps_are_the_trunks_on_flipped_images(two_view_cache: Path, train_cache: Path,
                                                        train_data: Path) -> None:
    info = read_info(two_view_cache)
    assert info.views == ("identity", "hflip")
    keys = read_keys(two_view_cache)
    # the first view is the one-view cache's, byte for byte
    assert read_features(two_view_cache, keys).tobytes() == \
        read_features(train_cache, keys).tobytes()
    dataset = read_dataset(train_data)
    trunk = Trunk(TrunkSpec.resolve("resnet50", None, "none"))
    rows = [0, 7, len(keys) - 1]
    images = torch.from_numpy(np.stack([load_image(dataset.images[keys[r]], SIZE)
                                        for r in rows]))
    with torch.inference_mode():
        expected = trunk(images.flip(-1)).numpy()
    flipped = read_features(two_view_cache, [keys[r] for r in rows], "hflip")
    np.testing.assert_allclose(flipped.astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    assert not np.allclose(flipped, read_features(two_view_cache, [keys[r] for r in rows]))


def test_hflip_is_part_of_the_cache_name_and_identity(two_view_cache: Path, train_data: Path,
                                                      tmp_path: Path) -> None:
    spec = TrunkSpec.resolve("resnet50", None, "none", SIZE)
    assert default_cache_path(spec, hflip=True).name == "resnet50-layer4-none-64x64-hflip.h5"
    copy = Path(shutil.copy(two_view_cache, tmp_path / "x.h5"))
    with pytest.raises(Exception, match="views"):  # a one-view run over a two-view cache
        extract("resnet50", train_data, out=copy, weights="none", input_size=SIZE,
                device="cpu", batch_size=32, workers=0, hflip=False)


def test_a_two_view_cache_merges_from_shards(two_view_cache: Path, tmp_path: Path) -> None:
    """Rows written through shards (as under torchrun) keep both views."""
    keys, info = read_keys(two_view_cache), read_info(two_view_cache)
    digests = read_image_digests(two_view_cache, keys)
    features = np.stack([read_features(two_view_cache, keys, v) for v in info.views], axis=1)
    out = tmp_path / "x.h5"
    half = np.arange(len(keys) // 2)
    with ShardWriter(out, 1, keys, digests, info) as shard:
        shard.write(half, features[half])
    writer = CacheWriter(out, keys, digests, info)
    rest = writer.missing
    writer.write(rest, features[rest])
    writer.finish()
    for view in info.views:
        assert read_features(out, keys, view).tobytes() == \
            read_features(two_view_cache, keys, view).tobytes()


def test_a_schema_2_cache_still_trains(train_cache: Path, tmp_path: Path) -> None:
    """A cache written before views existed: schema 2, no views attribute."""
    old = Path(shutil.copy(train_cache, tmp_path / "old.h5"))
    with h5py.File(old, "r+") as file:
        file.attrs["schema_version"] = 2
        del file.attrs["views"]
    assert read_info(old).views == ("identity",)
    run = train(old, name="old", runs_dir=tmp_path / "runs", epochs=1, batch_size=32,
                val_fraction=0.2, device="cpu")
    _, checkpoint = load_checkpoint(run / "head.pt")
    assert checkpoint["views"] == ["identity"]


def test_training_records_and_averages_the_views(flip_run: Path, two_view_cache: Path,
                                                 tmp_path: Path) -> None:
    _, checkpoint = load_checkpoint(flip_run / "head.pt")
    assert checkpoint["views"] == ["identity", "hflip"]
    assert checkpoint["train_config"]["flip"] is True
    # --no-flip on the same cache: the images as they are only
    run = train(two_view_cache, name="plain", runs_dir=tmp_path / "runs", epochs=1,
                batch_size=32, val_fraction=0.2, device="cpu", flip=False)
    assert load_checkpoint(run / "head.pt")[1]["views"] == ["identity"]


def test_embed_averages_the_views_and_normalises() -> None:
    torch.manual_seed(0)
    head = Head(HeadConfig(feature_shapes=((8, 3, 3),), embedding_dim=4)).eval()
    features = torch.rand(5, 2, 8, 3, 3)  # (N, V, C, h, w)
    rows = torch.tensor([4, 0, 2])
    got = embed(head, [features], rows, batch_size=2)
    with torch.no_grad():
        mean = (head(features[rows, 0]) + head(features[rows, 1])) / 2
    np.testing.assert_allclose(got, torch.nn.functional.normalize(mean, dim=1).numpy(),
                               atol=1e-6)


def test_export_averages_the_flip_inside_the_graph(flip_run: Path, tmp_path: Path) -> None:
    """The exported graph embeds the image and its flip and averages them (parity with eager
    torch at batch 1 and 7 is checked by export itself); eager torch agrees with doing it by
    hand, and the metadata says so."""
    run = Path(shutil.copytree(flip_run, tmp_path / "flip"))
    model = export(run)
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert json.loads(props["views"]) == ["identity", "hflip"]
    # the maps, folded over both views, passed the same parity check (tests/test_maps.py)
    assert [o.name for o in onnx.load(str(model)).graph.output] == \
        ["embedding", "cell_embeddings", "attention_0"]
    net, _ = build_network(run / "head.pt")
    assert net.views == ("identity", "hflip")
    images = torch.rand(3, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trunk, head = net.trunks[0], net.head
        by_hand = torch.nn.functional.normalize(
            head(trunk(images)) + head(trunk(images.flip(-1))), dim=1)
        torch.testing.assert_close(net(images), by_hand, atol=1e-6, rtol=0)
        one_view = TLLNet([trunk], head)(images)
    assert (one_view - by_hand).abs().max() > 1e-4  # the flip changes the embedding


@pytest.mark.parametrize("flip", [True, False])
def test_training_draws_both_views_unless_told_not_to(flip: bool) -> None:
    """With a two-view cache, each image in a training batch is fed to the head in a view drawn
    anew (both views over an epoch, for anchors and positives alike); --no-flip feeds only the
    first. Here view 0 is all positive and view 1 all negative, so each row the head is given
    tells which view it came from."""
    n, d = 64, 8
    plain = torch.rand(n, d, generator=torch.Generator().manual_seed(0)) + 0.1  # (N, D) > 0
    features = torch.stack([plain, -plain], dim=1).half()  # (N, 2, D)
    empty = np.zeros(0, dtype=np.int64)
    fold = Fold(features=[features], train_left=torch.arange(0, n, 2),
                train_right=torch.arange(1, n, 2), val_images=torch.from_numpy(empty),
                val_queries=empty, val_candidates=np.zeros((0, 20), dtype=np.int64),
                val_truth=empty)
    config = TrainConfig(caches=("x",), name="x", batch_size=8, device="cpu", flip=flip)
    assert TrainConfig(caches=("x",), name="x").flip  # flipped views are the default
    trainer = Trainer(fold, HeadConfig(feature_shapes=((d,),)), config, progress=False)
    fed = []  # per forward call (B, D): the rows the head was given
    trainer.head.register_forward_pre_hook(lambda _, inputs: fed.append(inputs[0].clone()))
    trainer.epoch(1)
    assert len(fed) == 2 * (n // 2) // 8  # anchors and positives of every batch
    for rows in fed:
        assert ((rows > 0).all(dim=1) | (rows < 0).all(dim=1)).all()  # each row one whole view
    flipped = [int((rows < 0).all(dim=1).sum()) for rows in fed]  # per call: rows in view 1
    if flip:  # about half of each side's 32 rows; 0 of 32 has odds 2**-32
        assert sum(flipped[0::2]) > 0 and sum(flipped[1::2]) > 0
        assert sum(flipped[0::2]) < n // 2 and sum(flipped[1::2]) < n // 2
    else:
        assert sum(flipped) == 0
