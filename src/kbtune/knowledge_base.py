"""Chroma access (the seed's ChromaService / DocumentRepository): connect, export in pages, upsert."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from kbtune import store_checks
from kbtune.settings_base import settings

logger = logging.getLogger(__name__)

# The collection the README's first command creates from the shipped sample corpus. Only this name
# is ever created implicitly; any other missing collection is an error.
SAMPLE_COLLECTION = "kbtune-sample"
# Ids listed per call while exporting: ids-only pages are cheap, so few and large.
ID_PAGE = 100_000


class KnowledgeBaseError(ValueError):
    """A knowledge-base problem the user must fix (missing collection, bad filter...)."""


class KnowledgeBaseUnavailable(KnowledgeBaseError):
    """The store itself cannot be used now: locked by another process, corrupted, or failing inside
    Chroma. Not the request's fault (the API answers 503)."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


@settings
class KBSettings:
    """Where the knowledge base lives. `backend` picks the embedded store or a Chroma server."""

    backend: Literal["chroma", "chroma_http"] = "chroma"
    collection: str = SAMPLE_COLLECTION
    path: str = "data/chroma"
    host: str = "127.0.0.1"
    port: int = 8000
    ssl: bool = False
    where: dict[str, Any] | None = None
    page_size: int = 5000
    # Seconds to wait for another process's write lock on the embedded store before giving up.
    lock_timeout: float = 10.0

    def validate(self) -> list[str]:
        problems = []
        if self.backend not in ("chroma", "chroma_http"):
            problems.append(f"kb.backend: must be 'chroma' or 'chroma_http', got {self.backend!r} (select kb=chroma or kb=chroma_http)")
        if not 3 <= len(self.collection or "") <= 512:
            problems.append(f"kb.collection: Chroma collection names need 3-512 characters, got {self.collection!r}")
        if not 1 <= self.page_size <= 5000:
            problems.append(f"kb.page_size: must be in [1, 5000], got {self.page_size}")
        if self.backend == "chroma_http" and not 0 < self.port < 65536:
            problems.append(f"kb.port: not a TCP port: {self.port}")
        if not 0 < self.lock_timeout <= 3600:
            problems.append(f"kb.lock_timeout: must be in (0, 3600] seconds, got {self.lock_timeout}")
        if self.where is not None and not isinstance(self.where, dict):
            problems.append(f"kb.where: must be a Chroma metadata filter mapping, got {self.where!r}")
        return problems

    def describe(self) -> str:
        if self.backend == "chroma":
            return f"chroma://{self.path}#{self.collection}"
        scheme = "https" if self.ssl else "http"
        return f"{scheme}://{self.host}:{self.port}#{self.collection}"


# The embedded store's database; and tables every Chroma store has had since 0.4.
STORE_FILE = "chroma.sqlite3"
_CHROMA_TABLES = {"collections", "embeddings", "embedding_metadata"}


