"""`python -m head.export`: trunk(s) + head of a run -> one self-contained ONNX file.

The trunk is rebuilt from the cache metadata in the checkpoint (the same weights, checked by
name, hub id, seed or sha256) and refused if its features no longer have the cached shape. The
file carries its own description in `metadata_props` (what `python -m infer` reads), and is checked
against eager torch in ONNX Runtime at two batch sizes before it is kept.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import click
import numpy as np
import onnx
import torch

from extract.backbones import GLOBAL, Trunk
from extract.trunk_spec import TrunkSpec, file_id
from head.model import TLLNet, load_checkpoint
from infer.model_info import TRUNK_KEYS, ModelInfo
from tll import UserError, UserPath, __version__, logger, user_errors
from tll.files import atomic_output, check_output, file_kind, file_start

PARITY_TOLERANCE = 1e-4  # max abs difference of unit embeddings, ONNX Runtime vs eager torch
PARITY_BATCHES = (1, 7)
# The opsets a file is written in as asked (tried with torch 2.14, onnx 1.23, onnxruntime 1.31):
# torch's dynamo exporter implements 18 and up and quietly writes 18 for anything lower (or for a
# version it cannot convert to); onnxruntime loads up to 26 (27 and 28 fail to load).
OPSETS = (18, 26)


def build_network(checkpoint_path: Path, weights: list[str | Path] = ()
                  ) -> tuple[TLLNet, dict]:
    """The whole network of a run, rebuilt from its checkpoint alone (eval mode, CPU): its
    trunks, the head, the views. Caches cut from one trunk (the same backbone, weights and input
    size, other layers) share one pass of it; other caches each get their own. `weights`: state
    dicts that have moved since extraction, each standing in for the trunk built with the very
    same file (by its sha256)."""
    head, checkpoint = load_checkpoint(checkpoint_path)
    specs = [TrunkSpec.from_metadata(cache) for cache in checkpoint["caches"]]
    for path in map(Path, weights):
        if not path.is_file():
            raise UserError(f"--weights {path} does not exist")
        matching = [i for i, spec in enumerate(specs) if spec.weights_id == file_id(path)]
        if not matching:
            raise UserError(f"--weights {path} is none of this run's trunk weights "
                            f"({', '.join(spec.weights_id for spec in specs)})")
        for i in matching:
            specs[i] = specs[i].with_weights_file(path)
    groups = shared_trunks(specs)
    trunks = [Trunk(specs[members[0]], tuple(specs[i].layer for i in members))
              for members in groups]
    for trunk, members in zip(trunks, groups, strict=True):
        for shape, i in zip(trunk.output_shapes(), members, strict=True):
            expected = tuple(checkpoint["caches"][i]["feature_shape"])
            if shape != expected:
                raise UserError(f"the rebuilt {specs[i].backbone} {specs[i].layer} trunk gives "
                                f"features {shape}, but the head was trained on {expected}")
    inputs = {i: (t, k) for t, members in enumerate(groups) for k, i in enumerate(members)}
    net = TLLNet(trunks, head, tuple(checkpoint["views"]),
                 tuple(inputs[i] for i in range(len(specs))))
    return net.eval(), checkpoint


def shared_trunks(specs: list[TrunkSpec]) -> list[list[int]]:
    """The specs grouped by the trunk they are cut from (all but the layer alike), as lists of
    their positions, in order of first appearance. A timm model's global embedding takes the
    model's whole pass: it shares with nothing."""
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        alone = i if spec.layer == GLOBAL else -1
        groups.setdefault((dataclasses.replace(spec, layer=""), alone), []).append(i)
    return list(groups.values())


def model_info(checkpoint: dict) -> ModelInfo:
    """What the exported file says about itself: everything `infer` needs to use it."""
    caches, config = checkpoint["caches"], checkpoint["train_config"]
    first = caches[0]
    return ModelInfo(
        tll_version=__version__,
        trunks=tuple({k: c[k] for k in TRUNK_KEYS} for c in caches),
        caches=tuple(config["caches"]),  # as head.train was given them
        input_size=first["input_size"],  # one for every trunk
        # how infer resizes images to input_size (fused caches share it)
        interpolation=TrunkSpec.from_metadata(first).interpolation,
        embedding_dim=checkpoint["head_config"]["embedding_dim"],
        views=tuple(checkpoint["views"]),  # averaged inside the graph
        head_config=checkpoint["head_config"],
        dataset_fingerprint=first["dataset_fingerprint"],
        # after cross-validation the final head saw every pair: no split to score it on
        val_fraction=0.0 if config["folds"] else config["val_fraction"],
        folds=config["folds"],
        assign=config["assign"],  # what the kept epoch was chosen with: infer's default
        assign_temperature=config["assign_temperature"],
        split_seed=config["split_seed"],
        val_metrics=checkpoint.get("metrics") or {},
        best_epoch=checkpoint["best_epoch"],
    )


