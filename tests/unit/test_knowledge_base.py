"""Chroma access: paged export (never one unbounded get), filters, clear errors."""

from __future__ import annotations

import pytest

from kbtune.knowledge_base import Document, KBSettings, KnowledgeBase, KnowledgeBaseError


@pytest.fixture
def kb(tmp_path) -> KnowledgeBase:
    kb = KnowledgeBase.connect(KBSettings(path=str(tmp_path / "chroma"), collection="paging", page_size=10))
    docs = [Document(f"d{i:03d}", f"text {i}", {"group": "even" if i % 2 == 0 else "odd"}) for i in range(95)]
    kb.upsert(docs, [[float(i), 1.0] for i in range(95)], create=True)
    return kb


class SpyCollection:
    """Records the arguments of every get() on the real collection."""

    def __init__(self, collection):
        self._c = collection
        self.calls: list[dict] = []

    def get(self, **kwargs):
        self.calls.append(kwargs)
        return self._c.get(**kwargs)

    def __getattr__(self, name):
        return getattr(self._c, name)


def test_export_reads_every_document_in_bounded_pages_in_id_order(kb, monkeypatch):
    import kbtune.knowledge_base as module

    monkeypatch.setattr(module, "ID_PAGE", 40)  # the id listing pages too: 40 + 40 + 15
    spy = SpyCollection(kb._collection())
    monkeypatch.setattr(kb, "_collection", lambda: spy)
    pages = list(kb.iter_pages())
    assert [len(p) for p in pages] == [10] * 9 + [5]
    assert [d.id for p in pages for d in p] == [f"d{i:03d}" for i in range(95)]
    listing = [c for c in spy.calls if c["include"] == []]
    fetches = [c for c in spy.calls if c["include"] != []]
    assert [c["limit"] for c in listing] == [40, 40, 40], "an unbounded id listing was made"
    # Documents are fetched by id, never at an offset (a read at an offset costs Chroma the offset).
    assert len(fetches) == 10 and all(len(c["ids"]) <= 10 and "offset" not in c for c in fetches)


def test_a_document_deleted_during_the_export_is_left_out(kb):
    pages = kb.iter_pages()
    first = next(pages)
    kb.delete(["d050"])
    rest = [d.id for p in pages for d in p]
    assert len(first) == 10 and "d050" not in rest and len(first) + len(rest) == 94


def test_export_is_lazy(kb):
    pages = kb.iter_pages()
    first = next(pages)
    assert len(first) == 10  # nothing beyond the first page has been read yet


def test_where_filter(kb):
    odd = list(kb.with_settings(collection="paging", where={"group": "odd"}).iter_documents())
    assert len(odd) == 47 and all(d.metadata["group"] == "odd" for d in odd)


def test_missing_collection_names_it_and_the_ingest_command(tmp_path):
    kb = KnowledgeBase.connect(KBSettings(path=str(tmp_path / "chroma"), collection="nope-nope"))
    with pytest.raises(KnowledgeBaseError, match=r"kb.collection.*'nope-nope'.*kbtune kb ingest"):
        list(kb.iter_documents())
    assert not kb.exists()  # reading never creates a collection


def test_get_by_ids_keeps_order_and_skips_missing(kb):
    got = kb.get(["d050", "missing", "d001"])
    assert [d.id for d in got] == ["d050", "d001"]


def test_settings_validation_lists_every_problem():
    from kbtune.configuration import parse

    problems: list[str] = []
    assert parse(KBSettings, {"backend": "mongo", "collection": "x", "page_size": 0}, "kb", problems) is None
    problems += KBSettings(collection="x", page_size=0).validate()
    assert any(p.startswith("kb.backend") for p in problems)
    assert any(p.startswith("kb.collection") for p in problems)
    assert any(p.startswith("kb.page_size") for p in problems)
