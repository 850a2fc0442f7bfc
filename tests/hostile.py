"""The machinery of the hostile-input tables (`test_hostile*.py`): a row is a `Case` (the command
its setup builds, the exit code, fragments the message must hold, what must survive, and a check of
the result with `then`); `run_case` runs one and asserts, for every row: the exit code, no
traceback, no exception but SystemExit, every fragment, every kept file unchanged, every gone path
absent, and no temporary file left where the command writes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from extract.extract_features import cli as extract_cli
from extract.synth import cli as synth_cli
from head.export import cli as export_cli
from head.sweep import cli as sweep_cli
from head.train import cli as train_cli
from head.whiten import cli as whiten_cli
from infer.predict import cli as infer_cli

COMMANDS = {"extract": extract_cli, "train": train_cli, "export": export_cli,
            "infer": infer_cli, "synth": synth_cli, "sweep": sweep_cli, "whiten": whiten_cli}
SMALL = ["--input-size", "32", "32", "--device", "cpu", "--workers", "0"]
TEMPORARY = re.compile(r"^\..*\.tmp$")


def digest(path: Path) -> str:
    """Content of a file, or of a whole folder (names and contents), as one sha256."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    entries = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(path)}\t{digest(p)}\n" for p in entries)
    return hashlib.sha256(listing.encode()).hexdigest()


class World:
    """What a row's setup works with: its own folder, copies of the shared fixtures to damage,
    and the list of what must survive."""

    def __init__(self, request: pytest.FixtureRequest, tmp: Path, monkeypatch):
        self.request, self.tmp, self.monkeypatch = request, tmp, monkeypatch
        self.kept: dict[Path, str] = {}
        self.gone: list[Path] = []
        self.watched: list[Path] = [tmp]  # folders that must hold no temporaries afterwards
        self.cleanup: list[Callable[[], None]] = []

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    def copy(self, fixture: str, name: str) -> Path:
        import shutil

        source = Path(self.fixture(fixture))
        target = self.tmp / name
        if source.is_dir():
            return Path(shutil.copytree(source, target))
        return Path(shutil.copy(source, target))

    def keep(self, *paths: Path) -> None:
        for path in paths:
            self.kept[path] = digest(path)

    def data(self) -> Path:
        return self.copy("synthetic", "data")

    def cache(self, data: Path) -> Path:
        """A complete resnet50 cache of `data` at 32 x 32."""
        from extract.extract_features import main as extract

        return extract("resnet50", data, out=self.tmp / "cache" / "r50.h5", weights="none",
                       input_size=(32, 32), device="cpu", batch_size=32, workers=0,
                       hflip=False)


@dataclass(frozen=True)
class Case:
    setup: Callable[[World], list]  # -> [command, *arguments]
    exit_code: int
    says: tuple[str, ...] = ()  # fragments of the output; "{tmp}" is the row's folder
    then: Callable[[World], None] | None = None
    marks: tuple = field(default=())


def run_case(case: Case, request: pytest.FixtureRequest, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> None:
    """Run one row: its command, then every assertion the module docstring lists."""
    world = World(request, tmp_path, monkeypatch)
    try:
        command, *arguments = case.setup(world)
        result = CliRunner().invoke(COMMANDS[command], [str(a) for a in arguments])
    finally:
        for undo in world.cleanup:
            undo()
    text = result.output + (getattr(result, "stderr", "") or "")
    assert result.exit_code == case.exit_code, text
    assert "Traceback" not in text
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                      SystemExit), text
    pid = (tmp_path / "pid").read_text() if (tmp_path / "pid").exists() else ""
    for fragment in case.says:
        assert fragment.format(tmp=tmp_path, pid=pid) in text, (fragment, text)
    for path, before in world.kept.items():
        assert path.exists() and digest(path) == before, f"{path} changed or was lost"
    for path in world.gone:
        assert not path.exists(), path
    for folder in world.watched:
        left = [p for p in folder.rglob(".*") if TEMPORARY.match(p.name)]
        assert left == [], left
    if case.then:
        case.then(world)
