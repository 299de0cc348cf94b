"""ModelEvaluation after a tiny training: the held-out set is exactly the manifest's val documents,
the metrics (and the gain over the starting model) are stored on the version and on the session's
run, scripts/evaluate.py prints and records them, and a changed KB is refused by name."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kbtune.configuration import load
from kbtune.data.preparation import DataError
from kbtune.evaluation import EvalSettings, ModelEvaluation
from kbtune.hydra_entry import compose, to_container
from kbtune.knowledge_base import Document, KBSettings, KnowledgeBase
from kbtune.project import Project
from tests.conftest import hash_embedder

# Subprocesses or several trainings: outside `make test-fast`, always in `make test` (CI).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
METRICS = ("loss", "perplexity", "accuracy", "rougeL", "bleu")
# Small generation settings keep the test quick; the metrics are the same as with the defaults.
SETTINGS = EvalSettings(
    max_documents=64, batch_size=8, prefix_tokens=16, generate_tokens=16, generation_documents=6
)


def overrides(root: Path, kb: dict[str, str]) -> list[str]:
    return [f"paths.root={root}", f"kb.path={kb['path']}", f"kb.collection={kb['collection']}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_kb) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("evaluation")
    train_overrides = [*overrides(root, small_kb), "model=tiny", "data.block_size=64", "trainer.max_epochs=2",
                       "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=2"]  # fmt: skip
    plan, runtime = load(to_container(compose(train_overrides)))
    service = Project({}, runtime).service
    outcome = service.train_model(plan)
    results = service.evaluate_model("latest", SETTINGS)
    return {
        "root": root,
        "kb": small_kb,
        "service": service,
        "runtime": runtime,
        "outcome": outcome,
        "results": results,
    }


def val_ids(manifest: dict[str, Any]) -> list[str]:
    return [d["id"] for d in manifest["documents"] if d["split"] == "val"]


def trained_val_ids(trained: dict[str, Any]) -> list[str]:
    return [d["id"] for d in trained["outcome"].prepared.documents() if d["split"] == "val"]


def test_test_set_is_the_manifests_val_documents(trained):
    service, outcome = trained["service"], trained["outcome"]
    session_id = outcome.session.id
    stored = json.loads(service.store.read_text(session_id, "data/manifest.json"))
    assert stored == {**outcome.prepared.manifest, "documents": outcome.prepared.documents()}
    evaluation = ModelEvaluation(service.kb, service.store, service.model_manager, service.cache_dir)
    docs, data, manifest = evaluation.load_test_set(session_id)
    assert manifest == stored
    assert [d.id for d in docs] == val_ids(stored)
    assert {d.id for d in docs}.isdisjoint(d["id"] for d in stored["documents"] if d["split"] == "train")
    assert [d.sha256 for d in docs] == [d["sha256"] for d in stored["documents"] if d["split"] == "val"]
    assert all(d.formatted for d in docs)
    assert data.block_size == 64
    assert len(docs) == stored["splits"]["val"]["documents"]
    assert trained["results"]["eval/documents"] == min(len(docs), SETTINGS.max_documents)


def test_metrics_and_gain(trained):
    results = trained["results"]
    for name in METRICS:
        assert f"eval/{name}" in results and f"eval/start_{name}" in results
        assert math.isfinite(results[f"eval/{name}"])
    assert results["eval/perplexity"] == pytest.approx(math.exp(results["eval/loss"]))
    assert 0.0 <= results["eval/accuracy"] <= 1.0 and 0.0 <= results["eval/rougeL"] <= 1.0
    assert results["eval/perplexity_gain"] == pytest.approx(
        results["eval/start_perplexity"] - results["eval/perplexity"]
    )
    assert results["eval/perplexity_gain"] > 0
    assert results["eval/loss"] < results["eval/start_loss"]
    assert results["eval/accuracy"] > results["eval/start_accuracy"]
    assert "eval/rougeL_gain" in results
    # The untrained init of a 512-token vocabulary is close to uniform.
    assert results["eval/start_perplexity"] > 100
    assert results["eval/generation_samples"] >= 1


def test_metrics_are_stored_on_version_and_run(trained):
    service, outcome, results = trained["service"], trained["outcome"], trained["results"]
    version = {v.id: v for v in service.model_manager.get_model_versions()}[outcome.version.id]
    for key, value in results.items():
        assert version.metrics[key] == pytest.approx(value)
    assert version.metrics["val/loss"] == outcome.version.metrics["val/loss"]  # training metrics kept
    session = service.store.get_session(outcome.session.id)
    for key, value in results.items():
        assert session.metrics[key] == pytest.approx(value)


def test_evaluate_script_prints_and_records(trained):
    service, outcome = trained["service"], trained["outcome"]
    args = [f"version={outcome.version.version}", *overrides(trained["root"], trained["kb"]),
            "eval.generation_documents=4", "eval.prefix_tokens=16", "eval.generate_tokens=8"]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=trained["root"], env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])
    for name in METRICS:
        assert f"eval/{name}" in printed and f"eval/start_{name}" in printed
    assert printed["eval/perplexity_gain"] > 0
    # Same model, same documents: the teacher-forced metrics repeat exactly.
    assert printed["eval/loss"] == pytest.approx(trained["results"]["eval/loss"], rel=1e-5)
    version = service.store.get_version(outcome.version.id)
    assert version.metrics["eval/loss"] == pytest.approx(printed["eval/loss"])
    assert version.metrics["eval/bleu"] == pytest.approx(printed["eval/bleu"])
    assert service.store.get_session(outcome.session.id).metrics["eval/bleu"] == pytest.approx(
        printed["eval/bleu"]
    )


def test_evaluate_script_unknown_version_is_a_clear_error(trained):
    args = ["version=no-such-version", *overrides(trained["root"], trained["kb"])]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=trained["root"], env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})  # fmt: skip
    output = proc.stdout + proc.stderr  # Hydra's log handler writes to stdout
    assert proc.returncode == 2, output[-3000:]
    assert (
        "model version 'no-such-version' not found" in output and trained["outcome"].version.version in output
    )
    assert "Traceback" not in output


def kb_copy(trained: dict[str, Any], tmp_path: Path) -> KnowledgeBase:
    """A private copy of the session's KB (the shared fixture KB is read-only)."""
    target = tmp_path / "chroma"
    shutil.copytree(trained["kb"]["path"], target)
    return KnowledgeBase.connect(KBSettings(path=str(target), collection=trained["kb"]["collection"]))


