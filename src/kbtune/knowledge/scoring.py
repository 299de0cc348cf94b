"""Scoring a causal LM on fact probes (greedy recall, token F1, multiple choice by likelihood), plus the
per-document losses and retain-set perplexity that show what fine-tuning learned and what it forgot."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kbtune.knowledge.probes import Probe
from kbtune.modeling.loss import token_nll

logger = logging.getLogger(__name__)

# Punctuation goes, except between digits, where it is part of the number: 1,200 / 3.5 / 2021-03-03.
_PUNCTUATION = re.compile(r"(?<!\d)[^\w\s]|[^\w\s](?!\d)|[^\w\s.,:/-]")
_ARTICLES = frozenset(("a", "an", "the"))
# Prompts ending with these want the answer glued on (`code`, "term", (aside)), not after a space.
_GLUE = "\"'`([{“‘"
_SPLIT_NAMES = {"train": "trained", "val": "heldout"}


@dataclass(frozen=True)
class ProbeResult:
    probe_id: str
    document_id: str
    split: str
    kind: str
    exact: bool
    f1: float
    mc_correct: bool | None  # None: the probe has no distractors
    prediction: str


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation (but not inside numbers) and articles dropped, whitespace collapsed."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD's F1 over normalized words: the harmonic mean of word precision and recall."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@contextlib.contextmanager
def _inference(model: Any) -> Iterator[None]:
    """Eval mode and no autograd; the caller's mode comes back (scoring may run inside training)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _context_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of texts read as the start of a document: behind a BOS token, as in training, where each
    packed document follows an EOS (kbtune's BOS) or the model's own BOS. Tokenizers that add BOS keep theirs."""
    ids = tokenizer(list(texts))["input_ids"] if texts else []
    bos = tokenizer.bos_token_id
    if bos is None:
        return [list(x) for x in ids]
    return [list(x) if x[:1] == [bos] else [bos, *x] for x in ids]


def _option_text(prompt: str, option: str) -> str:
    # Byte-level BPE reads " 1987" after a word, not "1987": the space belongs to the answer's token.
    return option if not prompt or prompt[-1].isspace() or prompt[-1] in _GLUE else " " + option


def greedy_continuations(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy continuation text of each prompt, batched with left padding and the KV cache; the text is
    the same as decoding each prompt alone. Prompts are batched by length, so little is padding."""
    import torch

    ids = _context_ids(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = [""] * len(ids)
    with _inference(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            # Padded on the left (by hand: the tokenizer's padding_side is left alone), so that generated
            # tokens follow each prompt's last token directly; the mask hides the padding.
            batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                batch[row, width - len(ids[i]) :] = torch.as_tensor(ids[i])
                mask[row, width - len(ids[i]) :] = 1
            generated = model.generate(
                input_ids=batch.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
                do_sample=False, use_cache=True, pad_token_id=pad_id,
            )  # fmt: skip
            for i, tokens in zip(chunk, generated[:, width:].tolist(), strict=True):
                out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
            del generated
    return out


def _sequence_nll(
    model: Any, sequences: Sequence[tuple[list[int], int]], batch_size: int
) -> list[tuple[float, int]]:
    """(summed nll, scored tokens) of each (ids, context) sequence, its first `context` tokens unscored.
    One forward pass per batch of sequences of similar length; only the two sums are kept per sequence."""
    import torch

    device = model.device
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i][0]), i))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    with _inference(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(sequences[i][0]) for i in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)  # right padding: positions stay 0..n-1
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                seq, context = sequences[i]
                ids[row, : len(seq)] = torch.as_tensor(seq)
                labels[row, context : len(seq)] = torch.as_tensor(seq[context:], dtype=torch.long)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            nll = token_nll(logits, labels.to(device))[0].sum(dim=1).tolist()
            counts = (labels[:, 1:] != -100).sum(dim=1).tolist()
            for row, i in enumerate(chunk):
                out[i] = (nll[row], counts[row])
            del logits
    return out


def _option_logprobs(
    model: Any, tokenizer: Any, probes: Sequence[Probe], batch_size: int
) -> list[list[float] | None]:
    """Log-likelihood of [answer, *distractors] after each probe's prompt; None without distractors. Prompt
    and option are tokenized apart, so every option follows exactly the same prompt tokens."""
    asked = [p for p in probes if p.distractors]
    prompts = _context_ids(tokenizer, [p.prompt for p in asked])
    sequences, owners = [], []
    for n, (probe, prompt_ids) in enumerate(zip(asked, prompts, strict=True)):
        options = [_option_text(probe.prompt, o) for o in (probe.answer, *probe.distractors)]
        for option_ids in tokenizer(options, add_special_tokens=False)["input_ids"]:
            sequences.append((prompt_ids + list(option_ids), len(prompt_ids)))
            owners.append(n)
    scores: list[list[float]] = [[] for _ in asked]
    for owner, (nll, _) in zip(owners, _sequence_nll(model, sequences, batch_size), strict=True):
        scores[owner].append(-nll)
    by_id = {p.id: s for p, s in zip(asked, scores, strict=True)}
    return [by_id.get(p.id) for p in probes]


