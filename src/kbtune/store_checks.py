"""Which embedded Chroma stores passed SQLite's integrity check, and in what state, so an unchanged
store is not read end to end at every open: PRAGMA quick_check over a million-document store (7 GB)
takes 15 s with the file in the page cache and nearly 3 minutes without.

A store's stamp is its file's identity, size, modification and status-change times and SQLite's
change counter (plus the times of a write-ahead log beside it), taken after a clean check and after
the client's own start, which writes to the store every time. Any write through the filesystem
changes the status-change time, which no tool can set back, so a store written or damaged by anyone
since its stamp is checked again. What a stamp cannot see is damage below the filesystem (a failing
disk): deleting the stamps folder forces the full check at the next open.

The same stamps give a store's content epoch (epoch_after_start): an id two kbtune opens share only
when nothing can have been written to the store between them, so a preparation that read every
document under one epoch need not read them again under the same epoch (data.corpus.SourceIndex).

Stamps are kept outside the store, under $XDG_CACHE_HOME/kbtune/checked-stores (~/.cache when unset),
one small file per store: kbtune never writes into a store it only reads."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from kbtune.atomic_files import atomic_file

logger = logging.getLogger(__name__)

# SQLite's companions of a database file: a write-ahead log, and a rollback journal, whose presence
# means a write was interrupted (a hot journal): never trusted, always checked.
WAL_SUFFIX, JOURNAL_SUFFIX = "-wal", "-journal"
# A stamp without a write-ahead log: dev, ino, size, mtime, ctime, change counter, page count.
_PLAIN_STAMP, _COUNTER = 7, 5


def stamps_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kbtune" / "checked-stores"


def _stamp_file(store: Path) -> Path:
    return stamps_dir() / f"{hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:32]}.json"


def stamp(store: Path) -> list[int] | None:
    """The store file's state, or None when it cannot be stamped (missing, or a journal beside it)."""
    if Path(f"{store}{JOURNAL_SUFFIX}").exists():
        return None
    try:
        st = store.stat()
        with open(store, "rb") as f:
            header = f.read(100)
        wal = Path(f"{store}{WAL_SUFFIX}")
        ws = wal.stat() if wal.exists() else None
    except OSError:
        return None
    # The header's change counter and page count: every SQLite write transaction moves the counter,
    # even one landing within the filesystem clock's resolution of the last.
    counters = [int.from_bytes(header[i : i + 4], "big") for i in (24, 28)] if len(header) == 100 else []
    found = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, *counters]
    return found + ([ws.st_ino, ws.st_size, ws.st_mtime_ns, ws.st_ctime_ns] if ws else [])


def _recorded(store: Path) -> dict[str, Any]:
    try:
        recorded = json.loads(_stamp_file(store).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) and recorded.get("path") == str(store.resolve()) else {}


def unchanged_since_check(store: Path) -> bool:
    """Whether `store` is exactly as it was when its last clean check (and open) was stamped."""
    current = stamp(store)
    return current is not None and _recorded(store).get("stamp") == current


def epoch_after_start(store: Path, before: list[int] | None, after: list[int] | None) -> str:
    """The content epoch of `store` after a client's start that found it in state `before` and left it
    in `after`: the recorded one when the store is exactly as the last kbtune open left it and the
    start made the one write Chroma's start makes (a row in its `acquire_write` table, which moves
    the change counter by one), else a new one. So two opens share an epoch only when no document
    can have been written between them; a write landing during this start moves the counter twice.
    A store in write-ahead-log mode, whose header counter does not move with each write, gets a new
    epoch at every start that writes."""
    recorded = _recorded(store)
    one_start_write = (
        before is not None and after is not None and len(before) == len(after) == _PLAIN_STAMP
        and before[:2] == after[:2] and after[_COUNTER] == before[_COUNTER] + 1
    )  # fmt: skip
    # Nothing written at all: a second client in a process whose Chroma system had already started.
    continues = before is not None and recorded.get("stamp") == before and (after == before or one_start_write)
    continues = continues and isinstance(recorded.get("epoch"), str)
    return recorded["epoch"] if continues else uuid.uuid4().hex


# Past this many stamps, those of stores no longer there are removed (test suites make many).
PRUNE_ABOVE = 256


def record_checked(store: Path, epoch: str | None = None) -> list[int] | None:
    """Stamp `store` as checked in its present state (with its content `epoch`); the stamp, or None
    when the store cannot be stamped. A cache: failing to write it costs only a check."""
    current = stamp(store)
    if current is None:
        return None
    try:
        with atomic_file(_stamp_file(store)) as f:
            f.write(json.dumps({"path": str(store.resolve()), "stamp": current, "epoch": epoch}).encode())
        stamps = list(stamps_dir().glob("*.json"))
        if len(stamps) > PRUNE_ABOVE:
            _prune(stamps)
    except OSError as exc:
        logger.debug("could not stamp the checked store %s: %s", store, exc)
    return current


def _prune(stamps: list[Path]) -> None:
    for file in stamps:
        try:
            if not Path(json.loads(file.read_text())["path"]).exists():
                file.unlink(missing_ok=True)
        except (OSError, ValueError, KeyError, TypeError):
            file.unlink(missing_ok=True)


def forget(store: Path) -> None:
    """Drop `store`'s stamp (it failed a check, or is about to be written outside Chroma)."""
    _stamp_file(store).unlink(missing_ok=True)
