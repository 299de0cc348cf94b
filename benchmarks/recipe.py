"""The knowledge recipe against the defaults and each of its options alone, at equal exposures per fact.

The KB: 100 invented entities x 5 facts, one document each (`kbtune kb facts --entities 100`; the facts
exist nowhere else, so what a model recalls it learned here). Each variant is `scripts/train.py
model=small` from scratch as a user runs it, in a fresh project root (interpreter start-up, tokenizer
training, data preparation, training, registration and the knowledge evaluation all in the wall time),
with every training document seen 200 times:
- views-per-epoch variants (repack, sentence_shuffle, experiment=knowledge): 5 views x 40 epochs;
- the others (defaults, packing=document, qa_pairs): 200 epochs, validated every 5
  (`trainer.check_val_every_n_epoch=5`), so every variant validates and checkpoints 40 times.
All variants are probed with the same probes (same KB, same split, `eval.probes.max_per_document=5`).

Reported per variant: closed-book exact-match recall of trained facts and of held-out facts (and the
untrained start's), wall time, and training tokens/s from the session's progress (block positions per
second of fit, validation included; padded positions of `packing=document` count, so its useful rate
is lower) against the defaults in the same run. One round: a variant takes 3-6 minutes on 2 cores.

Standalone: `python benchmarks/recipe.py [--quick]`."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import harness
import kbs

ENTITIES, QUICK_ENTITIES = 100, 30
COLLECTION = "kbtune-facts"

# name -> (overrides, uses views per epoch). Views variants: 5 views x epochs; others: epochs x 5.
VARIANTS: dict[str, tuple[list[str], bool]] = {
    "defaults": ([], False),
    "repack": (["data.repack=true"], True),
    "document (block 128)": (["data.packing=document", "data.block_size=128"], False),
    "sentence_shuffle": (["data.sentence_shuffle=true"], True),
    "qa_pairs=3": (["data.qa_pairs=3"], False),
    "repack + sentence_shuffle (packed)": (["data.repack=true", "data.sentence_shuffle=true"], True),
    "experiment=knowledge": (["experiment=knowledge"], True),
}
QUICK_VARIANTS = ("defaults", "experiment=knowledge")


def facts_kb(workdir: Path, entities: int) -> dict[str, str]:
    from kbtune.knowledge.facts import plant_facts
    from kbtune.knowledge_base import KBSettings, KnowledgeBase

    path = workdir / f"facts-{entities}" / "chroma"
    kb = KnowledgeBase.connect(KBSettings(path=str(path), collection=COLLECTION))
    plant_facts(kb, entities, embed=kbs.hash_embed)
    return {"path": str(path), "collection": COLLECTION}


def exposure_overrides(uses_views: bool, quick: bool) -> list[str]:
    """200 exposures per training document (quick: 10), with the same number of validations."""
    epochs, views = (2, 5) if quick else (40, 5)
    if uses_views:
        return [f"trainer.max_epochs={epochs}", f"data.views_per_epoch={views}"]
    return [f"trainer.max_epochs={epochs * views}", f"trainer.check_val_every_n_epoch={views}"]


def train_variant(workdir: Path, name: str, overrides: list[str]) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    root = workdir / "recipe" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    shutil.rmtree(root, ignore_errors=True)
    seconds = harness.train_script(root, overrides)
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("kbtune").experiment_id])
    (progress,) = root.glob("**/progress.json")
    # "knowledge/seconds" (the evaluation's own time) is kept as eval_seconds, apart from the wall time.
    knowledge = {k.split("/", 1)[1].replace("seconds", "eval_seconds"): v for k, v in run.data.metrics.items()
                 if k.startswith("knowledge/")}  # fmt: skip
    if "recall_trained" not in knowledge:
        raise RuntimeError(f"{name}: no knowledge evaluation recorded (metrics: {sorted(run.data.metrics)})")
    return {**knowledge, "seconds": seconds, "tokens_per_s": json.loads(progress.read_text())["tokens_per_s"]}


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    kb = facts_kb(workdir, QUICK_ENTITIES if quick else ENTITIES)
    base = [f"kb.path={kb['path']}", f"kb.collection={kb['collection']}", "trainer.enable_progress_bar=false",
            "eval.after_training=true", "eval.probes.max_per_document=5",
            *(["model=tiny"] if quick else ["model=small"])]  # fmt: skip
    names = QUICK_VARIANTS if quick else tuple(VARIANTS)
    overrides = {n: [*base, *VARIANTS[n][0], *exposure_overrides(VARIANTS[n][1], quick)] for n in names}
    variants = {n: (lambda n=n: train_variant(workdir, n, overrides[n])) for n in names}
    samples = harness.interleave(variants, rounds or 1, "recipe")
    s = harness.summarise(samples)
    entities = QUICK_ENTITIES if quick else ENTITIES
    size = f"{entities} entities, {'model=tiny, 10' if quick else 'model=small, 200'} exposures"
    rows = []
    for n in names:
        rows += [
            harness.row("recipe", size, n, "recall trained", "", s[n]["recall_trained"]),
            harness.row("recipe", size, n, "recall held-out", "", s[n]["recall_heldout"]),
            harness.row(
                "recipe", size, n, "wall", "s", s[n]["seconds"], s["defaults"]["seconds"], "defaults"
            ),
            harness.row(
                "recipe",
                size,
                n,
                "train",
                "tok/s",
                s[n]["tokens_per_s"],
                s["defaults"]["tokens_per_s"],
                "defaults",
            ),  # fmt: skip
        ]
    rows.append(harness.row("recipe", size, "untrained start", "recall trained", "",
                            s["experiment=knowledge"]["start/recall_trained"]))  # fmt: skip
    k = s["experiment=knowledge"]
    leak = k["recall_heldout"]["median"] - k.get("start/recall_heldout", {"median": 0.0})["median"]
    targets = [
        harness.target(
            "experiment=knowledge recall of trained facts", k["recall_trained"]["median"], ">=", 0.9
        ),
        harness.target(
            "experiment=knowledge wall time incl. start-up (s)", k["seconds"]["median"], "<=", 600
        ),
        harness.target("held-out recall above the start (no leakage)", leak, "<=", 0.05),
        *(
            harness.target(
                f"{n} tokens/s vs defaults",
                harness.ratio(s, n, "defaults", "tokens_per_s"),
                ">=",
                0.9,
                "defaults",
            )
            for n in names
            if n != "defaults"
        ),  # fmt: skip
    ]
    return {"rows": rows, "targets": targets, "summaries": s, "samples": samples,
            "details": {"overrides": overrides, "collection": kb}}  # fmt: skip


def main() -> None:
    harness.section_main(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
