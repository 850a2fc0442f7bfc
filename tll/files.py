"""Writing outputs without losing anything: the one atomic-output helper, the checks an output
path gets before any work starts, the leftovers of killed runs, and the lock of a cache's writer.

Every output appears under its final name whole or not at all: it is written to a temporary
sibling ``.<name>.<host>-<pid>.<random>.tmp`` (a file or a folder) and renamed into place. The
host and pid in the name let a later run remove what a killed one left, and only that: the
temporaries of a live process, here or on another machine sharing the folder, are never touched.
Nothing outside the output itself is ever deleted or replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from tll import UserError, logger

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TEMPORARY = re.compile(
    r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[0-9a-f]{6}\.tmp$")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# below this many free bytes after a failed write, the disk being full is the likely cause
_NEARLY_FULL = 1 << 20


def temporary_sibling(path: Path) -> Path:
    """A fresh temporary name next to `path`, marked with this host and process."""
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(3)}.tmp")


def no_link(path: Path) -> Path:
    """`path`, a name this tool keeps for its own working file (a temporary, partial, shard or
    lock file), with any symbolic link found there removed (the link alone, never what it
    points to): the file is then created afresh, so the tool never writes through a link."""
    if path.is_symlink():
        target = os.readlink(path)
        path.unlink()
        logger.warning("removed the link %s (to %s, left as it is): tll never writes its "
                       "working files through a link", path, target)
    return path


def remove_leftovers(folder: Path) -> None:
    """Remove the temporaries in `folder` that killed processes of this host left."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if not match or match["host"] != _HOST:
            continue
        if _process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        logger.info("removed %s, left behind by a run that was killed", entry)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and someone else's
        return True
    return True


def check_output(path: Path, what: str, inputs: Iterable[Path] = (), folder: bool = False,
                 foreign: Callable[[Path], str | None] | None = None) -> None:
    """Refuse, before any work starts, an output that cannot or must not be written: a folder
    where a file is wanted (or the reverse), a place that cannot be written, one of the inputs,
    or an existing file that `foreign` describes (it says what the file is where it is not an
    output of this tool, e.g. "not a tll cache (a binary file)"; None where it is one, which a
    rerun may replace)."""
    if not folder and path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    resolved = os.path.realpath(path)  # unlike Path.resolve, never raises on a link loop
    for source in inputs:
        if resolved == os.path.realpath(source):
            raise UserError(f"{what} {path} is one of the inputs ({source}); choose another path")
    if foreign and path.is_file() and (kind := foreign(path)):
        # not even --overwrite replaces it: that is for the tool's own outputs
        raise UserError(f"{what} {path} exists and is {kind}; tll replaces only its own "
                        "outputs: give another path, or move that file away first")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {what} {path}: {parent} is a file, not a folder")
    try:  # os.access says yes to root even on a read-only mount: try it for real
        probe = temporary_sibling(parent / "probe")
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write {what} {path}: {parent} is not writable "
                        f"({error.strerror or error})") from None


def file_start(path: Path, size: int = 4096) -> bytes:
    """The first `size` bytes of the file `path` (b"" where it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def file_kind(start: bytes) -> str:
    """What a file is, by its first bytes, for a message about a file that is not ours."""
    if start.startswith(HDF5_SIGNATURE):
        return "an HDF5 file"
    if b"\0" in start:
        return "a binary file"
    first = (start.decode(errors="replace").splitlines() or [""])[0]
    return f"a text file beginning {first[:40]!r}"


def is_disk_full(error: BaseException, where: Path) -> bool:
    """Whether a failed write most likely ran out of space. Some writers (torch.save) report it
    as a RuntimeError without an errno, so the free space is looked at too."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(error):
        return True
    try:
        return shutil.disk_usage(where).free < _NEARLY_FULL
    except OSError:
        return False


def no_space(path: Path) -> UserError:
    return UserError(f"no space left on device while writing {path}; free some space and rerun")


@contextlib.contextmanager
def atomic_output(path: Path, folder: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write the output `path` to (a file, or a folder made here);
    on success it is renamed to `path`, on any error removed. An existing `path` is replaced
    only if `overwrite` (a file always is: check first with `check_output` and the caller's
    own rule); a replaced folder is moved aside and deleted only once the new one is in place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)
    tmp = no_link(temporary_sibling(path))
    try:
        if folder:
            tmp.mkdir()
        yield tmp
        if folder:
            _move_folder_into_place(tmp, path, overwrite)
        else:
            os.replace(tmp, path)
    except Exception as error:
        if not isinstance(error, UserError) and is_disk_full(error, path.parent):
            raise no_space(path) from None
        raise
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path: Path, write: Callable[[IO[str]], object]) -> Path:
    """Call `write(file)` on a UTF-8 text file that appears at `path` only once it is whole."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)
    return path


def _move_folder_into_place(new: Path, path: Path, overwrite: bool) -> None:
    try:
        os.rename(new, path)  # atomic where `path` is absent or an empty folder, else refused
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
    if not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    old = temporary_sibling(path)
    os.rename(path, old)
    os.rename(new, path)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()  # a link to a folder elsewhere: the link goes, what it pointed to stays


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold the lock file ``.<name>.lock`` beside `path` while writing it. A second writer fails
    at once, naming the process that holds it, and changes nothing. The (hidden, empty) lock
    file stays after release: deleting it would let two processes lock two different files of
    the same name."""
    from filelock import FileLock, Timeout

    lock_path = no_link(lock_file(path))
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{path} is being written by another process ({lock_holder(lock_path)}); "
                        "wait for it to finish or stop it, then rerun") from None
    try:
        yield
    finally:
        lock.release()


def lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def lock_holder(lock_path: Path) -> str:
    """`pid N: <command>` of the process holding a lock on `lock_path`, where the system says
    (Linux's /proc/locks), else "pid unknown"."""
    try:
        inode = lock_path.stat().st_ino
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # 1: FLOCK  ADVISORY  WRITE 5400 fe:00:2146324 0 EOF
                if len(fields) > 5 and fields[5].rsplit(":", 1)[-1] == str(inode):
                    pid = fields[4]
                    words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    return f"pid {pid}: {b' '.join(words).decode(errors='replace').strip()}"
    except OSError:
        pass
    return "pid unknown"
