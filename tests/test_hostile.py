"""Bad input and faults, as a careless or hostile user would bring them, one row each: the
command, the exit code, fragments the message must hold (the culprit named, the fix where there
is one), and what must survive untouched. A new case is one more row in CASES.

Every row also asserts: no traceback, and no temporary file or folder left behind where the
command writes. Rows that are not errors (an image that used to load wrongly) check the result
with `then`.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest
import torch
from conftest import REPO_ROOT
from hostile import COMMANDS, SMALL, Case, World, run_case
from PIL import Image

from extract.cache import read_features, read_info, read_keys
from head import model as model_module
from tll.data import load_image
from tll.files import lock_file

# --- run folders are the user's ---------------------------------------------------------------


def _train(w: World, *extra) -> list:
    return ["train", "--cache", w.fixture("train_cache"), "--runs-dir", w.tmp / "runs",
            "--epochs", "1", "--device", "cpu", *extra]


def name_dot_dot(w: World) -> list:
    (w.tmp / "runs").mkdir()
    (w.tmp / "notes.txt").write_text("the user's own file beside the runs folder")
    w.keep(w.tmp / "notes.txt")
    return _train(w, "--name", "..")


def name_dot(w: World) -> list:
    run = w.tmp / "runs" / "old"
    run.mkdir(parents=True)
    (run / "head.pt").write_bytes(b"an earlier run")
    w.keep(w.tmp / "runs")
    return _train(w, "--name", ".")


def name_reused(w: World) -> list:
    run = w.tmp / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "model.onnx").write_bytes(b"exported earlier")
    (run / "notes.md").write_text("what I learnt from this run")
    w.keep(run)
    return _train(w, "--name", "mine")


def _whiten(w: World, *extra) -> list:
    return ["whiten", "--cache", w.fixture("train_cache"), "--runs-dir", w.tmp / "runs",
            "--device", "cpu", *extra]


def whiten_reuses_a_name(w: World) -> list:
    name_reused(w)
    return _whiten(w, "--name", "mine")


def whiten_too_many_components(w: World) -> list:
    return _whiten(w, "--name", "w", "--components", "100000")


def name_with_slash(w: World) -> list:
    return _train(w, "--name", "a/b")


def name_reused_with_overwrite(w: World) -> list:
    run = w.tmp / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "notes.md").write_text("replaced on purpose")
    (w.tmp / "runs" / "other").mkdir()
    w.keep(w.tmp / "runs" / "other")
    return _train(w, "--name", "mine", "--overwrite")


def _replaced_run(w: World) -> None:
    run = w.tmp / "runs" / "mine"
    assert {p.name for p in run.iterdir()} == {"head.pt", "config.json", "metrics.jsonl",
                                                "curves.png"}
    assert sorted(p.name for p in (w.tmp / "runs").iterdir()) == ["mine", "other"]


def leftovers_of_a_killed_run(w: World) -> list:
    """A temporary run folder of a process that no longer exists, and one of a live process."""
    import socket

    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
    runs = w.tmp / "runs"
    dead = runs / f".old.{host}-{2 ** 22 + 12345}.abcdef.tmp"  # beyond Linux's pid_max default
    live = runs / f".busy.{host}-{os.getpid()}.abcdef.tmp"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("{}\n")
    w.gone.append(dead)
    w.keep(live)
    w.watched.remove(w.tmp)  # the live one is another run's temporary, left in place on purpose
    return _train(w, "--name", "new")


def runs_dir_is_a_file(w: World) -> list:
    (w.tmp / "runs").write_text("not a folder")
    w.keep(w.tmp / "runs")
    return _train(w, "--name", "x")


def interrupted_training(w: World) -> list:
    from head import train

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    w.monkeypatch.setattr(train, "train_epoch", interrupt)
    return _train(w, "--name", "x")


def disk_full_in_training(w: World) -> list:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    w.monkeypatch.setattr(model_module.torch, "save", full)
    w.gone.append(w.tmp / "runs" / "x")
    return _train(w, "--name", "x")


# --- training that cannot train -----------------------------------------------------------------


def one_training_pair(w: World) -> list:
    # 300 pairs with 299 held out: too few for validation in the tiny split, so hold out 0.9966
    return _train(w, "--name", "x", "--val-fraction", "0.9967")


def lr_far_too_high(w: World) -> list:
    return _train(w, "--name", "x", "--lr", "1e6")


def whitened_weight_nan(w: World) -> list:
    return _train(w, "--name", "x", "--whitened-weight", "nan")


def _no_run(w: World) -> None:
    assert not (w.tmp / "runs").exists()


def lr_overflowing(w: World) -> list:
    return _train(w, "--name", "x", "--lr", "1e39")


def memory_budget_without_a_unit(w: World) -> list:
    return _train(w, "--name", "x", "--memory-budget", "4 lots")


def memory_budget_a_bare_number(w: World) -> list:
    return _train(w, "--name", "x", "--memory-budget", "8")


def lr_that_collapses(w: World) -> list:
    # the default head collapses at lr 1: every embedding one point (with InfoNCE, a features
    # layer and dropout it trains on)
    return _train(w, "--name", "x", "--lr", "1", "--val-fraction", "0.2")


# --- the cache: one writer, damage named --------------------------------------------------------


def _extract(w: World, data: Path, out: Path, *extra) -> list:
    return ["extract", "--backbone", "resnet50", "--weights", "none", "--data", data,
            "--out", out, "--no-hflip", *SMALL, *extra]


def second_writer(w: World) -> list:
    """Another process holds the cache's lock, as a running extraction does."""
    data = w.data()
    out = w.tmp / "cache" / "r50.h5"
    out.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; "
         "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
         "time.sleep(120)", str(lock_file(out))],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    w.cleanup.append(lambda: (holder.kill(), holder.wait()))
    (w.tmp / "pid").write_text(str(holder.pid))
    w.gone.append(Path(f"{out}.partial"))
    w.gone.append(out)
    return _extract(w, data, out)