def score_probes(
    model: Any,
    tokenizer: Any,
    probes: Sequence[Probe],
    batch_size: int = 16,
    max_new_tokens: int | None = None,
) -> list[ProbeResult]:
    """Greedy recall, token F1 and multiple choice of each probe.

    `exact`: the normalized continuation starts with the normalized answer, word for word (it may run on).
    `f1`: the best token F1 of the continuation's first k words, k <= answer words + 2, so a right answer
    followed by the rest of the sentence scores 1 and two extra words ("the year 1987") are tolerated.
    `mc_correct`: the answer is strictly more likely than every distractor (summed token log-probs)."""
    probes = list(probes)
    predictions = [""] * len(probes)
    # Cloze answers are a few words, QA answers can be paragraphs: each kind gets its own budget.
    for kind in sorted({p.kind for p in probes}):
        idx = [i for i, p in enumerate(probes) if p.kind == kind]
        budget = max_new_tokens
        if budget is None:
            texts = [_option_text(probes[i].prompt, probes[i].answer) for i in idx]
            budget = max(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]) + 4
        texts = greedy_continuations(model, tokenizer, [probes[i].prompt for i in idx], budget, batch_size)
        for i, text in zip(idx, texts, strict=True):
            predictions[i] = text
    choices = _option_logprobs(model, tokenizer, probes, batch_size)
    results = []
    for probe, prediction, scores in zip(probes, predictions, choices, strict=True):
        expected, said = normalize_answer(probe.answer).split(), normalize_answer(prediction).split()
        words = prediction.split()
        f1 = max(token_f1(" ".join(words[:k]), probe.answer) for k in range(1, len(probe.answer.split()) + 3))
        exact = bool(expected) and said[: len(expected)] == expected
        mc = None if scores is None else scores[0] > max(scores[1:])
        results.append(
            ProbeResult(probe.id, probe.document_id, probe.split, probe.kind, exact, f1, mc, prediction)
        )
    return results


def knowledge_metrics(results: Sequence[ProbeResult]) -> dict[str, float]:
    """Recall (exact), F1 and multiple-choice accuracy on trained and held-out documents. A split without
    probes (or without multiple-choice probes) gets no rate: a missing number, never a made-up 0."""
    out: dict[str, float] = {}
    for split, name in _SPLIT_NAMES.items():
        mine = [r for r in results if r.split == split]
        out[f"probes_{name}"] = float(len(mine))
        if mine:
            out[f"recall_{name}"] = sum(r.exact for r in mine) / len(mine)
            out[f"f1_{name}"] = sum(r.f1 for r in mine) / len(mine)
        choices = [r.mc_correct for r in mine if r.mc_correct is not None]
        if choices:
            out[f"mc_accuracy_{name}"] = sum(choices) / len(choices)
    return out


def document_report(results: Sequence[ProbeResult]) -> dict[str, dict[str, Any]]:
    """Per document: its split, probe count, recall and mean F1 (which documents the model did not learn)."""
    grouped: dict[str, list[ProbeResult]] = {}
    for r in results:
        grouped.setdefault(r.document_id, []).append(r)
    return {
        doc_id: {
            "split": rs[0].split,
            "probes": len(rs),
            "recall": sum(r.exact for r in rs) / len(rs),
            "f1": sum(r.f1 for r in rs) / len(rs),
        }
        for doc_id, rs in sorted(grouped.items())
    }


def _windows(ids: list[int], block_size: int) -> list[list[int]]:
    """block_size windows overlapping by one token, so every token after the first is scored exactly once
    (each window's first token is only context)."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    return [ids[s : s + block_size] for s in range(0, max(len(ids) - 1, 0), block_size - 1)]


def document_losses(
    model: Any, tokenizer: Any, texts: Mapping[str, str], block_size: int, batch_size: int = 8
) -> dict[str, float]:
    """Mean token cross-entropy of each document read on its own (from a BOS, in block_size windows, never
    packed with another document). Documents without tokens get no entry."""
    keys = list(texts)
    sequences, owners = [], []
    for key, ids in zip(keys, _context_ids(tokenizer, [texts[k] for k in keys]), strict=True):
        for window in _windows(ids, block_size):
            sequences.append((window, 1))
            owners.append(key)
    sums: dict[str, list[float]] = {}
    for key, (nll, count) in zip(owners, _sequence_nll(model, sequences, batch_size), strict=True):
        total = sums.setdefault(key, [0.0, 0])
        total[0] += nll
        total[1] += count
    return {key: sums[key][0] / sums[key][1] for key in keys if key in sums and sums[key][1]}


def text_perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], block_size: int, batch_size: int = 8
) -> float:
    """Perplexity over a retain set: texts joined with EOS after each, as in training, in block_size windows;
    the last, partial window counts, so a set shorter than one block is still scored."""
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []:
        stream.extend([*ids, tokenizer.eos_token_id])
    windows = _windows(stream, block_size)
    if not windows:
        raise ValueError("text_perplexity: the texts have no tokens to score")
    nll = count = 0.0
    for window_nll, window_count in _sequence_nll(model, [(w, 1) for w in windows], batch_size):
        nll, count = nll + window_nll, count + window_count
    return math.exp(nll / count)
