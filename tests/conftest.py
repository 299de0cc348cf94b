"""Shared fixtures: a real embedded Chroma KB seeded from the shipped sample corpus (with cheap
deterministic vectors: training never reads embeddings), a temporary project root, and a tiny config."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_KB = REPO / "data" / "sample_kb"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def hash_embedder(texts):
    """8-dim vectors from a hash: deterministic, offline, instant (tests that need the real model say so)."""
    out = []
    for t in texts:
        d = hashlib.sha256(t.encode()).digest()
        out.append([b / 255.0 for b in d[:8]])
    return out


def seed_kb(kb_path: Path, collection: str, folder: Path = SAMPLE_KB, limit_files: int | None = None):
    """Ingest `folder` (the sample corpus by default) into a real embedded Chroma collection."""
    from kbtune.ingestion import SUFFIXES, ingest_folder
    from kbtune.knowledge_base import KBSettings, KnowledgeBase

    kb = KnowledgeBase.connect(KBSettings(path=str(kb_path), collection=collection))
    if limit_files is not None:
        files = sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES)[:limit_files]
        sub = kb_path.parent / f"{collection}-src"
        for f in files:
            target = sub / f.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.read_text())
        folder = sub
    ingest_folder(kb, folder, embed=hash_embedder)
    return kb


@pytest.fixture(scope="session")
def small_kb(tmp_path_factory) -> dict[str, str]:
    """A KB of 24 sample-corpus files (~150 documents), created once per test session. Read-only:
    tests that write to a KB make their own."""
    root = tmp_path_factory.mktemp("kb")
    seed_kb(root / "chroma", "testkb", limit_files=24)
    return {"path": str(root / "chroma"), "collection": "testkb"}


@pytest.fixture
def project(tmp_path, small_kb) -> dict:
    """A temporary project root and the overrides that point a tiny training at it."""
    overrides = [
        f"paths.root={tmp_path}",
        f"kb.path={small_kb['path']}",
        f"kb.collection={small_kb['collection']}",
        "model=tiny",
        "data.block_size=64",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=2",
        # Tests of training and records; the knowledge evaluation has its own (test_knowledge_evaluation).
        "eval.after_training=false",
    ]
    return {"root": tmp_path, "overrides": overrides, "kb": small_kb}


@pytest.fixture
def python() -> str:
    return sys.executable
