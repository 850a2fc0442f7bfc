"""The maps the exported model gives besides its embedding (`TLLNet.explain`): cell embeddings
that sum to the embedding, each equal to a brute-force cell-by-cell FC; the flipped view folded
back into the image's frame; a head fused with a whitening adding the whitened share as one
more term; the ONNX outputs equal to torch's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from head.export import PARITY_TOLERANCE, build_network
from head.model import (
    Ensemble,
    EnsembleConfig,
    Head,
    HeadConfig,
    SpatialAttention,
    TLLNet,
    with_whitening,
)
from head.whiten import fit_whitening
from infer.maps import similarity_grid
from infer.session import open_session

POOL = 2


class PoolingTrunk(nn.Module):
    """A trunk that commutes with a left-right flip: the image average-pooled 4 x 4 (a map),
    and its mean colour (a vector)."""

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:  # (N, 3, 16, 16)
        return [F.avg_pool2d(image, 4), image.mean(dim=(2, 3))]  # (N, 3, 4, 4), (N, 3)


def trained_looking_head(attention: str = "spatial") -> Head:
    """A head on a map and a vector input, its batch norms given statistics and its FC a bias,
    as training would leave them."""
    torch.manual_seed(0)
    head = Head(HeadConfig(feature_shapes=((3, 4, 4), (3,)), embedding_dim=8, pool=POOL,
                           attention=attention, features_dim=5))
    for module in head.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    nn.init.uniform_(head.fc.bias, -0.3, 0.3)
    return head.eval()


def net(views: tuple[str, ...], attention: str = "spatial") -> TLLNet:
    return TLLNet([PoolingTrunk()], trained_looking_head(attention), views, ((0, 0), (0, 1)))


def images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def test_terms_are_the_fc_of_each_cell_alone() -> None:
    """Brute force: the FC applied to the features with every cell but one zeroed, less the
    bias, is that cell's term; the vector's term likewise; the bias is the last."""
    head = trained_looking_head()
    features = PoolingTrunk().features(images())
    with torch.no_grad():
        z, terms, attentions = head.explain(*features)
        torch.testing.assert_close(F.normalize(z, dim=1), head(*features), atol=1e-6, rtol=0)
        flat = torch.cat([branch(f) for branch, f in zip(head.branches, features, strict=True)],
                         dim=1)  # (N, width)
        cells, width = POOL ** 2, 5 * POOL ** 2
        for number, (i, r, c) in enumerate(head.terms()):
            keep = torch.zeros(flat.shape[1], dtype=torch.bool)
            if i == 0:  # the map: channel * cells + cell
                keep[torch.arange(5) * cells + r * POOL + c] = True
            elif i == 1:  # the vector, after the map's width
                keep[width:] = True
            alone = head.fc(flat * keep) - head.fc.bias * (i is not None)  # (N, D)
            torch.testing.assert_close(terms[:, number], alone, atol=1e-5, rtol=0)
    assert head.terms() == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, None, None),
                            (None, None, None)]
    # the attention: its own 1x1 convolutions' sigmoid on what enters it, position by position
    at = next(k for k, layer in enumerate(head.branches[0]) if isinstance(layer, SpatialAttention))
    with torch.no_grad():
        entering = head.branches[0][:at](features[0])  # (N, C, 4, 4)
        by_hand = torch.sigmoid(head.branches[0][at].score(entering))[:, 0]  # (N, 4, 4)
    assert [a.shape for a in attentions] == [(3, 4, 4)]
    torch.testing.assert_close(attentions[0], by_hand, atol=1e-6, rtol=0)


@pytest.mark.parametrize("views", [("identity",), ("identity", "hflip")])
def test_cell_embeddings_sum_to_the_embedding_and_split_any_cosine(views) -> None:
    model = net(views)
    with torch.no_grad():
        out = model.explain(images())
        torch.testing.assert_close(out["embedding"], model(images()), atol=0, rtol=0)
    cells = out["cell_embeddings"]  # (N, P, D)
    assert cells.shape == (3, POOL ** 2 + 2, 8)
    torch.testing.assert_close(cells.sum(dim=1), out["embedding"], atol=1e-6, rtol=0)
    other = F.normalize(torch.rand(8, generator=torch.Generator().manual_seed(4)), dim=0)
    torch.testing.assert_close((cells @ other).sum(dim=1), out["embedding"] @ other,
                               atol=1e-6, rtol=0)
    assert list(out) == ["embedding", "cell_embeddings", "attention_0"]


def test_an_ensembles_maps_are_its_members_joined() -> None:
    """An ensemble's cell embeddings are its members' concatenated / sqrt(M), as its embedding
    is: they sum to the ensemble's embedding (so they split its cosine, the mean of the
    members'), with two views too; its attention is the members' mean."""
    members = [trained_looking_head(), trained_looking_head()]
    with torch.no_grad():
        for parameter in members[1].parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    ensemble = Ensemble(EnsembleConfig(members[0].config, ({"seed": 0, "fold": None},
                                                           {"seed": 1, "fold": None})), members)
    views = ("identity", "hflip")
    model = TLLNet([PoolingTrunk()], ensemble.eval(), views, ((0, 0), (0, 1)))
    alone = [TLLNet([PoolingTrunk()], head, views, ((0, 0), (0, 1))) for head in members]
    with torch.no_grad():
        out, parts = model.explain(images()), [m.explain(images()) for m in alone]
        torch.testing.assert_close(out["embedding"], model(images()), atol=1e-6, rtol=0)
    cells = out["cell_embeddings"]  # (N, P, 2 D)
    assert cells.shape == (3, POOL ** 2 + 2, 16)
    torch.testing.assert_close(cells.sum(dim=1), out["embedding"], atol=1e-6, rtol=0)
    joined = torch.cat([p["cell_embeddings"] for p in parts], dim=2) / 2 ** 0.5
    torch.testing.assert_close(cells, joined, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["attention_0"],
                               (parts[0]["attention_0"] + parts[1]["attention_0"]) / 2,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("views", [("identity",), ("identity", "hflip")])
def test_a_fused_heads_maps_add_the_whitened_share(views) -> None:
    """A head fused with a whitening at w: the head's cells scaled by sqrt(1 - w), zero in the
    whitening's columns, then one term (no cell: "the rest" on the page) holding sqrt(w) x the
    whitened embedding in those columns; they sum to the fused embedding and split its cosine;
    the attention is the head's."""
    generator, weight = torch.Generator().manual_seed(6), 0.25
    whitening = fit_whitening([torch.rand(30, 1, 3, 4, 4, generator=generator),
                               torch.rand(30, 1, 3, generator=generator)], torch.arange(30), 4)
    model = TLLNet([PoolingTrunk()], with_whitening(trained_looking_head(), whitening, weight),
                   views, ((0, 0), (0, 1)))
    alone = net(views)  # the same head's weights
    whitened_alone = TLLNet([PoolingTrunk()], whitening, views, ((0, 0), (0, 1)))
    with torch.no_grad():
        out, head_out = model.explain(images()), alone.explain(images())
        whitened = whitened_alone(images())  # (N, 4)
        torch.testing.assert_close(out["embedding"], model(images()), atol=1e-6, rtol=0)
    assert model.terms() == alone.terms() + [(None, None, None)]
    cells = out["cell_embeddings"]  # (N, P + 1, 8 + 4)
    assert cells.shape == (3, POOL ** 2 + 3, 12) and list(out) == list(head_out)
    torch.testing.assert_close(cells.sum(dim=1), out["embedding"], atol=1e-6, rtol=0)
    torch.testing.assert_close(cells[:, :-1, :8], (1 - weight) ** 0.5 * head_out["cell_embeddings"],
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(cells[:, -1, 8:], weight ** 0.5 * whitened, atol=1e-6, rtol=0)
    assert not cells[:, :-1, 8:].any() and not cells[:, -1, :8].any()
    torch.testing.assert_close(out["attention_0"], head_out["attention_0"], atol=0, rtol=0)
    # the page's split of a cosine: the grid's cells plus the rest
    grid, rest = similarity_grid(cells[0].numpy(), out["embedding"][1].numpy(), model.terms(),
                                 POOL)
    assert grid.sum() + rest == pytest.approx(float(out["embedding"][0] @ out["embedding"][1]),
                                              abs=1e-6)


def test_the_flipped_view_is_folded_into_the_images_frame() -> None:
    """On a trunk that commutes with the flip, a two-view model sees an image and its mirror
    alike: the same embedding, the cells mirrored column for column, the attention mirrored."""
    model = net(("identity", "hflip"))
    image = images(2)
    with torch.no_grad():
        out, mirrored = model.explain(image), model.explain(image.flip(-1))
    torch.testing.assert_close(mirrored["embedding"], out["embedding"], atol=1e-6, rtol=0)
    cells = out["cell_embeddings"]
    by_cell = cells[:, :4].unflatten(1, (POOL, POOL))  # (N, r, c, D)
    torch.testing.assert_close(mirrored["cell_embeddings"][:, :4].unflatten(1, (POOL, POOL)),
                               by_cell.flip(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(mirrored["cell_embeddings"][:, 4:], cells[:, 4:], atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(mirrored["attention_0"], out["attention_0"].flip(-1), atol=1e-6,
                               rtol=0)
    assert (by_cell - by_cell.flip(2)).abs().max() > 1e-3  # the mirror is not the identity


def test_no_attention_output_without_spatial_attention() -> None:
    with torch.no_grad():
        out = net(("identity",), attention="channel").explain(images())
    assert list(out) == ["embedding", "cell_embeddings"]


def test_onnx_maps_equal_torchs(exported_run: Path) -> None:
    """The exported file's every output against eager torch, within the export's parity
    tolerance, at a batch size the export did not check; its metadata says what the terms
    are; infer's session reads it back."""
    model, (height, width) = exported_run / "model.onnx", (64, 64)
    network, _ = build_network(exported_run / "head.pt")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["embedding", "cell_embeddings", "attention_0"]
    batch = torch.rand(4, 3, height, width, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = network.explain(batch)
    got = dict(zip(names, session.run(names, {"image": batch.numpy()}), strict=True))
    for name in names:
        assert got[name].shape == tuple(expected[name].shape)
        assert np.abs(got[name] - expected[name].numpy()).max() <= PARITY_TOLERANCE
    np.testing.assert_allclose(got["cell_embeddings"].sum(axis=1), got["embedding"], atol=1e-5)
    _, info = open_session(model, "cpu")
    assert info.maps["attention"] == ["attention_0"]
    assert [tuple(t) for t in info.maps["terms"]] == network.head.terms()
    assert json.loads(info.to_props()["maps"]) == info.maps


def test_a_model_without_maps_still_gets_its_page(exported_run: Path, train_data: Path,
                                                  tmp_path: Path) -> None:
    """A file from before the maps (its graph cut to the embedding, no `maps` metadata): infer
    asks it for the embedding alone and writes the page without overlays, saying why."""
    import onnx

    from infer.predict import main as infer

    model = onnx.load(str(exported_run / "model.onnx"))
    cut = onnx.utils.Extractor(model).extract_model(["image"], ["embedding"])
    for entry in model.metadata_props:
        if entry.key != "maps":
            cut.metadata_props.add(key=entry.key, value=entry.value)
    onnx.save_model(cut, tmp_path / "old.onnx")
    assert [o.name for o in ort.InferenceSession(
        str(tmp_path / "old.onnx"), providers=["CPUExecutionProvider"]).get_outputs()] == \
        ["embedding"]
    infer(tmp_path / "old.onnx", train_data, split="val", out=tmp_path / "val.json",
          device="cpu")
    page = (tmp_path / "val.html").read_text()
    assert page.count('<div class="q" id=') == 60
    assert "<canvas" not in page and "No maps: this model does not give them" in page
    assert "const MAPS = null;" in page
