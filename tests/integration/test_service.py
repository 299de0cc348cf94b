"""TrainingService end to end on a tiny model: composed config -> open_project -> the project's service ->
train_model. A session's lifecycle for success, an exception in training, an interrupt, and
register=false, recorded in a real SQLite MLflow store."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl

from kbtune.configuration import load
from kbtune.hydra_entry import compose, to_container
from kbtune.project import Project
from kbtune.records import SessionStatus

# Subprocesses or several trainings: outside `make test-fast`, always in `make test` (CI).
pytestmark = pytest.mark.slow


def tiny_overrides(root: Path, kb: dict[str, str], epochs: int = 2) -> list[str]:
    return [
        f"paths.root={root}",
        f"kb.path={kb['path']}",
        f"kb.collection={kb['collection']}",
        "model=tiny",
        "data.block_size=64",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=2",
    ]


def build(root: Path, kb: dict[str, str], extra: list[str] | None = None) -> tuple[Any, Any, Any]:
    plan, runtime = load(to_container(compose([*tiny_overrides(root, kb), *(extra or [])])))
    return plan, runtime, Project({}, runtime).service


class RaiseAtBatch(pl.Callback):
    """Raises `exc` from inside the training loop, as a crashing step or a Ctrl-C would."""

    def __init__(self, exc: BaseException, at_batch: int = 2):
        self.exc = exc
        self.at_batch = at_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at_batch:
            raise self.exc


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_kb) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("service")
    plan, runtime, service = build(root, small_kb)
    outcome = service.train_model(plan)
    return {
        "root": root,
        "kb": small_kb,
        "plan": plan,
        "runtime": runtime,
        "service": service,
        "outcome": outcome,
    }


def newest_session(service):
    return service.store.list_sessions(limit=1)[0]


def test_success_completes_and_saves_a_version(env):
    service, outcome, plan = env["service"], env["outcome"], env["plan"]
    session = service.store.get_session(outcome.session.id)
    assert session == outcome.session
    assert session.status is SessionStatus.COMPLETED
    assert session.error in (None, "")
    assert session.completed_at is not None and session.started_at is not None
    assert session.completed_at >= session.started_at
    assert session.config == plan.config
    assert session.config["model"]["name"] == "tiny" and session.config["data"]["block_size"] == 64
    assert {"train/loss", "val/loss", "val/perplexity"} <= set(session.metrics)

    mv = outcome.version
    assert mv is not None and mv.training_session_id == session.id
    assert mv.metrics == session.metrics  # the session's final metrics
    versions = service.model_manager.get_model_versions()
    assert [v.id for v in versions] == [mv.id]
    assert service.store.get_version("latest") == mv


def test_success_writes_checkpoints(env):
    checkpoints = env["service"].layout.files(env["outcome"].session.id).checkpoints
    assert (checkpoints / "last.ckpt").is_file()
    best = list(checkpoints.glob("best-*.ckpt"))
    assert len(best) == 1 and best[0].stat().st_size > 0


def test_saved_model_reloads_with_transformers_and_generates(env):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, directory = env["service"].model_manager.model_dir(env["outcome"].version.version)
    assert any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(str(directory), use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    prompt = tokenizer("The calibration", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert out.shape[1] == prompt.shape[1] + 12
    text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert text.strip()  # real text, not only special tokens

    # The manager's own loader gives the same weights, ready for generate.
    loaded, _ = env["service"].model_manager.load_model("latest")
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_exception_in_training_fails_the_session(env):
    service, plan = env["service"], env["plan"]
    before = service.model_manager.get_model_versions()
    with pytest.raises(RuntimeError, match="injected failure"):
        service.train_model(plan, extra_callbacks=[RaiseAtBatch(RuntimeError("injected failure at step 2"))])
    session = newest_session(service)
    assert session.id != env["outcome"].session.id
    assert session.status is SessionStatus.FAILED
    assert session.error.startswith("RuntimeError: injected failure at step 2")
    assert "Traceback" in session.error
    assert session.completed_at is not None
    assert service.model_manager.get_model_versions() == before
    assert service.store.list_sessions(SessionStatus.FAILED)[0].id == session.id


def test_interrupt_stops_the_session(env):
    service, plan = env["service"], env["plan"]
    before = service.model_manager.get_model_versions()
    handler = signal.getsignal(signal.SIGINT)
    outcome = service.train_model(plan, extra_callbacks=[RaiseAtBatch(KeyboardInterrupt())])
    assert outcome.session.status is SessionStatus.STOPPED and outcome.version is None
    session = service.store.get_session(outcome.session.id)
    assert session.status is SessionStatus.STOPPED
    assert session.completed_at is not None and not session.error
    assert service.model_manager.get_model_versions() == before
    assert signal.getsignal(signal.SIGINT) == handler  # Lightning leaves SIGINT ignored; the loop restores it


def test_register_false_saves_no_version(env):
    plan, runtime, service = build(env["root"], env["kb"], ["register=false", "trainer.max_epochs=1"])
    before = service.model_manager.get_model_versions()
    outcome = service.train_model(plan)
    assert outcome.session.status is SessionStatus.COMPLETED and outcome.version is None
    assert service.model_manager.get_model_versions() == before
    # The trained model is still kept on the session, to save later by hand.
    mv = service.model_manager.save_model("by-hand", outcome.session.id)
    assert mv.training_session_id == outcome.session.id and mv.metrics == outcome.session.metrics


def test_labelled_version_from_config(env, monkeypatch):
    plan, _, service = build(env["root"], env["kb"], ["version=release-7", "trainer.max_epochs=1"])
    # What a client polling the session sees at the moment it reads `completed`: its version is listed.
    listed_when_completed = []
    update_session = service.store.update_session

    def spy(session_id, **fields):
        if fields.get("status") is SessionStatus.COMPLETED:
            listed_when_completed.append(
                [v.version for v in service.store.list_versions() if v.training_session_id == session_id]
            )
        return update_session(session_id, **fields)

    monkeypatch.setattr(service.store, "update_session", spy)
    outcome = service.train_model(plan)
    assert outcome.version.version == "release-7"
    assert listed_when_completed == [["release-7"]]
    assert service.store.get_version("release-7").training_session_id == outcome.session.id
    # The same label again is refused before any session exists, and overwrites nothing.
    sessions = service.store.list_sessions()
    with pytest.raises(FileExistsError, match="release-7"):
        service.train_model(dataclasses.replace(plan))
    assert service.store.list_sessions() == sessions
    assert service.store.get_version("release-7").training_session_id == outcome.session.id