def describe(checkpoint: dict, net: TLLNet | None = None) -> dict[str, str]:
    """The metadata_props of the exported file (`ModelInfo.to_props`), with what its maps are
    where `net` gives them (`exported_outputs`)."""
    info = model_info(checkpoint)
    if net is not None and net.has_maps():
        info = dataclasses.replace(info, maps={
            "terms": [list(term) for term in net.terms()],
            "attention": [name for name in exported_outputs(net) if name.startswith("attention_")],
        })
    return info.to_props()


def exported_outputs(net: TLLNet) -> list[str]:
    """The exported file's outputs, by name: the embedding, then `TLLNet.explain`'s maps."""
    return net.explained_outputs() if net.has_maps() else ["embedding"]


class Explained(torch.nn.Module):
    """`TLLNet.explain` as a tuple, the form the exporter takes, in `exported_outputs` order."""

    def __init__(self, net: TLLNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net.explain(image).values())


def foreign_model(path: Path) -> str | None:
    """What the file at a model's path is where it is not a model tll exported (for
    `check_output`); None for one of ours, which an export may replace, and for an empty file."""
    start = file_start(path)
    if not start:
        return None
    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception:  # protobuf's decode errors have no common public type
        return f"not a tll model ({file_kind(start)})"
    if not any(entry.key == "tll_version" for entry in model.metadata_props):
        return "not a tll model (an ONNX model without tll's metadata)"
    return None


def main(run: str | Path, out: str | Path | None = None, weights: list[str | Path] = (),
         opset: int = 18) -> Path:
    """Export runs/NAME/head.pt with its trunk to `out` (default runs/NAME/model.onnx); the
    file appears only once it has passed the parity check."""
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise UserError(f"--opset {opset}: choose one in {OPSETS[0]}..{OPSETS[1]}")
    run = Path(run)
    checkpoint_path = run / "head.pt"
    if not checkpoint_path.is_file():
        raise UserError(f"{run} has no head.pt; pass the folder `python -m head.train` wrote")
    out = Path(out) if out else run / "model.onnx"
    check_output(out, "model", inputs=[checkpoint_path], foreign=foreign_model)
    net, checkpoint = build_network(checkpoint_path, weights)
    height, width = checkpoint["caches"][0]["input_size"]
    example = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    logger.info("export %s (%s) -> %s", run, describe(checkpoint)["backbone"], out)
    outputs = exported_outputs(net)
    with atomic_output(out) as tmp:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's own chatter
            program = torch.onnx.export(
                Explained(net) if net.has_maps() else net, (example,), input_names=["image"],
                output_names=outputs,
                opset_version=opset, dynamo=True, external_data=False, verbose=False,
                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
            )
        model = program.model_proto
        written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if written != opset:  # the exporter falls back quietly where it cannot convert
            raise UserError(f"--opset {opset}: the exporter wrote opset {written} instead; "
                            f"choose one in {OPSETS[0]}..{OPSETS[1]}; not written")
        for key, value in describe(checkpoint, net).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(model, tmp)
        check_parity(net, tmp, (height, width))
    return out


def check_parity(net: TLLNet, path: Path, input_size: tuple[int, int]) -> None:
    """Run the file in ONNX Runtime (CPU) and eager torch at batch 1 and 7, every output (the
    embedding, and the maps where the file has them); refuse a mismatch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    generator = torch.Generator().manual_seed(1)
    for batch in PARITY_BATCHES:
        images = torch.rand(batch, 3, *input_size, generator=generator)
        with torch.no_grad():
            expected = (net.explain(images) if net.has_maps()
                        else {"embedding": net(images)})  # name -> (batch, ...)
        got = dict(zip(names, session.run(names, {"image": images.numpy()}), strict=True))
        for name in expected:
            difference = float(np.abs(got[name] - expected[name].numpy()).max())
            logger.info("parity of %s at batch %d: max abs difference %.2e", name, batch,
                        difference)
            if got[name].shape != expected[name].shape or not difference <= PARITY_TOLERANCE:
                raise UserError(f"the exported model disagrees with torch at batch {batch} on "
                                f"its {name}: max abs difference {difference:.2e} > "
                                f"{PARITY_TOLERANCE:.0e}; not written")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--run", type=UserPath(), required=True,
              help="Run folder written by `python -m head.train` (holds head.pt).")
@click.option("--out", type=UserPath(), default=None,
              help="ONNX file [default: <run>/model.onnx].")
@click.option("--weights", type=UserPath(), multiple=True,
              help="Where a trunk's state dict is now, if it has moved since extraction (matched "
                   "to its trunk by sha256; repeatable) [default: the paths recorded in the "
                   "run].")
@click.option("--opset", type=click.IntRange(*OPSETS), default=18,
              help="The ONNX opset of the file (the ones this exporter writes as asked).")
def cli(**options) -> None:
    """Export the trunk and trained head of a run to one ONNX model, checked against torch."""
    with user_errors():
        path = main(**options)
    click.echo(path)


if __name__ == "__main__":
    cli(prog_name="python -m head.export")