def probe_store(path: Path, timeout: float) -> bool:
    """KnowledgeBaseUnavailable naming `path` unless the store is a readable Chroma database that no
    other process keeps locked for more than `timeout` seconds. Writes nothing: a damaged store is
    left exactly as it is for its owner to recover. True when SQLite's quick_check ran; it is skipped
    for a store unchanged since its last clean check and open (store_checks)."""
    if not path.exists() or path.stat().st_size == 0:
        return False  # a new store: Chroma creates it
    full_check = not store_checks.unchanged_since_check(path)
    hint = "restore it from a backup or ingest the documents again into a new kb.path"
    uri = f"file:{quote(str(path))}"
    try:
        with contextlib.closing(sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            checked = [row[0] for row in db.execute("PRAGMA quick_check")] if full_check else ["ok"]
        # Chroma's start writes: wait for another writer here, where the wait is bounded and releases
        # the GIL. BEGIN IMMEDIATE takes the write lock; ROLLBACK gives it back with nothing written.
        with contextlib.closing(sqlite3.connect(f"{uri}?mode=rw", uri=True, timeout=timeout,
                                                isolation_level=None)) as db:  # fmt: skip
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise KnowledgeBaseUnavailable(
                f"kb.path: the Chroma store {path} is locked by another process (waited {timeout:g} s, "
                "kb.lock_timeout); let that process finish, or point kb.path at another store"
            ) from exc
        raise KnowledgeBaseUnavailable(f"kb.path: the Chroma store {path} cannot be used ({exc})") from exc
    except sqlite3.DatabaseError as exc:
        store_checks.forget(path)
        raise KnowledgeBaseUnavailable(f"kb.path: the Chroma store {path} is corrupted ({exc}); {hint}") from exc
    if checked != ["ok"]:
        store_checks.forget(path)
        problem = " ".join(line for line in checked[0].splitlines() if not line.startswith("***"))[:200]
        raise KnowledgeBaseUnavailable(f"kb.path: the Chroma store {path} is corrupted ({problem}); {hint}")
    if not tables >= _CHROMA_TABLES:
        raise KnowledgeBaseUnavailable(f"kb.path: {path} is an SQLite database but not a Chroma store")
    return full_check


@dataclass(frozen=True)
class StoreEpoch:
    """An embedded store's content epoch as of this client's start, and the stamp it left."""

    store: Path
    epoch: str
    stamp: list[int]

    def current(self) -> str | None:
        return self.epoch if store_checks.stamp(self.store) == self.stamp else None


@contextlib.contextmanager
def chroma_errors(settings: KBSettings) -> Iterator[None]:
    """Chroma's failures on a store damaged under it (its InternalError, a Rust panic, the missing
    attribute of a client whose start failed) as one error naming the store."""
    try:
        yield
    except KnowledgeBaseError:
        raise
    except BaseException as exc:
        from chromadb.errors import InternalError

        inside_chroma = isinstance(exc, AttributeError) and "chromadb" in str(_last_frame(exc))
        if isinstance(exc, InternalError) or type(exc).__name__ == "PanicException" or inside_chroma:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise KnowledgeBaseUnavailable(
                f"kb.path: Chroma failed on the store {settings.describe()} ({first_line}); it may be "
                "damaged: restore it from a backup or ingest the documents again into a new kb.path"
            ) from exc
        raise


def _last_frame(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else ""


class KnowledgeBase:
    """A Chroma client bound to one collection name. Reads never need an embedding function."""

    def __init__(self, client: Any, settings: KBSettings, epoch: StoreEpoch | None = None):
        self._client = client
        self.settings = settings
        self._epoch = epoch

    def content_epoch(self) -> str | None:
        """An id of the store's content, shared with an earlier kbtune open that saw the same content
        (store_checks.epoch_after_start); None when the store was written since this client opened it,
        or when it cannot be known (a Chroma server, a store in write-ahead-log mode)."""
        return self._epoch.current() if self._epoch is not None else None

    @classmethod
    def connect(cls, settings: KBSettings) -> KnowledgeBase:
        import chromadb
        from chromadb.config import Settings

        # Chroma's product telemetry would try the network on every client start.
        chroma_settings = Settings(anonymized_telemetry=False)
        if settings.backend == "chroma":
            # Chroma's client start writes to the store and waits, holding the GIL, for as long as
            # another process holds a lock on it: check first, from Python, with a timeout.
            store = Path(settings.path) / STORE_FILE
            probe_store(store, settings.lock_timeout)
            before = store_checks.stamp(store)
            with chroma_errors(settings):
                client = chromadb.PersistentClient(path=settings.path, settings=chroma_settings)
            # After the client's start, which writes to the store at every open: the state to expect
            # next time, and whether the content is still that of the last open (its epoch).
            epoch = store_checks.epoch_after_start(store, before, store_checks.stamp(store))
            after = store_checks.record_checked(store, epoch)
            logger.info("knowledge base: %s", settings.describe())
            return cls(client, settings, StoreEpoch(store, epoch, after) if after is not None else None)
        client = chromadb.HttpClient(host=settings.host, port=settings.port, ssl=settings.ssl, settings=chroma_settings)
        logger.info("knowledge base: %s", settings.describe())
        return cls(client, settings)

    def with_settings(self, **changes: Any) -> KnowledgeBase:
        """The same store (and client) with other settings, e.g. another collection or filter."""
        from dataclasses import replace

        return KnowledgeBase(self._client, replace(self.settings, **changes), self._epoch)

    @property
    def collection_name(self) -> str:
        return self.settings.collection

    def exists(self) -> bool:
        return self.collection_name in self.list_collections()

    def list_collections(self) -> list[str]:
        with chroma_errors(self.settings):
            return sorted(c if isinstance(c, str) else c.name for c in self._client.list_collections())

    def _collection(self):
        if not self.exists():
            known = ", ".join(self.list_collections()) or "none"
            raise KnowledgeBaseError(
                f"kb.collection: collection {self.collection_name!r} does not exist in "
                f"{self.settings.describe()} (existing: {known}); ingest documents with "
                f"`kbtune kb ingest PATH --collection {self.collection_name}` or set kb.collection"
            )
        with chroma_errors(self.settings):
            return self._client.get_collection(self.collection_name, embedding_function=None)

    def count(self) -> int:
        collection = self._collection()
        with chroma_errors(self.settings):
            return collection.count()

    def iter_pages(self, where: dict[str, Any] | None = None, page_size: int | None = None, *,
                   ids: Sequence[str] | None = None, metadata: bool = True) -> Iterator[list[Document]]:  # fmt: skip
        """Yield the collection's documents a page at a time, in id order; only one page of documents
        is held at once (plus the list of ids). `ids` (sorted) reads those instead of listing them;
        `metadata=False` leaves metadata out (each Document's is empty).

        The ids are listed first (ids only, in a few large pages) and the documents fetched by id: a
        page read at an offset costs Chroma time proportional to the offset, which made reading a
        million documents in pages of 1,000 take ~150 s; by id it takes ~15 s (2-core Xeon)."""
        if ids is None:
            ids = self.list_ids(where)
        for page_ids, texts, metas in self.iter_raw(ids, page_size, metadata):
            yield [Document(i, t, dict(metas[k] or {}) if metas else {}) for k, (i, t) in enumerate(zip(page_ids, texts, strict=True))]

    def iter_raw(self, ids: Sequence[str], page_size: int | None = None, metadata: bool = False,
                 ) -> Iterator[tuple[list[str], list[str | None], list[Any] | None]]:  # fmt: skip
        """Pages of (ids, texts, metadatas or None) in the order of `ids`, as Chroma returns them: no
        Document per row, which a pass that only hashes the texts does not need (a million cost ~2 s).
        A document deleted after the ids were listed is left out, as a later export would.

        The next page is read in a thread while the caller works on this one: Chroma's reads leave
        the GIL, so hashing or tokenizing overlaps them (a million-document survey: 18-21 s instead
        of 22-31 s, 2-core AMD EPYC, store in the page cache). One page is held ahead, no more."""
        collection = self._collection()
        size = page_size or self.settings.page_size
        include = ["documents", "metadatas"] if metadata else ["documents"]

        def read(start: int) -> tuple[list[str], dict[str, Any]]:
            wanted = list(ids[start : start + size])
            return wanted, collection.get(ids=wanted, include=include)

        with ThreadPoolExecutor(1, thread_name_prefix="kb-read-ahead") as pool:
            ahead = pool.submit(read, 0) if len(ids) else None
            for start in range(0, len(ids), size):
                with chroma_errors(self.settings):
                    wanted, raw = ahead.result()  # type: ignore[union-attr]
                ahead = pool.submit(read, start + size) if start + size < len(ids) else None
                got, texts = raw["ids"], raw["documents"] or [None] * len(raw["ids"])
                metas = (raw.get("metadatas") or [None] * len(got)) if metadata else None
                if got != wanted:  # missing ids, or Chroma's own order: back to the order asked
                    at = {doc_id: k for k, doc_id in enumerate(got)}
                    order = [at[doc_id] for doc_id in wanted if doc_id in at]
                    got, texts = [got[k] for k in order], [texts[k] for k in order]
                    metas = [metas[k] for k in order] if metas is not None else None
                yield got, texts, metas

    def list_ids(self, where: dict[str, Any] | None = None) -> list[str]:
        """Every id matching `where` (None: the settings' kb.where), sorted."""
        where = where if where is not None else self.settings.where
        return sorted(self._ids(self._collection(), where))

    def _ids(self, collection: Any, where: dict[str, Any] | None) -> list[str]:
        """Every id (matching `where`), read ids-only in pages of ID_PAGE."""
        out: list[str] = []
        offset = 0
        while True:
            try:
                with chroma_errors(self.settings):
                    page = collection.get(where=where or None, limit=ID_PAGE, offset=offset, include=[])["ids"]
            except KnowledgeBaseError:
                raise
            except ValueError as exc:  # Chroma validates filters client-side with ValueError
                raise KnowledgeBaseError(f"kb.where: Chroma rejected the filter {where!r}: {exc}") from exc
            out.extend(page)
            if len(page) < ID_PAGE:
                return out
            offset += ID_PAGE

    def iter_documents(self, where: dict[str, Any] | None = None) -> Iterator[Document]:
        for page in self.iter_pages(where):
            yield from page

    def get(self, ids: Sequence[str]) -> list[Document]:
        """Fetch documents by id (in pages), in the order asked; missing ids are left out."""
        collection = self._collection()
        found: dict[str, Document] = {}
        size = self.settings.page_size
        for start in range(0, len(ids), size):
            chunk = list(ids[start : start + size])
            with chroma_errors(self.settings):
                raw = collection.get(ids=chunk, include=["documents", "metadatas"])
            for i, d, m in zip(raw["ids"], raw["documents"], raw["metadatas"], strict=True):
                found[i] = Document(i, d, dict(m or {}))
        return [found[i] for i in ids if i in found]

    def upsert(
        self,
        documents: Sequence[Document],
        embeddings: Sequence[Sequence[float]],
        create: bool = False,
    ) -> None:
        """Write documents with precomputed embeddings (Chroma must never embed: it would download)."""
        if create:
            collection = self._client.get_or_create_collection(
                self.collection_name, embedding_function=None, metadata={"hnsw:space": "cosine"}
            )
        else:
            collection = self._collection()
        batch = max(1, min(self._client.get_max_batch_size(), 5000))
        for start in range(0, len(documents), batch):
            part = documents[start : start + batch]
            collection.upsert(
                ids=[d.id for d in part],
                documents=[d.text for d in part],
                metadatas=[d.metadata or None for d in part],
                embeddings=[list(map(float, e)) for e in embeddings[start : start + batch]],
            )

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self._collection().delete(ids=list(ids))

    def ids_where(self, where: dict[str, Any]) -> list[str]:
        return self._ids(self._collection(), where)
