"""The head, all of it, and `TLLNet`, the whole network that is exported.

Head: for each trunk's feature map, batch norm -> [features layer: 1x1 conv to `features_dim`
channels, batch norm, ReLU] -> attention -> max-pool to a fixed grid -> flatten -> batch norm;
for each trunk's vector (a global embedding such as CLIP's, which has no positions to attend
over or pool), batch norm -> a features layer (linear to `features_dim` or its own width ->
layer norm -> GELU); the results are concatenated -> [dropout] -> one fully connected layer ->
L2-normalised embedding. It takes one input per trunk, maps and vectors in any mix, so several
caches can feed one model. With `features_dim` 0 and `dropout` 0 a map head is the head of
checkpoint format 1, weight for weight. `Ensemble`: several heads of one config as one head
(head.train --seeds, --keep-fold-heads), their unit embeddings concatenated / sqrt(M). `Fused`: a
head or an ensemble beside a PCA whitening of the same inputs (head.train --whitened-weight w),
[sqrt(1 - w) trained, sqrt(w) whitened]. Both are joins of unit parts whose cosine is the weighted
mean of the parts' cosines: `mean_of_views` and `TLLNet.explain` keep that, part by part.

The two batch norms are there because raw trunk features are large and share one dominant
direction (random-init ResNet50 layer4 values reach 265; pooled maps have a mean pairwise cosine
of 0.998). Without the first, the attention's sigmoid saturates at once (at lr 3e-4 every weight
went to 3e-15 and all embeddings collapsed to one point); without the second, the FC layer maps
every image near the same embedding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tll import UserError, first_line

if TYPE_CHECKING:
    from head.whiten import WhiteningConfig

ATTENTIONS = ("spatial", "channel", "none")
CHECKPOINT_VERSION = 6  # 2: features layer, dropout; 3: the views, and a list of caches;
# 4: the head's kind ("trained", or "whitening": head.whiten); 5: the kind "ensemble";
# 6: the kind "fused" (head.train --whitened-weight)
# every format this code still loads: format 1 is format 2 without a features layer or dropout
# (the same modules, the same state-dict keys), format 2 is format 3 on one view and one cache,
# format 3 is format 4 with a trained head, format 4 is format 5 without ensembles, format 5 is
# format 6 without fused heads
READABLE_CHECKPOINTS = (1, 2, 3, 4, 5, 6)


@dataclass(frozen=True)
class HeadConfig:
    feature_shapes: tuple[tuple[int, ...], ...]  # (C, h, w) of each trunk's map, or (D,)
    embedding_dim: int = 256
    pool: int = 2  # max-pool each map to a pool x pool grid
    attention: str = "spatial"
    features_dim: int = 0  # channels of the 1x1 features layer before attention; 0: none
    dropout: float = 0.0  # before the fully connected layer

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; choose from {ATTENTIONS}")
        object.__setattr__(self, "feature_shapes",
                           tuple(tuple(int(n) for n in shape) for shape in self.feature_shapes))
        for shape in self.feature_shapes:
            if len(shape) not in (1, 3):
                raise ValueError(f"feature shape {shape} is neither a map (C, h, w) nor a "
                                 "vector (D,)")


class SpatialAttention(nn.Module):
    """Weights each spatial position by a learned importance in (0, 1)."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.score = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(),
                                   nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w), channels last
        # the 1x1 convolutions as matrix products over positions, on the channels-last rows the
        # Head passes (a free view): on CPU oneDNN's 1x1 convolution backward took ~8 ms a call
        # on a 64 x 512 x 7 x 6 batch in either layout, the matrix products ~3 ms, and the
        # multiply broadcasts along contiguous channels
        rows = x.permute(0, 2, 3, 1)  # (B, h, w, C)
        return (rows * self._weights(rows)).permute(0, 3, 1, 2)  # (B, C, h, w), channels last

    def weights(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, h, w)
        """Each position's weight in (0, 1): what the attention multiplies it by."""
        return self._weights(x.permute(0, 2, 3, 1))[..., 0]

    def _weights(self, rows: torch.Tensor) -> torch.Tensor:  # (B, h, w, C) -> (B, h, w, 1)
        first, last = self.score[0], self.score[2]
        hidden = F.relu(F.linear(rows, first.weight.flatten(1), first.bias))  # (B, h, w, hidden)
        return torch.sigmoid(F.linear(hidden, last.weight.flatten(1), last.bias))


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: weights each channel by a learned importance in (0, 1)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.score = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(),
                                   nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        weights = torch.sigmoid(self.score(x.mean(dim=(2, 3))))  # (B, C)
        return x * weights[:, :, None, None]


