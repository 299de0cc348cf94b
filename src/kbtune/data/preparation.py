"""The seed's DataPreparation: collect documents from the KB, clean and format them, split by document,
tokenize, pack into blocks, and cache the result (Arrow) under a key derived from everything it used."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kbtune.data.cleaning import CleanDoc, Cleaner, format_document, normalise_whitespace
from kbtune.data.dataset_cache import (
    DocumentRecords,
    PendingEntry,
    documents_text,
    load_augmentation,
    load_documents,
    load_prepared,
)
from kbtune.data.settings import DataError, DataSettings
from kbtune.data.tokens import SplitBlocks, tokenizer_fingerprint, tokenizer_parallelism
from kbtune.knowledge_base import Document, KnowledgeBase

if TYPE_CHECKING:
    from kbtune.data import corpus

logger = logging.getLogger(__name__)

# Bump when the preparation's output for the same inputs changes, so old caches are not reused.
PREPARATION_VERSION = 2  # 2: the per-document entries in documents.json; streamed preparation
TokenizerFactory = Callable[[Sequence[str]], Any]


@dataclass
class PreparedData:
    train: np.ndarray  # [blocks, block_size] int32 token ids
    val: np.ndarray
    train_labels: np.ndarray | None  # only for `qa`: -100 where no loss is taken
    val_labels: np.ndarray | None
    tokenizer: Any
    manifest: dict[str, Any]
    directory: Path
    cached: bool = False
    # Training texts and question/answer pairs for per-epoch views (data.repack/sentence_shuffle/qa_pairs).
    augmentation: dict[str, Any] | None = None

    def documents(self) -> list[dict[str, Any]]:
        """The manifest's per-document entries (id, sha256 of the cleaned text, split[, role]), kept in
        their own file: a million of them take ~400 MB as Python dicts, which nothing else needs."""
        return load_documents(self.directory)

    def manifest_text(self) -> str:
        """The whole data manifest as JSON (what a session records as data/manifest.json): this
        preparation's manifest with the per-document entries spliced in from their file."""
        head = json.dumps({**self.manifest, "documents": None}, indent=1)
        assert head.endswith('"documents": null\n}')
        return head[: -len("null\n}")] + documents_text(self.directory) + "\n}"


