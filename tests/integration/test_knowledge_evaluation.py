"""Did the model learn the KB? A knowledge base of fictional facts generated here (one fact sentence a
document), one model trained long enough to memorise it and one for a single epoch: trained-fact recall
separates them, held-out recall stays at the starting model's level, re-evaluation reproduces the
figures, and promotion is gated on recall and forgetting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kbtune.evaluation import EvalSettings
from kbtune.hydra_entry import compose
from kbtune.jobs import train
from kbtune.knowledge.facts import FACT_KEYS, generate_entities
from kbtune.knowledge.probes import split_sentences
from kbtune.knowledge_base import Document, KBSettings, KnowledgeBase
from kbtune.project import open_project
from tests.conftest import hash_embedder

pytestmark = pytest.mark.slow
ENTITIES = 10


def seed_fact_kb(path: Path, collection: str) -> None:
    """One document per fact sentence, so a closed-book prompt is the start of a training document."""
    from kbtune.knowledge.facts import entity_document

    docs = []
    for entity in generate_entities(ENTITIES, seed=3):
        doc_id, text, _ = entity_document(entity)
        sentences = [s for s in split_sentences(text) if not s.startswith("#")]
        assert len(sentences) == len(FACT_KEYS)
        docs += [Document(f"{doc_id}/{i}", s, {"source": "facts"}) for i, s in enumerate(sentences)]
    kb = KnowledgeBase.connect(KBSettings(path=str(path), collection=collection))
    kb.upsert(docs, embeddings=hash_embedder([d.text for d in docs]), create=True)


@pytest.fixture(scope="module")
def facts_project(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("facts")
    seed_fact_kb(root / "chroma", "facts")
    base = [f"paths.root={root}", f"kb.path={root / 'chroma'}", "kb.collection=facts", "model=tiny",
            "data.block_size=32", "data.packing=document", "data.val_fraction=0.15", "trainer.enable_progress_bar=false",
            "trainer.max_epochs=-1", "eval.probes.max_probes=null"]  # fmt: skip
    train(compose([*base, "trainer.max_steps=450", "optim.learning_rate=3e-3", "version=memorised"]))
    train(compose([*base, "trainer.max_steps=2", "version=one-epoch"]))
    return {"root": root, "overrides": base, "project": open_project(base)}


def test_recall_separates_a_memorising_model_from_a_barely_trained_one(facts_project):
    store = facts_project["project"].store
    memorised, barely = store.get_version("memorised").metrics, store.get_version("one-epoch").metrics
    # Evaluated after training (eval.after_training defaults to true).
    assert memorised["knowledge/probes_trained"] >= 30 and memorised["knowledge/probes_heldout"] >= 3
    assert memorised["knowledge/recall_trained"] >= 0.8, memorised
    assert barely["knowledge/recall_trained"] <= 0.1, barely
    assert memorised["knowledge/mc_accuracy_trained"] > barely["knowledge/mc_accuracy_trained"]
    for metrics in (memorised, barely):
        # The held-out facts were never seen: no better than the untrained start.
        assert metrics["knowledge/recall_heldout"] <= metrics["knowledge/start/recall_heldout"] + 0.1
        assert metrics["knowledge/start/recall_trained"] <= 0.1


def test_re_evaluating_a_version_reproduces_its_figures_on_the_same_probes(facts_project):
    project = facts_project["project"]
    recorded = project.store.get_version("memorised").metrics
    again = project.service.evaluate_knowledge("memorised", EvalSettings(probes=EvalSettings().probes), record=False)
    for key, value in again.metrics.items():
        if key != "knowledge/seconds":
            assert recorded[key] == value, key
    worst = again.worst_trained(3)
    assert len(worst) == 3 and all(row["split"] == "train" for row in worst)
    assert all(row["loss_after"] < row["loss_before"] for row in again.documents if row["split"] == "train")


def test_scripts_evaluate_prints_json_only_and_names_the_collection(facts_project):
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(repo / "scripts" / "evaluate.py"), "version=memorised",
                          *[o for o in facts_project["overrides"] if o.startswith(("paths.", "kb."))],
                          "eval.max_documents=4", "eval.generation_documents=1"],
                         capture_output=True, text=True, timeout=600, cwd=repo)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["collection"] == "facts"
    assert result["knowledge/recall_trained"] >= 0.8 and result["knowledge/worst_trained"]


def test_promotion_is_gated_on_recall_and_recorded(facts_project):
    from kbtune.knowledge.promotion import DECISION_TAG, PromotionRefused

    project = facts_project["project"]
    promotion = project.promotion()
    assert promotion.promote("memorised", "champion").promoted
    with pytest.raises(PromotionRefused, match="recall drops"):
        promotion.promote("one-epoch", "champion")
    assert "champion" in project.store.get_version("memorised").aliases
    refused = project.store.get_version_tags(project.store.get_version("one-epoch").id)
    assert '"promoted": false' in refused[DECISION_TAG.format(alias="champion")]
    forced = promotion.promote("one-epoch", "champion", force=True)
    assert forced.promoted and forced.forced
    assert "champion" in project.store.get_version("one-epoch").aliases


def test_forgetting_of_a_local_checkpoint_on_a_retain_folder_gates_promotion(tmp_path):
    """A pretrained local model fine-tuned hard on tickets: its perplexity on text it knew before (the
    retain folder) rises, the figure is finite, and promotion over the limit is refused unless forced."""
    import math

    from kbtune.knowledge.promotion import DECISION_TAG, PromotionRefused
    from tests.conftest import SAMPLE_KB, seed_kb
    from tests.integration.local_checkpoints import make_local_checkpoint, write_ticket_corpus

    model_dir = make_local_checkpoint(tmp_path / "base", "llama")
    seed_kb(tmp_path / "chroma", "tickets", folder=write_ticket_corpus(tmp_path / "docs", files=2))
    overrides = [f"paths.root={tmp_path}", f"kb.path={tmp_path / 'chroma'}", "kb.collection=tickets", "model=local",
                 f"model.path={model_dir}", "optim.learning_rate=1e-2", "optim.warmup_steps=2", "data.block_size=64",
                 "trainer.max_steps=30", "trainer.max_epochs=-1", "trainer.enable_progress_bar=false",
                 f"eval.retain={SAMPLE_KB / 'part_b'}", "eval.retain_max_documents=6", "eval.probes.max_probes=40",
                 "version=forgetful"]  # fmt: skip
    train(compose(overrides))
    project = open_project(overrides)
    metrics = project.store.get_version("forgetful").metrics
    change = metrics["knowledge/retain_perplexity_change"]
    assert math.isfinite(change) and change > 0.05, metrics
    with pytest.raises(PromotionRefused, match="forgetting"):
        project.promotion().promote("forgetful", "champion", max_forgetting=0.05)
    assert project.store.get_version("forgetful").aliases == ()
    decision = project.promotion().promote("forgetful", "champion", max_forgetting=0.05, force=True)
    assert decision.forced and "champion" in project.store.get_version("forgetful").aliases
    recorded = project.store.get_version_tags(project.store.get_version("forgetful").id)
    assert '"forced": true' in recorded[DECISION_TAG.format(alias="champion")]


def test_a_model_trained_from_scratch_reports_forgetting_as_not_applicable(facts_project, tmp_path):
    from kbtune.knowledge.evaluation import NOT_APPLICABLE

    retain = tmp_path / "retain"
    retain.mkdir()
    (retain / "a.md").write_text("Some text the model never saw, to measure forgetting on.\n")
    report = facts_project["project"].service.evaluate_knowledge(
        "one-epoch", EvalSettings(retain=str(retain)), record=False
    )
    assert "knowledge/retain_perplexity_change" not in report.metrics
    assert report.notes["retain_perplexity_change"] == NOT_APPLICABLE


def test_kbtune_versions_shows_recall_and_the_worst_learned_documents(facts_project):
    import subprocess
    import sys

    locate = [o for o in facts_project["overrides"] if o.startswith(("paths.", "kb."))]
    table = subprocess.run([sys.executable, "-m", "kbtune", "versions", *locate], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    memorised = next(line for line in table.stdout.splitlines() if " memorised " in f" {line} ")
    assert "100.0%" in memorised or "9" in memorised.split()[4]  # recall column, e.g. 100.0% / 97.8%
    detail = subprocess.run([sys.executable, "-m", "kbtune", "versions", "--detail", "one-epoch", *locate],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert detail.returncode == 0, detail.stderr[-2000:]
    assert "knowledge/recall_trained" in detail.stdout and "worst-learned training documents" in detail.stdout
    assert "facts/" in detail.stdout.split("worst-learned training documents")[1]
