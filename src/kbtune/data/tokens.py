"""Formatted documents into tokens: batch tokenization (plain text, prompt/answer with the loss on the
answer, or a model's chat template) and packing into fixed-size blocks with EOS between documents."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kbtune.data.cleaning import CleanDoc
    from kbtune.data.dataset_cache import PendingEntry, TokenFile
    from kbtune.data.settings import DataSettings


def pack(sequences: Sequence[Sequence[int]], eos_id: int, block_size: int) -> tuple[np.ndarray, int]:
    """Concatenate documents with EOS after each, cut into full blocks; returns (blocks, tail dropped)."""
    lengths = np.fromiter((len(s) + 1 for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.full(int(lengths.sum()), eos_id, dtype=np.int32)
    ends = np.cumsum(lengths)
    for seq, end, n in zip(sequences, ends, lengths, strict=True):
        flat[end - n : end - 1] = seq
    n_blocks = len(flat) // block_size
    return flat[: n_blocks * block_size].reshape(n_blocks, block_size), len(flat) - n_blocks * block_size


@contextlib.contextmanager
def tokenizer_parallelism() -> Iterator[None]:
    """Let the Rust tokenizer use every core while it trains or encodes here (~1.8x on 2 cores).
    kbtune's entry points set TOKENIZERS_PARALLELISM=false so that nothing competes with training
    steps for the cores; preparation runs before any step, and the library reads the variable at
    every call, so it is switched on for these calls only and restored after."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def chat_turns(docs: Sequence[CleanDoc], tokenizer: Any) -> tuple[list[str], list[str]]:
    """(prompt, answer) texts in the tokenizer's chat template: the prompt is the user turn plus the
    assistant header, the answer is the rest of the rendered conversation (with its end marker)."""
    if not getattr(tokenizer, "chat_template", None):
        from kbtune.data.preparation import DataError

        raise DataError(
            "data.chat_template: the model's tokenizer has no chat template; set data.chat_template=false "
            "to format with data.qa_prompt"
        )
    prompts, answers = [], []
    for d in docs:
        user = [{"role": "user", "content": str(d.metadata["question"]).strip()}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        answer = [{"role": "assistant", "content": d.formatted}]
        full = tokenizer.apply_chat_template(user + answer, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(
                "data.chat_template: the tokenizer's chat template renders the user turn differently once an "
                "answer follows, so the prompt cannot be masked; set data.chat_template=false"
            )
        prompts.append(prompt)
        answers.append(full[len(prompt) :])
    return prompts, answers


def document_blocks(
    ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None, eos_id: int, pad_id: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """`data.packing=document`: every block holds one document (or a piece of a long one), after an EOS as
    in packed data, padded to block_size; padding takes no loss (label -100). No token ever sees another
    document. Returns (blocks, label blocks, padding tokens)."""
    blocks, label_blocks, padding = [], [], 0
    for i, doc in enumerate(ids):
        seq = [eos_id, *doc, eos_id]
        lab = [-100, *(labels[i] if labels else doc), eos_id]
        for start in range(0, len(seq) - 1, block_size):
            piece, piece_labels = seq[start : start + block_size], lab[start : start + block_size]
            pad = block_size - len(piece)
            padding += pad
            blocks.append(piece + [pad_id] * pad)
            label_blocks.append(piece_labels + [-100] * pad)
    shape = (len(blocks), block_size)
    return (np.asarray(blocks, dtype=np.int32).reshape(shape), np.asarray(label_blocks, dtype=np.int64).reshape(shape),
            padding)  # fmt: skip


def tokenize_documents(
    docs: Sequence[CleanDoc], tokenizer: Any, s: DataSettings
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids per document (Rust batch encoding); for `qa` also labels with the prompt masked."""
    backend = tokenizer.backend_tokenizer
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    for start in range(0, len(docs), s.tokenize_batch):
        part = docs[start : start + s.tokenize_batch]
        prompt_texts, body_texts = [d.prompt for d in part], [d.formatted for d in part]
        if s.format == "qa" and s.chat_template:
            prompt_texts, body_texts = chat_turns(part, tokenizer)
        bodies = [e.ids for e in backend.encode_batch(body_texts, add_special_tokens=False)]
        if s.format == "qa":
            prompts = [e.ids for e in backend.encode_batch(prompt_texts, add_special_tokens=False)]
            for p, b in zip(prompts, bodies, strict=True):
                ids.append(p + b)
                # pack() appends EOS after each sequence; the label there stays EOS (learned).
                labels.append([-100] * len(p) + b)
        else:
            ids.extend(bodies)
    return ids, labels


def tokenizer_fingerprint(tokenizer: Any) -> str:
    payload = tokenizer.backend_tokenizer.to_str() + json.dumps(
        {"eos": tokenizer.eos_token_id, "cls": type(tokenizer).__name__}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class SplitBlocks:
    """One split's token blocks, built from its documents added a part at a time, in order, and
    appended to the cache entry's files: each part is tokenized and its texts dropped, so a large KB's
    peak memory holds neither its texts nor its tokens (as lists of Python ints, the tokens alone
    took ~9x the memory of the arrays)."""

    def __init__(self, split: str, settings: DataSettings, tokenizer: Any, entry: PendingEntry):
        self.settings, self.tokenizer = settings, tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        document = settings.packing == "document"
        self.blocks = entry.array(split, np.int32, settings.block_size)
        # Created on the first labelled part: only `qa` and document packing have labels.
        self._labels_file = lambda: entry.array(f"{split}_labels", np.int64 if document else np.int32, settings.block_size)
        self.labels: TokenFile | None = None
        self.documents = self.tokens = self.padding = 0

    def add(self, docs: list[CleanDoc]) -> None:
        s, eos = self.settings, self.tokenizer.eos_token_id
        for start in range(0, len(docs), s.tokenize_batch):
            part = docs[start : start + s.tokenize_batch]
            ids, labels = tokenize_documents(part, self.tokenizer, s)
            if s.packing == "document":
                blocks, label_blocks, padding = document_blocks(ids, labels or None, eos, self.pad, s.block_size)
                self.padding += padding
                self.tokens += sum(len(x) + 2 for x in ids)
                self._append(blocks, label_blocks)
            else:
                stream = pack(ids, eos, 1)[0].reshape(-1)
                self.tokens += len(stream)
                self._append(stream, pack(labels, eos, 1)[0].reshape(-1) if labels else None)
            for d in part:
                d.text = d.formatted = d.prompt = ""
            self.documents += len(part)

    def _append(self, blocks: np.ndarray, labels: np.ndarray | None) -> None:
        self.blocks.append(blocks)
        if labels is not None:
            self.labels = self.labels or self._labels_file()
            self.labels.append(labels)

    def finish(self) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        """(blocks, labels or None, counts), memory-mapped from their files. Packed: the tail shorter
        than a block is dropped."""
        blocks = self.blocks.close()
        labels = self.labels.close() if self.labels is not None else None
        counts = {"documents": self.documents, "tokens": self.tokens, "blocks": len(blocks)}
        if self.settings.packing == "document":
            return blocks, labels, {**counts, "tail_tokens_dropped": 0, "padding_tokens": self.padding}
        return blocks, labels, {**counts, "tail_tokens_dropped": self.tokens - blocks.size}
