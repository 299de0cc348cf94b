"""The KB read one page at a time, for a preparation that never holds every document: the corpus
digest that keys the cache (a survey pass), the training texts a tokenizer is trained on (streamed),
and the record of where a collection's last preparation went, so a rerun can check it without
listing the collection again.

The corpus digest is over each document's id and its text as stored (plus its metadata when the
template reads metadata): cleaning, dedup, split and formatting are functions of those and of the
settings, so a rerun need not clean or format anything to know whether its cache is current."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kbtune.atomic_files import atomic_file
from kbtune.data.settings import DataSettings
from kbtune.knowledge_base import KnowledgeBase

logger = logging.getLogger(__name__)

def reads_metadata(s: DataSettings) -> bool:
    """Whether the formatted text depends on metadata (template fields, question/answer)."""
    return not (s.format == "text" and s.template == "{text}")


class CorpusDigest:
    """A digest of every document (id, text as stored, and metadata when `with_metadata`), in id order.

    Fed a page at a time with whole-page operations (joins, lengths), not a hash per document: the
    rerun's survey of a million documents spends ~0.5 s here instead of ~3 s. The ids, their lengths,
    the texts' lengths and the texts are hashed as separate streams, so the digest does not depend on
    where pages end, and the lengths make the joined texts unambiguous (-1: a document stored without text)."""

    def __init__(self, with_metadata: bool):
        self.with_metadata = with_metadata
        self._ids, self._id_lengths, self._lengths, self._texts, self._metadata = (hashlib.sha256() for _ in range(5))
        self.count = 0

    def add_page(self, ids: list[str], texts: list[str | None], metadatas: list[Any] | None = None) -> None:
        if None in texts:
            lengths = [-1 if t is None else len(t) for t in texts]
            texts = [t or "" for t in texts]
        else:
            lengths = list(map(len, texts))
        self._ids.update("".join(ids).encode("utf-8"))
        # Id lengths and text lengths in streams of their own: one stream of both per page would
        # depend on where pages end (kb.page_size).
        self._id_lengths.update(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)).tobytes())
        self._lengths.update(np.array(lengths, dtype=np.int64).tobytes())
        self._texts.update("".join(texts).encode("utf-8"))  # type: ignore[arg-type]
        if self.with_metadata:
            for meta in metadatas or [None] * len(ids):
                self._metadata.update(json.dumps(meta or {}, sort_keys=True, default=str).encode("utf-8") + b"\n")
        self.count += len(ids)

    def hexdigest(self) -> str:
        h = hashlib.sha256(b"kbtune-corpus-v3" + (b"+metadata" if self.with_metadata else b""))
        for part in (self._ids, self._id_lengths, self._lengths, self._texts, self._metadata):
            h.update(part.digest())
        return h.hexdigest()


@dataclass(frozen=True)
class Survey:
    ids: list[str]  # every id read, sorted (documents without text included)
    digest: str
    usable: int  # documents with some text (cleaning may still drop duplicates and unformattable ones)


def survey(kb: KnowledgeBase, s: DataSettings, ids: Sequence[str] | None = None) -> Survey | None:
    """One pass over the collection's raw documents (`ids`: those, not a fresh listing). None when `ids`
    were given and any of them is gone."""
    listed = list(ids) if ids is not None else kb.list_ids()
    digest, usable = CorpusDigest(reads_metadata(s)), 0
    # Raw pages, no Document objects: this pass runs on every rerun, and only hashes.
    for page_ids, texts, metas in kb.iter_raw(listed, metadata=digest.with_metadata):
        digest.add_page(page_ids, texts, metas)
        usable += sum(1 for t in texts if t and not t.isspace())
    if digest.count != len(listed):
        return None
    return Survey(listed, digest.hexdigest(), usable)


def training_texts_fingerprint(s: DataSettings, digest: str) -> str:
    """Names the training texts of the corpus with `digest`: only the settings that choose and render
    them count (the split and the format), not block_size or packing, which change the blocks but
    not the texts, so a tokenizer trained on them is found again whatever the blocks."""
    fields = {k: getattr(s, k) for k in ("val_fraction", "split_seed", "format", "template", "qa_prompt")}
    return hashlib.sha256(json.dumps(["training-texts-v1", fields, digest], sort_keys=True).encode()).hexdigest()


class TrainingTexts(list):
    """Training texts held in memory, with the fingerprint a TrainingCorpus of the same documents
    would have, so both preparations find the same cached tokenizer."""

    fingerprint: str | None = None  # None: named by a digest of the texts themselves


class TrainingCorpus:
    """The training texts of a surveyed corpus, for a tokenizer factory: `fingerprint` identifies them
    (without reading them), iterating streams them from the KB a page at a time."""

    def __init__(self, kb: KnowledgeBase, s: DataSettings, found: Survey):
        self.kb, self.settings, self.survey = kb, s, found
        self.fingerprint = training_texts_fingerprint(s, found.digest)

    def __len__(self) -> int:
        return len(self.survey.ids)  # an upper bound: held-out and dropped documents are not yielded

    def __iter__(self) -> Iterator[str]:
        from kbtune.data.cleaning import Cleaner

        cleaner = Cleaner(self.settings)
        for page in self.kb.iter_pages(ids=self.survey.ids, metadata=reads_metadata(self.settings)):
            for doc in cleaner.clean(page):
                if doc.split == "train":
                    yield doc.prompt + doc.formatted


class SourceIndex:
    """Where the last preparation of one collection (+ filter + data settings) went: its cache key,
    the ids it read (in the cache entry), its corpus digest, and the store's content epoch it read
    under (KnowledgeBase.content_epoch). A rerun under the same epoch knows the corpus without reading
    a document (~30 s at a million documents); otherwise it reads exactly those ids and checks the
    count, instead of listing the collection (~4 s at a million)."""

    def __init__(self, cache_dir: Path, kb: KnowledgeBase, s: DataSettings):
        self.kb = kb
        name = json.dumps([kb.settings.describe(), kb.settings.where, s.fingerprint_fields()], sort_keys=True)
        self.path = Path(cache_dir) / "datasets" / "sources" / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.json"

    def _entry(self) -> dict[str, Any] | None:
        try:
            entry = json.loads(self.path.read_text())
            return entry if self._ids_file(entry).exists() else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("ignoring an unreadable source index %s", self.path, exc_info=True)
            return None

    def _ids_file(self, entry: dict[str, Any]) -> Path:
        return self.path.parent.parent / entry["cache_key"] / IDS_FILE

    def _ids(self, entry: dict[str, Any]) -> list[str] | None:
        """The ids of `entry`'s preparation, when they are as many as it recorded."""
        try:
            ids = json.loads(self._ids_file(entry).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("ignoring unreadable ids of %s", self.path, exc_info=True)
            return None
        return ids if isinstance(ids, list) and len(ids) == entry.get("count") else None

    def unchanged(self) -> Survey | None:
        """The last preparation's survey, when the store's content epoch is the one it read under:
        nothing can have been written since, so no document is read."""
        epoch = self.kb.content_epoch()
        entry = self._entry() if epoch is not None else None
        if entry is None or entry.get("epoch") != epoch or not isinstance(entry.get("digest"), str):
            return None
        ids = self._ids(entry)
        if ids is None:
            return None
        logger.info("the knowledge base is unchanged since its last preparation (store epoch %s)", epoch[:8])
        return Survey(ids, entry["digest"], int(entry.get("usable", 0)))

    def candidate_ids(self) -> list[str] | None:
        """The ids the last preparation read, when the collection still holds as many documents
        (a filtered collection cannot be counted, so it is always listed)."""
        if self.kb.settings.where:
            return None
        entry = self._entry()
        if entry is None or entry.get("count") != self.kb.count():
            return None
        return self._ids(entry)

    def remember(self, cache_key: str, found: Survey) -> None:
        """Record this preparation. Its epoch is taken now, after every read: an epoch still current
        means nothing was written to the store while its documents were read."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"cache_key": cache_key, "count": len(found.ids), "digest": found.digest, "usable": found.usable,
                 "epoch": self.kb.content_epoch()}  # fmt: skip
        with atomic_file(self.path) as f:
            f.write(json.dumps(entry).encode())


IDS_FILE = "ids.json"  # in a cache entry: the ids its preparation read, sorted


def write_ids(directory: Path, ids: Sequence[str]) -> None:
    # One json.dumps: json.dump encodes item by item in Python (~1 s for a million ids).
    (directory / IDS_FILE).write_text(json.dumps(list(ids)), encoding="utf-8")
