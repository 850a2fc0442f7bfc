"""Issue 19's file-safety, trunk and memory cases, one row each (the machinery: `hostile.py`):
links at the tool's own working paths, an output path that holds someone else's file, a ViT
input size that is not whole patches, timm's `--layer global` on a torchvision model, and
running out of memory."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import pytest
import torch
from hostile import SMALL, Case, World, run_case

from extract.cache import partial_path, read_info, shard_path
from tll.data import CANDIDATE_COLUMNS
from tll.files import lock_file

# --- the tool never writes through a link at its own working paths (#65, #66) -------------------


def _extract(w: World, out: Path, *extra, backbone: str = "resnet50") -> list:
    data = w.copy("tiny", "data")
    return ["extract", "--backbone", backbone, "--weights", "none", "--data", data,
            "--out", out, "--no-hflip", *SMALL, *extra]


def _users_file(w: World) -> Path:
    mine = w.tmp / "mine" / "thesis.txt"
    mine.parent.mkdir()
    mine.write_text("the user's own file, which a link happens to point to")
    w.keep(mine)
    return mine


def _linked(w: World, *links: Path) -> list:
    """The cache's `links` (paths beside it) point to the user's file."""
    out = w.tmp / "cache" / "r50.h5"
    out.parent.mkdir()
    mine = _users_file(w)
    for link in links:
        link.symlink_to(mine)
    return _extract(w, out)


def partial_is_a_link(w: World) -> list:
    return _linked(w, partial_path(w.tmp / "cache" / "r50.h5"))


def lock_is_a_link(w: World) -> list:
    return _linked(w, lock_file(w.tmp / "cache" / "r50.h5"))


def shard_and_its_lock_are_links(w: World) -> list:
    shard = shard_path(w.tmp / "cache" / "r50.h5", 1)
    return _linked(w, shard, lock_file(shard))


def _cache_is_a_real_file(w: World) -> None:
    cache = w.tmp / "cache" / "r50.h5"
    assert cache.is_file() and not cache.is_symlink()
    assert read_info(cache).input_size == (32, 32)
    assert [p.name for p in (w.tmp / "cache").iterdir() if p.is_symlink()] == []


# --- an output path holding someone else's file is refused, even with --overwrite (#62, #93) ---


def extract_out_is_a_text_file(w: World) -> list:
    notes = w.tmp / "notes.txt"
    notes.write_text("results of last week\n")
    w.keep(notes)
    return _extract(w, notes, "--overwrite")


def extract_out_is_another_hdf5(w: World) -> list:
    other = w.tmp / "measurements.h5"
    with h5py.File(other, "w") as file:
        file["signal"] = [1.0, 2.0]
    w.keep(other)
    return _extract(w, other, "--overwrite")


def _infer(w: World, out: Path) -> list:
    return ["infer", "--onnx", w.fixture("exported_run") / "model.onnx",
            "--data", w.fixture("train_data"), "--out", out, "--device", "cpu"]


def infer_out_is_a_cache(w: World) -> list:
    cache = w.copy("train_cache", "r50.h5")
    w.keep(cache)
    return _infer(w, cache)


def infer_out_is_an_earlier_submission(w: World) -> list:
    """Rewriting infer's own earlier submission stays as it was: replaced whole."""
    out = w.tmp / "submission.csv"
    out.write_text(",".join(CANDIDATE_COLUMNS) + "\r\nold,0\r\n")
    return _infer(w, out)


