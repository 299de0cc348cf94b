"""Ingestion: splitting by heading then size, stable ids, idempotent re-ingest, offline embeddings."""

from __future__ import annotations

import math

import pytest

from kbtune.ingestion import default_embedder, ingest_folder, split_file
from kbtune.knowledge_base import KBSettings, KnowledgeBase
from tests.conftest import hash_embedder

DOC = """# Heron H4 buoy

Intro paragraph about the buoy.

## Calibration

Calibrate the sensor heads every quarter.

## Q: How often should I clean the wiper?

Every two months in summer.
"""


def test_split_by_heading_with_stable_ids_and_metadata():
    docs = split_file("products/heron.md", DOC)
    assert [d.id for d in docs] == ["products/heron.md#0", "products/heron.md#1", "products/heron.md#2"]
    assert docs[0].text.startswith("# Heron H4 buoy")
    assert docs[1].metadata["section"] == "Calibration" and docs[1].metadata["title"] == "Heron H4 buoy"
    assert docs[2].metadata["question"] == "How often should I clean the wiper?"
    assert docs[2].metadata["answer"] == "Every two months in summer."


def test_long_sections_are_split_by_size_at_paragraphs():
    body = "\n\n".join(f"Paragraph {i} " + "word " * 40 for i in range(20))
    docs = split_file("long.txt", body, max_chars=600)
    assert len(docs) > 1 and all(len(d.text) <= 600 for d in docs)
    assert " ".join(d.text for d in docs).split() == body.split()  # nothing lost or reordered


def _kb(tmp_path, name="ingest"):
    return KnowledgeBase.connect(KBSettings(path=str(tmp_path / "chroma"), collection=name))


def test_reingest_unchanged_changes_nothing_and_an_edit_replaces_its_documents(tmp_path):
    src = tmp_path / "docs"
    (src / "sub").mkdir(parents=True)
    (src / "a.md").write_text(DOC)
    (src / "sub" / "b.txt").write_text("Plain text file about soil probes.")
    (src / "ignored.pdf").write_text("not read")
    kb = _kb(tmp_path)
    first = ingest_folder(kb, src, embed=hash_embedder)
    assert (first.files, first.documents, first.added) == (2, 4, 4)

    again = ingest_folder(kb, src, embed=hash_embedder)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, 4)

    (src / "a.md").write_text("# Heron H4 buoy\n\nRewritten intro only.\n")
    edited = ingest_folder(kb, src, embed=hash_embedder)
    assert (edited.updated, edited.removed, edited.unchanged) == (1, 2, 1)
    ids = sorted(d.id for d in kb.iter_documents())
    assert ids == ["a.md#0", "sub/b.txt#0"]
    assert kb.get(["a.md#0"])[0].text == "# Heron H4 buoy\n\nRewritten intro only."


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .md or .txt"):
        ingest_folder(_kb(tmp_path), tmp_path / "empty", embed=hash_embedder)


def test_default_embedder_is_offline_minilm_with_unit_vectors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vectors = default_embedder()(["Calibrate the dissolved oxygen head.", "Wiper maintenance schedule."])
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-4)
