"""The knowledge bases the benchmarks run on: the shipped sample corpus, and synthetic collections of
~150-word documents (10k, 50k, 100k) built once with random 8-dim embeddings and reused across runs.
Training never reads embeddings, so random vectors change nothing that is measured."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

from harness import REPO, log

SAMPLE_CORPUS = REPO / "data" / "sample_kb"
SAMPLE_COLLECTION = "kbtune-sample"
# Documents are generated in independently seeded chunks, so the 10k collection is the first 10k
# documents of the 100k one and a rebuild produces the same text.
CHUNK = 1000
SEED = 7


def hash_embed(texts: list[str]) -> list[list[float]]:
    return [[b / 255.0 for b in hashlib.sha256(t.encode()).digest()[:8]] for t in texts]


def sample_kb(workdir: Path) -> dict[str, str]:
    """The sample corpus in an embedded Chroma store under `workdir` (re-ingesting an unchanged corpus
    writes nothing)."""
    from kbtune.ingestion import ingest_folder
    from kbtune.knowledge_base import KBSettings, KnowledgeBase

    path = workdir / "sample_kb" / "chroma"
    kb = KnowledgeBase.connect(KBSettings(path=str(path), collection=SAMPLE_COLLECTION))
    ingest_folder(kb, SAMPLE_CORPUS, embed=hash_embed)
    return {"path": str(path), "collection": SAMPLE_COLLECTION}


def _vocabulary() -> tuple[list[str], Any]:
    """Words of the sample corpus and their frequencies: synthetic text with natural word statistics,
    so a BPE tokenizer gives a realistic ~1.2 tokens per word."""
    import numpy as np

    counts: Counter = Counter()
    for f in sorted(SAMPLE_CORPUS.rglob("*.md")):
        counts.update(re.findall(r"[A-Za-z][A-Za-z'-]*|\d+", f.read_text(encoding="utf-8", errors="replace")))
    words = sorted(counts)
    freq = np.array([counts[w] for w in words], dtype=np.float64)
    return words, freq / freq.sum()


def synthetic_chunk(index: int, words: list[str], probs: Any) -> list[str]:
    """CHUNK documents of 120-180 words in sentences and paragraphs."""
    import numpy as np

    rng = np.random.default_rng([SEED, index])
    docs = []
    for _ in range(CHUNK):
        n = int(rng.integers(120, 181))
        picks = rng.choice(len(words), size=n, p=probs)
        cuts = np.cumsum(rng.integers(8, 20, size=n // 8 + 2))
        sentences, start = [], 0
        for end in cuts:
            part = [words[i] for i in picks[start : min(end, n)]]
            if not part:
                break
            sentences.append(part[0].capitalize() + (" " + " ".join(part[1:]) if len(part) > 1 else "") + ".")
            start = end
        paragraphs = [" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)]
        docs.append("\n\n".join(paragraphs))
    return docs


def synthetic_kbs(workdir: Path, sizes: list[int]) -> dict[int, dict[str, str]]:
    """One collection per size (`syn<size>`), built only where missing or incomplete. The sizes up to
    100k share one store; a million documents (~9 GB on disk, ~15 min to build on 2 cores) get their
    own, so the smaller collections are not read from beside them."""
    out = {}
    for store, group in (("chroma", [n for n in sizes if n < 1_000_000]), ("chroma-1m", [n for n in sizes if n >= 1_000_000])):
        if group:
            out.update(_build(workdir / "synthetic_kb" / store, group))
    return out


def _build(path: Path, sizes: list[int]) -> dict[int, dict[str, str]]:
    import chromadb
    import numpy as np
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    existing = {c if isinstance(c, str) else c.name for c in client.list_collections()}
    words, probs = None, None
    out = {}
    for size in sizes:
        name = f"syn{size}"
        out[size] = {"path": str(path), "collection": name}
        if name in existing and client.get_collection(name).count() == size:
            continue
        if words is None:
            words, probs = _vocabulary()
        if name in existing:
            client.delete_collection(name)
        log(f"  building synthetic KB {name} ({size} documents, once) in {path}")
        col = client.create_collection(name, embedding_function=None)
        rng = np.random.default_rng(SEED)
        batch = min(5000, client.get_max_batch_size())
        pending: list[str] = []
        done = 0
        for index in range((size + CHUNK - 1) // CHUNK):
            pending += synthetic_chunk(index, words, probs)[: size - done - len(pending)]
            if len(pending) >= batch or done + len(pending) == size:
                ids = [f"doc-{i:07d}" for i in range(done, done + len(pending))]
                metas = [
                    {"source": f"synthetic/{i // 10:05d}.md", "part": i % 10}
                    for i in range(done, done + len(pending))
                ]
                col.add(ids=ids, documents=pending, metadatas=metas,
                        embeddings=rng.random((len(pending), 8), dtype=np.float32))  # fmt: skip
                done += len(pending)
                pending = []
    return out


def ready_tokenizer(workdir: Path, vocab_size: int = 8192, documents: int = 2000) -> Path:
    """A BPE tokenizer trained (by kbtune's own factory) on synthetic text: the 'ready' tokenizer both
    data-preparation variants use, so neither pays for training one. Returns its directory."""
    from kbtune.modeling.factory import train_bpe_tokenizer

    words, probs = _vocabulary()
    texts: list[str] = []
    index = 1000  # chunks beyond any collection: the tokenizer never saw the benchmarked text
    while len(texts) < documents:
        texts += synthetic_chunk(index, words, probs)
        index += 1
    tok = train_bpe_tokenizer(texts[:documents], vocab_size, workdir / "tokenizer_cache")
    return Path(tok.name_or_path)
