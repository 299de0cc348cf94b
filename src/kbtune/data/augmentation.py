"""Per-epoch views of the training documents, so a model stores each fact under its subject instead of
memorising a fixed block through its neighbours: sentences in another order within their sections
(`data.sentence_shuffle`), documents in another order and packed anew (`data.repack`), and question /
answer pairs cut from the documents' own facts (`data.qa_pairs`). Every view is a function of
(seed, epoch) alone, so a resumed run sees exactly what the uninterrupted one saw."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

# A heading line starts a section and stays first in it.
_HEADING = re.compile(r"(?m)^[ \t]{0,3}#{1,6}[ \t].*$")
# Sentence ends: . ! ? followed by whitespace; the whitespace stays with the position (as the next
# sentence's lead), so paragraph breaks stay where they were.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?=\s)")
QA_QUESTION = "{prompt} ..."


def _rng(seed: int, *parts: object) -> random.Random:
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def sections(text: str) -> list[str]:
    """The text cut before each heading line; joined, the sections give the text back exactly."""
    starts = sorted({0, *(m.start() for m in _HEADING.finditer(text))})
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True) if text[a:b]]


def _parts(section: str) -> tuple[str, list[str], list[str], str]:
    """(head: the heading line and the whitespace after it, the sentences' leading whitespace, the
    sentences, the section's trailing whitespace)."""
    heading = _HEADING.match(section)
    head_end = heading.end() if heading else 0
    rest = section[head_end:]
    body = rest.lstrip()
    head = section[: head_end + len(rest) - len(body)]
    core = body.rstrip()
    tail = body[len(core) :]
    pieces = [p for p in _SENTENCE_END.split(core) if p] if core else []
    leads = [p[: len(p) - len(p.lstrip())] for p in pieces]
    return head, leads, [p.lstrip() for p in pieces], tail


def shuffle_sentences(text: str, rng: random.Random) -> str:
    """Sentence order permuted within each section; a section's heading stays first, and each position
    keeps its whitespace (paragraph breaks stay where they were). No sentence is lost or repeated."""
    out = []
    for section in sections(text):
        head, leads, sentences, tail = _parts(section)
        rng.shuffle(sentences)
        out.append(head + "".join(lead + s for lead, s in zip(leads, sentences, strict=True)) + tail)
    return "".join(out)


def qa_pairs(docs: Sequence[Any], per_document: int, seed: int, qa_prompt: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from the facts of `docs` (training documents only: the probe machinery's
    cloze cuts, rendered as questions), at most `per_document` each."""
    from kbtune.knowledge.probes import ProbeSettings, build_probes

    settings = ProbeSettings(max_per_document=per_document, max_probes=None, n_distractors=0, seed=seed)
    probes = build_probes(docs, {d.id: "train" for d in docs}, settings).probes
    return [(qa_prompt.format(question=QA_QUESTION.format(prompt=p.prompt)), p.answer) for p in probes if p.kind == "cloze"]


class EpochViews:
    """The training blocks of each epoch. The block count is that of epoch 0 in every epoch (a view
    whose tokens come out a little longer or shorter is cut or wrapped), so the schedule, the progress
    and a resume's position mean the same thing throughout."""

    def __init__(self, texts: list[str], qa: list[tuple[str, str]], tokenizer: Any, settings: Any, seed: int):
        self.texts, self.qa, self.tokenizer, self.settings, self.seed = texts, qa, tokenizer, settings, seed
        self._qa_ids = self._encode_qa()
        self.n_blocks: int | None = None
        self.n_blocks = len(self.blocks(0)[0])

    def _encode_qa(self) -> list[tuple[list[int], list[int]]]:
        backend = self.tokenizer.backend_tokenizer
        if not self.qa:
            return []
        prompts = [e.ids for e in backend.encode_batch([q for q, _ in self.qa], add_special_tokens=False)]
        answers = [e.ids for e in backend.encode_batch([" " + a for _, a in self.qa], add_special_tokens=False)]
        return [(p + a, [-100] * len(p) + a) for p, a in zip(prompts, answers, strict=True)]

    def documents(self, epoch: int) -> tuple[list[list[int]], list[list[int]]]:
        """(ids, labels) of every training example of `epoch`: `views_per_epoch` views, each the
        documents (sentences reordered if asked) and the question/answer pairs, in that view's order."""
        s = self.settings
        examples: list[tuple[list[int], list[int]]] = []
        for view in range(epoch * s.views_per_epoch, (epoch + 1) * s.views_per_epoch):
            texts = [shuffle_sentences(t, _rng(self.seed, "sentences", view, i)) if s.sentence_shuffle else t
                     for i, t in enumerate(self.texts)]  # fmt: skip
            encoded = [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
            part = [(ids, ids) for ids in encoded] + self._qa_ids
            if s.repack:
                _rng(self.seed, "order", view).shuffle(part)
            examples.extend(part)
        return [ids for ids, _ in examples], [labels for _, labels in examples]

    def blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        from kbtune.data.tokens import document_blocks, pack

        ids, labels = self.documents(epoch)
        eos, block = self.tokenizer.eos_token_id, self.settings.block_size
        if self.settings.packing == "document":
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
            blocks, label_blocks, _ = document_blocks(ids, labels, eos, pad, block)
        else:
            blocks = pack(ids, eos, 1)[0].reshape(-1)
            label_blocks = pack(labels, eos, 1)[0].reshape(-1)
            n = len(blocks) // block
            blocks, label_blocks = blocks[: n * block].reshape(n, block), label_blocks[: n * block].reshape(n, block)
        return self._fixed_count(blocks), self._fixed_count(label_blocks)

    def _fixed_count(self, array: np.ndarray) -> np.ndarray:
        if self.n_blocks is None or len(array) == self.n_blocks:
            return array
        reps = -(-self.n_blocks // len(array))
        return np.concatenate([array] * reps)[: self.n_blocks]