def grid_bins(size: int, cells: int) -> list[tuple[int, int]]:
    """[start, end) of each cell along one axis, the same bins as torch's adaptive pooling."""
    return [(math.floor(i * size / cells), math.ceil((i + 1) * size / cells)) for i in range(cells)]


class GridMaxPool(nn.Module):
    """Adaptive max-pool to a fixed grid: (B, C, h, w) -> (B, C, cells * cells).

    AdaptiveMaxPool2d exports to ONNX only where the grid divides the map, so the exported
    graph takes the same bins as static slices + amax. Training keeps the fused op: its
    index-based backward makes an epoch about 28% faster, and on the channels-last maps the
    Head hands it, it is vectorised over channels. The export's parity check compares the two
    paths.
    """

    def __init__(self, height: int, width: int, cells: int):
        super().__init__()
        self.cells = cells
        self.rows, self.cols = grid_bins(height, cells), grid_bins(width, cells)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        if not torch.onnx.is_in_onnx_export():
            return F.adaptive_max_pool2d(x, self.cells).flatten(2)
        pooled = [x[:, :, r0:r1, c0:c1].amax(dim=(2, 3))
                  for r0, r1 in self.rows for c0, c1 in self.cols]  # cells x (B, C)
        return torch.stack(pooled, dim=2)


