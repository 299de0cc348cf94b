"""`kbtune kb ...`: knowledge-base commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from kbtune.project import open_project


def cmd_kb_ingest(args: argparse.Namespace) -> int:
    from kbtune.ingestion import ingest_folder

    overrides = [f"kb.collection={args.collection}", *args.overrides]
    if args.kb_path:
        overrides.append(f"kb.path={args.kb_path}")
    project = open_project(overrides)
    runtime = project.runtime
    report = ingest_folder(project.kb, Path(args.path), max_chars=args.max_chars, prune=args.prune)
    print(
        f"{report.files} files -> {report.documents} documents in {runtime.kb.describe()}: "
        f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged, {report.removed} removed"
    )
    return 0


def cmd_kb_facts(args: argparse.Namespace) -> int:
    """A planted-facts knowledge base: invented entities, one document each, whose facts a model can
    only know from training on it (experiment=knowledge is measured on it)."""
    from kbtune.knowledge.facts import plant_facts

    overrides = [f"kb.collection={args.collection}", *args.overrides]
    if args.kb_path:
        overrides.append(f"kb.path={args.kb_path}")
    project = open_project(overrides)
    count = plant_facts(project.kb, args.entities, args.seed)
    print(f"{count} entity documents ({count * 5} facts) in {project.runtime.kb.describe()}")
    print(f"train: python scripts/train.py experiment=knowledge kb.collection={args.collection}")
    return 0
