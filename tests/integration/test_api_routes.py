"""The API's routes through FastAPI's test client, without a server or worker processes: a
WorkerControl whose launch records the session instead of spawning a worker. Validation, the store
and the session files are real."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from kbtune.api import create_app
from kbtune.project import open_project
from kbtune.records import SessionStatus
from kbtune.worker_control import WorkerControl


class RecordingControl(WorkerControl):
    """Launches nothing: a started session stays pending, as it would until its worker runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.launched: list[str] = []

    def _spawn(self, session_id: str) -> None:
        self.files(session_id).claim()  # this test process stands in for the worker
        self.launched.append(session_id)


@pytest.fixture
def api(project):
    p = open_project(project["overrides"])
    control = RecordingControl(p.store, p.runtime.sessions_dir, project["overrides"])
    return TestClient(create_app(control=control)), control


def test_start_records_a_pending_session_with_the_requested_settings(api):
    client, control = api
    response = client.post("/training/start", json={"max_epochs": 1, "learning_rate": 0.002,
                                                    "overrides": ["trainer.accumulate_grad_batches=2"]})  # fmt: skip
    assert response.status_code == 201, response.text
    session = response.json()
    assert session["status"] == "pending" and control.launched == [session["id"]]
    config = control.store.get_session(session["id"]).config
    assert config["trainer"]["max_epochs"] == 1
    assert config["optim"]["learning_rate"] == 0.002
    assert config["trainer"]["accumulate_grad_batches"] == 2


def test_a_second_start_while_one_runs_is_409(api):
    client, _ = api
    first = client.post("/training/start", json={}).json()
    response = client.post("/training/start", json={})
    assert response.status_code == 409 and response.json()["running_session_id"] == first["id"]


def test_config_problems_are_422_on_their_field_with_real_keys(api):
    client, control = api
    response = client.post("/training/start", json={"learning_rate": -1.0, "max_epochs": 0,
                                                    "overrides": ["trainer.gradient_clip_val=-1"]})  # fmt: skip
    assert response.status_code == 422
    by_field = {}
    for item in response.json()["detail"]:
        by_field.setdefault(item["loc"][-1], []).append(item["msg"])
    assert by_field["learning_rate"][0].startswith("optim.learning_rate: must be > 0")
    assert by_field["max_epochs"][0].startswith("trainer.max_epochs:")
    assert by_field["overrides"][0].startswith("trainer.gradient_clip_val:")
    assert control.store.list_sessions() == [] and control.launched == []


@pytest.mark.parametrize("override", ["paths.root=/tmp/x", "tracking.uri=http://x", "hydra.run.dir=/x",
                                      "kb.path=/etc", "model.path=/x", "resume=abc", "data.template='${oc.env:HOME}'",
                                      "no equals sign"])  # fmt: skip
def test_overrides_that_locate_files_or_inject_are_refused(api, override):
    client, control = api
    response = client.post("/training/start", json={"overrides": [override]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "overrides"
    assert control.launched == []


def test_status_and_stop_of_a_started_session(api):
    client, control = api
    session = client.post("/training/start", json={}).json()
    status = client.get("/training/status").json()
    assert status["id"] == session["id"] and status["worker_pid"] is not None
    stopped = client.post("/training/stop", params={"session_id": session["id"]})
    assert stopped.status_code == 200 and stopped.json()["stop_requested"] is True
    assert control.files(session["id"]).stop_requested()


def test_unknown_session_is_404_and_resume_of_a_pending_one_is_409(api):
    client, _ = api
    assert client.get("/training/status", params={"session_id": "nope"}).status_code == 404
    session = client.post("/training/start", json={}).json()
    assert client.post("/training/start", json={"resume": session["id"]}).status_code == 409


def test_listings(api):
    client, control = api
    session = client.post("/training/start", json={}).json()
    listed = client.get("/training/sessions", params={"status": "pending"}).json()
    assert [s["id"] for s in listed] == [session["id"]]
    assert client.get("/models/versions").json() == []
    control.store.update_session(session["id"], status=SessionStatus.COMPLETED)
    assert client.get("/training/sessions", params={"status": "pending"}).json() == []
