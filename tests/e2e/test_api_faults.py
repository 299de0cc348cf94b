"""A real `kbtune serve` facing faults: its knowledge base locked by another process (before a start,
and between a start and the worker's first read), cross-site and non-JSON requests, and oversized
bodies and fields. The server answers at once with an error naming the cause, keeps answering
status reads meanwhile, and loses nothing it recorded."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import start_server, stop_server
from tests.integration.test_kb_faults import digests, locked

LOCK_TIMEOUT = 2
TRAINING = {"model": "tiny", "max_steps": 12, "batch_size": 8, "block_size": 64, "seed": 3}


@pytest.fixture(scope="module")
def kb_server(tmp_path_factory, small_kb):
    root = tmp_path_factory.mktemp("faults")
    kb_path = root / "chroma"
    shutil.copytree(small_kb["path"], kb_path)
    overrides = [f"paths.root={root}", f"kb.path={kb_path}", f"kb.collection={small_kb['collection']}",
                 f"kb.lock_timeout={LOCK_TIMEOUT}", "model=tiny", "data.block_size=64",
                 "trainer.precision=32-true", "eval.after_training=false"]  # fmt: skip
    server = start_server(root, overrides)
    server.kb_path = kb_path
    try:
        yield server
    finally:
        stop_server(server)


def _timed_get(server, path: str) -> tuple[int, float]:
    started = time.monotonic()
    response = server.get(path)
    return response.status_code, time.monotonic() - started


def test_a_locked_kb_answers_503_naming_it_and_status_keeps_answering(kb_server):
    store_file = kb_server.kb_path / "chroma.sqlite3"
    result: dict[str, object] = {}

    def start() -> None:
        started = time.monotonic()
        result["response"] = kb_server.post("/training/start", json=TRAINING)
        result["seconds"] = time.monotonic() - started

    with locked(store_file):
        before = digests(kb_server.kb_path)
        thread = threading.Thread(target=start)
        thread.start()
        reads = []
        while thread.is_alive():
            reads.append(_timed_get(kb_server, "/training/sessions"))
            reads.append(_timed_get(kb_server, "/health"))
            time.sleep(0.1)
        thread.join()
        assert digests(kb_server.kb_path) == before
    response = result["response"]
    assert response.status_code == 503, response.text
    assert f"the Chroma store {store_file} is locked by another process" in response.json()["detail"]
    assert result["seconds"] < 2 * LOCK_TIMEOUT + 10
    # The start waited on the lock; the status routes did not wait on the start.
    assert reads and all(code == 200 for code, _ in reads), reads
    assert max(seconds for _, seconds in reads) < 1.5, reads
    assert kb_server.get("/training/sessions").json() == []  # nothing half-recorded


@pytest.mark.slow
def test_a_kb_locked_under_a_starting_worker_fails_its_session_and_resume_completes_it(kb_server):
    store_file = kb_server.kb_path / "chroma.sqlite3"
    response = kb_server.post("/training/start", json=TRAINING)
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    # The worker imports torch for seconds before it reads the KB: the lock is there first.
    with locked(store_file):
        failed = kb_server.wait_terminal(session_id, timeout=180)
    assert failed["status"] == "failed", failed
    assert f"the Chroma store {store_file} is locked by another process" in failed["error"]
    assert "Traceback" not in failed["error"]
    resumed = kb_server.post("/training/start", json={"resume": session_id})
    assert resumed.status_code == 201, resumed.text
    done = kb_server.wait_terminal(session_id, timeout=300)
    assert done["status"] == "completed", done.get("error")
    assert done["progress"]["step"] == TRAINING["max_steps"]


def test_cross_site_and_non_json_requests_are_refused(kb_server):
    url = kb_server.url
    other = "http://127.0.0.1:1"  # another loopback port is another site
    for headers in ({"Origin": other}, {"Origin": "null"}, {"Referer": other + "/attack.html"}):
        response = kb_server.post("/training/stop", headers=headers)
        assert response.status_code == 403 and "cross-origin request refused" in response.json()["detail"]
    # A form's body, even one shaped like JSON (enctype=text/plain), is refused by its type.
    response = kb_server.post(
        "/training/start", content=b'{"resume": "x"}', headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415 and "must be JSON" in response.json()["detail"]
    response = kb_server.post("/training/stop", data={"session_id": "x"})
    assert response.status_code == 415
    # This server's own origin, and clients that send none (curl, scripts), go through.
    assert kb_server.post("/training/stop", headers={"Origin": url}).status_code in (200, 404)
    assert kb_server.post("/training/start", json={"model": "huge"}).status_code == 422
    assert (
        kb_server.post("/training/start", json={"model": "huge"}, headers={"Origin": url}).status_code == 422
    )


def test_oversized_bodies_and_fields_are_refused_at_once_without_being_echoed(kb_server):
    big = b'{"collection": "' + b"x" * 30_000_000 + b'"}'
    started = time.monotonic()
    try:
        response = kb_server.post(
            "/training/start", content=big, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413 and "over the limit" in response.json()["detail"]
        assert len(response.content) < 500
    except httpx.WriteError:
        pass  # the server answered 413 and closed before the client finished sending: also refused
    assert time.monotonic() - started < 5

    def chunks():
        for _ in range(300):
            yield b"x" * 100_000

    response = kb_server.post(
        "/training/start", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    response = kb_server.post("/training/start", json={"collection": "y" * 100_000, "version": "v" * 100_000})
    assert response.status_code == 422
    assert len(response.content) < 2_000
    assert {tuple(item["loc"]) for item in response.json()["detail"]} == {
        ("body", "collection"),
        ("body", "version"),
    }
    response = kb_server.post("/training/start", json={"overrides": ["trainer.max_epochs=" + "9" * 100_000]})
    assert response.status_code == 422 and len(response.content) < 2_000
    assert kb_server.get("/health").status_code == 200
