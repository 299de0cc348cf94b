"""Mistakes the data or the store can show are refused in one line before anything is recorded, and
the data record describes the session's own KB: a validation interval longer than an epoch, `kbtune
save` of a session without a model, and two collections whose cleaned documents are the same."""

from __future__ import annotations

import json
from pathlib import Path

from kbtune.cli import main as kbtune
from kbtune.configuration import ConfigError, load
from kbtune.hydra_entry import compose, precheck, to_container
from kbtune.knowledge_base import Document
from kbtune.project import Project
from kbtune.records import SessionStatus
from kbtune.session_runner import SessionRunner
from tests.conftest import hash_embedder, seed_kb


def test_a_validation_interval_longer_than_an_epoch_is_refused_before_a_session(project):
    root = project["root"]
    # 12 batches an epoch (limit_train_batches), validation every 15: Lightning would fail the session.
    cfg = compose([*project["overrides"], "trainer.limit_train_batches=12", "trainer.val_check_interval=15"])
    expected = [
        "trainer.val_check_interval: 15 is more than the 12 training batches of an epoch (data.batch_size=8); "
        "use at most 12, or a fraction of the epoch such as 0.5"
    ]
    try:
        precheck(cfg, "train")  # the Hydra callback's check, before Hydra's output directory exists
    except ConfigError as exc:
        assert exc.problems == expected
    else:
        raise AssertionError("precheck accepted val_check_interval=15")

    data = to_container(cfg)
    plan, runtime = load(data)
    service = Project(data, runtime).service
    try:
        SessionRunner(service).run(plan)
    except ConfigError as exc:
        assert exc.problems == expected
    else:
        raise AssertionError("the session runner accepted val_check_interval=15")
    assert service.store.list_sessions() == []
    assert not (root / "sessions").exists()

    # Exactly one epoch is fine.
    precheck(
        compose([*project["overrides"], "trainer.limit_train_batches=12", "trainer.val_check_interval=12"]),
        "train",
    )


def test_saving_a_session_without_a_model_is_one_line(project, capsys):
    located = [f"paths.root={project['root']}"]
    data = to_container(compose(located))
    store = Project(data, load(data)[1]).store
    session = store.create_session({"model": {"name": "tiny"}})
    store.update_session(session.id, status=SessionStatus.FAILED, error="RuntimeError: boom")
    capsys.readouterr()  # MLflow's note that it created the store's tables

    assert kbtune(["save", session.id, *located]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"kbtune: error: session {session.id}: no trained model to save; it is failed "
        f"(continue it with `kbtune start --resume {session.id}`)\n"
    )
    assert kbtune(["save", "no-such-session", *located]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("kbtune: error: training session 'no-such-session' not found") and err.count("\n") == 1
    )
    assert store.list_versions() == []


def twin_collections(kb_path: Path) -> None:
    """`twin-a` and `twin-b`: the same part of the sample corpus plus an empty document and a copy of
    one (which cleaning drops), stored in two collections."""
    for name in ("twin-b", "twin-a"):
        kb = seed_kb(kb_path, name, limit_files=24)
        first = next(kb.iter_documents())
        extra = [Document("zz-empty", "  \n\t ", {}), Document("zz-copy", first.text, {})]
        kb.upsert(extra, hash_embedder([d.text or "" for d in extra]))


def test_the_data_record_names_its_own_collection_when_the_cache_is_shared(tmp_path):
    twin_collections(tmp_path / "chroma")

    def overrides(collection: str) -> list[str]:
        return [f"paths.root={tmp_path}", f"kb.path={tmp_path / 'chroma'}", f"kb.collection={collection}",
                "model=tiny", "data.block_size=64", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
                "eval.after_training=false"]  # fmt: skip

    manifests = {}
    for collection in ("twin-a", "twin-b"):
        data = to_container(compose(overrides(collection)))
        plan, runtime = load(data)
        manifests[collection] = Project(data, runtime).prepare(plan).prepare_dataset().manifest
    a, b = manifests["twin-a"], manifests["twin-b"]
    assert a["cache_key"] == b["cache_key"]  # one shared cache entry, written for twin-a
    assert (a["collection"], a["drops"]) == ("twin-a", {"duplicate": 1, "empty": 1})
    assert (b["collection"], b["drops"]) == ("twin-b", {"duplicate": 1, "empty": 1})
    assert "twin-b" in b["kb"] and "twin-a" in a["kb"]

    # The session's own record of its data says the same.
    data = to_container(compose(overrides("twin-b")))
    plan, runtime = load(data)
    project = Project(data, runtime)
    outcome = SessionRunner(project.service).run(plan)
    recorded = json.loads(project.store.read_text(outcome.session.id, "data/manifest.json"))
    assert recorded["collection"] == "twin-b" and "twin-b" in recorded["kb"]
    assert project.store.get_tags(outcome.session.id)["kbtune.collection"] == "twin-b"
