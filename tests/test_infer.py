"""`python -m infer`: the submission (checked by a validator and against a brute-force ranking),
the validation report (the figures head.train reported, each image embedded once), one-to-one
assignment and where it is refused, no torch, the provider rules, and the clear errors that write
nothing."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import REPO_ROOT, TRAIN_PAIRS, TRAIN_QUERIES, TRAIN_SETTINGS, invoke_cli

from extract.synth import plan_pairs
from infer import predict
from infer.model_info import ModelInfo
from infer.predict import cli
from infer.scoring import DEFAULT_ASSIGN, DEFAULT_TEMPERATURE, assign, ranking_metrics
from tll.data import CANDIDATE_COLUMNS, load_image, read_dataset, validation_split

# the rules for a machine without a GPU; on one with a working CUDA provider they differ
no_gpu = pytest.mark.skipif(Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists(),
                            reason="checks the provider rules of a machine without a GPU")

# Runs infer's command with torch and torchvision unimportable. (Setting sys.modules["torch"] to
# None instead breaks scipy, which infer.scoring imports: scipy's array-api helpers look up
# sys.modules["torch"] and call getattr on it.)
WITHOUT_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} is not available here")
        return None

sys.meta_path.insert(0, NoTorch())
try:
    from infer.predict import cli
    cli()
finally:
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision"))
    print("torch modules loaded:", loaded)
"""


def invoke(*arguments):
    return invoke_cli(cli, *arguments)


