"""What an exported ONNX file says about itself (its `metadata_props`): one dataclass, written by
`head.export` (`to_props`) and read back by `infer` (`from_props`). Pure data: no torch, no
onnxruntime.

Every value is text: numbers as Python writes them, lists and dicts as JSON. With several caches
(fusion), backbone, layer, weights and weights_id join every trunk's with "+" and `trunks` lists
them in full. A key a file from an older tll lacks reads as its field's default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tll import UserError
from tll.data import DEFAULT_INTERPOLATION, INTERPOLATIONS

TRUNK_KEYS = ("backbone", "layer", "weights", "weights_id")  # what a file records of each trunk


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """The description of an exported model, in the order its metadata_props are written."""

    tll_version: str | None = None  # the tll that exported it
    trunks: tuple[dict[str, str], ...] = ()  # each trunk's TRUNK_KEYS, in the head's order
    caches: tuple[str, ...] = ()  # the caches the head was trained on, as head.train was given
    input_size: tuple[int, int]  # (H, W), one for every trunk
    interpolation: str = DEFAULT_INTERPOLATION  # how images are resized to input_size
    embedding_dim: int | None = None
    views: tuple[str, ...] = ("identity",)  # averaged inside the graph
    head_config: dict = field(default_factory=dict)
    dataset_fingerprint: str | None = None
    val_fraction: float | None = None  # 0 after cross-validation: the head saw every pair
    folds: int | None = None
    assign: str | None = None  # the assignment training chose its epoch with, infer's default
    assign_temperature: float | None = None
    split_seed: int | None = None
    val_metrics: dict = field(default_factory=dict)
    best_epoch: int | None = None
    # what the file's map outputs are (head.export): "terms", each cell_embeddings term as
    # [input, row, column] (`head.model.TLLNet.terms`: a fused head's whitened share is one more
    # term, all None), and "attention", the attention outputs' names; empty for a file without
    # maps (a whitening head, a file from before them)
    maps: dict = field(default_factory=dict)

    @property
    def trunk(self) -> str:
        """Backbone, layer and weights, for people to read."""
        return " ".join("+".join(t.get(key, "?") for t in self.trunks) or "?"
                        for key in ("backbone", "layer", "weights"))

    @property
    def caches_text(self) -> str:
        """The caches, for people to read."""
        return ", ".join(self.caches) or "?"

    def to_props(self) -> dict[str, str]:
        """The metadata_props of the exported file."""
        return {
            "tll_version": self.tll_version,
            **{key: "+".join(t[key] for t in self.trunks) for key in TRUNK_KEYS},
            "caches": json.dumps(list(self.caches)),
            "trunks": json.dumps([dict(t) for t in self.trunks]),
            "input_size": json.dumps(list(self.input_size)),
            "interpolation": self.interpolation,
            "embedding_dim": str(self.embedding_dim),
            "views": json.dumps(list(self.views)),
            "head_config": json.dumps(self.head_config),
            "dataset_fingerprint": self.dataset_fingerprint,
            "val_fraction": str(self.val_fraction),
            "folds": str(self.folds),
            "assign": self.assign,
            "assign_temperature": str(self.assign_temperature),
            "split_seed": str(self.split_seed),
            "val_metrics": json.dumps(self.val_metrics),
            "best_epoch": str(self.best_epoch),
            "maps": json.dumps(self.maps),
        }

    @classmethod
    def from_props(cls, path: Path, props: dict[str, str]) -> ModelInfo:
        """Read and check the metadata; anything damaged is refused naming the file."""
        if "input_size" not in props:
            raise UserError(f"{path} has no input_size in its metadata; export it with "
                            "`python -m head.export`")

        def number(kind: type, key: str) -> int | float | None:
            return kind(props[key]) if props.get(key) else None

        try:
            height, width = (int(n) for n in json.loads(props["input_size"]))
            values = dict(
                val_fraction=number(float, "val_fraction"), split_seed=number(int, "split_seed"),
                val_metrics=json.loads(props.get("val_metrics", "{}")),
                assign_temperature=number(float, "assign_temperature"),
                embedding_dim=number(int, "embedding_dim"), folds=number(int, "folds"),
                best_epoch=number(int, "best_epoch"), trunks=_trunks(props),
                caches=tuple(json.loads(props.get("caches", "[]"))),
                views=tuple(json.loads(props.get("views", '["identity"]'))),
                head_config=json.loads(props.get("head_config", "{}")),
                maps=json.loads(props.get("maps", "{}")),
            )
        except (ValueError, TypeError) as error:  # not JSON, not numbers, not two of them
            raise UserError(f"{path} has damaged metadata ({error}); export it again with "
                            "`python -m head.export`") from None
        interpolation = props.get("interpolation", DEFAULT_INTERPOLATION)
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"{path} has damaged metadata (interpolation {interpolation!r}); "
                            "export it again with `python -m head.export`")
        return cls(tll_version=props.get("tll_version"), input_size=(height, width),
                   interpolation=interpolation, assign=props.get("assign"),
                   dataset_fingerprint=props.get("dataset_fingerprint"), **values)


def _trunks(props: dict[str, str]) -> tuple[dict[str, str], ...]:
    """Each trunk's TRUNK_KEYS; a file from before fusion lists none under `trunks`: its one
    trunk is in the joined keys."""
    if "trunks" not in props:
        return ({k: props[k] for k in TRUNK_KEYS if k in props},) if "backbone" in props else ()
    return tuple({k: trunk[k] for k in TRUNK_KEYS if k in trunk}
                 for trunk in json.loads(props["trunks"]))
