"""A Chroma store locked by another process or corrupted on disk: reading it fails within
kb.lock_timeout with one error naming the store (never a hang, a Rust panic or a missing attribute),
and the store's files are left exactly as they were."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kbtune.knowledge_base import STORE_FILE, KBSettings, KnowledgeBase, KnowledgeBaseUnavailable, probe_store

REPO = Path(__file__).resolve().parents[2]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@contextmanager
def locked(db: Path, how: str = "EXCLUSIVE") -> Iterator[None]:
    """Another process holding a `BEGIN <how>` transaction on `db` until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
         f"c.execute('BEGIN {how}'); print('locked', flush=True); sys.stdin.read()", str(db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()
        holder.wait(10)


@pytest.fixture
def kb_copy(tmp_path, small_kb) -> tuple[Path, str]:
    """A private copy of the test KB (these tests lock and damage it)."""
    path = tmp_path / "chroma"
    shutil.copytree(small_kb["path"], path)
    return path, small_kb["collection"]


@pytest.mark.parametrize("how", ["EXCLUSIVE", "IMMEDIATE"])
def test_a_locked_store_fails_within_the_timeout_naming_it(kb_copy, how):
    path, collection = kb_copy
    settings = KBSettings(path=str(path), collection=collection, lock_timeout=1.0)
    expected = KnowledgeBase.connect(settings).count()
    # A fresh process: Chroma caches its client per path, and it is the first start that writes.
    probe = ("import sys, time; from kbtune.knowledge_base import KBSettings, KnowledgeBase\n"
             "t = time.monotonic()\n"
             "try:\n    KnowledgeBase.connect(KBSettings(path=sys.argv[1], collection=sys.argv[2], lock_timeout=1.0))\n"
             "except Exception as e:\n    print(type(e).__name__, round(time.monotonic() - t, 2), e)\n")  # fmt: skip
    with locked(path / STORE_FILE, how):
        before = digests(path)
        out = subprocess.run([sys.executable, "-c", probe, str(path), collection],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert digests(path) == before
    name, seconds, message = out.stdout.split(" ", 2)
    assert name == "KnowledgeBaseUnavailable", out.stdout + out.stderr[-2000:]
    assert float(seconds) < 5
    assert f"the Chroma store {path / STORE_FILE} is locked by another process" in message
    # Released: every document is still there.
    assert KnowledgeBase.connect(settings).count() == expected


def test_the_train_script_stops_with_the_message_before_any_output_directory(kb_copy, tmp_path):
    path, collection = kb_copy
    root = tmp_path / "project"
    root.mkdir()
    with locked(path / STORE_FILE):
        started = time.monotonic()
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), f"paths.root={root}",
                              f"kb.path={path}", f"kb.collection={collection}", "kb.lock_timeout=1", "model=tiny"],
                             capture_output=True, text=True, timeout=300, cwd=root)  # fmt: skip
        seconds = time.monotonic() - started
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    assert f"the Chroma store {path / STORE_FILE} is locked by another process" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert seconds < 60
    assert not (root / "outputs").exists() and not (root / "sessions").exists()


def _garbage(db: Path) -> None:
    db.write_bytes(b"not a database " * 4000)


def _damaged_page(offset: int):
    def damage(db: Path) -> None:
        data = bytearray(db.read_bytes())
        data[offset : offset + 8192] = b"\xde\xad" * 4096
        db.write_bytes(bytes(data))

    return damage


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_garbage, "file is not a database"),
        (_damaged_page(4096), "database disk image is malformed"),
        (_damaged_page(100_000), "On tree page"),
    ],  # fmt: skip
    ids=["garbage", "second-page", "middle"],
)
def test_a_corrupted_store_is_named_and_left_untouched(kb_copy, damage, reason):
    path, collection = kb_copy
    damage(path / STORE_FILE)
    before = digests(path)
    with pytest.raises(
        KnowledgeBaseUnavailable, match=f"the Chroma store {path / STORE_FILE} is corrupted"
    ) as err:
        list(KnowledgeBase.connect(KBSettings(path=str(path), collection=collection)).iter_documents())
    assert reason in str(err.value)
    assert digests(path) == before


def test_a_store_unchanged_since_its_clean_check_is_not_read_again_and_a_damaged_one_is(kb_copy, tmp_path,
                                                                                        monkeypatch):  # fmt: skip
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, collection = kb_copy
    store, settings = path / STORE_FILE, KBSettings(path=str(path), collection=collection)
    assert probe_store(store, 5.0) is True  # never checked: quick_check runs
    expected = KnowledgeBase.connect(settings).count()  # checked, opened (Chroma writes), stamped
    assert probe_store(store, 5.0) is False
    # A fresh process: its client start writes to the store again, and restamps it.
    opened = subprocess.run([sys.executable, "-c", "import sys; from kbtune.knowledge_base import KBSettings, "
                             "KnowledgeBase; print(KnowledgeBase.connect(KBSettings(path=sys.argv[1], "
                             "collection=sys.argv[2])).count())", str(path), collection],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert opened.stdout.split() == [str(expected)], opened.stderr[-2000:]
    assert probe_store(store, 5.0) is False
    # Damage from outside SQLite, with the modification time put back: still seen, and named.
    st = store.stat()
    _damaged_page(100_000)(store)
    os.utime(store, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = digests(path)
    for _ in range(2):  # and not forgotten after the first failure
        with pytest.raises(KnowledgeBaseUnavailable, match=f"the Chroma store {store} is corrupted"):
            KnowledgeBase.connect(settings)
    assert digests(path) == before


def test_an_sqlite_file_that_is_not_a_chroma_store_is_named(tmp_path):
    import sqlite3

    (tmp_path / "kb").mkdir()
    with sqlite3.connect(tmp_path / "kb" / STORE_FILE) as db:
        db.execute("CREATE TABLE notes (text)")
    with pytest.raises(KnowledgeBaseUnavailable, match="is an SQLite database but not a Chroma store"):
        KnowledgeBase.connect(KBSettings(path=str(tmp_path / "kb"), collection="anything"))
