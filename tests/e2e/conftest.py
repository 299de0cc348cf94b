"""A real `kbtune serve` process on a free loopback port over a temporary store and the shared test KB.
On teardown it stops the server and any training worker that server started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TERMINAL = ("completed", "failed", "stopped")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    root: Path
    proc: subprocess.Popen
    log: Path

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        return httpx.request(method, self.url + path, timeout=60, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def status(self, session_id: str) -> dict[str, Any]:
        response = self.get("/training/status", params={"session_id": session_id})
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(
        self,
        session_id: str,
        done: Callable[[dict[str, Any]], bool],
        timeout: float = 600,
        every: float = 0.2,
    ) -> dict[str, Any]:
        """Poll the session's status until `done(status)`; fail with the worker's log on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(session_id)
            if done(status):
                return status
            if time.monotonic() > deadline:
                pytest.fail(f"session {session_id} never got there; last status {status['status']}, "
                            f"progress {status.get('progress')}\n{self.worker_log(session_id)[-3000:]}")  # fmt: skip
            time.sleep(every)

    def wait_terminal(self, session_id: str, timeout: float = 600) -> dict[str, Any]:
        return self.wait_for(session_id, lambda s: s["status"] in TERMINAL, timeout)

    def worker_log(self, session_id: str) -> str:
        log = self.root / "sessions" / session_id / "worker.log"
        return log.read_text(errors="replace") if log.exists() else "(no worker log)"

    def sessions_dir(self) -> Path:
        return self.root / "sessions"


def _kill_workers(sessions_dir: Path) -> None:
    """SIGKILL the workers this test's server started and that are still alive (by recorded pid and
    start time, so a reused pid is never hit)."""
    import json

    import psutil

    for info_file in sessions_dir.glob("*/worker.json"):
        info = json.loads(info_file.read_text())
        try:
            process = psutil.Process(info["pid"])
            if info.get("create_time") and abs(process.create_time() - info["create_time"]) < 1.0:
                process.send_signal(signal.SIGKILL)
                process.wait(10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass


def start_server(root: Path, overrides: list[str], *extra_args: str) -> Server:
    port = free_port()
    log = root / "server.log"
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "KBTUNE_ROOT": str(root),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("KBTUNE_API_TOKEN", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kbtune.cli", "serve", "--port", str(port), *extra_args, *overrides],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", root, proc, log)
    import httpx

    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"kbtune serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            pytest.fail(f"kbtune serve did not answer within 180 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
    _kill_workers(server.sessions_dir())


@pytest.fixture(scope="module")
def server_overrides(request, tmp_path_factory, small_kb) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("api")
    # The knowledge evaluation after each training is tested where it is shown (the page's test sets
    # EVALUATE_AFTER_TRAINING); elsewhere it would only slow the API tests down.
    evaluate = getattr(request.module, "EVALUATE_AFTER_TRAINING", False)
    overrides = [
        f"paths.root={root}",
        f"kb.path={small_kb['path']}",
        f"kb.collection={small_kb['collection']}",
        "model=tiny",
        "data.block_size=64",
        # A toy model: fp32 is faster than bf16 autocast on CPU, and exact run to run.
        "trainer.precision=32-true",
        "trainer.log_every_n_steps=5",
        f"eval.after_training={str(evaluate).lower()}",
    ]
    return root, overrides


@pytest.fixture(scope="module")
def server(server_overrides) -> Iterator[Server]:
    root, overrides = server_overrides
    server = start_server(root, overrides)
    try:
        yield server
    finally:
        stop_server(server)
