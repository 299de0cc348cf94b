"""Soak: one training stopped and resumed through the API 20 times, each stop landing mid-run, ends
completed with the very weights of the same training run uninterrupted; every session ends in a
final state and no worker process outlives its session."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.e2e.conftest import TERMINAL

pytestmark = pytest.mark.slow  # about 20 worker starts (torch imports, checkpoint loads): minutes

CYCLES = 20
# About 1,400 optimizer steps (ten epochs of the test KB at batch 8), validated every 20: on a quiet
# machine a tiny model trains tens of steps a second, so fewer steps than this can finish between a
# resume and the next stop, and the 20 stops must all land mid-run.
TRAINING = {
    "model": "tiny",
    "max_epochs": 10,
    "batch_size": 8,
    "block_size": 64,
    "val_check_interval": 20,
    "seed": 7,
}


def _step(status: dict) -> int:
    return int((status.get("progress") or {}).get("step") or 0)


def _weights(server_overrides, session_id: str) -> dict:
    from safetensors.torch import load_file

    from kbtune.project import open_project

    _, overrides = server_overrides
    manager = open_project(overrides).manager
    (version,) = [v for v in manager.store.list_versions() if v.training_session_id == session_id]
    _, directory = manager.model_dir(version.id)
    return load_file(str(directory / "model.safetensors"))


def test_twenty_stop_resume_cycles_end_with_the_weights_of_an_uninterrupted_run(server, server_overrides):
    response = server.post("/training/start", json=TRAINING)
    assert response.status_code == 201, response.text
    reference = server.wait_terminal(response.json()["id"])
    assert reference["status"] == "completed", reference.get("error")
    total = reference["progress"]["total_steps"]

    response = server.post("/training/start", json=TRAINING)
    assert response.status_code == 201, response.text
    session_id = response.json()["id"]
    stops: list[int] = []
    started = time.monotonic()
    for cycle in range(CYCLES):
        last = stops[-1] if stops else 0
        seen = server.wait_for(session_id, lambda s, last=last: s["status"] in TERMINAL or _step(s) > last)
        assert seen["status"] == "running", (
            f"cycle {cycle}: {seen['status']} ({seen.get('error')}); stops {stops}"
        )
        assert server.post("/training/stop", params={"session_id": session_id}).status_code == 200
        stopped = server.wait_terminal(session_id, timeout=180)
        assert stopped["status"] == "stopped" and stopped["has_checkpoint"], (cycle, stopped.get("error"))
        stops.append(_step(stopped))
        response = server.post("/training/start", json={"resume": session_id})
        assert response.status_code == 201, response.text
    done = server.wait_terminal(session_id)
    print(
        f"\n{CYCLES} stop/resume cycles in {time.monotonic() - started:.0f} s, stopped at steps {stops} of {total}"
    )
    assert done["status"] == "completed", done.get("error")
    assert stops == sorted(set(stops)) and 0 < stops[-1] < total  # every stop landed mid-run, later each time
    assert done["metrics"]["val/loss"] == reference["metrics"]["val/loss"]

    want, got = _weights(server_overrides, reference["id"]), _weights(server_overrides, session_id)
    assert want.keys() == got.keys()
    differing = {
        name: float((got[name] - want[name]).abs().max()) for name in want if not got[name].equal(want[name])
    }
    assert differing == {}, f"weights differ from the uninterrupted run: {differing}"

    sessions = server.get("/training/sessions").json()
    assert {s["status"] for s in sessions} <= set(TERMINAL) and len(sessions) == 2
    # Every worker has exited and been reaped by the server (no zombies either).
    deadline = time.monotonic() + 30
    while psutil.Process(server.proc.pid).children(recursive=True) and time.monotonic() < deadline:
        server.get("/training/sessions")  # a listing reaps finished workers
        time.sleep(0.5)
    assert psutil.Process(server.proc.pid).children(recursive=True) == []