class DataPreparation:
    """Prepares (or loads from cache) the train/val token blocks for one KB + settings + tokenizer.

    Plain preparations stream: the KB is read a page at a time, in id order, and each page cleaned,
    tokenized and dropped, so memory holds the token arrays and a few bytes per document. The cache key
    is a digest of the documents as stored (corpus.Survey), so a rerun reads and hashes every document
    but cleans and tokenizes nothing. An update session (it selects from every training document) and
    per-epoch views (they keep the training texts) hold the cleaned documents in memory."""

    def __init__(self, kb: KnowledgeBase, settings: DataSettings, tokenizer_factory: TokenizerFactory, cache_dir: Path,
                 update: Any = None):  # fmt: skip
        self.kb = kb
        # An UpdateBase: train on the change since that version plus a replay sample (experiment=update).
        self.update = update
        self.settings = settings
        # Called with the training texts (a list, or a corpus.TrainingCorpus that streams them and
        # carries their fingerprint); a factory with `needs_corpus = False` ignores them, which lets a
        # first preparation tokenize in the same pass that reads the KB.
        self.tokenizer_factory = tokenizer_factory
        # paths.cache_dir: prepared datasets live under its datasets/ folder, keyed by content.
        self.cache_dir = Path(cache_dir)
        self._result: PreparedData | None = None

    def prepare_dataset(self) -> PreparedData:
        if self._result is None:
            streams = self.update is None and not self.settings.augmented
            self._result = self._prepare_streamed() if streams else self._prepare_in_memory()
        return self._result

    # -- steps -------------------------------------------------------------------------------------
    def collect(self) -> tuple[list[CleanDoc], Counter]:
        return self._collect()[:2]

    def _collect(self) -> tuple[list[CleanDoc], Counter, str]:
        """Every kept document in id order, the drops, and the corpus digest (as a survey computes it)."""
        from kbtune.data import corpus

        s = self.settings
        digest, cleaner, kept = corpus.CorpusDigest(corpus.reads_metadata(s)), Cleaner(s), []
        for page_ids, texts, metas in self.kb.iter_raw(self.kb.list_ids(), metadata=True):
            digest.add_page(page_ids, texts, metas)
            kept += cleaner.clean([Document(i, t, dict(metas[k] or {}) if metas else {})
                                   for k, (i, t) in enumerate(zip(page_ids, texts, strict=True))])  # fmt: skip
        return kept, cleaner.drops, digest.hexdigest()

    def _prepare_streamed(self) -> PreparedData:
        from kbtune.data import corpus

        s, t0 = self.settings, time.perf_counter()
        index = corpus.SourceIndex(self.cache_dir, self.kb, s)
        found = index.unchanged()
        candidate = index.candidate_ids() if found is None else None
        if found is None and candidate is not None:
            found = corpus.survey(self.kb, s, candidate)
        if found is None and (candidate is not None or getattr(self.tokenizer_factory, "needs_corpus", True)):
            # A tokenizer trained on the corpus, or a collection prepared before: its digest first,
            # which may find the cache, before anything is tokenized.
            found = corpus.survey(self.kb, s)
        if found is not None and not found.usable:
            self._check_split_documents(0, 0, Counter())  # before a tokenizer is trained on nothing
        tokenizer = self._tokenizer(corpus.TrainingCorpus(self.kb, s, found) if found else [])
        if found is not None:
            hit = self._load_cached(self._streamed_key(found.digest, tokenizer), tokenizer, t0)
            if hit is not None:
                index.remember(hit.manifest["cache_key"], found)
                return hit
        ids = found.ids if found is not None else self.kb.list_ids()
        with self._pending() as entry:
            counts, records, streamed, drops = self._stream_blocks(ids, tokenizer, entry)
            digest = streamed.digest
            self._check_splits(counts, drops)
            key = self._streamed_key(digest, tokenizer)
            hit = self._load_cached(key, tokenizer, t0)  # the same documents under another collection's name
            if hit is None:
                manifest = self._manifest(key, tokenizer, drops, counts, len(records), None)
                entry.commit(key, manifest, records, ids=ids)
                hit = self._prepared(tokenizer, key, t0)
        index.remember(key, streamed)
        return hit

    def _stream_blocks(self, ids: list[str], tokenizer: Any, entry: PendingEntry) -> tuple[dict[str, Any], DocumentRecords, corpus.Survey, Counter]:
        """One pass: every page read, digested, cleaned, formatted, split, tokenized and dropped; the
        survey of what was read comes with it."""
        from kbtune.data import corpus

        s, usable = self.settings, 0
        digest = corpus.CorpusDigest(corpus.reads_metadata(s))
        cleaner, records = Cleaner(s), DocumentRecords()
        splits = {name: SplitBlocks(name, s, tokenizer, entry) for name in ("train", "val")}
        with tokenizer_parallelism():
            for page_ids, texts, metas in self.kb.iter_raw(ids, metadata=digest.with_metadata):
                digest.add_page(page_ids, texts, metas)
                usable += sum(1 for t in texts if t and not t.isspace())
                page = [Document(i, t, metas[k] or {} if metas else {}) for k, (i, t) in enumerate(zip(page_ids, texts, strict=True))]
                kept = cleaner.clean(page)
                for doc in kept:
                    records.add(doc)
                for name, blocks in splits.items():
                    blocks.add([d for d in kept if d.split == name])
        # The ids asked for, not those read (a second list of a million ids: ~70 MB): a document
        # deleted meanwhile moved the store's stamp, so this survey is recorded without an epoch.
        return self._finish(splits), records, corpus.Survey(ids, digest.hexdigest(), usable), cleaner.drops

    def _prepare_in_memory(self) -> PreparedData:
        from kbtune.data import corpus

        t0 = time.perf_counter()
        docs, drops, digest = self._collect()
        train_docs = [d for d in docs if d.split == "train"]
        val_docs = [d for d in docs if d.split == "val"]
        self._check_split_documents(len(train_docs), len(val_docs), drops)
        from kbtune.updates.selection import select_training

        train_docs, update = select_training(train_docs, self.update, {d.id for d in docs})
        texts = corpus.TrainingTexts(d.prompt + d.formatted for d in train_docs)
        if update is None:  # every training document, as a streamed preparation would train on
            texts.fingerprint = corpus.training_texts_fingerprint(self.settings, digest)
        tokenizer = self._tokenizer(texts)
        key = self._cache_key(docs, tokenizer)
        hit = self._load_cached(key, tokenizer, t0, drops)
        if hit is not None:
            return hit
        augmentation = self._augmentation(train_docs)
        with self._pending() as entry:
            splits = {name: SplitBlocks(name, self.settings, tokenizer, entry) for name in ("train", "val")}
            with tokenizer_parallelism():
                splits["train"].add(train_docs)
                splits["val"].add(val_docs)
            counts = self._finish(splits)
            self._check_splits(counts, drops)
            manifest = self._manifest(key, tokenizer, drops, counts, len(docs), update)
            if augmentation:
                manifest["augmentation"] = {"qa_pairs": len(augmentation["qa"])}
            records = DocumentRecords()
            for d in docs:
                records.add(d)
            entry.commit(key, manifest, records, augmentation)
        return self._prepared(tokenizer, key, t0)

    # -- helpers -----------------------------------------------------------------------------------
    def _tokenizer(self, texts: Any) -> Any:
        with tokenizer_parallelism():
            tokenizer = self.tokenizer_factory(texts)
        if tokenizer.eos_token_id is None:
            raise DataError("model: the tokenizer has no EOS token, which packing needs between documents")
        return tokenizer

    @contextlib.contextmanager
    def _pending(self) -> Iterator[PendingEntry]:
        """A cache entry to write into; removed unless committed (a refused preparation leaves nothing)."""
        entry = PendingEntry(self.cache_dir)
        try:
            yield entry
        finally:
            entry.discard()  # after a commit, only what another process's same entry made redundant

    def _finish(self, splits: dict[str, SplitBlocks]) -> dict[str, Any]:
        """Each split's counts; its files complete."""
        return {name: blocks.finish()[2] for name, blocks in splits.items()}

    def _check_split_documents(self, train: int, val: int, drops: Counter) -> None:
        if not train + val:
            raise DataError(
                f"kb.collection: {self.kb.settings.describe()} has no usable documents after cleaning "
                f"(dropped: {dict(drops) or 'none'}); add documents or change kb.where"
            )
        if not train or not val:
            raise DataError(
                f"data.val_fraction: {train + val} documents gave {train} train and {val} "
                f"validation documents; each split needs at least one (change data.val_fraction or add documents)"
            )

    def _check_splits(self, counts: dict[str, Any], drops: Counter) -> None:
        s = self.settings
        self._check_split_documents(counts["train"]["documents"], counts["val"]["documents"], drops)
        for split in ("train", "val"):
            if counts[split]["blocks"] == 0:
                raise DataError(
                    f"data.block_size: the {split} split has {counts[split]['tokens']} tokens, fewer than one "
                    f"block of {s.block_size}; lower data.block_size or add documents to {self.kb.settings.describe()}"
                )

    def _load_cached(self, key: str, tokenizer: Any, t0: float, drops: Counter | None = None) -> PreparedData | None:
        directory = self.cache_dir / "datasets" / key
        if not (directory / "manifest.json").exists():
            return None
        out, cached = load_prepared(directory)
        # The cache may be another collection's; drops are the cached run's when this one cleaned nothing.
        source = self._source(drops if drops is not None else Counter(cached.get("drops", {})))
        prepared = PreparedData(out["train"], out["val"], out["train_labels"], out["val_labels"], tokenizer,
                                {**cached, **source}, directory, cached=True,
                                augmentation=load_augmentation(directory))  # fmt: skip
        logger.info("prepared data loaded from cache %s in %.2fs", directory, time.perf_counter() - t0)
        return prepared

    def _manifest(self, key: str, tokenizer: Any, drops: Counter, counts: dict[str, Any], documents: int,
                  update: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        """The data manifest, less its per-document entries (written beside it: see PendingEntry.commit)."""
        return {
            "kbtune_preparation_version": PREPARATION_VERSION,
            "cache_key": key,
            **self._source(drops),
            "settings": self.settings.fingerprint_fields(),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "document_count": documents,
            "splits": counts,
            "augmentation": None,
            "update": update,
        }

    def _prepared(self, tokenizer: Any, key: str, t0: float) -> PreparedData:
        """The entry just written, as a cached one loads (its arrays memory-mapped)."""
        directory = self.cache_dir / "datasets" / key
        arrays, manifest = load_prepared(directory)
        counts = manifest["splits"]
        logger.info(
            "prepared %d train / %d val documents -> %d / %d blocks of %d tokens in %.2fs (cache %s)",
            counts["train"]["documents"], counts["val"]["documents"], counts["train"]["blocks"],
            counts["val"]["blocks"], self.settings.block_size, time.perf_counter() - t0, directory,
        )  # fmt: skip
        return PreparedData(arrays["train"], arrays["val"], arrays["train_labels"], arrays["val_labels"], tokenizer,
                            {**manifest, **self._source(Counter(manifest["drops"]))}, directory, cached=False,
                            augmentation=load_augmentation(directory))  # fmt: skip

    def _source(self, drops: Counter) -> dict[str, Any]:
        """Where the documents came from and what cleaning dropped. The cache is keyed by content, so
        collections with the same cleaned documents share an entry: its manifest must not name them."""
        kb = self.kb.settings
        return {"collection": self.kb.collection_name, "kb": kb.describe(), "where": kb.where,
                "drops": dict(sorted(drops.items()))}  # fmt: skip

    def _augmentation(self, train_docs: list[CleanDoc]) -> dict[str, Any] | None:
        """What the per-epoch views need, kept before tokenizing frees the texts: the training documents'
        formatted texts and the question/answer pairs cut from their facts (training documents only)."""
        s = self.settings
        if not s.augmented:
            return None
        from kbtune.data.augmentation import qa_pairs

        qa = qa_pairs(train_docs, s.qa_pairs, s.split_seed, s.qa_prompt) if s.qa_pairs else []
        return {"texts": [d.formatted for d in train_docs], "qa": qa}

    def _key_prefix(self, tokenizer: Any, *parts: Any) -> Any:
        h = hashlib.sha256()
        h.update(json.dumps([PREPARATION_VERSION, *parts, self.settings.fingerprint_fields(),
                             tokenizer_fingerprint(tokenizer)]).encode())  # fmt: skip
        if self.settings.chat_template:
            h.update(str(tokenizer.chat_template).encode())
        return h

    def _streamed_key(self, corpus_digest: str, tokenizer: Any) -> str:
        """Over the documents as stored (corpus.CorpusDigest): what the streamed pass produces from
        them is a function of those, the settings and the tokenizer."""
        h = self._key_prefix(tokenizer, "streamed")
        h.update(corpus_digest.encode())
        return h.hexdigest()[:24]

    def _cache_key(self, docs: list[CleanDoc], tokenizer: Any) -> str:
        h = self._key_prefix(tokenizer)
        for d in docs:
            # The formatted text covers template fields drawn from metadata, not only the body.
            h.update(f"{d.id}\0{d.split}\0{d.sha256}\0{d.role}\0".encode() if d.role else f"{d.id}\0{d.split}\0{d.sha256}\0".encode())
            h.update(hashlib.sha256((d.prompt + "\0" + d.formatted).encode()).digest())
        return h.hexdigest()[:24]


def load_documents_for_split(kb: KnowledgeBase, manifest: dict[str, Any], settings: DataSettings, split: str = "val") -> list[CleanDoc]:
    """Rebuild a split exactly from a manifest: the same ids, checked against their content hashes,
    cleaned and formatted as in training."""
    wanted = [d for d in manifest["documents"] if d["split"] == split]
    found = {d.id: d for d in kb.get([d["id"] for d in wanted])}
    missing = [d["id"] for d in wanted if d["id"] not in found]
    out: list[CleanDoc] = []
    changed = []
    drops: Counter = Counter()
    for entry in wanted:
        doc = found.get(entry["id"])
        if doc is None:
            continue
        text = normalise_whitespace(doc.text or "")
        clean = CleanDoc(doc.id, text, doc.metadata, hashlib.sha256(text.encode("utf-8")).hexdigest(), split)
        if clean.sha256 != entry["sha256"]:
            changed.append(doc.id)
            continue
        format_document(settings, clean, drops)
        out.append(clean)
    if missing or changed:
        raise DataError(
            f"the {split} split of data manifest {manifest['cache_key']} cannot be rebuilt from "
            f"{kb.settings.describe()}: {len(missing)} documents missing {missing[:5]}, "
            f"{len(changed)} changed since training {changed[:5]}"
        )
    return out
