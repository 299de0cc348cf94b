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
    report = ingest_folder(project.kb, Path(args.path), max_chars=args.max_chars)
    print(
        f"{report.files} files -> {report.documents} documents in {runtime.kb.describe()}: "
        f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged, {report.removed} removed"
    )
    return 0
