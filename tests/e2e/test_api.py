"""The training API served by a real `kbtune serve` (uvicorn) on loopback, with real worker processes
training `model=tiny` on the shared test KB: start, progress, graceful stop, exact resume, one
training at a time, a killed worker, the API's validation and security answers, and generation
streamed as server-sent events from a trained version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.e2e.conftest import TERMINAL

# About 140 optimizer steps (two epochs of the test KB at batch 8): long enough to be stopped
# mid-epoch on a fast machine, validated every 20 steps so the chart has a validation curve.
TRAINING = {
    "model": "tiny",
    "max_epochs": 2,
    "batch_size": 8,
    "block_size": 64,
    "val_check_interval": 20,
    "seed": 7,
}


def _train_points(status):
    return status["progress"]["history"]["train"]


# -- validation, lookups and security (no training) -----------------------------------------------
def test_invalid_settings_get_422_with_a_message_per_field(server):
    response = server.post(
        "/training/start", json={"model": "tiny", "max_epochs": 0, "learning_rate": -1.0, "block_size": 512}
    )
    assert response.status_code == 422
    by_field = {item["loc"][-1]: item["msg"] for item in response.json()["detail"]}
    # The texts `kbtune start` / scripts/train.py print for the same overrides.
    assert by_field["max_epochs"].startswith("trainer.max_epochs: must be >= 1")
    assert by_field["learning_rate"].startswith("optim.learning_rate: must be > 0")
    assert by_field["block_size"].startswith("data.block_size: 512 exceeds")
    response = server.post("/training/start", json={"batch_size": "8", "model": "huge", "epochs": 2})
    assert response.status_code == 422
    fields = {item["loc"][-1] for item in response.json()["detail"]}
    assert fields == {"batch_size", "model", "epochs"}
    assert server.get("/training/sessions").json() == []  # nothing was recorded


def test_unknown_collection_and_unsafe_text_are_rejected(server):
    response = server.post("/training/start", json={"collection": "no-such-collection"})
    assert response.status_code == 422
    (item,) = response.json()["detail"]
    assert item["loc"][-1] == "collection" and "'no-such-collection' does not exist" in item["msg"]
    # OmegaConf would resolve an interpolation: the API must not let a client read the environment.
    response = server.post("/training/start", json={"collection": "${oc.env:HOME}"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "collection"


def test_unknown_session_ids_get_404_naming_them(server):
    for method, path in (("GET", "/training/status"), ("POST", "/training/stop")):
        response = server.request(method, path, params={"session_id": "0123456789abcdef0123456789abcdef"})
        assert response.status_code == 404
        assert "0123456789abcdef0123456789abcdef" in response.json()["detail"]
    response = server.post("/training/start", json={"resume": "0123456789abcdef0123456789abcdef"})
    assert response.status_code == 404 and "0123456789abcdef0123456789abcdef" in response.json()["detail"]
    response = server.get("/training/status", params={"session_id": "../../etc/passwd"})
    assert response.status_code == 404


def test_page_and_listings_are_served(server):
    page = server.get("/")
    assert page.status_code == 200 and "<title>kbtune" in page.text
    assert "http" not in "".join(line for line in page.text.splitlines() if "src=" in line or "href=" in line)
    assert server.get("/web/app.js").status_code == 200
    assert isinstance(server.get("/models/versions").json(), list)


def test_a_request_for_another_host_name_is_refused(server):
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not drive a loopback server.
    assert server.get("/training/sessions", headers={"Host": "evil.example"}).status_code == 400


def test_serve_refuses_a_public_bind_without_a_token(server_overrides):
    _, overrides = server_overrides
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("KBTUNE_API_TOKEN", None)
    out = subprocess.run([sys.executable, "-m", "kbtune.cli", "serve", "--host", "0.0.0.0", "--port", "1", *overrides],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 2
    assert "refusing to serve on 0.0.0.0 without an API token" in out.stderr


def test_a_token_guards_every_api_route(server_overrides):
    from fastapi.testclient import TestClient

    from kbtune.api import create_app

    _, overrides = server_overrides
    client = TestClient(create_app(overrides, token="s3cret"))
    assert client.get("/training/sessions").status_code == 401
    assert client.get("/training/sessions", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/training/stop", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/training/sessions", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/models/versions", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# -- trainings --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stop_and_resume_give_the_losses_of_an_uninterrupted_run(server):
    # The reference: the same settings and seed, never interrupted.
    response = server.post("/training/start", json=TRAINING)
    assert response.status_code == 201, response.text
    reference = server.wait_terminal(response.json()["id"])
    assert reference["status"] == "completed", reference.get("error")
    expected = _train_points(reference)
    assert len(expected) == reference["progress"]["total_steps"] > 60
    assert reference["progress"]["percent"] == 100.0

    response = server.post("/training/start", json=TRAINING)
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    running = server.wait_for(session_id, lambda s: (s.get("progress") or {}).get("step", 0) > 0)
    assert running["status"] == "running" and 0 < running["progress"]["percent"] < 100
    asked = time.monotonic()
    response = server.post("/training/stop", params={"session_id": session_id})
    assert response.status_code == 200 and response.json()["stop_requested"] is True
    stopped = server.wait_terminal(session_id, timeout=120)
    latency = time.monotonic() - asked
    print(
        f"\nPOST /training/stop -> status stopped: {latency:.2f} s (stopped at step {stopped['progress']['step']})"
    )
    assert stopped["status"] == "stopped", stopped.get("error")
    assert latency < 15
    assert (
        stopped["has_checkpoint"]
        and (server.sessions_dir() / session_id / "checkpoints" / "last.ckpt").exists()
    )
    stop_step = stopped["progress"]["step"]
    assert 0 < stop_step < len(expected), "the stop must land mid-run for this test to mean anything"
    # Stopping a stopped session changes nothing.
    again = server.post("/training/stop", params={"session_id": session_id})
    assert (
        again.status_code == 200
        and again.json()["status"] == "stopped"
        and again.json()["completed_at"] == stopped["completed_at"]
    )

    response = server.post("/training/start", json={"resume": session_id})
    assert response.status_code == 201, response.text
    assert response.json()["id"] == session_id
    resumed = server.wait_terminal(session_id)
    assert resumed["status"] == "completed", resumed.get("error")
    got = _train_points(resumed)
    assert [step for step, _ in got] == [step for step, _ in expected]
    for (step, loss), (_, want) in zip(got, expected, strict=True):
        assert loss == pytest.approx(want, rel=1e-5, abs=1e-6), f"step {step} (stopped after {stop_step})"
    got_val, want_val = resumed["progress"]["history"]["val"], reference["progress"]["history"]["val"]
    assert [step for step, _ in got_val] == [step for step, _ in want_val]
    assert [loss for _, loss in got_val] == pytest.approx([loss for _, loss in want_val], rel=1e-5)
    assert resumed["metrics"]["val/loss"] == pytest.approx(reference["metrics"]["val/loss"], rel=1e-5)
    versions = server.get("/models/versions").json()
    assert {v["training_session_id"] for v in versions} >= {reference["id"], session_id}, versions


@pytest.mark.slow
def test_two_starts_at_once_give_one_training_and_one_409(server):
    results = []
    barrier = threading.Barrier(2)

    def start():
        barrier.wait()
        results.append(server.post("/training/start", json={**TRAINING, "max_epochs": 50}))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 409], [r.text for r in results]
    started = next(r for r in results if r.status_code == 201).json()
    refused = next(r for r in results if r.status_code == 409).json()
    assert refused["running_session_id"] == started["id"] and started["id"] in refused["detail"]
    # Still one at a time while it runs.
    assert server.post("/training/start", json=TRAINING).status_code == 409
    server.post("/training/stop", params={"session_id": started["id"]})
    assert server.wait_terminal(started["id"], timeout=180)["status"] == "stopped"
    assert server.get("/training/sessions").status_code == 200


@pytest.mark.slow
def test_a_killed_worker_reads_failed(server):
    response = server.post("/training/start", json={**TRAINING, "max_epochs": 50})
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    running = server.wait_for(
        session_id, lambda s: s["status"] == "running" and (s.get("progress") or {}).get("step", 0) > 0
    )
    os.kill(running["worker_pid"], signal.SIGKILL)
    failed = server.wait_for(session_id, lambda s: s["status"] in TERMINAL, timeout=30)
    assert failed["status"] == "failed"
    assert failed["error"].startswith("training process exited unexpectedly (killed by SIGKILL")
    # The store is free again: the next start is accepted.
    response = server.post("/training/start", json={**TRAINING, "max_epochs": 50})
    assert response.status_code == 201, response.text
    server.post("/training/stop")
    assert server.wait_terminal(response.json()["id"], timeout=180)["status"] == "stopped"


def _first_token_and_stream(server, version: str, body: dict) -> tuple[float, list[str], dict, int]:
    """Seconds to the first `data:` piece, the pieces, the `done` event, and the status code of a
    training route asked while the stream was still open."""
    import json

    import httpx

    started, first, pieces, done, name, asked = time.perf_counter(), None, [], None, "message", None
    with httpx.stream("POST", f"{server.url}/models/{version}/generate", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if name == "done":
                    done = data
                else:
                    first = first if first is not None else time.perf_counter() - started
                    if asked is None:
                        asked = server.get("/training/status").status_code
                    pieces.append(data["text"])
                name = "message"
    return first, pieces, done, asked


@pytest.mark.slow
def test_generation_streams_server_sent_events_from_a_trained_version(server):
    response = server.post("/training/start", json={**TRAINING, "max_epochs": 1, "max_steps": 10, "version": "try-it"})
    assert response.status_code == 201, response.text
    assert server.wait_terminal(response.json()["id"])["status"] == "completed"
    deadline = time.monotonic() + 60  # the version is registered just after the session completes
    while "try-it" not in [v["version"] for v in server.get("/models/versions").json()]:
        assert time.monotonic() < deadline, "the version was never registered"
        time.sleep(0.2)
    body = {"prompt": "The on-call engineer", "max_new_tokens": 200}
    cold = _first_token_and_stream(server, "try-it", body)
    warm = _first_token_and_stream(server, "try-it", body)
    print(f"\ntime to first token over SSE: cold (loads the model) {cold[0]:.3f} s, warm {warm[0]:.3f} s")
    for _, pieces, done, asked in (cold, warm):
        assert "".join(pieces) == done["text"] and done["tokens"] >= len(pieces) > 1
        assert asked == 200  # the training routes answer while a stream is open
    assert warm[1] == cold[1]  # greedy: the same text
    assert warm[0] < cold[0] and warm[0] < 2.0
