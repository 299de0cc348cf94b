"""The seed's DataPreparation: collect documents from the KB, clean and format them, split by document,
tokenize, pack into blocks, and cache the result (Arrow) under a key derived from everything it used."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kbtune.data.dataset_cache import load_augmentation, load_prepared, write_prepared
from kbtune.data.settings import DataError, DataSettings
from kbtune.data.tokens import (
    concatenate,
    document_blocks,
    pack,
    tokenize_documents,
    tokenizer_fingerprint,
    tokenizer_parallelism,
)
from kbtune.knowledge_base import KnowledgeBase

logger = logging.getLogger(__name__)

# Bump when the preparation's output for the same inputs changes, so old caches are not reused.
PREPARATION_VERSION = 1
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_FIELD = re.compile(r"{(\w+)}")
# ASCII text containing none of these is already normalised: substring searches run in C, ~5x faster
# than the per-line regex pass, and most exported documents take this path.
_NOT_NORMAL_ASCII = ("\r", "\t", "\f", "\v", "\x1c", "\x1d", "\x1e", "\x1f", "  ", " \n", "\n ", "\n\n\n")

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

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"


@dataclass(slots=True)  # one per document: slots keep 100k of them ~30 MB smaller
class CleanDoc:
    id: str
    text: str
    metadata: dict[str, Any]
    sha256: str
    split: str = ""
    formatted: str = ""
    prompt: str = field(default="")
    # An update session's training documents: delta, replay or carried (kbtune.updates.selection).
    role: str = ""


def normalise_whitespace(text: str) -> str:
    """Collapse runs of spaces/tabs, strip line ends, keep paragraph breaks (at most one blank line)."""
    clean_ends = not text[:1].isspace() and not text[-1:].isspace()
    if clean_ends and text.isascii() and not any(s in text for s in _NOT_NORMAL_ASCII):
        return text
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def split_of(doc_id: str, split_seed: int, val_fraction: float) -> str:
    """Deterministic per-document split: depends only on the id and seed, so adding documents to the
    KB never moves an existing one across."""
    digest = hashlib.sha256(f"{split_seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def clean_documents(docs: Any, drops: Counter) -> list[CleanDoc]:
    """Drop None/empty/whitespace documents and exact duplicates (by content hash), counting each."""
    seen: set[str] = set()
    out: list[CleanDoc] = []
    for doc in docs:
        if doc.text is None:
            drops["none"] += 1
            continue
        text = normalise_whitespace(doc.text)
        if not text:
            drops["empty"] += 1
            continue
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest in seen:
            drops["duplicate"] += 1
            continue
        seen.add(digest)
        out.append(CleanDoc(doc.id, text, doc.metadata, digest))
    return out


def format_document(s: DataSettings, doc: CleanDoc, drops: Counter) -> None:
    """Fill doc.prompt/doc.formatted from the template (or count why it cannot be formatted)."""
    if s.format == "text" and s.template == "{text}":
        doc.prompt, doc.formatted = "", doc.text  # the default template: no copy of every text
        return
    fields = {**{k: v for k, v in doc.metadata.items() if v is not None}, "text": doc.text, "id": doc.id}
    if s.format == "qa":
        if not doc.metadata.get("question") or not doc.metadata.get("answer"):
            drops["no_question_answer"] += 1
            return
        template, answer = s.qa_prompt, normalise_whitespace(str(doc.metadata["answer"]))
    else:
        template, answer = s.template, ""
    missing = [name for name in _FIELD.findall(template) if name not in fields]
    if missing:
        drops[f"missing_field:{missing[0]}"] += 1
        return
    rendered = template.format_map(fields)
    doc.prompt, doc.formatted = (rendered, answer) if s.format == "qa" else ("", rendered)


class DataPreparation:
    """Prepares (or loads from cache) the train/val token blocks for one KB + settings + tokenizer."""

    def __init__(self, kb: KnowledgeBase, settings: DataSettings, tokenizer_factory: TokenizerFactory, cache_dir: Path,
                 update: Any = None):  # fmt: skip
        self.kb = kb
        # An UpdateBase: train on the change since that version plus a replay sample (experiment=update).
        self.update = update
        self.settings = settings
        self.tokenizer_factory = tokenizer_factory
        # paths.cache_dir: prepared datasets live under its datasets/ folder, keyed by content.
        self.cache_dir = Path(cache_dir)
        self._result: PreparedData | None = None

    def prepare_dataset(self) -> PreparedData:
        if self._result is None:
            self._result = self._prepare()
        return self._result

    # -- steps -------------------------------------------------------------------------------------
    def collect(self) -> tuple[list[CleanDoc], Counter]:
        drops: Counter = Counter()
        docs = clean_documents(self.kb.iter_documents(), drops)
        for doc in docs:
            format_document(self.settings, doc, drops)
        kept = [d for d in docs if d.formatted]
        for doc in kept:
            doc.split = split_of(doc.id, self.settings.split_seed, self.settings.val_fraction)
        # Packing order is by id, not by export order, so it does not depend on how Chroma pages.
        kept.sort(key=lambda d: d.id)
        return kept, drops

    def _prepare(self) -> PreparedData:
        s = self.settings
        t0 = time.perf_counter()
        docs, drops = self.collect()
        if drops:
            logger.info("cleaning dropped %d documents: %s", sum(drops.values()), dict(sorted(drops.items())))
        if not docs:
            raise DataError(
                f"kb.collection: {self.kb.settings.describe()} has no usable documents after cleaning "
                f"(dropped: {dict(drops) or 'none'}); add documents or change kb.where"
            )
        train_docs = [d for d in docs if d.split == "train"]
        val_docs = [d for d in docs if d.split == "val"]
        if not train_docs or not val_docs:
            raise DataError(
                f"data.val_fraction: {len(docs)} documents gave {len(train_docs)} train and {len(val_docs)} "
                f"validation documents; each split needs at least one (change data.val_fraction or add documents)"
            )
        from kbtune.updates.selection import select_training

        train_docs, update = select_training(train_docs, self.update, {d.id for d in docs})
        with tokenizer_parallelism():
            tokenizer = self.tokenizer_factory([d.prompt + d.formatted for d in train_docs])
        if tokenizer.eos_token_id is None:
            raise DataError("model: the tokenizer has no EOS token, which packing needs between documents")
        key = self._cache_key(docs, tokenizer)
        directory = self.cache_dir / "datasets" / key
        if (directory / "manifest.json").exists():
            out, cached = load_prepared(directory)
            manifest = {**cached, **self._source(drops)}  # the cache may be another collection's
            prepared = PreparedData(out["train"], out["val"], out["train_labels"], out["val_labels"], tokenizer,
                                    manifest, directory, cached=True, augmentation=load_augmentation(directory))  # fmt: skip
            logger.info("prepared data loaded from cache %s in %.2fs", directory, time.perf_counter() - t0)
            return prepared

        augmentation = self._augmentation(train_docs)
        arrays, counts = self._blocks(train_docs, val_docs, tokenizer)
        manifest = {
            "kbtune_preparation_version": PREPARATION_VERSION,
            "cache_key": key,
            **self._source(drops),
            "settings": s.fingerprint_fields(),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "document_count": len(docs),
            "splits": counts,
            "augmentation": {"qa_pairs": len(augmentation["qa"])} if augmentation else None,
            "update": update,
            "documents": [{"id": d.id, "sha256": d.sha256, "split": d.split, **({"role": d.role} if d.role else {})}
                          for d in docs],  # fmt: skip
        }
        write_prepared(directory, arrays, manifest, augmentation)
        logger.info(
            "prepared %d train / %d val documents -> %d / %d blocks of %d tokens in %.2fs (cache %s)",
            len(train_docs), len(val_docs), counts["train"]["blocks"], counts["val"]["blocks"],
            s.block_size, time.perf_counter() - t0, directory,
        )
        return PreparedData(
            arrays["train"], arrays["val"], arrays["train_labels"], arrays["val_labels"],
            tokenizer, manifest, directory, cached=False, augmentation=augmentation,
        )  # fmt: skip

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

    def _blocks(self, train_docs: list[CleanDoc], val_docs: list[CleanDoc], tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Each split tokenized and packed into whole blocks (the tail shorter than a block is dropped)."""
        s = self.settings
        arrays: dict[str, np.ndarray | None] = {}
        counts: dict[str, Any] = {}
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            if s.packing == "document":
                arrays[split], arrays[f"{split}_labels"], counts[split] = self._document_split(split_docs, tokenizer)
                continue
            stream, label_stream = self._token_stream(split_docs, tokenizer)
            n_blocks = len(stream) // s.block_size
            arrays[split] = stream[: n_blocks * s.block_size].reshape(n_blocks, s.block_size)
            arrays[f"{split}_labels"] = (
                label_stream[: n_blocks * s.block_size].reshape(n_blocks, s.block_size) if label_stream is not None else None
            )
            counts[split] = {
                "documents": len(split_docs),
                "tokens": len(stream),
                "blocks": n_blocks,
                "tail_tokens_dropped": len(stream) - n_blocks * s.block_size,
            }
        for split in ("train", "val"):
            if counts[split]["blocks"] == 0:
                raise DataError(
                    f"data.block_size: the {split} split has {counts[split]['tokens']} tokens, fewer than one "
                    f"block of {s.block_size}; lower data.block_size or add documents to {self.kb.settings.describe()}"
                )
        return arrays, counts

    def _document_split(self, docs: list[CleanDoc], tokenizer: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One split as document-aligned blocks (data.packing=document), tokenized a chunk at a time."""
        s = self.settings
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        blocks, labels, padding, tokens = [], [], 0, 0
        for start in range(0, len(docs), s.tokenize_batch):
            part = docs[start : start + s.tokenize_batch]
            with tokenizer_parallelism():
                ids, part_labels = tokenize_documents(part, tokenizer, s)
            b, lab, pad_count = document_blocks(ids, part_labels or None, tokenizer.eos_token_id, pad, s.block_size)
            blocks.append(b)
            labels.append(lab)
            padding, tokens = padding + pad_count, tokens + sum(len(x) + 2 for x in ids)
            for d in part:
                d.text = d.formatted = d.prompt = ""
        arrays = np.concatenate(blocks), np.concatenate(labels)
        counts = {"documents": len(docs), "tokens": tokens, "blocks": len(arrays[0]), "tail_tokens_dropped": 0,
                  "padding_tokens": padding}  # fmt: skip
        return arrays[0], arrays[1], counts

    def _token_stream(self, docs: list[CleanDoc], tokenizer: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """A split's tokens laid out as pack() lays them (EOS after each document) in one int32 array,
        and its labels for `qa`. Tokenized a chunk at a time, each text dropped once tokenized: a large
        KB's peak memory holds its texts or its tokens, not both (as lists of Python ints, the tokens
        alone took ~9x the memory)."""
        eos = tokenizer.eos_token_id
        chunks: list[np.ndarray] = []
        label_chunks: list[np.ndarray] = []
        step = self.settings.tokenize_batch
        for start in range(0, len(docs), step):
            part = docs[start : start + step]
            with tokenizer_parallelism():
                ids, labels = tokenize_documents(part, tokenizer, self.settings)
            chunks.append(pack(ids, eos, 1)[0].reshape(-1))
            if labels:
                label_chunks.append(pack(labels, eos, 1)[0].reshape(-1))
            for d in part:
                d.text = d.formatted = d.prompt = ""
        return concatenate(chunks), (concatenate(label_chunks) if label_chunks else None)

    def _cache_key(self, docs: list[CleanDoc], tokenizer: Any) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([PREPARATION_VERSION, self.settings.fingerprint_fields(), tokenizer_fingerprint(tokenizer)]).encode())
        if self.settings.chat_template:
            h.update(str(tokenizer.chat_template).encode())
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
