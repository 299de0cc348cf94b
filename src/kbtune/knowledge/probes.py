"""Fact probes built locally from knowledge-base documents: cloze prompts cut just before a fact-carrying
span (a number, date, name or term), question/answer pairs from metadata, and multiple-choice distractors
drawn from other documents' answers. A probe set is deterministic for a KB, a split and the settings."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kbtune.settings_base import settings

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Bump when the same documents and settings would give different probes, so stored sets are not mixed.
PROBES_VERSION = 1

_FUNCTION_WORDS = frozenset(
    "a an the and or but nor if of in on at to for from by with as is are was were be been this that these "
    "those it its when where while after before during since until than then there their our we you they "
    "he she his her i my your all each every some no not per via".split()
)
_CALENDAR = frozenset(
    "january february march april may june july august september october november december "
    "monday tuesday wednesday thursday friday saturday sunday".split()
)
# A year followed by a word is still a year after these ("in 1987 engineers built ...").
_YEAR_CUES = frozenset("in since from year until before after during circa around".split())
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_DATE = re.compile(
    rf"(?<![\w-])(?:{_MONTH}\s\d{{1,2}}(?:st|nd|rd|th)?,?\s\d{{4}}|\d{{1,2}}(?:st|nd|rd|th)?\s{_MONTH},?\s\d{{4}}"
    rf"|{_MONTH},?\s\d{{4}}|\d{{4}}-\d{{2}}-\d{{2}})(?![\w-])"
)
_NUMBER = re.compile(r"(?<![\w.,/$€£-])[$€£]?\d+(?:[.,]\d+)*(?!\w)")
_UNIT = re.compile(r"\s?%|[ ]([A-Za-zµ°][\w/²³°µ]*)")
_YEAR = re.compile(r"1\d{3}|20\d{2}")
_CAP_RUN = re.compile(r"(?<![\w'’-])[A-Z][\w'’-]*(?: [A-Z][\w'’-]*)*")
_OPENERS = "*([\"“'‘"
_TERM = re.compile(r"`([^`\n]+)`|\"([^\"\n]+)\"|“([^”\n]+)”")
# When spans overlap the more specific reading wins: a quoted term over what it contains, a date over
# its numbers, a number over a capitalised unit.
_PRIORITY = {"term": 0, "date": 1, "number": 2, "name": 3}
_FENCE = re.compile(r"```.*?```", re.S)
# Headings and table rows are not sentences (a row has no sentence to cut a prompt from).
_HEADING_LINE = re.compile(r"(?m)^[ \t]{0,3}(?:#{1,6}[ \t]|\|).*$")
_TITLE = re.compile(r"(?m)^[ \t]{0,3}#[ \t]+(.+?)[ \t#]*$")
_LIST_ITEM = re.compile(r"\n(?=[ \t]*(?:[-*+]|\d+[.)])[ \t])")
_LIST_MARKER = re.compile(r"^(?:[-*+]|\d+[.)])[ \t]+(?:\[[ xX]\][ \t]+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Probe:
    id: str
    document_id: str
    split: str  # "train" | "val"
    kind: str  # "cloze" | "qa"
    prompt: str
    answer: str
    answer_type: str  # "number" | "date" | "name" | "term" | "qa"
    distractors: tuple[str, ...] = ()


@settings
class ProbeSettings:
    max_per_document: int = 3
    # Cap over the whole set; the splits share it equally so the held-out rate is as precise as the trained one.
    max_probes: int | None = 300
    n_distractors: int = 3
    seed: int = 0
    # Longest name or quoted term taken as an answer; longer runs are headings or quotations, not facts.
    max_answer_words: int = 4
    qa_prompt: str = "Question: {question}\nAnswer: "

    def validate(self) -> list[str]:
        p = []
        if self.max_per_document < 1:
            p.append(f"eval.probes.max_per_document: must be >= 1, got {self.max_per_document}")
        if self.max_probes is not None and self.max_probes < 1:
            p.append(f"eval.probes.max_probes: must be >= 1 or null, got {self.max_probes}")
        if self.n_distractors < 0:
            p.append(f"eval.probes.n_distractors: must be >= 0, got {self.n_distractors}")
        if self.max_answer_words < 1:
            p.append(f"eval.probes.max_answer_words: must be >= 1, got {self.max_answer_words}")
        if not isinstance(self.seed, int):
            p.append(f"eval.probes.seed: must be an integer, got {self.seed!r}")
        if "{question}" not in self.qa_prompt:
            p.append(f"eval.probes.qa_prompt: must contain {{question}}, got {self.qa_prompt!r}")
        return p


@dataclass
class ProbeSet:
    probes: list[Probe]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    settings: ProbeSettings = field(default_factory=ProbeSettings)

    def by_split(self, split: str) -> list[Probe]:
        return [p for p in self.probes if p.split == split]

    def _payload(self) -> dict[str, Any]:
        return {
            "version": PROBES_VERSION,
            "settings": asdict(self.settings),
            "skipped": dict(sorted(self.skipped.items())),
            "probes": [{**asdict(p), "distractors": list(p.distractors)} for p in self.probes],
        }

    def to_json(self) -> str:
        return json.dumps(self._payload(), ensure_ascii=False, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ProbeSet:
        data = json.loads(text)
        if data.get("version") != PROBES_VERSION:
            raise ValueError(
                f"probe set version {data.get('version')!r} is not {PROBES_VERSION}; rebuild the probes"
            )
        probes = [Probe(**{**p, "distractors": tuple(p["distractors"])}) for p in data["probes"]]
        return cls(probes, dict(data["skipped"]), ProbeSettings(**data["settings"]))

    def digest(self) -> str:
        canonical = json.dumps(self._payload(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def split_sentences(text: str) -> list[str]:
    """Sentences of a Markdown text: headings, tables and fenced code are not sentences; paragraphs and
    list items always end one, and inside them a sentence ends at . ! or ? followed by whitespace."""
    text = _HEADING_LINE.sub("\n", _FENCE.sub("\n\n", text))
    out = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        for item in _LIST_ITEM.split(paragraph):
            item = _LIST_MARKER.sub("", item.strip())
            out.extend(s.strip() for s in _SENTENCE_END.split(item) if s.strip())
    return out


def document_title(text: str, metadata: Mapping[str, Any]) -> str | None:
    title = metadata.get("title")
    if isinstance(title, str) and title.strip():
        return title.strip()
    match = _TITLE.search(text)
    return match.group(1).strip() if match else None


def answer_spans(sentence: str, max_words: int = 4) -> list[tuple[int, int, str]]:
    """Non-overlapping fact-carrying spans (start, end, answer_type) in order of position."""
    found = [(m.start(), m.end(), "date") for m in _DATE.finditer(sentence)]
    found += _number_spans(sentence)
    for m in _TERM.finditer(sentence):
        group = next(i for i in (1, 2, 3) if m.group(i) is not None)
        if len(m.group(group).split()) <= max_words:
            found.append((m.start(group), m.end(group), "term"))
    found += _name_spans(sentence, max_words)
    kept: list[tuple[int, int, str]] = []
    for span in sorted(found, key=lambda s: (_PRIORITY[s[2]], s[0])):
        if all(span[1] <= k[0] or span[0] >= k[1] for k in kept):
            kept.append(span)
    return sorted(kept)


def _is_unit(word: str) -> bool:
    # "Port" in "12 Port Street" starts a name; "kW", "MW", "Hz" and lowercase words are units.
    looks_like_name = word[0].isupper() and word[1:].islower() and len(word) > 2
    return len(word) <= 15 and word.lower() not in _FUNCTION_WORDS | _CALENDAR and not looks_like_name


def _number_spans(sentence: str) -> list[tuple[int, int, str]]:
    spans = []
    for m in _NUMBER.finditer(sentence):
        previous = sentence[: m.start()].split()[-1:]
        cue = bool(previous) and previous[0].lower().strip("(,") in _YEAR_CUES
        year = _YEAR.fullmatch(m.group()) is not None
        unit = _UNIT.match(sentence, m.end())
        if unit and (unit.group(1) is None or _is_unit(unit.group(1))) and not (year and cue):
            spans.append((m.start(), unit.end(), "number"))
        else:
            spans.append((m.start(), m.end(), "date" if year else "number"))
    return spans


def _name_spans(sentence: str, max_words: int) -> list[tuple[int, int, str]]:
    spans = []
    for m in _CAP_RUN.finditer(sentence):
        start, words = m.start(), m.group().split(" ")
        # Function words open many runs ("In Port Selwyn", "The Velmora"): drop them.
        while words and words[0].lower() in _FUNCTION_WORDS:
            start, words = start + len(words[0]) + 1, words[1:]
        # A sentence's first word is capitalised anyway, and so is one opening bold text or a bracket:
        # such a run is the subject or a label, not an answer.
        opens = not sentence[:start].strip(_OPENERS + " ") or sentence[start - 1] in _OPENERS
        if start == m.start() and opens:
            continue
        if words and words[-1][-2:] in ("'s", "’s"):
            words[-1] = words[-1][:-2]
        name = " ".join(words)
        if len(name) < 2 or len(words) > max_words or name.lower() in _CALENDAR:
            continue
        spans.append((start, start + len(name), "name"))
    return spans


def _has_subject(prefix: str) -> bool:
    """A capitalised word other than the first says what the sentence is about."""
    return any(re.match(r"[\W_]*[A-Z]", word) for word in prefix.split()[1:])


def _mentions(text: str, phrase: str) -> bool:
    """`phrase` in `text` as whole words, ignoring case (a regex per call would be compiled every time)."""
    text, phrase = text.lower(), phrase.lower()
    at = text.find(phrase)
    while at >= 0 and phrase:
        before, after = text[at - 1 : at], text[at + len(phrase) : at + len(phrase) + 1]
        if not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"):
            return True
        at = text.find(phrase, at + 1)
    return False


def cloze(sentence: str, title: str | None, max_answer_words: int = 4) -> tuple[str, str, str] | str:
    """(prompt, answer, answer_type) for the last usable fact span of a sentence (the longest context),
    or why there is none: no_answer_span, no_subject, short_prompt or answer_in_prompt."""
    spans = answer_spans(sentence, max_answer_words)
    if not spans:
        return "no_answer_span"
    reason = ""
    for start, end, answer_type in reversed(spans):
        # No trailing space: the model then writes " 1987" as one word, as it read it in training.
        prefix, answer = sentence[:start].rstrip(), sentence[start:end]
        why = ""
        if title is None and not _has_subject(prefix):
            why = "no_subject"
        prompt = prefix if title is None or _mentions(prefix, title) else f"{title}: {prefix}"
        if not why and len(re.findall(r"\w+", prompt)) < 3:
            why = "short_prompt"
        if not why and _mentions(prompt, answer):
            why = "answer_in_prompt"
        if not why:
            return prompt, answer, answer_type
        reason = reason or why  # the reason the preferred (last) span failed
    return reason


def _document_probes(doc: Any, split: str, settings: ProbeSettings, skipped: Counter) -> list[Probe]:
    metadata = dict(doc.metadata or {})
    probes = []
    # Chroma metadata values may be numbers too ("answer": 42).
    question, answer = (str(metadata.get(k) or "").strip() for k in ("question", "answer"))
    if question and answer:
        prompt = settings.qa_prompt.replace("{question}", question)
        probes.append(Probe(f"{doc.id}#qa", doc.id, split, "qa", prompt, answer, "qa"))
    title = document_title(doc.text, metadata)
    for sentence in split_sentences(doc.text):
        outcome = cloze(sentence, title, settings.max_answer_words)
        if isinstance(outcome, str):
            skipped[outcome] += 1
            continue
        prompt, answer, answer_type = outcome
        # Numbered by position among the document's cloze probes: ids do not move when caps change.
        n = sum(p.kind == "cloze" for p in probes)
        probes.append(Probe(f"{doc.id}#{n}", doc.id, split, "cloze", prompt, answer, answer_type))
    return probes


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def _cap_document(probes: list[Probe], settings: ProbeSettings) -> list[Probe]:
    # A question/answer pair is the document's own statement of its key fact: it is kept first.
    ranked = sorted(probes, key=lambda p: (p.kind != "qa", _rank(settings.seed, p.id)))
    keep = {p.id for p in ranked[: settings.max_per_document]}
    return [p for p in probes if p.id in keep]


def _cap_total(probes: list[Probe], settings: ProbeSettings) -> list[Probe]:
    """Equal shares of max_probes per split (a share one split cannot fill goes to the other), each
    sampled by a hash of the seed and probe id, so neither the input order nor the other split matters."""
    cap = settings.max_probes
    if cap is None or len(probes) <= cap:
        return probes
    by_split = {s: [p for p in probes if p.split == s] for s in SPLITS}
    quota, left = {}, cap
    # The smaller split first, so the share it cannot fill goes to the larger one.
    order = sorted(SPLITS, key=lambda s: len(by_split[s]))
    for i, s in enumerate(order):
        quota[s] = min(len(by_split[s]), left // (len(order) - i))
        left -= quota[s]
    keep = set()
    for s in SPLITS:
        ranked = sorted(by_split[s], key=lambda p: _rank(settings.seed, p.id))
        keep.update(p.id for p in ranked[: quota[s]])
    return [p for p in probes if p.id in keep]


def _shape(answer: str, answer_type: str) -> str:
    """Answers of one shape ("# kw", "####", two-word names) make distractors that only knowledge separates."""
    if answer_type in ("number", "date"):
        return re.sub(r"\d+", "#", re.sub(_MONTH, "M", answer)).lower()
    return str(len(answer.split()))


def _with_distractors(probes: list[Probe], pool: list[Probe], settings: ProbeSettings) -> list[Probe]:
    """Distractors of the same answer type from other documents, preferring the same shape."""
    answers: dict[tuple[str, str], tuple[str, set[str]]] = {}
    for p in pool:  # sorted by document id, so the spelling kept for an answer is stable
        shown, docs = answers.setdefault((p.answer_type, p.answer.lower()), (p.answer, set()))
        docs.add(p.document_id)
    groups: dict[tuple[str, str], list[tuple[str, str, set[str]]]] = defaultdict(list)
    for (answer_type, key), (shown, docs) in sorted(answers.items()):
        groups[(answer_type, _shape(shown, answer_type))].append((key, shown, docs))
        groups[(answer_type, "")].append((key, shown, docs))
    out = []
    for probe in probes:
        rng = random.Random(int.from_bytes(_rank(settings.seed, probe.id)[:8], "big"))
        chosen: dict[str, str] = {}
        for group in (
            groups[(probe.answer_type, _shape(probe.answer, probe.answer_type))],
            groups[(probe.answer_type, "")],
        ):
            # A sample a few times larger than needed: only the probe's own answers are ever rejected.
            for key, shown, docs in rng.sample(group, min(len(group), 4 * settings.n_distractors + 8)):
                if len(chosen) == settings.n_distractors:
                    break
                if key != probe.answer.lower() and key not in chosen and docs - {probe.document_id}:
                    chosen[key] = shown
        out.append(replace(probe, distractors=tuple(chosen.values())))
    return out


def build_probes(
    documents: Iterable[Any], splits: Mapping[str, str], settings: ProbeSettings | None = None
) -> ProbeSet:
    """Probes for every document in `splits` (document id -> "train"/"val"); `documents` need `.id`,
    `.text` and `.metadata`. Documents are taken in id order, so the input order never matters."""
    settings = settings or ProbeSettings()
    problems = settings.validate()
    if problems:
        raise ValueError("; ".join(problems))
    skipped: Counter = Counter()
    per_document: dict[str, list[Probe]] = {}
    for doc in documents:
        split = splits.get(doc.id)
        if split is None:
            skipped["not_in_manifest"] += 1
            continue
        if split not in SPLITS:
            raise ValueError(f"document {doc.id!r}: split must be one of {SPLITS}, got {split!r}")
        if doc.id in per_document:
            raise ValueError(f"document id {doc.id!r} appears twice")
        if not doc.text or not doc.text.strip():
            skipped["no_text"] += 1
            per_document[doc.id] = []
            continue
        per_document[doc.id] = _document_probes(doc, split, settings, skipped)
    capped, seen = [], set()
    for doc_id in sorted(per_document):
        unique = []
        for p in per_document[doc_id]:
            if (p.prompt, p.answer) in seen:  # boilerplate repeated across documents tests nothing new
                skipped["duplicate"] += 1
                continue
            seen.add((p.prompt, p.answer))
            unique.append(p)
        kept = _cap_document(unique, settings)
        skipped["document_cap"] += len(unique) - len(kept)
        capped.extend(kept)
    probes = _cap_total(capped, settings)
    skipped["global_cap"] += len(capped) - len(probes)
    if settings.n_distractors:
        probes = _with_distractors(probes, capped, settings)
    result = ProbeSet(probes, {k: v for k, v in sorted(skipped.items()) if v}, settings)
    logger.info(
        "built %d probes (%d train, %d val) from %d documents; skipped %s",
        len(probes), len(result.by_split("train")), len(result.by_split("val")), len(per_document), result.skipped,
    )  # fmt: skip
    return result
