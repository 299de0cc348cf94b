"""Data preparation: cleaning rules, document-level split, packing, caching, formatting."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from kbtune.data.cleaning import clean_documents, normalise_whitespace, split_of
from kbtune.data.preparation import DataError, DataPreparation, DataSettings
from kbtune.data.tokens import pack
from kbtune.knowledge_base import Document, KBSettings, KnowledgeBase
from kbtune.modeling.factory import ModelSpec, TokenizerProvider

WORDS = "tide buoy sensor probe harbour calibration firmware station river soil wind rain".split()


def text(i: int, n: int = 60) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + f" document {i}."


def make_kb(tmp_path, docs: list[Document], name: str = "prep") -> KnowledgeBase:
    kb = KnowledgeBase.connect(KBSettings(path=str(tmp_path / "chroma"), collection=name, page_size=7))
    kb.upsert(docs, [[float(i % 5), 1.0] for i in range(len(docs))], create=True)
    return kb


def preparation(kb, tmp_path, **settings) -> DataPreparation:
    s = DataSettings(**{"block_size": 32, "val_fraction": 0.2, **settings})
    spec = ModelSpec(name="t", vocab_size=300, max_position=64)
    return DataPreparation(kb, s, TokenizerProvider(spec, tmp_path / "cache"), tmp_path / "cache")


# -- cleaning ------------------------------------------------------------------------------------
def test_cleaning_drops_none_empty_whitespace_and_duplicates_and_counts_them():
    docs = [
        Document("a", "Hello   world\t again\r\n\n\n\nsecond  para"),
        Document("b", None),
        Document("c", ""),
        Document("d", "  \n\t  "),
        Document("e", "Hello world again\n\nsecond para"),  # same content as "a" once normalised
        Document("f", "something else"),
    ]
    drops: Counter = Counter()
    kept = clean_documents(docs, drops)
    assert [d.id for d in kept] == ["a", "f"]
    assert kept[0].text == "Hello world again\n\nsecond para"
    assert drops == Counter({"none": 1, "empty": 2, "duplicate": 1})


def test_normalise_whitespace_keeps_paragraphs():
    assert normalise_whitespace(" a  b \n\n\n\n c\u00a0d ") == "a b\n\nc d"


# -- split ---------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_stable_when_documents_are_added():
    ids = [f"doc-{i}" for i in range(2000)]
    before = {i: split_of(i, 0, 0.1) for i in ids}
    grown = ids + [f"new-{i}" for i in range(3000)]
    after = {i: split_of(i, 0, 0.1) for i in grown}
    assert all(after[i] == before[i] for i in ids), "adding documents moved an existing one"
    share = sum(v == "val" for v in after.values()) / len(after)
    assert 0.08 < share < 0.12
    assert {split_of(i, 1, 0.1) for i in ids} == {"train", "val"}
    assert sum(split_of(i, 1, 0.1) != before[i] for i in ids) > 0, "the seed must change the split"


def test_prepared_splits_hold_whole_documents(tmp_path):
    kb = make_kb(tmp_path, [Document(f"d{i:03d}", text(i)) for i in range(60)])
    data = preparation(kb, tmp_path).prepare_dataset()
    entries = data.documents()
    assert len(entries) == 60 and len({e["id"] for e in entries}) == 60
    val_ids = {e["id"] for e in entries if e["split"] == "val"}
    assert val_ids and val_ids == {f"d{i:03d}" for i in range(60) if split_of(f"d{i:03d}", 0, 0.2) == "val"}
    assert data.manifest["splits"]["val"]["documents"] == len(val_ids)


# -- packing -------------------------------------------------------------------------------------
def test_pack_puts_eos_between_documents_and_cuts_full_blocks():
    blocks, tail = pack([[1, 2, 3], [4, 5], [6, 7, 8]], eos_id=0, block_size=4)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert tail == 3  # 7 8 EOS do not fill a block
    assert blocks.dtype == np.int32


def test_prepared_blocks_have_block_size_and_eos_separators(tmp_path):
    kb = make_kb(tmp_path, [Document(f"d{i:03d}", text(i)) for i in range(40)])
    data = preparation(kb, tmp_path).prepare_dataset()
    eos = data.tokenizer.eos_token_id
    assert data.train.shape[1] == 32 and data.val.shape[1] == 32
    train_docs = data.manifest["splits"]["train"]["documents"]
    # One EOS per document, except those that fell into the dropped tail.
    assert train_docs - 1 <= int((data.train == eos).sum()) <= train_docs


# -- cache ---------------------------------------------------------------------------------------
def test_cache_hit_when_nothing_changed_and_new_key_when_one_document_changes(tmp_path):
    docs = [Document(f"d{i:03d}", text(i)) for i in range(40)]
    kb = make_kb(tmp_path, docs)
    first = preparation(kb, tmp_path).prepare_dataset()
    again = preparation(kb, tmp_path).prepare_dataset()
    assert again.cached and again.manifest["cache_key"] == first.manifest["cache_key"]
    np.testing.assert_array_equal(again.train, first.train)

    kb.upsert([Document("d005", text(5) + " edited")], [[0.0, 1.0]])
    changed = preparation(kb, tmp_path).prepare_dataset()
    assert not changed.cached
    assert changed.manifest["cache_key"] != first.manifest["cache_key"]
    other = preparation(kb, tmp_path, block_size=16).prepare_dataset()
    assert other.manifest["cache_key"] not in (first.manifest["cache_key"], changed.manifest["cache_key"])


def test_manifest_records_hashes_drops_and_token_counts(tmp_path):
    docs = [Document(f"d{i:03d}", text(i)) for i in range(40)] + [Document("dup", text(3)), Document("blank", "  ")]
    kb = make_kb(tmp_path, docs)
    data = preparation(kb, tmp_path).prepare_dataset()
    m = json.loads(data.manifest_text())
    assert m["document_count"] == 40 and m["drops"] == {"duplicate": 1, "empty": 1}
    assert all(len(e["sha256"]) == 64 for e in m["documents"])
    assert m["splits"]["train"]["tokens"] > 0 and m["collection"] == "prep"


# -- formatting ----------------------------------------------------------------------------------
def test_template_can_use_metadata_and_counts_missing_fields(tmp_path):
    docs = [Document(f"d{i:03d}", text(i), {"title": f"Title {i}"}) for i in range(30)] + [Document("untitled", text(99))]
    kb = make_kb(tmp_path, docs)
    data = preparation(kb, tmp_path, template="# {title}\n\n{text}").prepare_dataset()
    assert data.manifest["drops"] == {"missing_field:title": 1}
    decoded = data.tokenizer.decode(data.train.reshape(-1).tolist())
    assert "# Title" in decoded


def test_qa_format_masks_the_prompt(tmp_path):
    docs = [
        Document(f"q{i:02d}", f"## Q: question {i}?\n\nanswer {i}", {"question": f"How does {WORDS[i % 12]} work?", "answer": text(i, 20)})
        for i in range(40)
    ] + [Document("plain", text(1))]
    kb = make_kb(tmp_path, docs)
    data = preparation(kb, tmp_path, format="qa").prepare_dataset()
    assert data.manifest["drops"] == {"no_question_answer": 1}
    assert data.train_labels is not None and data.train_labels.shape == data.train.shape
    masked = data.train_labels == -100
    assert masked.any() and (~masked).any()
    # Where a label is kept it is the token itself (the model shifts internally).
    np.testing.assert_array_equal(data.train_labels[~masked], data.train[~masked])


# -- errors --------------------------------------------------------------------------------------
def test_too_little_text_names_block_size(tmp_path):
    kb = make_kb(tmp_path, [Document(f"d{i}", f"tiny text {i}") for i in range(30)])
    with pytest.raises(DataError, match="data.block_size"):
        preparation(kb, tmp_path, block_size=4096).prepare_dataset()


def test_empty_collection_names_the_collection(tmp_path):
    kb = make_kb(tmp_path, [Document("a", "   ")])
    with pytest.raises(DataError, match="kb.collection"):
        preparation(kb, tmp_path).prepare_dataset()


# -- streamed preparation --------------------------------------------------------------------------
class ReadyTokenizer:
    """A factory whose tokenizer needs no corpus (as a local model's): the first preparation reads the
    KB once, tokenizing as it goes."""

    needs_corpus = False

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, texts):
        self.calls += 1
        return self.tokenizer


def mixed_docs() -> list[Document]:
    docs = [Document(f"d{i:03d}", text(i), {"title": f"T{i}", "question": f"Q{i}?", "answer": text(i, 12)})
            for i in range(50)]  # fmt: skip
    return docs + [Document("dup", text(7)), Document("blank", " \n "), Document("messy", "a  b\r\n\n\n\nc  " + text(3))]


@pytest.mark.parametrize(
    "settings",
    [{}, {"template": "# {title}\n\n{text}"}, {"format": "qa"}, {"packing": "document"}],
    ids=["text", "template", "qa", "document-packing"],
)
def test_streamed_preparation_gives_the_in_memory_blocks_and_records(tmp_path, settings):
    kb = make_kb(tmp_path, mixed_docs())
    streamed = preparation(kb, tmp_path, **settings).prepare_dataset()
    held = preparation(kb, tmp_path / "other", **settings)
    held.tokenizer_factory = lambda texts: streamed.tokenizer
    in_memory = held._prepare_in_memory()
    for name in ("train", "val", "train_labels", "val_labels"):
        a, b = getattr(streamed, name), getattr(in_memory, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert streamed.documents() == in_memory.documents()
    for field_ in ("drops", "splits", "document_count"):
        assert streamed.manifest[field_] == in_memory.manifest[field_], field_


def test_the_bpe_tokenizer_trained_on_the_stream_is_the_one_trained_on_the_texts(tmp_path):
    from kbtune.modeling.factory import train_bpe_tokenizer

    kb = make_kb(tmp_path, mixed_docs())
    data = preparation(kb, tmp_path).prepare_dataset()
    texts = [d.formatted for d in preparation(kb, tmp_path).collect()[0] if d.split == "train"]
    direct = train_bpe_tokenizer(texts, 300, tmp_path / "direct")
    assert data.tokenizer.get_vocab() == direct.get_vocab()


def test_one_tokenizer_for_the_same_training_texts_whatever_the_blocks_or_the_path(tmp_path):
    # A checkpoint names the tokenizer it was trained with: a session that changes only the blocks
    # (block_size), or repacks the same documents (the in-memory path), must find it again.
    kb = make_kb(tmp_path, mixed_docs())
    tokenizers = tmp_path / "cache" / "tokenizers"
    plain = preparation(kb, tmp_path).prepare_dataset()
    trained = [p.name for p in tokenizers.iterdir()]
    shorter = preparation(kb, tmp_path, block_size=16).prepare_dataset()
    repacked = preparation(kb, tmp_path, repack=True).prepare_dataset()
    assert [p.name for p in tokenizers.iterdir()] == trained and len(trained) == 1
    assert plain.tokenizer.get_vocab() == shorter.tokenizer.get_vocab() == repacked.tokenizer.get_vocab()
    # Another split trains on other texts: another tokenizer.
    preparation(kb, tmp_path, val_fraction=0.3).prepare_dataset()
    assert len(list(tokenizers.iterdir())) == 2


def test_a_ready_tokenizer_prepares_in_one_pass_and_the_rerun_is_cached(tmp_path):
    kb = make_kb(tmp_path, mixed_docs())
    reference = preparation(kb, tmp_path / "ref").prepare_dataset()
    factory = ReadyTokenizer(reference.tokenizer)
    settings = DataSettings(block_size=32, val_fraction=0.2)
    first = DataPreparation(kb, settings, factory, tmp_path / "cache").prepare_dataset()
    again = DataPreparation(kb, settings, factory, tmp_path / "cache").prepare_dataset()
    assert not first.cached and again.cached and factory.calls == 2
    np.testing.assert_array_equal(first.train, reference.train)
    assert again.manifest["cache_key"] == first.manifest["cache_key"]
    assert again.manifest["drops"] == first.manifest["drops"] == {"duplicate": 1, "empty": 1}


def test_the_rerun_notices_a_swap_that_keeps_the_count_and_an_edit(tmp_path):
    kb = make_kb(tmp_path, [Document(f"d{i:03d}", text(i)) for i in range(40)])
    first = preparation(kb, tmp_path).prepare_dataset()
    assert preparation(kb, tmp_path).prepare_dataset().cached
    # The same number of documents, one of them new: the ids read last time are no longer all there.
    kb.delete(["d010"])
    kb.upsert([Document("new-doc", text(77) + " fresh")], [[0.0, 1.0]])
    swapped = preparation(kb, tmp_path).prepare_dataset()
    ids = {e["id"] for e in swapped.documents()}
    assert not swapped.cached and "new-doc" in ids and "d010" not in ids
    # Same ids, one text edited.
    kb.upsert([Document("d020", text(20) + " edited")], [[0.0, 1.0]])
    edited = preparation(kb, tmp_path).prepare_dataset()
    assert not edited.cached
    assert len({first.manifest["cache_key"], swapped.manifest["cache_key"], edited.manifest["cache_key"]}) == 3
    assert preparation(kb, tmp_path).prepare_dataset().manifest["cache_key"] == edited.manifest["cache_key"]


def test_a_filtered_collection_is_listed_again_on_every_run(tmp_path):
    docs = [Document(f"d{i:03d}", text(i), {"part": i % 2}) for i in range(60)]
    kb = make_kb(tmp_path, docs)
    filtered = kb.with_settings(where={"part": 0})
    first = preparation(filtered, tmp_path).prepare_dataset()
    assert {e["id"] for e in first.documents()} == {f"d{i:03d}" for i in range(0, 60, 2)}
    kb.upsert([Document("d100", text(100), {"part": 0})], [[0.0, 1.0]])
    grown = preparation(filtered, tmp_path).prepare_dataset()
    assert not grown.cached and "d100" in {e["id"] for e in grown.documents()}


def test_a_rerun_on_a_store_nobody_wrote_reads_no_document_and_any_other_open_or_write_reads_again(
    tmp_path, monkeypatch
):
    import chromadb
    from chromadb.api.shared_system_client import SharedSystemClient

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the store stamps of this test only
    make_kb(tmp_path, [Document(f"d{i:03d}", text(i)) for i in range(40)])
    pages = []
    iter_raw = KnowledgeBase.iter_raw
    monkeypatch.setattr(KnowledgeBase, "iter_raw", lambda self, *a, **k: (pages.append(p) or p for p in iter_raw(self, *a, **k)))

    def reopened() -> KnowledgeBase:
        """A client started as a new process starts it (Chroma's start writes to the store)."""
        SharedSystemClient.clear_system_cache()
        return KnowledgeBase.connect(KBSettings(path=str(tmp_path / "chroma"), collection="prep", page_size=7))

    def rerun(kb=None):
        pages.clear()
        return preparation(kb or reopened(), tmp_path).prepare_dataset(), len(pages)

    first, read = rerun()
    assert not first.cached and read > 0
    again, read = rerun()
    assert again.cached and read == 0 and again.manifest["cache_key"] == first.manifest["cache_key"]
    # Another program's Chroma client opened the store (its start writes): every document is read
    # again, the cache is still right, and the next rerun reads nothing again.
    SharedSystemClient.clear_system_cache()
    chromadb.PersistentClient(path=str(tmp_path / "chroma")).get_collection("prep").count()
    surveyed, read = rerun()
    assert surveyed.cached and read > 0 and surveyed.manifest["cache_key"] == first.manifest["cache_key"]
    assert rerun()[1] == 0
    # Another program edits one document: read, and prepared again.
    SharedSystemClient.clear_system_cache()
    other = chromadb.PersistentClient(path=str(tmp_path / "chroma")).get_collection("prep")
    other.upsert(ids=["d020"], documents=[text(20) + " edited"], embeddings=[[0.0, 1.0]])
    edited, read = rerun()
    assert not edited.cached and read > 0 and edited.manifest["cache_key"] != first.manifest["cache_key"]
    # This process writes after its client started: the epoch it started with no longer holds.
    kb = reopened()
    assert rerun(kb)[1] == 0
    kb.upsert([Document("d021", text(21) + " edited too")], [[0.0, 1.0]])
    assert kb.content_epoch() is None
    changed, read = rerun(kb)
    assert not changed.cached and read > 0


def test_the_store_epoch_continues_only_over_the_one_write_of_a_client_start(tmp_path, monkeypatch):
    from kbtune import store_checks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make_kb(tmp_path, [Document("d0", text(0))])
    store = tmp_path / "chroma" / "chroma.sqlite3"
    before = store_checks.record_checked(store, "e1")

    def counter(step: int) -> list[int]:
        return before[:5] + [before[5] + step] + before[6:]

    assert store_checks.epoch_after_start(store, before, before) == "e1"  # nothing written
    assert store_checks.epoch_after_start(store, before, counter(1)) == "e1"  # the start's own write
    assert store_checks.epoch_after_start(store, before, counter(2)) != "e1"  # and another one
    assert store_checks.epoch_after_start(store, counter(1), counter(2)) != "e1"  # written since the stamp
    assert store_checks.epoch_after_start(store, before, before + [1, 2, 3, 4]) != "e1"  # a write-ahead log
    assert store_checks.epoch_after_start(store, None, before) != "e1"


def test_the_corpus_digest_ignores_page_ends_but_not_where_one_document_ends():
    from kbtune.data.corpus import CorpusDigest

    def digest(*pages, metadata=False):
        d = CorpusDigest(metadata)
        for ids, texts, *metas in pages:
            d.add_page(ids, texts, metas[0] if metas else None)
        return d.hexdigest()

    whole = digest((["a", "b", "c"], ["x", "yy", None]))
    assert digest((["a"], ["x"]), (["b", "c"], ["yy", None])) == whole
    # Ids and texts of other lengths, cut at every place (a digest mixing the two lengths per page
    # once depended on kb.page_size).
    ids, texts = ["d1", "doc22", "x", "d4444"], ["first text", "", None, "the fourth"]
    pages = [digest(*((ids[a:b], texts[a:b]) for a, b in zip((0, *cut), (*cut, 4), strict=True) if a < b))
             for cut in ((), (1,), (2,), (1, 3), (1, 2, 3))]  # fmt: skip
    assert len(set(pages)) == 1
    assert digest((["a", "b", "c"], ["xy", "y", None])) != whole  # the same characters, cut elsewhere
    assert digest((["a", "bc", ""], ["x", "yy", None])) != whole
    assert digest((["a", "b", "c"], ["x", "yy", ""])) != whole  # no text is not empty text
    with_meta = digest((["a"], ["x"], [{"k": 1}]), metadata=True)
    assert with_meta != digest((["a"], ["x"], [{"k": 2}]), metadata=True)
