"""A knowledge base that changes: `kbtune kb diff` after documents are added, edited and deleted through
`kbtune kb ingest`; an incremental update (`experiment=update base_version=...`) that records its
parent and delta and never replays held-out documents; the audit of deleted documents; the lineage tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kbtune.cli import main as kbtune
from kbtune.hydra_entry import compose
from kbtune.jobs import train
from kbtune.knowledge.facts import facts_documents
from kbtune.project import open_project
from kbtune.updates.lineage import PARENT_TAG, UPDATE_TAG

ENTITIES = 24
# Each test trains two or three tiny versions.
pytestmark = pytest.mark.slow


def write_corpus(folder: Path, docs: list[tuple[str, str, dict[str, str]]]) -> None:
    """One markdown file per entity: `kbtune kb ingest` turns each into one document."""
    folder.mkdir(parents=True, exist_ok=True)
    for doc_id, text, _meta in docs:
        (folder / f"{doc_id.split('/')[-1]}.md").write_text(text + "\n")


def ingest(env: dict[str, Any], capsys) -> None:
    assert (
        kbtune(["kb", "ingest", str(env["folder"]), "--collection", "facts", "--prune", *env["locate"]]) == 0
    )
    capsys.readouterr()


def cli_json(args: list[str], env: dict[str, Any], capsys) -> Any:
    capsys.readouterr()
    assert kbtune([*args, "--json", *env["locate"]]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def env(tmp_path, capsys, monkeypatch) -> dict[str, Any]:
    """A planted-facts corpus ingested with offline vectors, and a base version trained on it."""
    from tests.conftest import hash_embedder

    monkeypatch.setattr("kbtune.ingestion.default_embedder", lambda: hash_embedder)
    folder = tmp_path / "docs"
    write_corpus(folder, facts_documents(ENTITIES))
    locate = [f"paths.root={tmp_path}", f"kb.path={tmp_path / 'chroma'}"]
    training = [*locate, "kb.collection=facts", "model=tiny", "data.block_size=64", "experiment=knowledge",
                "trainer.max_epochs=1", "data.views_per_epoch=2", "trainer.enable_progress_bar=false",
                "eval.after_training=false"]  # fmt: skip
    e = {"folder": folder, "locate": locate, "training": training, "root": tmp_path}
    ingest(e, capsys)
    train(compose([*training, "version=base"]))
    return e


def base_manifest(env: dict[str, Any], version: str = "base") -> dict[str, Any]:
    store = open_project(env["locate"]).store
    return json.loads(store.read_text(store.get_version(version).training_session_id, "data/manifest.json"))


def edit_corpus(env: dict[str, Any]) -> dict[str, str]:
    """Add two entities, change a fact of one trained document, delete another; return the document
    id of each (the added: their file stems)."""
    trained = sorted(d["id"] for d in base_manifest(env)["documents"] if d["split"] == "train")
    changed, deleted = (env["folder"] / doc_id.split("#")[0] for doc_id in trained[:2])
    changed.write_text(changed.read_text().replace(".", " and nothing else.", 1))
    deleted.unlink()
    new = facts_documents(ENTITIES + 2)[ENTITIES:]
    write_corpus(env["folder"], new)
    return {"changed": trained[0], "deleted": trained[1], "added": ",".join(d[0].split("/")[-1] for d in new)}


def _ids(ids: list[str], stem: str) -> list[str]:
    return [i for i in ids if stem in i]


def test_diff_names_what_was_added_changed_and_deleted_since_a_version(env, capsys):
    before = cli_json(["kb", "diff", "--since", "base"], env, capsys)
    assert before["counts"] == {"added": 0, "changed": 0, "deleted": 0, "unchanged": ENTITIES}
    kinds = edit_corpus(env)
    ingest(env, capsys)
    after = cli_json(["kb", "diff"], env, capsys)  # default: the latest version (no champion yet)
    assert after["since"] == "base"
    assert after["counts"] == {"added": 2, "changed": 1, "deleted": 1, "unchanged": ENTITIES - 2}
    assert after["changed"] == [kinds["changed"]] and after["deleted"] == [kinds["deleted"]]
    assert all(_ids(after["added"], stem) for stem in kinds["added"].split(","))
    assert after["digest"] != before["digest"]
    assert kbtune(["kb", "diff", *env["locate"]]) == 0
    assert "2 new, 1 changed, 1 deleted since base" in capsys.readouterr().out


def test_update_trains_the_change_records_parent_and_delta_and_never_replays_held_out(env, capsys):
    edit_corpus(env)
    ingest(env, capsys)
    train(compose([*env["training"], "experiment=update", "base_version=base", "version=upd",
                   "data.replay_fraction=0.5", "eval.after_training=true", "eval.probes.max_probes=60"]))  # fmt: skip
    project = open_project(env["locate"])
    store = project.store
    upd = store.get_version("upd")
    tags = store.get_version_tags(upd.id)
    assert tags[PARENT_TAG] == "base"
    update = json.loads(tags[UPDATE_TAG])
    assert update["counts"]["added"] + update["counts"]["changed"] == update["counts"]["delta"] >= 1
    assert update["counts"]["deleted"] == 1 and update["counts"]["replay"] >= 1
    manifest = json.loads(store.read_text(upd.training_session_id, "data/manifest.json"))
    roles = {d["id"]: (d["split"], d.get("role")) for d in manifest["documents"]}
    # Held-out documents carry no role: never delta, never replayed; every training document has one.
    assert all(role is None for split, role in roles.values() if split == "val")
    assert all(role in ("delta", "replay", "carried") for split, role in roles.values() if split == "train")
    base_manifest = json.loads(
        store.read_text(store.get_version("base").training_session_id, "data/manifest.json")
    )
    base_hashes = {d["id"]: d["sha256"] for d in base_manifest["documents"]}
    for d in manifest["documents"]:
        if d.get("role") in ("replay", "carried"):
            assert base_hashes[d["id"]] == d["sha256"]  # unchanged since the base
    # Each delta document is trained data.delta_repeat times per view (4 in experiment=update).
    assert manifest["splits"]["train"]["documents"] == 4 * update["counts"]["delta"] + update["counts"]["replay"]
    # The update started from the base's weights and tokenizer, and was scored on the three probe sets.
    session = store.get_session(upd.training_session_id)
    assert session.config["base_version"] == "base"
    for key in ("recall_delta", "recall_unchanged", "recall_heldout", "start/recall_unchanged"):
        assert f"knowledge/{key}" in upd.metrics, key
    # The lineage tree puts the update under its parent.
    capsys.readouterr()
    assert kbtune(["versions", "--tree", *env["locate"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0].startswith("base")
        and lines[1].startswith("└─ upd")
        and "new, 1 changed, 1 deleted, replay" in lines[1]
    )


def test_update_refuses_a_missing_base_or_an_unchanged_kb_before_any_session(env, capsys):
    from kbtune.configuration import ConfigError, user_errors

    store = open_project(env["locate"]).store
    count = len(store.list_sessions())
    with pytest.raises(user_errors()) as err:
        train(compose([*env["training"], "experiment=update", "base_version=base"]))
    assert "base_version" in str(err.value) and "nothing to update" in str(err.value)
    with pytest.raises(ConfigError, match="base_version: required"):
        train(compose([*env["training"], "experiment=update"]))
    with pytest.raises(user_errors()) as err:
        train(compose([*env["training"], "experiment=update", "base_version=nope"]))
    assert "nope" in str(err.value)
    with pytest.raises(ConfigError, match="data.split_seed"):
        train(compose([*env["training"], "experiment=update", "base_version=base", "data.split_seed=3"]))
    assert len(store.list_sessions()) == count


def test_audit_finds_the_versions_trained_on_a_deleted_document_and_only_those(env, capsys):
    kinds = edit_corpus(env)
    ingest(env, capsys)
    train(compose([*env["training"], "version=after"]))
    audit = {a["version"]: a for a in cli_json(["audit"], env, capsys)}
    assert set(audit) == {"base", "after"}
    assert audit["after"]["affected"] is False
    assert audit["base"]["deleted"] == [kinds["deleted"]] and audit["base"]["changed"] == [kinds["changed"]]
    rows = cli_json(["audit", "--document", kinds["deleted"]], env, capsys)
    assert [(r["version"], r["split"], r["now"]) for r in rows] == [("base", "trained", "deleted")]
    rows = cli_json(["audit", "--document", kinds["changed"]], env, capsys)
    assert sorted((r["version"], r["now"]) for r in rows) == [("after", "same"), ("base", "changed")]
    # The same on the API, which the page's "KB changed" badge and change line read.
    from fastapi.testclient import TestClient

    from kbtune.api import create_app

    client = TestClient(create_app([*env["locate"], "kb.collection=facts"]))
    answer = client.get("/audit")
    assert answer.status_code == 200
    by_version = {a["version"]: a for a in answer.json()["versions"]}
    assert by_version["base"]["affected"] and not by_version["after"]["affected"]
    assert (
        client.get("/audit", params={"document": kinds["deleted"]}).json()["versions"][0]["version"] == "base"
    )
    diff = client.get("/kb/diff", params={"since": "base"}).json()
    assert diff["counts"]["deleted"] == 1 and diff["summary"].startswith(
        "2 new, 1 changed, 1 deleted since base"
    )
    assert client.get("/kb/diff", params={"since": "nope"}).status_code == 404