def run_infer(code: str, *arguments) -> subprocess.CompletedProcess:
    """`python -c CODE ARGUMENTS` in a fresh interpreter at the repository root."""
    return subprocess.run([sys.executable, "-c", code, *map(str, arguments)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def written(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="session")
def model(exported_run: Path) -> Path:
    return exported_run / "model.onnx"


@pytest.fixture(scope="module")
def submission(model: Path, train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`main`, not the command: a command run here would leave its log handler to every later
    test (the logger is reset to its state before each test, and this runs before them)."""
    out = tmp_path_factory.mktemp("submission") / "submission.csv"
    # batches of 7 and a last, shorter one
    assert predict.main(model, train_data, out=out, device="cpu", batch_size=7) == out
    return out


def brute_force_scores(model: Path, paths_of_queries: list[tuple[Path, list[Path]]],
                       input_size: tuple[int, int]) -> np.ndarray:
    """Each query's cosine with each candidate, one image at a time through ONNX Runtime."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def embed(path: Path) -> np.ndarray:
        vector = session.run(["embedding"], {"image": load_image(path, input_size)[None]})[0][0]
        return vector / np.linalg.norm(vector)

    cache: dict[Path, np.ndarray] = {}
    rows = []
    for left, candidates in paths_of_queries:
        for path in (left, *candidates):
            if path not in cache:
                cache[path] = embed(path)
        rows.append([float(cache[left] @ cache[c]) for c in candidates])
    return np.array(rows)


# --- the submission ----------------------------------------------------------------------------


def test_submission_passes_the_validator(submission: Path, train_data: Path) -> None:
    with open(train_data / "test_candidates.csv", newline="") as f:
        expected_lefts = [row["left"] for row in csv.DictReader(f)]
    with open(submission, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["left"] + [f"c{i}" for i in range(20)] == CANDIDATE_COLUMNS
    assert [row[0] for row in rows[1:]] == expected_lefts  # one row per query, same order
    for row in rows[1:]:
        assert len(row) == 21
        assert all(math.isfinite(float(value)) for value in row[1:])
    assert [p.name for p in submission.parent.iterdir()] == ["submission.csv"]  # no temp file


def test_submission_agrees_with_brute_force(submission: Path, train_data: Path,
                                            model: Path) -> None:
    dataset = read_dataset(train_data)
    with open(submission, newline="") as f:
        got = np.array([[float(v) for v in row[1:]] for row in list(csv.reader(f))[1:]])
    queries = [(dataset.images[q.left], [dataset.images[c] for c in q.candidates])
               for q in dataset.test_queries]
    cosines = brute_force_scores(model, queries, (64, 64))
    # by default the whole pool is re-scored one-to-one, as the model's training chose
    candidates = np.array([q.candidates for q in dataset.test_queries])
    expected = assign(cosines, candidates, DEFAULT_ASSIGN, DEFAULT_TEMPERATURE)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    # the model ranks: on synthetic look-alikes the true right is usually in the top 2
    truth = [q.candidates.index(f"test/right/{right}") for q, right in
             zip(dataset.test_queries, _test_answers(train_data), strict=True)]
    top2 = np.argsort(-got, axis=1)[:, :2]
    assert np.mean([t in row for t, row in zip(truth, top2, strict=True)]) > 0.3


def _test_answers(data: Path) -> list[str]:
    """The true right of each test query, from the generator's plan (the CSV does not say)."""
    _, test = plan_pairs(TRAIN_PAIRS, TRAIN_QUERIES, seed=0)
    return [pair.right_id for pair in test]  # sorted by left id, like test_candidates.csv


# --- the validation report ---------------------------------------------------------------------


def test_val_split_reproduces_training(model: Path, exported_run: Path, train_data: Path,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedded: list[list[Path]] = []
    real_embed = predict.embed_images

    def counting_embed(session, paths, *args, **kwargs):
        embedded.append(list(paths))
        return real_embed(session, paths, *args, **kwargs)

    rows_run = []
    real_open = predict.open_session

    class CountingSession:
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds):
            rows_run.append(len(feeds["image"]))
            return self.session.run(names, feeds)

    def counting_open(*args, **kwargs):
        session, info = real_open(*args, **kwargs)
        return CountingSession(session), info

    monkeypatch.setattr(predict, "embed_images", counting_embed)
    monkeypatch.setattr(predict, "open_session", counting_open)
    out = tmp_path / "report.json"
    result = invoke("--onnx", model, "--data", train_data, "--split", "val", "--out", out,
                    "--device", "cpu", "--batch-size", "16")
    assert result.exit_code == 0, result.text

    summary = json.loads((exported_run / "config.json").read_text())
    report = json.loads(out.read_text())
    queries = validation_split(read_dataset(train_data), TRAIN_SETTINGS["val_fraction"],
                               TRAIN_SETTINGS["seed"])[1]
    assert len(queries) == 60
    # head.train scored float16 cached maps, infer the float32 trunk in ONNX Runtime: the scores
    # differ by up to 2e-4 here, while the nearest rank boundary of a true candidate is 6e-4 away
    assert report["metrics"]["top2"] == summary["best"]["top2"]
    assert json.loads(ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
                      .get_modelmeta().custom_metadata_map["val_metrics"])["top2"] \
        == summary["best"]["top2"]
    assert report["metrics"]["top1"] == pytest.approx(summary["best"]["top1"], abs=1e-12)
    assert len(report["queries"]) == len(queries)
    for entry, query in zip(report["queries"], queries, strict=True):
        assert entry["left"] == query.left.rsplit("/", 1)[1]
        assert entry["candidates"] == [c.rsplit("/", 1)[1] for c in query.candidates]
        assert entry["truth"] == query.truth
        assert len(entry["scores"]) == 20 and all(math.isfinite(s) for s in entry["scores"])
    top2 = np.mean([e["truth"] in np.argsort(e["scores"])[::-1][:2] for e in report["queries"]])
    assert top2 == pytest.approx(report["metrics"]["top2"])

    # each unique image once: 60 lefts and 60 held-out rights (each the truth of one query)
    assert len(embedded) == 1
    unique = {q.left for q in queries} | {c for q in queries for c in q.candidates}
    assert len(unique) == 2 * len(queries)
    assert len(embedded[0]) == len(set(embedded[0])) == len(unique)
    assert sum(rows_run) == len(unique) and max(rows_run) <= 16
    # the default re-scoring, as training reported it (float16 maps there, float32 here)
    assert report["assignment"]["method"] == DEFAULT_ASSIGN
    assert report["assignment"]["temperature"] == DEFAULT_TEMPERATURE
    assert report["assignment"]["metrics"]["top2"] == pytest.approx(
        summary["best"]["top2_assigned"], abs=1 / 60 + 1e-9)
    assert written(tmp_path) == ["report.html", "report.json"]  # the page beside the report
    page = (tmp_path / "report.html").read_text()
    assert page.count('<div class="q" id=') == len(queries)
    # the model's maps, from the same single pass: every figure has both overlays
    assert page.count("<figure") == page.count('<canvas class="a">') \
        == page.count('<canvas class="s">') > 0


def read_submission(path: Path) -> tuple[list[str], np.ndarray]:
    """The header and the scores (Q, 20) of a submission that passes the validator's checks."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == CANDIDATE_COLUMNS and all(len(row) == 21 for row in rows[1:])
    scores = np.array([[float(v) for v in row[1:]] for row in rows[1:]])
    assert np.isfinite(scores).all()
    return [row[0] for row in rows[1:]], scores


# --- one-to-one assignment ---------------------------------------------------------------------


def test_val_split_with_sinkhorn(model: Path, train_data: Path, tmp_path: Path) -> None:
    out, page = tmp_path / "report.json", tmp_path / "pages" / "val.html"
    result = invoke("--onnx", model, "--data", train_data, "--split", "val", "--out", out,
                    "--device", "cpu", "--assign", "sinkhorn", "--assign-temperature", "0.1",
                    "--report", page)
    assert result.exit_code == 0, result.text
    report = json.loads(out.read_text())
    plain = np.array([e["scores"] for e in report["queries"]])  # (60, 20)
    assigned = np.array([e["assigned_scores"] for e in report["queries"]])
    truth = np.array([e["truth"] for e in report["queries"]])
    assert report["assignment"]["method"] == "sinkhorn"
    assert report["assignment"]["temperature"] == 0.1
    assert report["metrics"] == pytest.approx(ranking_metrics(plain, truth))
    assert report["assignment"]["metrics"] == pytest.approx(ranking_metrics(assigned, truth))
    # balanced over the whole pool: each query's and each image's probabilities sum to 1
    probabilities = np.exp(assigned)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-3)
    per_image: dict[str, float] = {}
    for entry, row in zip(report["queries"], probabilities, strict=True):
        for image, p in zip(entry["candidates"], row, strict=True):
            per_image[image] = per_image.get(image, 0.0) + p
    assert len(per_image) == 60
    np.testing.assert_allclose(list(per_image.values()), 1, atol=1e-3)
    assert "after sinkhorn, temperature 0.1 assignment: top-1" in result.text
    assert written(tmp_path) == ["pages", "report.json"] and written(page.parent) == ["val.html"]


def test_submission_with_hungarian(model: Path, train_data: Path, submission: Path,
                                   tmp_path: Path) -> None:
    out, page = tmp_path / "submission.csv", tmp_path / "test.html"
    result = invoke("--onnx", model, "--data", train_data, "--out", out, "--device", "cpu",
                    "--assign", "hungarian", "--report", page)
    assert result.exit_code == 0, result.text
    lefts, lifted = read_submission(out)
    plain_out = tmp_path / "plain" / "submission.csv"
    assert invoke("--onnx", model, "--data", train_data, "--out", plain_out, "--device", "cpu",
                  "--assign", "none").exit_code == 0
    plain_lefts, plain = read_submission(plain_out)
    assert lefts == plain_lefts
    # each query's first choice is a different image; the other 19 keep their plain scores
    dataset = read_dataset(train_data)
    first = lifted.argmax(axis=1)
    chosen = [q.candidates[k] for q, k in zip(dataset.test_queries, first, strict=True)]
    assert len(set(chosen)) == len(chosen) == 20
    others = np.arange(20) != first[:, None]
    np.testing.assert_array_equal(lifted[others], plain[others])
    assert page.read_text().count('<div class="q" id=') == 20
    assert written(tmp_path) == ["plain", "submission.csv", "test.html"]


def test_assignment_where_the_pool_is_not_one_to_one(model: Path, dataset_copy: Path,
                                                     tmp_path: Path) -> None:
    """20 right images for 19 queries: an explicit --assign is refused before any work, and a
    model whose default would assign falls back to plain scores, saying so once."""
    candidates_csv = dataset_copy / "test_candidates.csv"
    candidates_csv.write_text("".join(candidates_csv.read_text().splitlines(True)[:-1]))
    proto = onnx.load(str(model))
    next(p for p in proto.metadata_props if p.key == "assign").value = "sinkhorn"
    assigning = tmp_path / "assigning.onnx"
    onnx.save_model(proto, str(assigning))
    # first, while this test's command output still carries the log (see `_fresh_logger`)
    defaulted = tmp_path / "defaulted.csv"
    result = invoke("--onnx", assigning, "--data", dataset_copy, "--out", defaulted,
                    "--device", "cpu")
    assert result.exit_code == 0, result.text
    assert result.output.count("no sinkhorn assignment (the default) for this split: the pool "
                               "has 20 candidate images for 19 queries") == 1  # once
    plain = tmp_path / "plain.csv"
    assert invoke("--onnx", model, "--data", dataset_copy, "--out", plain, "--device", "cpu",
                  "--assign", "none").exit_code == 0
    assert defaulted.read_bytes() == plain.read_bytes()

    out = tmp_path / "out" / "submission.csv"
    for method in ("sinkhorn", "hungarian"):
        result = invoke("--onnx", model, "--data", dataset_copy, "--out", out, "--device", "cpu",
                        "--assign", method)
        assert_refused(result, f"--assign {method} needs every candidate image to be the match",
                       "the pool has 20 candidate images for 19 queries")
        assert not out.parent.exists()


# --- no torch, providers -----------------------------------------------------------------------


def test_infer_runs_without_torch(model: Path, train_data: Path, submission: Path,
                                  tmp_path: Path) -> None:
    out = tmp_path / "submission.csv"
    process = run_infer(WITHOUT_TORCH, "--onnx", model, "--data", train_data, "--out", out,
                        "--device", "cpu")
    assert process.returncode == 0, process.stderr
    assert "torch modules loaded: []" in process.stdout
    assert out.read_bytes() == submission.read_bytes()


@no_gpu
def test_device_cuda_without_gpu_is_a_clear_error(model: Path, train_data: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "out" / "submission.csv"
    process = run_infer("from infer.predict import cli; cli()", "--onnx", model, "--data",
                        train_data, "--out", out, "--device", "cuda")
    assert process.returncode == 1, process.stderr
    assert "Error: --device cuda asked for" in process.stderr and "CUDA" in process.stderr
    assert "Traceback" not in process.stderr
    assert not out.parent.exists()


@no_gpu
def test_device_auto_runs_on_cpu_quietly(model: Path, train_data: Path, submission: Path,
                                         tmp_path: Path) -> None:
    out = tmp_path / "submission.csv"
    process = run_infer("from infer.predict import cli; cli()", "--onnx", model, "--data",
                        train_data, "--out", out, "--device", "auto")
    assert process.returncode == 0, process.stderr
    provider_lines = [line for line in process.stderr.splitlines()
                      if "ExecutionProvider" in line]
    assert len(provider_lines) == 1 and "CPUExecutionProvider" in provider_lines[0], \
        process.stderr
    assert "[E:onnxruntime" not in process.stderr
    assert "Failed to load library" not in process.stderr
    assert out.read_bytes() == submission.read_bytes()


def test_device_cpu_works(model: Path, train_data: Path, submission: Path,
                          tmp_path: Path) -> None:
    out = tmp_path / "submission.csv"
    result = invoke("--onnx", model, "--data", train_data, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.text
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert "on CPUExecutionProvider" in result.text
    assert out.read_bytes() == submission.read_bytes()  # the batch size changes nothing


# --- clear errors, nothing written -------------------------------------------------------------


def assert_refused(result, *phrases: str) -> None:
    assert result.exit_code == 1, result.text
    for phrase in phrases:
        assert phrase in result.text, (phrase, result.text)
    assert "Traceback" not in result.text


def test_corrupt_model_is_named(train_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "out" / "submission.csv"
    result = invoke("--onnx", bad, "--data", train_data, "--out", out, "--device", "cpu")
    assert_refused(result, f"{bad} is not a usable ONNX model")
    assert not out.parent.exists()

    result = invoke("--onnx", tmp_path / "none.onnx", "--data", train_data, "--out", out)
    assert_refused(result, f"model {tmp_path / 'none.onnx'} does not exist")
    assert not out.parent.exists()


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_onnxruntime_without_cuda_provider(model: Path, train_data: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """With plain onnxruntime (no CUDA provider at all): cuda is refused, auto runs on the CPU."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    out = tmp_path / "out" / "submission.csv"
    result = invoke("--onnx", model, "--data", train_data, "--out", out, "--device", device)
    if device == "cuda":
        assert_refused(result, "this onnxruntime has no CUDA provider")
        assert not out.parent.exists()
    else:
        assert result.exit_code == 0, result.text
        assert "on CPUExecutionProvider" in result.text and out.is_file()


def test_unreadable_image_is_named(model: Path, dataset_copy: Path, tmp_path: Path) -> None:
    with open(dataset_copy / "test_candidates.csv", newline="") as f:
        broken_id = list(csv.reader(f))[2][0]  # the left of the second query
    image = dataset_copy / "test" / "left" / f"{broken_id}.jpg"
    image.write_bytes(image.read_bytes()[:300])  # truncated
    out = tmp_path / "out" / "submission.csv"
    result = invoke("--onnx", model, "--data", dataset_copy, "--out", out, "--device", "cpu")
    assert_refused(result, f"{image}: cannot read image", "replace it with a readable copy")
    assert not out.parent.exists() or written(out.parent) == []


def test_model_without_input_size_is_refused(model: Path, train_data: Path,
                                             tmp_path: Path) -> None:
    proto = onnx.load(str(model))
    del proto.metadata_props[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save_model(proto, str(stripped))
    out = tmp_path / "out" / "submission.csv"
    result = invoke("--onnx", stripped, "--data", train_data, "--out", out, "--device", "cpu")
    assert_refused(result, str(stripped), "input_size")
    assert not out.parent.exists()


def test_missing_image_is_named(model: Path, dataset_copy: Path, tmp_path: Path) -> None:
    with open(dataset_copy / "test_candidates.csv", newline="") as f:
        rows = list(csv.reader(f))
    missing = rows[3][5]  # line 4, column c4
    (dataset_copy / "test" / "right" / f"{missing}.jpg").unlink()
    out = tmp_path / "out" / "submission.csv"
    result = invoke("--onnx", model, "--data", dataset_copy, "--out", out, "--device", "cpu")
    assert_refused(result, f"id '{missing}' has no image file",
                   str(dataset_copy / "test_candidates.csv"))
    assert not out.parent.exists()


def test_val_split_of_another_dataset_is_refused(model: Path, synthetic: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "out" / "report.json"
    result = invoke("--onnx", model, "--data", synthetic, "--split", "val", "--out", out,
                    "--device", "cpu")
    assert_refused(result, "trained on another dataset", str(synthetic),
                   "validation split cannot be rebuilt")
    assert not out.parent.exists()


# --- the real data -----------------------------------------------------------------------------


@pytest.mark.real
def test_real_validation_split_has_160_queries(real_data: Path) -> None:
    """The split infer rebuilds for a model trained with head.train's defaults (what head.export
    writes: val_fraction and split_seed as text)."""
    from head.config import TrainConfig

    defaults = TrainConfig(caches=("",), name="")
    info = ModelInfo.from_props(Path("model.onnx"), {
        "input_size": "[245, 200]", "val_fraction": str(defaults.val_fraction),
        "split_seed": str(defaults.seed)})
    dataset = read_dataset(real_data)
    assert len(dataset.train_pairs) == 1600 and len(dataset.test_queries) == 2000
    pairs, queries = validation_split(dataset, info.val_fraction, info.split_seed)
    assert len(queries) == 160 and len(pairs) == 1440
    rights = [q.candidates[q.truth] for q in queries]
    assert len(set(rights)) == 160  # each held-out right is the truth of exactly one query
    assert all(len(set(q.candidates)) == 20 and set(q.candidates) <= set(rights)
               for q in queries)
    # the same split every time
    assert validation_split(dataset, info.val_fraction, info.split_seed)[1] == queries
