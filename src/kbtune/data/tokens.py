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


def concatenate(chunks: list[Any]) -> np.ndarray:
    """np.concatenate that frees each part once copied: the peak is ~1x the total, not 2x."""
    out = np.empty(sum(len(c) for c in chunks), dtype=np.int32)
    pos = 0
    for i, chunk in enumerate(chunks):
        out[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
        chunks[i] = None
    return out


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
    """One split's token blocks, built from its documents added a part at a time, in order: each part
    is tokenized and its texts dropped, so a large KB's peak memory holds its tokens (as int32 arrays),
    not its texts too (as lists of Python ints, the tokens alone took ~9x the memory)."""

    def __init__(self, split: str, settings: DataSettings, tokenizer: Any):
        self.split, self.settings, self.tokenizer = split, settings, tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.chunks: list[np.ndarray] = []
        self.label_chunks: list[np.ndarray] = []
        self.documents = self.tokens = self.padding = 0

    def add(self, docs: list[CleanDoc]) -> None:
        s, eos = self.settings, self.tokenizer.eos_token_id
        for start in range(0, len(docs), s.tokenize_batch):
            part = docs[start : start + s.tokenize_batch]
            ids, labels = tokenize_documents(part, self.tokenizer, s)
            if s.packing == "document":
                blocks, label_blocks, padding = document_blocks(ids, labels or None, eos, self.pad, s.block_size)
                self.chunks.append(blocks)
                self.label_chunks.append(label_blocks)
                self.padding += padding
                self.tokens += sum(len(x) + 2 for x in ids)
            else:
                self.chunks.append(pack(ids, eos, 1)[0].reshape(-1))
                self.tokens += len(self.chunks[-1])
                if labels:
                    self.label_chunks.append(pack(labels, eos, 1)[0].reshape(-1))
            for d in part:
                d.text = d.formatted = d.prompt = ""
            self.documents += len(part)

    def finish(self) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        """(blocks, labels or None, counts). Packed: the tail shorter than a block is dropped."""
        s = self.settings
        if s.packing == "document":
            width = (0, s.block_size)
            blocks = np.concatenate(self.chunks) if self.chunks else np.empty(width, np.int32)
            labels = np.concatenate(self.label_chunks) if self.label_chunks else np.empty(width, np.int64)
            counts = {"documents": self.documents, "tokens": self.tokens, "blocks": len(blocks),
                      "tail_tokens_dropped": 0, "padding_tokens": self.padding}  # fmt: skip
            return blocks, labels, counts
        stream = concatenate(self.chunks)
        label_stream = concatenate(self.label_chunks) if self.label_chunks else None
        n_blocks = len(stream) // s.block_size
        blocks = stream[: n_blocks * s.block_size].reshape(n_blocks, s.block_size)
        labels = label_stream[: n_blocks * s.block_size].reshape(n_blocks, s.block_size) if label_stream is not None else None
        counts = {"documents": self.documents, "tokens": len(stream), "blocks": n_blocks,
                  "tail_tokens_dropped": len(stream) - n_blocks * s.block_size}  # fmt: skip
        return blocks, labels, counts
