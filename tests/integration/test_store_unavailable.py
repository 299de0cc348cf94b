"""An MLflow store that is not there, not answering, locked or corrupted: every entry point fails within
seconds with one message naming tracking.uri, creates nothing, and leaves the store's records intact."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kbtune.tracking.reachability import StoreUnavailable, check_store

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=300, cwd=cwd, env={**ENV, "KBTUNE_ROOT": str(cwd)}
    )
    return proc, time.monotonic() - started


def test_kbtune_sessions_names_the_unreachable_uri_within_seconds(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    proc, seconds = run([sys.executable, "-m", "kbtune.cli", "sessions", f"paths.root={tmp_path}",
                         "tracking=server", f"tracking.uri={uri}"], tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"tracking.uri: the MLflow store at {uri} is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Python and kbtune's imports take ~1 s here; MLflow's own retries took about 4 minutes.
    assert seconds < 20
    assert list(tmp_path.iterdir()) == []


def test_train_script_stops_before_any_output_directory(tmp_path, small_kb):
    uri = f"http://127.0.0.1:{closed_port()}"
    proc, seconds = run([sys.executable, str(REPO / "scripts" / "train.py"), f"paths.root={tmp_path}",
                         f"kb.path={small_kb['path']}", f"kb.collection={small_kb['collection']}", "model=tiny",
                         "tracking=server", f"tracking.uri={uri}"], tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"the MLflow store at {uri} is unreachable" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert seconds < 30
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "sessions").exists()


def test_a_server_that_never_answers_fails_after_the_probe_timeout():
    # A listening socket that never accepts: the connection opens (backlog) but no answer comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"{uri} did not answer within 1 s"):
            check_store(uri, timeout=1.0)
        assert time.monotonic() - started < 5


@pytest.fixture
def sqlite_store(tmp_path) -> tuple[str, Path, str]:
    from kbtune.tracking.mlflow_store import MlflowStore

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    store = MlflowStore(uri, artifact_location=str(tmp_path / "artifacts"))
    session = store.create_session({"seed": 1}, "kept")
    return uri, db, session.id


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_store_locked_by_another_process_is_named_and_its_records_survive(sqlite_store):
    from kbtune.tracking.mlflow_store import MlflowStore

    uri, db, session_id = sqlite_store
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()", str(db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"{uri} stayed locked by another process for 1 s"):
            check_store(uri, timeout=1.0)
        assert time.monotonic() - started < 5
    finally:
        holder.stdin.close()
        holder.wait(10)
    check_store(uri, timeout=1.0)
    assert [s.id for s in MlflowStore(uri).list_sessions()] == [session_id]


def test_a_corrupted_store_is_named_and_left_as_it_was(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database" * 200)
    before = _digest(db)
    with pytest.raises(StoreUnavailable, match=f"sqlite:///{db} is not an SQLite database"):
        check_store(f"sqlite:///{db}")
    assert _digest(db) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]
