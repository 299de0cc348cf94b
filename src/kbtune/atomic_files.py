"""Files written whole or not at all. Each is written as a temporary sibling in its own directory,
flushed to disk and renamed over its target, so a kill or a full disk leaves the previous file intact;
a failed write names its file and removes its partial copy, and a killed writer's leftovers are
removed when the next one starts."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

# Temporary names end with this, after the writer's pid: `.<name>.<pid>.kbtune-tmp`.
TEMP_SUFFIX = ".kbtune-tmp"


class WriteFailed(OSError):
    """A file that could not be written (a full disk, permissions); nothing partial was left behind."""

    def __str__(self) -> str:
        return str(self.strerror)


def temp_sibling(path: Path, tag: str = "") -> Path:
    # Beside the target, never in TMPDIR: on another filesystem the final move becomes a copy, and a
    # kill during that copy leaves the target truncated.
    return path.with_name(f".{path.name}{tag}.{os.getpid()}{TEMP_SUFFIX}")


def _fsync_directory(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def failure(path: Path, exc: BaseException) -> WriteFailed:
    """One line naming `path` and the reason (a full disk says so)."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    reason = (
        exc.strerror
        if isinstance(exc, OSError) and exc.strerror
        else (str(exc).splitlines() or [type(exc).__name__])[0]
    )
    hint = "; free some space and try again" if code == errno.ENOSPC else ""
    return WriteFailed(code, f"could not write {path}: {reason}{hint}")


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[BinaryIO]:
    """An open binary file that replaces `path` only once everything was written and synced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, WriteFailed):
            raise failure(path, exc) from exc
        raise
    _fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """A folder to fill whose files appear at `path` together (replacing an older folder there), or
    not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
    except BaseException as exc:
        newest = _newest(tmp)
        failed = path / newest.relative_to(tmp) if newest else path
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, WriteFailed):
            raise failure(failed, exc) from exc
        raise
    if path.exists():
        old = temp_sibling(path, ".old")
        os.replace(path, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def _newest(directory: Path) -> Path | None:
    # Writers such as save_pretrained do not say which file failed: it is the one written last.
    files = [f for f in directory.rglob("*") if f.is_file()]
    return max(files, key=lambda f: f.stat().st_mtime_ns) if files else None


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is starting: nothing of its own is being written yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove the temporary files and folders that writers killed mid-write left in `directory`."""
    removed = []
    for entry in Path(directory).glob(f".*{TEMP_SUFFIX}") if Path(directory).is_dir() else []:
        pid = entry.name.removesuffix(TEMP_SUFFIX).rsplit(".", 1)[-1]
        if pid.isdigit() and _writer_alive(int(pid)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        logger.warning(
            "removed %d unfinished file(s) a killed writer left: %s",
            len(removed),
            ", ".join(str(p) for p in removed),
        )
    return removed