def _submission_replaced(w: World) -> None:
    with open(w.tmp / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == CANDIDATE_COLUMNS and len(rows) > 2 and rows[1][0] != "old"


def _export(w: World, out: Path) -> list:
    return ["export", "--run", w.fixture("trained_run"), "--out", out]


def export_out_is_a_text_file(w: World) -> list:
    out = w.tmp / "model.onnx"
    out.write_text("my notes, not a model\n")
    w.keep(out)
    return _export(w, out)


def export_out_is_another_onnx_model(w: World) -> list:
    """An ONNX model that some other program wrote: refused, even though it is ONNX."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "theirs",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    out = w.tmp / "theirs.onnx"
    onnx.save_model(helper.make_model(graph), out)
    w.keep(out)
    return _export(w, out)


# --- the trunk: what it sees, and the words it takes (#56, #51) ----------------------------------


def vit_input_not_whole_patches(w: World) -> list:
    out = w.tmp / "vit.h5"
    w.gone += [out, partial_path(out)]
    arguments = _extract(w, out, backbone="timm:vit_tiny_patch16_224")
    return [*arguments, "--input-size", "64", "56"]  # the last --input-size wins


def layer_global_on_torchvision(w: World) -> list:
    return _extract(w, w.tmp / "r50.h5", "--layer", "global")


# --- out of memory: what to lower (#60, #61) -----------------------------------------------------


def input_size_beyond_memory(w: World) -> list:
    """120 GB for one image: the CPU allocator refuses it at once, without using memory."""
    arguments = _extract(w, w.tmp / "r50.h5")
    return [*arguments, "--input-size", "100000", "100000"]


def extract_out_of_memory(w: World) -> list:
    from extract import extract_features

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        yield

    w.monkeypatch.setattr(extract_features, "_computed", exhausted)
    return _extract(w, w.tmp / "r50.h5", "--batch-size", "4096")


def train_out_of_memory(w: World) -> list:
    from head import train

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 85899345920 bytes.")

    w.monkeypatch.setattr(train, "train_epoch", exhausted)
    return ["train", "--cache", w.fixture("train_cache"), "--runs-dir", w.tmp / "runs",
            "--epochs", "1", "--device", "cpu", "--batch-size", "4096", "--name", "x"]


CASES: dict[str, Case] = {
    "extract .partial a link": Case(partial_is_a_link, 0, ("removed the link",),
                                    then=_cache_is_a_real_file),
    "extract lock a link": Case(lock_is_a_link, 0, ("removed the link",),
                                then=_cache_is_a_real_file),
    "extract shard and its lock links": Case(shard_and_its_lock_are_links, 0,
                                             ("removed the link",), then=_cache_is_a_real_file),
    "extract --out a text file": Case(extract_out_is_a_text_file, 1,
                                      ("cache {tmp}/notes.txt exists", "not a tll cache",
                                       "a text file beginning 'results of last week'",
                                       "give another path")),
    "extract --out another HDF5": Case(extract_out_is_another_hdf5, 1,
                                       ("cache {tmp}/measurements.h5 exists", "not a tll cache",
                                        "give another path")),
    "infer --out a cache": Case(infer_out_is_a_cache, 1,
                                ("output {tmp}/r50.h5 exists",
                                 "not a submission or report of tll (an HDF5 file)",
                                 "give another path")),
    "export --out a text file": Case(export_out_is_a_text_file, 1,
                                     ("model {tmp}/model.onnx exists", "not a tll model",
                                      "a text file beginning 'my notes", "give another path")),
    "export --out another program's model": Case(export_out_is_another_onnx_model, 1,
                                                 ("model {tmp}/theirs.onnx exists",
                                                  "an ONNX model without tll's metadata",
                                                  "give another path")),
    "infer --out an earlier submission": Case(infer_out_is_an_earlier_submission, 0,
                                              then=_submission_replaced),
    "extract ViT size not whole patches": Case(vit_input_not_whole_patches, 1,
                                               ("16 x 16 patches", "64 x 56",
                                                "last 8 columns",
                                                "--input-size 64 48 or 64 64")),
    "extract --layer global on torchvision": Case(layer_global_on_torchvision, 1,
                                                  ("--layer global", "timm models",
                                                   "resnet50 is a torchvision model",
                                                   "layer4")),
    "extract --input-size beyond memory": Case(input_size_beyond_memory, 1,
                                               ("input size 100000 x 100000 does not "
                                                "fit in memory", "lower --input-size")),
    "extract out of memory": Case(extract_out_of_memory, 1,
                                  ("out of memory (CUDA out of memory", "lower --batch-size",
                                   "resumes")),
    "train out of memory": Case(train_out_of_memory, 1,
                                ("out of memory", "DefaultCPUAllocator",
                                 "lower --memory-budget", "or --batch-size")),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_files_hostile(case: Case, request: pytest.FixtureRequest, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(case, request, tmp_path, monkeypatch)
