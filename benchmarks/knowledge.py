"""The knowledge evaluation's cost: `model=small` trained for 3 epochs on the sample KB (as the README's
main job does), then evaluated on 1,000 fact probes (greedy decoding batched with the KV cache, plus the
multiple-choice likelihoods, for the version and for its starting model, and the per-document losses).
Reported: the evaluation's wall time, its share of the training's wall time (the training measured in
the same process: tokenizer, data preparation, fit and registration), and probe scoring batched vs one
probe at a time on the same probes and model (the same work).

Standalone: `python benchmarks/knowledge.py [--quick]`."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import harness
import kbs


def train_version(workdir: Path, quick: bool) -> tuple[list[str], float]:
    from kbtune.hydra_entry import compose
    from kbtune.jobs import train

    kb = kbs.sample_kb(workdir)
    root = workdir / "knowledge"
    shutil.rmtree(root, ignore_errors=True)
    size = (
        ["model=tiny", "data.block_size=64", "trainer.max_steps=20"]
        if quick
        else ["model=small", "trainer.max_epochs=3"]
    )
    overrides = [f"paths.root={root}", f"kb.path={kb['path']}", f"kb.collection={kb['collection']}", *size,
                 "trainer.enable_progress_bar=false", "eval.after_training=false", "version=bench"]  # fmt: skip
    t0 = time.perf_counter()
    train(compose(overrides))
    return overrides, time.perf_counter() - t0


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    from kbtune.evaluation import EvalSettings
    from kbtune.knowledge.probes import ProbeSettings
    from kbtune.knowledge.scoring import score_probes
    from kbtune.model_manager import load_model_dir
    from kbtune.project import open_project

    overrides, train_seconds = train_version(workdir, quick)
    project = open_project(overrides)
    settings = EvalSettings(probes=ProbeSettings(max_probes=100 if quick else 1000))
    reports: list[Any] = []

    def evaluate() -> dict[str, float]:
        t0 = time.perf_counter()
        report = project.service.evaluate_knowledge("bench", settings, record=False)
        reports.append(report)
        return {"seconds": time.perf_counter() - t0, "probes": float(len(report.probes.probes)),
                **{k.split("/", 1)[1]: v for k, v in report.metrics.items() if "recall" in k}}  # fmt: skip

    samples = harness.interleave({"evaluation": evaluate}, rounds or (1 if quick else 2), "knowledge")
    probes = reports[-1].probes.probes
    model, tokenizer = load_model_dir(project.manager.model_dir("bench")[1])

    def scoring(batch: int) -> Any:
        def measure() -> dict[str, float]:
            t0 = time.perf_counter()
            score_probes(model, tokenizer, probes, batch_size=batch)
            return {"seconds": time.perf_counter() - t0}

        return measure

    scored = harness.interleave(
        {"batched (16)": scoring(16), "one at a time": scoring(1)}, rounds or 1, "scoring"
    )
    s, sc = harness.summarise(samples), harness.summarise(scored)
    size = "model=tiny 20 steps" if quick else "model=small 3 epochs"
    n = int(s["evaluation"]["probes"]["median"])
    train_stats = harness.summary([train_seconds])
    rows = [
        harness.row("knowledge", size, "training", "wall", "s", train_stats),
        harness.row(
            "knowledge",
            f"{n} probes",
            "evaluation",
            "wall",
            "s",
            s["evaluation"]["seconds"],
            train_stats,
            "training",
        ),
        harness.row(
            "knowledge",
            f"{n} probes",
            "batched (16)",
            "scoring",
            "s",
            sc["batched (16)"]["seconds"],
            sc["one at a time"]["seconds"],
            "one at a time",
        ),  # fmt: skip
        harness.row(
            "knowledge", f"{n} probes", "one at a time", "scoring", "s", sc["one at a time"]["seconds"]
        ),
    ]
    for key in ("recall_trained", "start/recall_trained", "recall_heldout", "mc_accuracy_trained"):
        if key in s["evaluation"]:
            rows.append(harness.row("knowledge", f"{n} probes", "version", key, "", s["evaluation"][key]))
    evaluation, batched = s["evaluation"]["seconds"], sc["batched (16)"]["seconds"]["median"]
    one = sc["one at a time"]["seconds"]["median"]
    what = "model=tiny trained 20 steps" if quick else "model=small"
    readme = [
        harness.readme_row(
            f"knowledge evaluation, {n:,} probes of the sample KB on {what}",
            f"**{harness.num(evaluation['median'])} s** ({harness.num(evaluation['min'])}..{harness.num(evaluation['max'])}) "
            f"= {evaluation['median'] / train_seconds:.2f}x the {harness.num(train_seconds)} s of the training it follows "
            f"(tokenizer, preparation, fit, registration); both the version and its starting model are scored, plus "
            f"per-document losses. Probe scoring batched by 16 with the KV cache: {harness.num(batched)} s vs "
            f"{harness.num(one)} s one probe at a time (**{one / batched:.1f}x**)",
        )
    ]  # fmt: skip
    return {"rows": rows, "targets": [], "readme": readme, "summaries": {**s, **sc},
            "samples": {**samples, **scored}, "details": {"overrides": overrides, "training_seconds": train_seconds}}  # fmt: skip


def main() -> None:
    harness.section_main(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
