"""The API's routes through FastAPI's test client, without a server or worker processes: a
WorkerControl whose launch records the session instead of spawning a worker. Validation, the store
and the session files are real; generation runs a tiny model registered as a version."""

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


# -- generation ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generation_api(tmp_path_factory):
    """A client over a store holding one version, registered directly (a tiny pretrained Llama):
    what the generate route reads is the version's files, not how a training made them."""
    from tests.integration.local_checkpoints import make_local_checkpoint

    root = tmp_path_factory.mktemp("generate")
    checkpoint = make_local_checkpoint(root / "checkpoint", pretrain_steps=20)
    p = open_project([f"paths.root={root}", "model=tiny"])
    session = p.store.create_session({"model": {"name": "tiny", "source": "scratch"}})
    p.store.create_version(session.id, p.store.log_artifacts(session.id, checkpoint, "model"), "v1", {})
    control = RecordingControl(p.store, p.runtime.sessions_dir, [f"paths.root={root}"])
    app = create_app(control=control, manager=p.manager)
    return TestClient(app), app


def sse_events(response) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event; unnamed events are `message`."""
    import json

    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
            name = "message"
    return events


def test_generate_streams_the_same_greedy_text_as_the_json_answer(generation_api):
    client, app = generation_api
    body = {"prompt": "The on-call engineer", "max_new_tokens": 24}
    answer = client.post("/models/v1/generate", json={**body, "stream": False})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["version"] == "v1" and 1 <= data["tokens"] <= 24 and data["text"] and data["seconds"] > 0
    with client.stream("POST", "/models/v1/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    pieces = [d["text"] for name, d in events if name == "message"]
    (done,) = [d for name, d in events if name == "done"]
    assert events[-1][0] == "done" and len(pieces) > 1
    assert "".join(pieces) == done["text"] == data["text"]
    assert done["tokens"] == data["tokens"]
    # Loaded once, kept for the next request (keyed by the registry's version id).
    assert app.state.model_cache.keys() == ["1"]


def test_generate_answers_404_for_an_unknown_version_and_422_for_bad_settings(generation_api):
    client, _ = generation_api
    response = client.post("/models/nope/generate", json={"prompt": "x"})
    assert response.status_code == 404 and "nope" in response.json()["detail"]
    response = client.post("/models/v1/generate", json={"prompt": "x", "max_new_tokens": 100000, "top_p": 0})
    assert response.status_code == 422
    assert {item["loc"][-1] for item in response.json()["detail"]} == {"max_new_tokens", "top_p"}
    response = client.post("/models/v1/generate", json={"prompt": "x" * 8001, "temperature": "1"})
    assert {item["loc"][-1] for item in response.json()["detail"]} == {"prompt", "temperature"}


def test_generate_needs_the_token_like_every_api_route(generation_api, tmp_path):
    client, app = generation_api
    guarded = TestClient(create_app(control=app.state.control, token="s3cret"))
    assert guarded.post("/models/v1/generate", json={"prompt": "x"}).status_code == 401
    response = guarded.post("/models/v1/generate", json={"prompt": "x", "max_new_tokens": 2, "stream": False},
                            headers={"Authorization": "Bearer s3cret"})  # fmt: skip
    assert response.status_code == 200 and response.json()["tokens"] >= 1


def test_the_model_cache_budget_comes_from_the_environment():
    from kbtune.api_generate import model_cache
    from kbtune.configuration import ConfigError

    assert model_cache({}).max_bytes == 2048 * 10**6
    assert model_cache({"KBTUNE_MODEL_CACHE_MB": "64"}).max_bytes == 64 * 10**6
    for bad in ("lots", "-1", "nan"):
        with pytest.raises(ConfigError, match="KBTUNE_MODEL_CACHE_MB"):
            model_cache({"KBTUNE_MODEL_CACHE_MB": bad})