class Head(nn.Module):
    kind = "trained"  # what a checkpoint calls it (head.whiten's WhiteningHead: "whitening";
    # an Ensemble of heads: "ensemble"; a head or ensemble Fused with a whitening: "fused")

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.branches = nn.ModuleList(self._map_branch(*shape) if len(shape) == 3
                                      else self._vector_branch(shape[0])
                                      for shape in config.feature_shapes)
        flat = sum(self._width(shape) for shape in config.feature_shapes)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(flat, config.embedding_dim)

    def _channels(self, trunk_channels: int) -> int:
        return self.config.features_dim or trunk_channels

    def _width(self, shape: tuple[int, ...]) -> int:
        """What one input's branch gives the FC: channels * pool^2 for a map, channels for a
        vector."""
        return self._channels(shape[0]) * (self.config.pool ** 2 if len(shape) == 3 else 1)

    def _map_branch(self, c: int, h: int, w: int) -> nn.Sequential:
        """(B, c, h, w) -> (B, channels * pool^2); the layers in checkpoint format 1's order."""
        config, channels = self.config, self._channels(c)
        attention = {"spatial": SpatialAttention, "channel": ChannelAttention,
                     "none": lambda channels: nn.Identity()}[config.attention]
        features_layer = [nn.Conv2d(c, channels, 1, bias=False), nn.BatchNorm2d(channels),
                          nn.ReLU()] if config.features_dim else []
        return nn.Sequential(nn.BatchNorm2d(c), *features_layer, attention(channels),
                             GridMaxPool(h, w, config.pool), nn.Flatten(),
                             nn.BatchNorm1d(channels * config.pool ** 2))

    def _vector_branch(self, dim: int) -> nn.Sequential:
        """(B, dim) -> (B, channels). The batch norm first for the reason the maps have theirs
        (large values sharing one direction); then a learnt layer, as the map's attention is,
        before the shared FC."""
        channels = self._channels(dim)
        return nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, channels),
                             nn.LayerNorm(channels), nn.GELU())

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        # each (B, C_i, h_i, w_i) or (B, D_i), float16 (as cached) or float32
        flat = torch.cat([branch(f) for branch, f in zip(self.branches, _float(features),
                                                         strict=True)],
                         dim=1)  # (B, sum of branch widths)
        return F.normalize(self.fc(self.dropout(flat)), dim=1)  # (B, D), unit norm

    def terms(self) -> list[tuple[int | None, int | None, int | None]]:
        """What each of `explain`'s terms is, in order, as (input, row, column): a map input's
        pool x pool cells row by row, a vector input's one term (row and column None), then the
        FC's bias (all None)."""
        cells = [(r, c) for r in range(self.config.pool) for c in range(self.config.pool)]
        return [term for i, shape in enumerate(self.config.feature_shapes)
                for term in ([(i, r, c) for r, c in cells] if len(shape) == 3
                             else [(i, None, None)])] + [(None, None, None)]

    def explain(self, *features: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """What the FC's output is made of (eval mode), for `TLLNet.explain`.

        Returns z (B, D), the FC's output as `forward` computes it before normalising; the terms
        (B, P, D) that sum to z (P and their order: `terms()`): the FC is linear, so a map cell's
        term is its C channels (after the final batch norm, which is per feature and so stays in
        its cell) times their FC weights, a vector input's term is its whole width times its
        weights, and the last is the FC's bias; and the spatial attention weights (B, h, w) of
        each map input that has them, in input order.
        """
        flats, attentions = [], []
        for branch, x in zip(self.branches, _float(features), strict=True):
            for layer in branch:
                if isinstance(layer, SpatialAttention):
                    attentions.append(layer.weights(x))  # (B, h, w)
                x = layer(x)
            flats.append(x)  # (B, width)
        z = self.fc(self.dropout(torch.cat(flats, dim=1)))  # (B, D)
        terms, start, cells = [], 0, self.config.pool ** 2
        for shape, flat in zip(self.config.feature_shapes, flats, strict=True):
            weight = self.fc.weight[:, start:start + flat.shape[1]]  # (D, width)
            start += flat.shape[1]
            if len(shape) == 3:  # a map's flat index is channel * cells + cell
                # one matrix product per cell, batched over cells: ONNX Runtime's Einsum took
                # ~15x longer on the same contraction
                by_cell = flat.unflatten(1, (-1, cells)).permute(2, 0, 1)  # (cells, B, C)
                weights = weight.unflatten(1, (-1, cells)).permute(2, 1, 0)  # (cells, C, D)
                terms.append((by_cell @ weights).permute(1, 0, 2))  # (B, cells, D)
            else:
                terms.append((flat @ weight.T)[:, None])  # (B, 1, D)
        terms.append(torch.zeros_like(z)[:, None] + self.fc.bias)  # (B, 1, D)
        return z, torch.cat(terms, dim=1), attentions


def _float(features: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The head's inputs in float32; maps in bfloat16 under the CPU's bfloat16 autocast (head.train
    --amp), where the map branch's batch norm, attention multiply and max-pool, bound by memory
    traffic on the maps, move half the bytes. Maps go channels last, in the same copy: on CPU the
    batch norm, the adaptive max-pool (14 ms -> 1 ms on a 64 x 512 x 7 x 6 batch) and the
    attention are vectorised over channels in that layout."""
    maps = (torch.bfloat16 if torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 else torch.float32)
    return [f.to(maps, memory_format=torch.channels_last) if f.dim() == 4
            else f.float() for f in features]


@dataclass(frozen=True)
class EnsembleConfig:
    member: HeadConfig  # every member's: one architecture, so one trunk pass feeds them all
    # what each member is, in order: {"seed": its --seed, "fold": None for a head trained on
    # every train pair, k for the head of fold k (head.train --keep-fold-heads)}
    members: tuple[dict, ...]
    embedding_dim: int = 0  # len(members) * member.embedding_dim, set from them

    def __post_init__(self):
        member = (self.member if isinstance(self.member, HeadConfig)
                  else HeadConfig(**self.member))  # as a checkpoint holds it
        members = tuple(dict(m) for m in self.members)
        if len(members) < 2:
            raise ValueError(f"an ensemble takes at least 2 members, got {len(members)}")
        _settle(self, len(members) * member.embedding_dim,
                f"{len(members)} members x {member.embedding_dim}", member=member, members=members)


def _settle(config: object, width: int, made_of: str, **fields: object) -> None:
    """Set `fields` (e.g. nested configs rebuilt from a checkpoint's dicts) and the derived
    `embedding_dim` `width` on the frozen dataclass `config`, refusing a given embedding_dim
    other than `width` (`made_of`: what it is, for the message)."""
    if config.embedding_dim not in (0, width):
        raise ValueError(f"embedding_dim {config.embedding_dim} is not {made_of}")
    for name, value in {**fields, "embedding_dim": width}.items():
        object.__setattr__(config, name, value)


class Ensemble(nn.Module):
    """M heads of one architecture on the same inputs, as one head: their unit embeddings
    (B, D) concatenated and scaled by 1/sqrt(M), a unit embedding (B, M * D) whose cosine with
    another is the mean of the M members' cosines, so that scoring, assignment and the error
    page use it as they use one head's."""

    kind = "ensemble"

    def __init__(self, config: EnsembleConfig, heads: list[Head] | None = None):
        super().__init__()
        self.config = config
        heads = heads or [Head(config.member) for _ in config.members]
        if len(heads) != len(config.members) or any(h.config != config.member for h in heads):
            raise ValueError(f"an ensemble of {len(config.members)} heads of one config takes "
                             "exactly those")
        self.members = nn.ModuleList(heads)

    @property
    def parts(self) -> list[Head]:
        """The heads whose embeddings `join` joins, in order."""
        return list(self.members)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The members' unit embeddings (..., D) each -> (..., M * D), concatenated / sqrt(M):
        unit norm, and the dot product of two is the mean of the members' cosines. Applied to
        terms that sum to each member's embedding (`TLLNet.explain`), it gives terms that sum to
        the ensemble's."""
        return torch.cat(parts, dim=-1) / math.sqrt(len(parts))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.join([head(*features) for head in self.members])  # (B, M * D)


def ensemble_of(heads: list[nn.Module], members: list[dict]) -> nn.Module:
    """One head from trained `heads` (plain heads or ensembles of them; `members` describes
    each plain head in order, see EnsembleConfig): the head itself where there is one."""
    plain = [h for head in heads for h in (head.members if isinstance(head, Ensemble) else [head])]
    if len(plain) == 1:
        return plain[0]
    return Ensemble(EnsembleConfig(plain[0].config, tuple(members)), plain)


@dataclass(frozen=True)
class FusedConfig:
    # the trained part: a Head ("trained") or an Ensemble ("ensemble"), and its config
    inner_kind: str
    inner: HeadConfig | EnsembleConfig
    whitening: WhiteningConfig
    weight: float  # the whitened cosine's share w, in (0, 1)
    embedding_dim: int = 0  # the inner's + the whitening's, set from them

    def __post_init__(self):
        if self.inner_kind not in (Head.kind, Ensemble.kind):
            raise ValueError(f"a fused head's trained part is a {Head.kind!r} or an "
                             f"{Ensemble.kind!r} head, not {self.inner_kind!r}")
        if not 0 < self.weight < 1:
            raise ValueError(f"the whitening's weight must lie in (0, 1), got {self.weight}")
        inner = config_of(self.inner_kind, self.inner)  # as a checkpoint holds them: dicts
        whitening = config_of("whitening", self.whitening)
        _settle(self, inner.embedding_dim + whitening.embedding_dim,
                f"{inner.embedding_dim} + {whitening.embedding_dim}", inner=inner,
                whitening=whitening)


class Fused(nn.Module):
    """A trained head (or an Ensemble) and a PCA whitening (`head.whiten.WhiteningHead`) on the
    same inputs, as one head (head.train --whitened-weight w): [sqrt(1 - w) trained,
    sqrt(w) whitened] (B, D + k), a unit embedding whose cosine with another is (1 - w) x the
    trained cosine + w x the whitened cosine."""

    kind = "fused"

    def __init__(self, config: FusedConfig, inner: nn.Module | None = None,
                 whitening: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.inner = build_head(config.inner_kind, config.inner) if inner is None else inner
        self.whitening = (build_head("whitening", config.whitening) if whitening is None
                          else whitening)
        if (self.inner.kind, self.inner.config, self.whitening.config) != \
                (config.inner_kind, config.inner, config.whitening):
            raise ValueError("a fused head takes the trained head and the whitening its config "
                             "describes")

    @property
    def parts(self) -> list[nn.Module]:
        """The trained part and the whitening, in the order `join` joins them."""
        return [self.inner, self.whitening]

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The trained part's and the whitening's unit embeddings (..., D), (..., k) ->
        (..., D + k), [sqrt(1 - w) trained, sqrt(w) whitened]: unit norm, and the dot product of
        two is (1 - w) x the trained cosine + w x the whitened cosine
        (`head.whiten.fused_with_whitening`). Applied to terms that sum to each part's
        embedding (`TLLNet.explain`), it gives terms that sum to the fused one."""
        trained, whitened = parts
        weight = self.config.weight
        return torch.cat([trained * math.sqrt(1 - weight), whitened * math.sqrt(weight)], dim=-1)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.join([self.inner(*features), self.whitening(*features)])  # (B, D + k)


def with_whitening(head: nn.Module, whitening: nn.Module | None, weight: float) -> nn.Module:
    """`head` (a Head or an Ensemble) fused with `whitening` at `weight` (`Fused`), the whitening
    moved to the head's device; at weight 0 the head itself."""
    if not weight:
        return head
    whitening = whitening.to(next(head.parameters()).device)
    return Fused(FusedConfig(head.kind, head.config, whitening.config, weight), head, whitening)


def head_kinds() -> dict[str, tuple[type, type]]:
    """Each head kind a checkpoint names -> (its config class, its module)."""
    from head.whiten import WhiteningConfig, WhiteningHead  # it imports this module

    return {Head.kind: (HeadConfig, Head), Ensemble.kind: (EnsembleConfig, Ensemble),
            WhiteningHead.kind: (WhiteningConfig, WhiteningHead),
            Fused.kind: (FusedConfig, Fused)}


def config_of(kind: str, config: object) -> object:
    """A head kind's config, from the dict a checkpoint holds or already one."""
    kinds = head_kinds()
    if kind not in kinds:
        raise ValueError(f"unknown head kind {kind!r}")
    config_class = kinds[kind][0]
    return config if isinstance(config, config_class) else config_class(**config)


def build_head(kind: str, config: object) -> nn.Module:
    """A new head of `kind` for `config` (or the dict a checkpoint holds), its weights as
    initialised (a checkpoint's are loaded into it)."""
    config = config_of(kind, config)  # refuses an unknown kind
    return head_kinds()[kind][1](config)


def mean_of_views(head: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
    """An image's embedding from its views' (V, B, W): their mean normalised again; for a head
    joined from parts (an ensemble's members, a fused head's trained part and whitening), each
    part's views by this same rule before the parts are joined, so that its cosine stays the
    weighted mean of its parts' cosines (B, W)."""
    if not isinstance(head, Ensemble | Fused):
        return F.normalize(embeddings.mean(dim=0), dim=1)
    chunks = embeddings.split([part.config.embedding_dim for part in head.parts], dim=2)
    return head.join([mean_of_views(part, chunk)
                      for part, chunk in zip(head.parts, chunks, strict=True)])


def plain_heads(head: nn.Module) -> list[Head]:
    """The trained `Head`s inside `head`: itself, an ensemble's members, a fused head's trained
    part's; none in a whitening."""
    if isinstance(head, Head):
        return [head]
    if isinstance(head, Ensemble):
        return list(head.members)
    return plain_heads(head.inner) if isinstance(head, Fused) else []


class TLLNet(nn.Module):
    """Trunks + head: image (N, 3, H, W) RGB in [0, 1] -> embedding (N, D), unit norm.

    Each trunk gives one or more of the head's inputs from one pass (`Trunk.features`: several
    layers of one model); `inputs` says, for each of the head's inputs in order, (which trunk,
    which of its outputs); by default each trunk gives one input, in order. With views
    ("identity", "hflip") the image and its left-right flip are embedded and their mean,
    normalised again, is the embedding: the test-time augmentation head.train validates with
    (for an ensemble or a fused head, per part: `mean_of_views`). `explain` gives, besides the
    embedding, what it is made of (the error-analysis page's maps; where the head has trained
    heads: `has_maps`).
    """

    def __init__(self, trunks: list[nn.Module], head: nn.Module,
                 views: tuple[str, ...] = ("identity",),
                 inputs: tuple[tuple[int, int], ...] | None = None):
        super().__init__()
        if set(views) - {"identity", "hflip"} or "identity" not in views:
            raise ValueError(f"unknown views {views}; the image as it is must be one of them")
        self.trunks = nn.ModuleList(trunks)
        self.head = head
        self.views = tuple(views)
        self.inputs = tuple(inputs or ((i, 0) for i in range(len(trunks))))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self._views_embedding(self.head, self._view_inputs(image))  # (N, D)

    def _view_inputs(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """The head's inputs for each view of `image`: one trunk pass per view."""
        return {view: self._head_inputs(image.flip(-1) if view == "hflip" else image)
                for view in self.views}

    def _head_inputs(self, image: torch.Tensor) -> list[torch.Tensor]:
        outputs = [trunk.features(image) for trunk in self.trunks]  # one pass each
        return [outputs[trunk][output] for trunk, output in self.inputs]

    def plain_heads(self) -> list[Head]:
        """The plain heads whose maps `explain` gives: the head, an ensemble's members, a fused
        head's trained part's (`plain_heads`); none for a whitening alone."""
        return plain_heads(self.head)

    def has_maps(self) -> bool:
        """Whether `explain` can say what the embedding is made of: where it has trained heads
        (a whitening alone does not)."""
        return bool(self.plain_heads())

    def terms(self) -> list[tuple[int | None, int | None, int | None]]:
        """What each of `explain`'s cell_embeddings terms is, in order, as (input, row, column):
        the trained heads' (`Head.terms`), then for a fused head the whitened share (all None,
        like the FC's bias: the page counts both in "the rest")."""
        terms = self.plain_heads()[0].terms()
        return terms + [(None, None, None)] if isinstance(self.head, Fused) else terms

    def explained_outputs(self) -> list[str]:
        """The names `explain` returns, in order."""
        config = self.plain_heads()[0].config
        return ["embedding", "cell_embeddings"] + [
            f"attention_{i}" for i, shape in enumerate(config.feature_shapes)
            if len(shape) == 3 and config.attention == "spatial"]

    def explain(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The embedding and what it is made of, by the names the exported file gives them
        (where `has_maps`; `head.export`):

        embedding (N, D): `forward`'s, computed the same way.
        cell_embeddings (N, P, D), P and their order as `terms()`: they sum to the
        embedding, so the cosine with any unit vector u is the sum of their dot products with u,
        term by term. With views, e = mean_v(e_v) / |mean_v(e_v)| and e_v = sum_k t_vk / |z_v|
        (z_v the view's FC output, t_vk its terms), so term k is
        sum_v t_vk / (|z_v| V |mean_v(e_v)|), the flipped view's cell (r, c) taken as the
        image's (r, pool - 1 - c): the cells are in the image's own frame. An ensemble's are its
        members' concatenated and scaled by 1/sqrt(M), as their embeddings are
        (`Ensemble.join`): they sum to its embedding too. A fused head's are its trained part's
        scaled by sqrt(1 - w), zero in the whitening's columns, and one more term, sqrt(w) x
        the whitened embedding in those columns, zero in the others (`Fused.join`): they sum
        to the fused embedding.
        attention_<i> (N, h, w) for each map input i with spatial attention: its weights, the
        flipped view's mirrored back, averaged over the views (and over an ensemble's members).
        """
        return self._explain(self.head, self._view_inputs(image))  # for every part

    def _explain(self, head: nn.Module, inputs: dict[str, list[torch.Tensor]]
                 ) -> dict[str, torch.Tensor]:
        """`explain` for `head` (the network's, or one of its parts), from each view's head
        inputs."""
        if isinstance(head, Head):
            return self._explain_head(head, inputs)
        if isinstance(head, Ensemble):
            explained = [self._explain(member, inputs) for member in head.members]
            return {name: (head.join([e[name] for e in explained])
                           if name in ("embedding", "cell_embeddings")
                           else sum(e[name] for e in explained) / len(explained))
                    for name in explained[0]}  # (N, M * D), (N, P, M * D), attentions (N, h, w)
        trained = self._explain(head.inner, inputs)  # a Fused head
        whitened = self._views_embedding(head.whitening, inputs)  # (N, k)
        cells = trained["cell_embeddings"]  # (N, P, D)
        n, p, d = cells.shape
        cells = torch.cat([head.join([cells, cells.new_zeros(n, p, whitened.shape[1])]),
                           head.join([cells.new_zeros(n, 1, d), whitened[:, None]])],
                          dim=1)  # (N, P + 1, D + k)
        return {**trained, "embedding": head.join([trained["embedding"], whitened]),
                "cell_embeddings": cells}

    def _views_embedding(self, head: nn.Module, inputs: dict[str, list[torch.Tensor]]
                         ) -> torch.Tensor:
        """`head`'s embedding (N, D) of the images from each view's head inputs: with several
        views their mean, part by part (`mean_of_views`)."""
        embeddings = [head(*inputs[view]) for view in self.views]  # V x (N, D)
        if len(embeddings) == 1:
            return embeddings[0]
        return mean_of_views(head, torch.stack(embeddings))

    def _explain_head(self, head: Head, inputs: dict[str, list[torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
        """`explain` for one plain head, from each view's head inputs."""
        terms = head.terms()
        mirrored = [terms.index((i, r, None if c is None else head.config.pool - 1 - c))
                    for i, r, c in terms]  # where each term of a flipped view goes
        names = self.explained_outputs()[2:]
        parts, attentions = [], {name: 0 for name in names}
        for view in self.views:
            z, view_terms, view_attentions = head.explain(*inputs[view])  # (N, D), (N, P, D)
            if view == "hflip":
                view_terms = view_terms[:, mirrored]
                view_attentions = [a.flip(-1) for a in view_attentions]
            parts.append((z, view_terms))
            for name, weights in zip(names, view_attentions, strict=True):
                attentions[name] = attentions[name] + weights / len(self.views)  # (N, h, w)
        embeddings = [F.normalize(z, dim=1) for z, _ in parts]  # V x (N, D)
        mean = embeddings[0] if len(embeddings) == 1 else torch.stack(embeddings).mean(dim=0)
        # F.normalize's own scale, max(|x|, eps), so that the terms sum to its output
        scales = [z.norm(dim=1).clamp_min(1e-12) * len(parts) for z, _ in parts]  # V x (N,)
        mean_scale = mean.norm(dim=1).clamp_min(1e-12) if len(parts) > 1 else 1  # (N,)
        cells = sum(t / (s * mean_scale)[:, None, None]
                    for (_, t), s in zip(parts, scales, strict=True))  # (N, P, D)
        embedding = embeddings[0] if len(embeddings) == 1 else F.normalize(mean, dim=1)
        return {"embedding": embedding, "cell_embeddings": cells, **attentions}


def save_checkpoint(path: Path, head: nn.Module, **description) -> None:
    """A checkpoint that describes itself: its format version, the head's config and weights
    plus `description` (the caches' metadata, the training config, the best epoch). It is
    written inside the run's temporary folder, which appears whole or not at all."""
    state = {k: v.cpu() for k, v in head.state_dict().items()}
    torch.save({"format_version": CHECKPOINT_VERSION, "head_kind": head.kind,
                "head_config": asdict(head.config), "state_dict": state, **description}, path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the head from the checkpoint file alone; returns it (eval mode) and the file.
    Refuses, with one message naming the file, one that is damaged or of another format."""
    retrain = "train it again with `python -m head.train`"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, arbitrary pickled objects
        raise UserError(f"{path} is not a readable checkpoint ({first_line(error)}); "
                        f"{retrain}") from None
    version = checkpoint.get("format_version") if isinstance(checkpoint, dict) else None
    if version not in READABLE_CHECKPOINTS:
        raise UserError(f"{path} has checkpoint format {version}, this tll reads "
                        f"{', '.join(map(str, READABLE_CHECKPOINTS))}; {retrain}")
    kind = checkpoint.setdefault("head_kind", Head.kind)  # formats 1-3: trained heads
    try:
        head = build_head(kind, checkpoint["head_config"])
        head.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} is damaged ({first_line(error)}); {retrain}") from None
    checkpoint.setdefault("views", ["identity"])  # formats 1 and 2: one view
    if "cache" in checkpoint:  # formats 1 and 2: one cache
        checkpoint["caches"] = [checkpoint.pop("cache")]
    return head.eval(), checkpoint
