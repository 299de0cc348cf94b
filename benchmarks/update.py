"""An incremental update against a full retrain, on a knowledge base that changed.

Start: a version trained with `experiment=knowledge` on 100 planted entities (`model=small`). Change:
10 new entities, and the year of 5 trained entities changed. Then, as a user runs them with
`scripts/train.py` in the same project (wall time from launch to exit, knowledge evaluation off in
both and run afterwards on the same probes):
- the update: `experiment=update base_version=base` (the delta plus a replay sample, from the base);
- the full retrain: `experiment=knowledge` from scratch on the whole changed KB.
Reported: wall time of each; recall of the delta's facts (new and changed) for both on the update's
probes; recall of unchanged trained facts before (the base) and after the update; and for the changed
facts, how often each version answers the new year and how often the old one.

Standalone: `python benchmarks/update.py [--quick]`."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import harness
import kbs

COLLECTION = "kbtune-facts"


def size(quick: bool) -> dict[str, Any]:
    if quick:
        return {"entities": 30, "new": 4, "changed": 2, "model": ["model=tiny", "data.block_size=64",
                "trainer.max_epochs=2", "data.views_per_epoch=2"]}  # fmt: skip
    return {"entities": 100, "new": 10, "changed": 5, "model": ["model=small"]}


def change_kb(kb: Any, s: dict[str, Any], trained: list[str]) -> dict[str, tuple[str, str]]:
    """Add s["new"] entities; move the year of s["changed"] trained entities by 7. Returns, per changed
    document, (old year, new year)."""
    from kbtune.knowledge.facts import entity_document, generate_entities
    from kbtune.knowledge_base import Document

    entities = generate_entities(s["entities"] + s["new"])
    docs = [Document(*entity_document(e)) for e in entities[s["entities"] :]]
    changes = {}
    by_id = {entity_document(e)[0]: e for e in entities[: s["entities"]]}
    for doc_id in trained[: s["changed"]]:
        e = by_id[doc_id]
        old = e.facts["year"]
        new = str(int(old) + 7)
        docs.append(Document(*entity_document(replace(e, facts={**e.facts, "year": new}))))
        changes[doc_id] = (old, new)
    kb.upsert(docs, embeddings=kbs.hash_embed([d.text for d in docs]))
    return changes


def changed_answers(
    results: list[Any], probes: dict[str, Any], changes: dict[str, tuple[str, str]]
) -> dict[str, float]:
    """Of the probes asking a changed year: the share answered with the new year, and with the old."""
    asked = [
        r
        for r in results
        if r.document_id in changes and probes[r.probe_id].answer == changes[r.document_id][1]
    ]
    if not asked:
        return {}
    new = sum(changes[r.document_id][1] in r.prediction for r in asked) / len(asked)
    old = sum(changes[r.document_id][0] in r.prediction for r in asked) / len(asked)
    return {"changed_probes": float(len(asked)), "new_value": new, "old_value": old}


def measure(workdir: Path, quick: bool) -> dict[str, Any]:
    import json

    from kbtune.knowledge.facts import plant_facts
    from kbtune.knowledge.scoring import score_probes
    from kbtune.model_manager import load_model_dir
    from kbtune.project import open_project

    s = size(quick)
    root = workdir / "update"
    shutil.rmtree(root, ignore_errors=True)
    locate = [f"kb.path={root / 'chroma'}", f"kb.collection={COLLECTION}", "trainer.enable_progress_bar=false",
              "eval.after_training=false", *s["model"]]  # fmt: skip
    project = open_project([f"paths.root={root}", *locate])
    plant_facts(project.kb, s["entities"], embed=kbs.hash_embed)
    base_s = harness.train_script(root, [*locate, "experiment=knowledge", "version=base"])
    store = project.store
    manifest = json.loads(
        store.read_text(store.get_version("base").training_session_id, "data/manifest.json")
    )
    changes = change_kb(
        project.kb, s, sorted(d["id"] for d in manifest["documents"] if d["split"] == "train")
    )
    update_s = harness.train_script(
        root, [*locate, "experiment=update", "base_version=base", "version=update"]
    )
    full_s = harness.train_script(root, [*locate, "experiment=knowledge", "version=full"])
    report = project.service.evaluate_knowledge("update")
    roles = {d["id"]: d.get("role") for d in json.loads(store.read_text(
        store.get_version("update").training_session_id, "data/manifest.json"))["documents"]}  # fmt: skip
    delta = [p for p in report.probes.probes if p.split == "train" and roles.get(p.document_id) == "delta"]
    by_id = {p.id: p for p in report.probes.probes}
    out = {"base_seconds": base_s, "update_seconds": update_s, "full_seconds": full_s,
           **{k.split("/", 1)[1]: v for k, v in report.metrics.items() if "recall" in k}}  # fmt: skip
    for name in ("update", "full"):
        model, tokenizer = load_model_dir(project.manager.model_dir(name)[1])
        results = score_probes(model, tokenizer, delta, batch_size=16)
        out[f"{name}_recall_delta"] = sum(r.exact for r in results) / max(1, len(results))
        out.update({f"{name}_{k}": v for k, v in changed_answers(results, by_id, changes).items()})
    return out


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    samples = harness.interleave({"update": lambda: measure(workdir, quick)}, 1, "update")
    s = harness.summarise(samples)["update"]
    size_label = "model=tiny, 30 entities" if quick else "model=small, 100 entities +10 new, 5 changed"
    rows = [
        harness.row("update", size_label, "full retrain", "wall", "s", s["full_seconds"]),
        harness.row(
            "update",
            size_label,
            "update",
            "wall",
            "s",
            s["update_seconds"],
            s["full_seconds"],
            "full retrain",
        ),
        harness.row("update", size_label, "full retrain", "recall delta", "", s["full_recall_delta"]),
        harness.row("update", size_label, "update", "recall delta", "", s["update_recall_delta"]),
        harness.row(
            "update", size_label, "base (start)", "recall unchanged", "", s["start/recall_unchanged"]
        ),
        harness.row("update", size_label, "update", "recall unchanged", "", s["recall_unchanged"]),
        harness.row("update", size_label, "update", "recall held-out", "", s["recall_heldout"]),
    ]
    for name in ("update", "full"):
        if f"{name}_new_value" in s:
            rows.append(
                harness.row("update", size_label, name, "changed fact: new value", "", s[f"{name}_new_value"])
            )
            rows.append(
                harness.row("update", size_label, name, "changed fact: old value", "", s[f"{name}_old_value"])
            )
    m = {k: v["median"] for k, v in s.items()}
    targets = [
        harness.target("update wall / full retrain wall", m["update_seconds"] / m["full_seconds"], "<=", 0.2),
        harness.target(
            "recall delta: full retrain - update",
            m["full_recall_delta"] - m["update_recall_delta"],
            "<=",
            0.05,
        ),
        harness.target(
            "recall unchanged: base - update", m["start/recall_unchanged"] - m["recall_unchanged"], "<=", 0.05
        ),
        harness.target("changed fact answered with the new value", m.get("update_new_value"), ">=", 0.9),
    ]
    return {"rows": rows, "targets": targets, "summaries": {"update": s}, "samples": samples}


def main() -> None:
    harness.section_main(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