def damaged_final_cache(w: World) -> list:
    data = w.data()
    cache = w.cache(data)
    with open(cache, "r+b") as f:
        f.truncate(os.path.getsize(cache) // 2)
    w.keep(cache)
    return _extract(w, data, cache)


def cache_header_wiped(w: World) -> list:
    data = w.data()
    cache = w.cache(data)
    with h5py.File(cache, "r+") as file:
        del file.attrs["layer"]
    w.keep(cache)
    return _extract(w, data, cache)


def damaged_cache_to_train(w: World) -> list:
    cache = w.copy("train_cache", "r50.h5")
    with open(cache, "r+b") as f:
        f.seek(0)
        f.write(b"\0" * 512)
    w.keep(cache)
    return ["train", "--cache", cache, "--runs-dir", w.tmp / "runs", "--name", "x",
            "--device", "cpu"]


def corrupt_partial(w: World) -> list:
    data = w.data()
    out = w.tmp / "cache" / "r50.h5"
    out.parent.mkdir()
    Path(f"{out}.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\xff" * 2000)
    return _extract(w, data, out)


def _complete_cache(w: World) -> None:
    cache = w.tmp / "cache" / "r50.h5"
    assert read_info(cache).input_size == (32, 32)
    assert not Path(f"{cache}.partial").exists()


def image_changed_before_resume(w: World) -> list:
    """A partial cache whose done rows include an image that has since been replaced."""
    data = w.data()
    cache = w.cache(data)
    partial = Path(f"{cache}.partial")
    cache.rename(partial)
    with h5py.File(partial, "r+") as file:
        file.attrs["complete"] = False
        file["done"][-5:] = 0  # the last rows still to do
    first, second = sorted((data / "train" / "left").iterdir())[:2]
    first.write_bytes(second.read_bytes())
    return _extract(w, data, cache)


def _changed_row_recomputed(w: World) -> None:
    data, cache = w.tmp / "data", w.tmp / "cache" / "r50.h5"
    first, second = sorted((data / "train" / "left").iterdir())[:2]
    a, b = read_features(cache, [f"train/left/{first.stem}", f"train/left/{second.stem}"])
    assert a.tobytes() == b.tobytes()  # same bytes now, so the same features


def input_size_too_small(w: World) -> list:
    return ["extract", "--backbone", "vgg16", "--weights", "none", "--data", w.data(),
            "--out", w.tmp / "cache" / "v.h5", "--input-size", "16", "16", "--device", "cpu"]


def input_size_zero(w: World) -> list:
    return ["extract", "--backbone", "resnet50", "--weights", "none", "--data", w.data(),
            "--out", w.tmp / "cache" / "r.h5", "--input-size", "0", "-5", "--device", "cpu"]


def weights_not_a_state_dict(w: World) -> list:
    weights = w.tmp / "weights.pt"
    torch.save([1, 2, 3], weights)
    return _extract(w, w.data(), w.tmp / "cache" / "r.h5", "--weights", weights)


def weights_not_a_torch_file(w: World) -> list:
    weights = w.tmp / "weights.pt"
    weights.write_text("these are not weights")
    return _extract(w, w.data(), w.tmp / "cache" / "r.h5", "--weights", weights)


def relative_weights_then_export_elsewhere(w: World) -> list:
    """Extract with `--weights resnet.pt` typed relative, train, then export from elsewhere."""
    from extract.extract_features import main as extract
    from head.train import main as train

    torch.save(_resnet_state(), w.tmp / "resnet.pt")
    w.monkeypatch.chdir(w.tmp)
    data = w.data()
    cache = extract("resnet50", data, out=w.tmp / "r.h5", weights="resnet.pt",
                    input_size=(32, 32), device="cpu", workers=0, hflip=False)
    run = train(cache, name="r", runs_dir=w.tmp / "runs", epochs=1, device="cpu",
                val_fraction=0.0)
    elsewhere = w.tmp / "elsewhere"
    elsewhere.mkdir()
    w.monkeypatch.chdir(elsewhere)
    return ["export", "--run", run]


def _resnet_state() -> dict:
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return torchvision.models.resnet50(weights=None).state_dict()


def moved_weights(w: World) -> list:
    """The state dict has moved since extraction: export finds it with --weights."""
    args = relative_weights_then_export_elsewhere(w)
    (w.tmp / "resnet.pt").rename(w.tmp / "moved.pt")
    return [*args, "--weights", w.tmp / "moved.pt"]


def moved_weights_not_given(w: World) -> list:
    args = relative_weights_then_export_elsewhere(w)
    (w.tmp / "resnet.pt").rename(w.tmp / "moved.pt")
    return args


def _exported(w: World) -> None:
    assert (w.tmp / "runs" / "r" / "model.onnx").is_file()


# --- images decoded correctly, or refused by name -----------------------------------------------


def _first_train_left(data: Path) -> Path:
    return sorted((data / "train" / "left").iterdir())[0]


def sixteen_bit_png(w: World) -> list:
    """A 16-bit greyscale PNG (mid grey) in place of a JPEG: it must not load as white."""
    data = w.data()
    image = _first_train_left(data)
    image.unlink()
    Image.fromarray(np.full((245, 200), 30000, dtype=np.uint16)).save(image.with_suffix(".png"))
    return _extract(w, data, w.tmp / "cache" / "r.h5")


def _sixteen_bit_loaded_grey(w: World) -> None:
    image = _first_train_left(w.tmp / "data")
    assert image.suffix == ".png"
    np.testing.assert_allclose(load_image(image, (32, 32)), 30000 / 65535, atol=1e-6)


def exif_rotated_photo(w: World) -> list:
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise)."""
    data = w.data()
    image = _first_train_left(data)
    upright = Image.open(image).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the camera wrote the pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(image, exif=exif, quality=95)
    upright.save(w.tmp / "upright.png")
    return _extract(w, data, w.tmp / "cache" / "r.h5")


def _exif_applied(w: World) -> None:
    image = _first_train_left(w.tmp / "data")
    loaded = load_image(image, (64, 48))
    expected = load_image(w.tmp / "upright.png", (64, 48))
    assert np.abs(loaded - expected).mean() < 0.03  # JPEG noise only, not a rotation


def decompression_bomb(w: World) -> list:
    data = w.data()
    w.monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200 x 245 is 4.9 times that
    return _extract(w, data, w.tmp / "cache" / "r.h5")


def symlink_loop(w: World) -> list:
    data = w.data()
    image = _first_train_left(data)
    image.unlink()
    image.symlink_to(image.name)  # a link to itself
    return _extract(w, data, w.tmp / "cache" / "r.h5")


def image_is_a_folder(w: World) -> list:
    data = w.data()
    image = _first_train_left(data)
    image.unlink()
    image.mkdir()
    return _extract(w, data, w.tmp / "cache" / "r.h5")


def csv_not_utf8(w: World) -> list:
    data = w.data()
    lines = (data / "train.csv").read_bytes().split(b"\n")
    lines[3] = lines[3] + b"\xe9"  # Latin-1 e-acute at the end of line 4
    (data / "train.csv").write_bytes(b"\n".join(lines))
    return _extract(w, data, w.tmp / "cache" / "r.h5")


def csv_with_nul(w: World) -> list:
    data = w.data()
    text = (data / "test_candidates.csv").read_text().split("\n")
    text[2] = text[2][:5] + "\0" + text[2][5:]
    (data / "test_candidates.csv").write_text("\n".join(text))
    return _extract(w, data, w.tmp / "cache" / "r.h5")


# --- outputs: never an input, a folder, or unwritable -------------------------------------------


def _infer(w: World, out, *extra) -> list:
    exported = w.fixture("exported_run")
    return ["infer", "--onnx", exported / "model.onnx", "--data", w.fixture("train_data"),
            "--out", out, "--device", "cpu", *extra]


def infer_out_is_the_candidates_csv(w: World) -> list:
    data = w.copy("train_data", "data")
    w.keep(data / "test_candidates.csv")
    exported = w.fixture("exported_run")
    return ["infer", "--onnx", exported / "model.onnx", "--data", data,
            "--out", data / "test_candidates.csv", "--device", "cpu"]


def infer_out_is_the_model(w: World) -> list:
    model = w.copy("exported_run", "run") / "model.onnx"
    w.keep(model)
    return ["infer", "--onnx", model, "--data", w.fixture("train_data"), "--out", model,
            "--device", "cpu"]


def infer_out_is_a_folder(w: World) -> list:
    (w.tmp / "out").mkdir()
    w.keep(w.tmp / "out")
    return _infer(w, w.tmp / "out")


def infer_out_in_unwritable_folder(w: World) -> list:
    # /proc refuses new files to everyone, root included (a chmod would not stop root)
    return _infer(w, "/proc/tll-test/submission.csv")


def infer_out_with_tilde(w: World) -> list:
    w.monkeypatch.setenv("HOME", str(w.tmp))
    return _infer(w, "~/subs/submission.csv")


def _written_under_home(w: World) -> None:
    assert (w.tmp / "subs" / "submission.csv").is_file()
    assert not (Path.cwd() / "~").exists()


def extract_out_is_an_image(w: World) -> list:
    data = w.data()
    image = _first_train_left(data)
    w.keep(image)
    return _extract(w, data, image)


def export_out_is_a_folder(w: World) -> list:
    run = w.copy("trained_run", "run")
    w.keep(run)
    return ["export", "--run", run, "--out", run]


# --- models and checkpoints, damaged --------------------------------------------------------------


def corrupt_checkpoint(w: World) -> list:
    run = w.copy("trained_run", "run")
    head = run / "head.pt"
    head.write_bytes(head.read_bytes()[:1000])
    w.keep(run)
    return ["export", "--run", run]


def checkpoint_of_another_format(w: World) -> list:
    run = w.copy("trained_run", "run")
    checkpoint = torch.load(run / "head.pt", weights_only=True)
    checkpoint["format_version"] = 99
    torch.save(checkpoint, run / "head.pt")
    return ["export", "--run", run]


def _model_with(w: World, **props) -> Path:
    model = w.copy("exported_run", "run") / "model.onnx"
    proto = onnx.load(str(model))
    for entry in proto.metadata_props:
        if entry.key in props:
            entry.value = props[entry.key]
    onnx.save_model(proto, str(model))
    return model


def model_input_size_not_json(w: World) -> list:
    model = _model_with(w, input_size="64 by 64")
    return ["infer", "--onnx", model, "--data", w.fixture("train_data"),
            "--out", w.tmp / "s.csv", "--device", "cpu"]


def model_input_size_differs_from_graph(w: World) -> list:
    model = _model_with(w, input_size="[128, 96]")
    return ["infer", "--onnx", model, "--data", w.fixture("train_data"),
            "--out", w.tmp / "s.csv", "--device", "cpu"]


# --- the table ------------------------------------------------------------------------------------

CASES: dict[str, Case] = {
    "train --name ..": Case(name_dot_dot, 1, ("--name '..'", "plain folder name")),
    "train --name .": Case(name_dot, 1, ("--name '.'", "plain folder name")),
    "train --name a/b": Case(name_with_slash, 1, ("--name 'a/b'", "path separator")),
    "train reuses a name": Case(name_reused, 1, ("{tmp}/runs/mine exists", "--overwrite")),
    "whiten reuses a name": Case(whiten_reuses_a_name, 1,
                                 ("{tmp}/runs/mine exists", "--overwrite")),
    "whiten --components 100000": Case(whiten_too_many_components, 0,
                                       ("--components 100000", "span at most")),
    "train --overwrite replaces only that run": Case(name_reused_with_overwrite, 0,
                                                     then=_replaced_run),
    "train cleans a killed run's leftovers": Case(leftovers_of_a_killed_run, 0,
                                                  ("left behind by a run that was killed",)),
    "train --runs-dir is a file": Case(runs_dir_is_a_file, 1, ("{tmp}/runs is a file",)),
    "train interrupted": Case(interrupted_training, 1,
                              ("interrupted; no run folder was written",)),
    "train disk full": Case(disk_full_in_training, 1,
                            ("no space left on device while writing {tmp}/runs/x",)),
    "train one training pair": Case(one_training_pair, 1,
                                    ("1 training pair(s) left", "--val-fraction")),
    "train --lr 1e6": Case(lr_far_too_high, 2, ("--lr", "0<x<=1.0")),
    "train --lr 1e39": Case(lr_overflowing, 2, ("--lr", "0<x<=1.0")),
    "train --whitened-weight nan": Case(whitened_weight_nan, 1,
                                        ("--whitened-weight nan", "[0, 1)"), then=_no_run),
    "train --memory-budget 4 lots": Case(memory_budget_without_a_unit, 2,
                                         ("--memory-budget", "'4 lots' is not a size", "4GiB")),
    "train --memory-budget 8": Case(memory_budget_a_bare_number, 2,
                                    ("--memory-budget", "'8' has no unit", "8GiB", "8B")),
    "train --lr 1 collapses": Case(lr_that_collapses, 1, ("head collapsed", "lower --lr")),
    "extract second writer": Case(second_writer, 1,
                                  ("{tmp}/cache/r50.h5 is being written by another process",
                                   "pid {pid}")),
    "extract damaged finished cache": Case(damaged_final_cache, 1,
                                           ("{tmp}/cache/r50.h5 is damaged", "--overwrite")),
    "extract cache header wiped": Case(cache_header_wiped, 1,
                                       ("{tmp}/cache/r50.h5 is damaged", "layer",
                                        "--overwrite")),
    "train damaged cache": Case(damaged_cache_to_train, 1, ("{tmp}/r50.h5 is damaged",)),
    "extract corrupt partial": Case(corrupt_partial, 0, ("starting it over",),
                                    then=_complete_cache),
    "extract image changed before resume": Case(image_changed_before_resume, 0,
                                                ("1 images have changed",
                                                 "computing them again"),
                                                then=_changed_row_recomputed),
    "extract --input-size too small": Case(input_size_too_small, 1,
                                           ("16 x 16 is too small for vgg16",
                                            "at least 32 x 32")),
    "extract --input-size 0 -5": Case(input_size_zero, 2, ("--input-size", "0")),
    "extract --weights not a state dict": Case(weights_not_a_state_dict, 1,
                                               ("{tmp}/weights.pt", "not a state dict")),
    "extract --weights not a torch file": Case(weights_not_a_torch_file, 1,
                                               ("{tmp}/weights.pt", "not a readable state dict")),
    "export after relative --weights": Case(relative_weights_then_export_elsewhere, 0,
                                            then=_exported),
    "export --weights moved file": Case(moved_weights, 0, then=_exported),
    "export weights moved, not given": Case(moved_weights_not_given, 1,
                                            ("{tmp}/resnet.pt does not exist",)),
    "extract 16-bit png": Case(sixteen_bit_png, 0, then=_sixteen_bit_loaded_grey),
    "extract exif orientation": Case(exif_rotated_photo, 0, then=_exif_applied),
    "extract decompression bomb": Case(decompression_bomb, 1,
                                       ("{tmp}/data/", "too large to decode safely")),
    "extract symlink loop": Case(symlink_loop, 1, ("{tmp}/data/train/left/", "cannot read")),
    "extract image is a folder": Case(image_is_a_folder, 1,
                                      ("{tmp}/data/train/left/", "cannot read")),
    "extract non-utf-8 csv": Case(csv_not_utf8, 1, ("{tmp}/data/train.csv, line 4",
                                                    "not UTF-8")),
    "extract csv with a NUL byte": Case(csv_with_nul, 1,
                                        ("{tmp}/data/test_candidates.csv, line 3",)),
    "infer --out test_candidates.csv": Case(infer_out_is_the_candidates_csv, 1,
                                            ("one of the inputs",)),
    "infer --out the model": Case(infer_out_is_the_model, 1, ("one of the inputs",)),
    "infer --out a folder": Case(infer_out_is_a_folder, 1, ("{tmp}/out is a folder",)),
    "infer --out unwritable": Case(infer_out_in_unwritable_folder, 1,
                                   ("cannot write", "/proc", "not writable")),
    "infer --out ~/...": Case(infer_out_with_tilde, 0, then=_written_under_home),
    "extract --out an image": Case(extract_out_is_an_image, 1, ("one of the inputs",)),
    "export --out a folder": Case(export_out_is_a_folder, 1, ("{tmp}/run is a folder",)),
    "export corrupt head.pt": Case(corrupt_checkpoint, 1,
                                   ("{tmp}/run/head.pt is not a readable checkpoint",
                                    "python -m head.train")),
    "export head.pt of another format": Case(checkpoint_of_another_format, 1,
                                             ("checkpoint format 99", "python -m head.train")),
    "infer metadata not json": Case(model_input_size_not_json, 1,
                                    ("{tmp}/run/model.onnx has damaged metadata",
                                     "head.export")),
    "infer metadata vs graph": Case(model_input_size_differs_from_graph, 1,
                                    ("{tmp}/run/model.onnx", "(128, 96)", "(64, 64)")),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_hostile_input(case: Case, request: pytest.FixtureRequest, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    run_case(case, request, tmp_path, monkeypatch)


def test_every_row_names_a_command() -> None:
    for name in CASES:
        assert name.split()[0] in COMMANDS, name


@pytest.mark.slow
def test_two_extract_processes_leave_one_whole_cache(synthetic: Path, tmp_path: Path) -> None:
    """Two real `python -m extract` processes on one cache: the second refuses at once and
    changes nothing; the first finishes a whole cache (earlier, the second could truncate it)."""
    out = tmp_path / "r50.h5"
    arguments = [sys.executable, "-m", "extract", "--backbone", "resnet50", "--weights", "none",
                 "--data", str(synthetic), "--out", str(out), "--input-size", "96", "96",
                 "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-hflip"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(arguments, cwd=REPO_ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        partial = Path(f"{out}.partial")
        deadline = time.monotonic() + 120
        while not partial.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        second = subprocess.run(arguments, cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        if first.poll() is None:  # the usual case; on a very slow machine it may be done
            assert second.returncode == 1, second.stderr
            assert f"{out} is being written by another process" in second.stderr
            assert f"pid {first.pid}" in second.stderr
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert read_info(out).input_size == (96, 96)
    features = read_features(out, read_keys(out))  # every row readable: a whole file
    assert np.isfinite(features.astype(np.float32)).all()
