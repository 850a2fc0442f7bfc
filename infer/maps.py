"""What the error-analysis page draws over each thumbnail, from the exported model's map outputs
(`head.model.TLLNet.explain`, named in the file's `maps` metadata): pure numpy, no torch.

cell_embeddings (N, P, D) sum to each image's unit embedding, so the cosine of images a and b
splits exactly into P parts, cells_a[k] . e_b; the page sums the parts of the map inputs' cells
at the same grid position (every map input is pooled to the same pool x pool grid over the
whole image) and gives the rest, the terms with no grid cell, as one number: the vector inputs'
terms, the FC's bias share and, for a head fused with a PCA whitening (head.train
--whitened-weight), the whitened embedding's share. The attention drawn is the first map
input's spatial attention (N, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infer.model_info import ModelInfo


@dataclass(frozen=True)
class ImageMaps:
    """Each embedded image's maps; `row` maps an image's key to its row in the arrays."""

    row: dict[str, int]
    cells: np.ndarray  # (N, P, D) cell_embeddings; their sum over P is the embedding
    attention: np.ndarray | None  # (N, h, w) in (0, 1), or None: no spatial attention
    terms: tuple[tuple[int | None, ...], ...]  # each of the P terms as (input, row, column)

    @property
    def pool(self) -> int:
        """The side of the cell grid; 0 where no input is a map."""
        return max((r + 1 for _, r, _ in self.terms if r is not None), default=0)

    def embedding(self, key: str) -> np.ndarray:  # (D,)
        return self.cells[self.row[key]].sum(axis=0)


def map_outputs(info: ModelInfo) -> list[str]:
    """The outputs to ask the session for besides the embedding (none for a file without
    maps): the cell embeddings and the first attention, if any."""
    if not info.maps:
        return []
    return ["cell_embeddings", *info.maps["attention"][:1]]


def image_maps(info: ModelInfo, keys: list[str], outputs: dict[str, np.ndarray]) -> ImageMaps:
    """`map_outputs`' arrays for the images `keys`, in their order."""
    attention = info.maps["attention"][:1]
    return ImageMaps(row={key: i for i, key in enumerate(keys)},
                     cells=outputs["cell_embeddings"],
                     attention=outputs[attention[0]] if attention else None,
                     terms=tuple(tuple(term) for term in info.maps["terms"]))


def similarity_grid(cells: np.ndarray, other: np.ndarray, terms, pool: int
                    ) -> tuple[np.ndarray, float]:
    """Where an image's cosine with another unit embedding comes from.

    cells (P, D): the image's cell embeddings; other (D,). Returns each grid cell's part
    (pool, pool), summed over the map inputs, and the rest (vector inputs, bias, whitened
    share); together they sum to the cosine.
    """
    parts = cells @ other  # (P,)
    grid = np.zeros((pool, pool))
    rest = 0.0
    for part, (_, r, c) in zip(parts, terms, strict=True):
        if r is None:
            rest += float(part)
        else:
            grid[r, c] += part
    return grid, rest