def evaluation_on(trained: dict[str, Any], kb: KnowledgeBase) -> ModelEvaluation:
    service = trained["service"]
    return ModelEvaluation(kb, service.store, service.model_manager, service.cache_dir)


def test_changed_val_document_is_refused_by_name(trained, tmp_path):
    kb = kb_copy(trained, tmp_path)
    manifest = trained["outcome"].prepared.manifest
    target = trained_val_ids(trained)[0]
    doc = kb.get([target])[0]
    edited = Document(doc.id, doc.text + "\n\nAn edit made after training.", doc.metadata)
    kb.upsert([edited], hash_embedder([edited.text]))
    before = trained["service"].store.get_version(trained["outcome"].version.id).metrics
    with pytest.raises(DataError) as info:
        evaluation_on(trained, kb).evaluate(trained["outcome"].version.version, SETTINGS)
    message = str(info.value)
    assert target in message and "changed" in message and manifest["cache_key"] in message
    assert trained["service"].store.get_version(trained["outcome"].version.id).metrics == before


def test_whitespace_only_edit_still_matches(trained, tmp_path):
    """The manifest hashes the cleaned text, so reformatting whitespace is not a change."""
    kb = kb_copy(trained, tmp_path)
    target = trained_val_ids(trained)[0]
    doc = kb.get([target])[0]
    kb.upsert(
        [Document(doc.id, "  " + doc.text.replace("\n", "  \n") + "\n\n\n", doc.metadata)],
        hash_embedder([doc.text]),
    )
    docs, _, _ = evaluation_on(trained, kb).load_test_set(trained["outcome"].session.id)
    assert target in [d.id for d in docs]


def test_deleted_val_document_is_refused_by_name(trained, tmp_path):
    kb = kb_copy(trained, tmp_path)
    target = trained_val_ids(trained)[-1]
    kb.delete([target])
    with pytest.raises(DataError, match="missing") as info:
        evaluation_on(trained, kb).load_test_set(trained["outcome"].session.id)
    assert target in str(info.value)


def test_added_documents_do_not_change_the_test_set(trained, tmp_path):
    kb = kb_copy(trained, tmp_path)
    new = [
        Document(f"added-{i}", f"A document added after training, number {i}.", {"source": "added.md"})
        for i in range(20)
    ]
    kb.upsert(new, hash_embedder([d.text for d in new]))
    docs, _, _ = evaluation_on(trained, kb).load_test_set(trained["outcome"].session.id)
    assert [d.id for d in docs] == trained_val_ids(trained)


def test_eval_settings_validation():
    problems = replace(SETTINGS, batch_size=0, max_documents=0, generation_documents=-1).validate()
    assert {p.split(":")[0] for p in problems} == {
        "eval.batch_size",
        "eval.max_documents",
        "eval.generation_documents",
    }
