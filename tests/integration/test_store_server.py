"""The store checks of test_store.py once more against a real `mlflow server` on loopback, over HTTP
(version numbers come back as str there, artifacts go through the server's proxy)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_store import (
    check_aliases,
    check_concurrent_same_label,
    check_concurrent_saves,
    check_invalid_labels,
    check_list_sessions,
    check_load_model,
    check_long_error_is_kept,
    check_round_trip,
    check_session_lifecycle,
    check_versions,
)

pytestmark = pytest.mark.server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """The server spawns job-runner/huey children: stop its whole process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group outlives the leader if children remain
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group
    proc.wait(15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below, after the group is stopped
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp}/db",
           "--artifacts-destination", str(tmp / "art"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not answer /health:\n{(tmp / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield {"url": url, "artifacts": tmp / "art", "tmp": tmp}
    finally:
        stop_group(proc)
        log.close()
    deadline = time.monotonic() + 20
    while (left := group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"mlflow server processes left behind: {left}"


def group_members(pgid: int) -> list[str]:
    """Live (not zombie: those only wait for init to reap them) processes of a process group."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(p.name)
    return out


@pytest.fixture
def store(server, request):
    from kbtune.tracking.mlflow_store import MlflowStore

    # One experiment and registered model per test, so the checks do not see each other's records.
    name = request.node.name.replace("[", "-").replace("]", "")
    return MlflowStore(server["url"], experiment=name, registered_model=name)


def test_server_store_is_over_http(store):
    assert store.tracking_uri.startswith("http://127.0.0.1:")
    session = store.create_session({"a": 1})
    assert store.artifact_uri(session.id).startswith("mlflow-artifacts:")


def test_session_lifecycle(store):
    check_session_lifecycle(store)


def test_long_error_text_is_kept(store):
    check_long_error_is_kept(store)


def test_session_round_trip(store):
    check_round_trip(store)


def test_list_sessions_filter_and_order(store):
    check_list_sessions(store)


def test_versions(store, tmp_path):
    check_versions(store, tmp_path)


def test_load_model_and_unknown_version(store, tmp_path):
    check_load_model(store, tmp_path)


def test_aliases(store, tmp_path):
    check_aliases(store, tmp_path)


def test_invalid_labels_write_nothing(store, server, tmp_path):
    check_invalid_labels(store, tmp_path, server["artifacts"])


def test_eight_concurrent_saves(store, server, tmp_path):
    check_concurrent_saves(store, tmp_path, server["artifacts"])


def test_concurrent_saves_of_one_label(store, tmp_path):
    check_concurrent_same_label(store, tmp_path)
