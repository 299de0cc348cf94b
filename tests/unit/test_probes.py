"""Fact probes: the spans taken as answers, the subject and answer rules, caps, skip counts, distractors,
determinism and the JSON round trip, on hand-written documents, the invented-facts KB and the sample corpus."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from kbtune.knowledge.facts import FACT_KEYS, entity_document, facts_documents, generate_entities
from kbtune.knowledge.probes import (
    Probe,
    ProbeSet,
    ProbeSettings,
    answer_spans,
    build_probes,
    cloze,
    split_sentences,
)
from kbtune.knowledge_base import Document

SAMPLE_KB = Path(__file__).resolve().parents[2] / "data" / "sample_kb"
ALL = ProbeSettings(max_per_document=100, max_probes=None)


def facts_kb(n: int, seed: int = 0) -> list[Document]:
    return [Document(doc_id, text, metadata) for doc_id, text, metadata in facts_documents(n, seed)]


def every_train(docs: list[Document]) -> dict[str, str]:
    return {d.id: "train" for d in docs}


def mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None


@pytest.mark.parametrize(
    ("sentence", "answer", "answer_type"),
    [
        ("The Velmora pumping station delivers an output of 340 kW.", "340 kW", "number"),
        ("The Tidewater depot stores 1,200 litres of brine at Port Alder.", "Port Alder", "name"),
        ("The Tidewater depot keeps a brine margin of 12%.", "12%", "number"),
        ("The Tidewater depot stores 2000 litres of brine.", "2000 litres", "number"),
        ("The Heron H4 buoy was first deployed in 1987.", "1987", "date"),
        ("The Estuary platform went live on March 3, 2021.", "March 3, 2021", "date"),
        ("The chief engineer of the Velmora station is Ada Lindqvist.", "Ada Lindqvist", "name"),
        ("On the Heron buoy the logger runs `pumpctl` every hour at night.", "pumpctl", "term"),
        ('The Tidewater handbook calls the weekly meeting "Tide Call" for short.', "Tide Call", "term"),
    ],
)
def test_last_fact_span_is_the_answer(sentence, answer, answer_type):
    prompt, got, got_type = cloze(sentence, None)
    assert (got, got_type) == (answer, answer_type)
    assert sentence.startswith(prompt) and not prompt.endswith(" ")
    assert sentence[len(prompt) :].lstrip().startswith(answer)


def test_year_followed_by_a_word_and_numbers_with_units():
    spans = answer_spans("In 1987 engineers shipped 2000 litres to the crew of 12 people.")
    texts = [("In 1987 engineers shipped 2000 litres to the crew of 12 people."[s:e], t) for s, e, t in spans]
    assert texts == [("1987", "date"), ("2000 litres", "number"), ("12 people", "number")]


def test_sentence_start_and_long_runs_are_not_names():
    assert answer_spans("Customer Support answers every call.") == []
    assert answer_spans("Ada Lindqvist designed the station.") == []
    # More capitalised words than max_answer_words: a heading-like run, not an answer.
    assert answer_spans("It runs the Port Alder Coastal Water Quality Programme.", max_words=4) == []


def test_sentences_skip_headings_tables_and_code():
    text = "# Title\n\nFirst one. Second one!\n\n## Part\n| a | b |\n\n```\ncode. here\n```\n- item one\n- [ ] item two"
    assert split_sentences(text) == ["First one.", "Second one!", "item one", "item two"]


def test_subject_rule():
    # No capitalised word before the answer and no title: the prompt would not say what it is about.
    assert cloze("It was built in 1987 by the river.", None) == "no_subject"
    # Only the first word is capitalised: it may be a name, but nothing tells it from any sentence start.
    assert cloze("Tidewater stores 1,200 litres of brine.", None) == "no_subject"
    # A known title stands in for the subject, in front of the prompt.
    assert cloze("It weighs 96 kg.", "Heron Buoy") == ("Heron Buoy: It weighs", "96 kg", "number")
    # A title the prompt already names is not repeated.
    prompt, _, _ = cloze("The Heron Buoy weighs 96 kg.", "Heron Buoy")
    assert prompt == "The Heron Buoy weighs"


def test_title_from_first_heading_when_metadata_has_none():
    doc = Document("d1", "# Heron Buoy\n\nIt weighs 96 kg. It was built in 1987.", {})
    probes = build_probes([doc], {"d1": "val"}, ALL).probes
    assert [(p.prompt, p.answer, p.split) for p in probes] == [
        ("Heron Buoy: It weighs", "96 kg", "val"),
        ("Heron Buoy: It was built in", "1987", "val"),
    ]


def test_skips_are_counted_by_reason():
    docs = [
        Document("a", "The Velmora station delivers 340 kW. It is nice.", {}),
        Document("b", "The Velmora station delivers 340 kW.", {}),  # same probe as a's: a duplicate
        Document("c", "it delivers 340 kW.", {}),  # no capitalised subject, no title
        Document("d", "The Brenwick mill stands in Brenwick.", {}),  # the answer is already in the prompt
        Document("e", "   ", {}),
        Document("outside", "The Velmora station delivers 340 kW.", {}),
    ]
    result = build_probes(docs, {d: "train" for d in "abcde"}, ALL)
    assert [p.id for p in result.probes] == ["a#0"]
    assert result.skipped == {
        "answer_in_prompt": 1,
        "duplicate": 1,
        "no_answer_span": 1,
        "no_subject": 1,
        "no_text": 1,
        "not_in_manifest": 1,
    }


def test_qa_probes_from_metadata():
    meta = {"title": "Estuary FAQ", "question": "How long is my data kept?", "answer": "Seven years."}
    doc = Document("faq#1", "## Q: How long is my data kept?\nSeven years.", meta)
    (probe,) = build_probes([doc], {"faq#1": "train"}, ALL).probes
    assert (probe.id, probe.kind, probe.answer_type) == ("faq#1#qa", "qa", "qa")
    assert probe.prompt == "Question: How long is my data kept?\nAnswer: "
    assert probe.answer == "Seven years."


def test_same_probes_in_any_input_order():
    docs = facts_kb(12)
    splits = {d.id: ("val" if i % 4 == 0 else "train") for i, d in enumerate(docs)}
    first = build_probes(docs, splits, ProbeSettings(max_probes=20))
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    second = build_probes(shuffled, splits, ProbeSettings(max_probes=20))
    assert second.to_json() == first.to_json()
    assert second.digest() == first.digest()
    assert build_probes(docs, splits, ProbeSettings(max_probes=20, seed=1)).digest() != first.digest()


def test_cap_per_document_keeps_stable_ids():
    docs = facts_kb(6)
    full = build_probes(docs, every_train(docs), ALL)
    capped = build_probes(docs, every_train(docs), replace(ALL, max_per_document=2))
    counts = {d.id: sum(p.document_id == d.id for p in capped.probes) for d in docs}
    assert set(counts.values()) == {2}
    # The kept probes are the same probes, under the same ids, as without the cap.
    bare = {replace(p, distractors=()) for p in full.probes}
    assert {replace(p, distractors=()) for p in capped.probes} <= bare
    assert capped.skipped["document_cap"] == len(full.probes) - len(capped.probes)


def test_global_cap_shares_the_cap_between_splits():
    docs = facts_kb(20)
    splits = {d.id: ("val" if i < 3 else "train") for i, d in enumerate(docs)}  # 15 val, 85 train probes
    result = build_probes(docs, splits, replace(ALL, max_probes=20))
    assert len(result.probes) == 20
    assert len(result.by_split("val")) == 10 and len(result.by_split("train")) == 10
    assert result.skipped["global_cap"] == 100 - 20
    few_val = build_probes(docs, splits, replace(ALL, max_probes=40, max_per_document=1))  # 3 val, 17 train
    assert len(few_val.by_split("val")) == 3 and len(few_val.by_split("train")) == 17


def test_distractors_same_type_other_documents_never_the_answer():
    docs = facts_kb(15)
    result = build_probes(docs, every_train(docs), ProbeSettings(max_per_document=5, n_distractors=3))
    sources: dict[tuple[str, str], set[str]] = {}
    for p in result.probes:
        sources.setdefault((p.answer_type, p.answer.lower()), set()).add(p.document_id)
    for probe in result.probes:
        assert len({d.lower() for d in probe.distractors}) == len(probe.distractors) == 3
        for distractor in probe.distractors:
            assert distractor.lower() != probe.answer.lower()
            # An answer of the same type that another document gives.
            assert sources[(probe.answer_type, distractor.lower())] - {probe.document_id}
    # Same shape first: outputs get other outputs ("# kw"), crews other crews.
    for probe in result.probes:
        if probe.answer.endswith(" kW"):
            assert all(d.endswith(" kW") for d in probe.distractors)


def test_no_distractors_when_none_asked_or_none_available():
    docs = facts_kb(3)
    assert all(
        p.distractors == ()
        for p in build_probes(docs, every_train(docs), replace(ALL, n_distractors=0)).probes
    )
    alone = build_probes(docs[:1], every_train(docs[:1]), ALL).probes
    assert all(p.distractors == () for p in alone)  # only the document's own answers exist


def test_json_round_trip_is_exact(tmp_path):
    docs = facts_kb(5)
    splits = {d.id: ("val" if i == 0 else "train") for i, d in enumerate(docs)}
    original = build_probes(docs, splits, ProbeSettings(max_probes=12, seed=7))
    path = tmp_path / "probes.json"
    path.write_text(original.to_json(), encoding="utf-8")
    loaded = ProbeSet.from_json(path.read_text(encoding="utf-8"))
    assert loaded == original
    assert loaded.digest() == original.digest()
    assert all(isinstance(p.distractors, tuple) for p in loaded.probes)
    with pytest.raises(ValueError, match="version"):
        ProbeSet.from_json(original.to_json().replace('"version": 1', '"version": 99'))


def test_settings_validation_names_every_key():
    bad = ProbeSettings(
        max_per_document=0, max_probes=0, n_distractors=-1, max_answer_words=0, qa_prompt="Q:"
    )
    assert {p.split(":")[0] for p in bad.validate()} == {
        "eval.probes.max_per_document",
        "eval.probes.max_probes",
        "eval.probes.n_distractors",
        "eval.probes.max_answer_words",
        "eval.probes.qa_prompt",
    }
    assert ProbeSettings().validate() == []
    with pytest.raises(ValueError, match="eval.probes.max_per_document"):
        build_probes([], {}, bad)


def test_facts_kb_probes_are_the_facts():
    entities = generate_entities(12, seed=5)
    docs = [Document(*entity_document(e)) for e in entities]
    result = build_probes(docs, every_train(docs), replace(ALL, max_per_document=5))
    assert result.skipped == {}
    for entity, doc in zip(entities, docs, strict=True):
        probes = [p for p in result.probes if p.document_id == doc.id]
        assert sorted(p.answer for p in probes) == sorted(entity.facts[k] for k in FACT_KEYS)
        assert all(p.kind == "cloze" and entity.name in p.prompt for p in probes)
        types = {p.answer: p.answer_type for p in probes}
        assert types[entity.facts["year"]] == "date" and types[entity.facts["town"]] == "name"
        assert types[entity.facts["output"]] == "number" and types[entity.facts["crew"]] == "number"


def test_facts_generator_is_deterministic_with_unique_names():
    entities = generate_entities(200, seed=1)
    assert entities == generate_entities(200, seed=1)
    assert len({e.name for e in entities}) == 200
    assert len({doc_id for doc_id, _, _ in facts_documents(200, seed=1)}) == 200
    assert generate_entities(5, seed=2) != generate_entities(5, seed=1)
    for key in FACT_KEYS:
        assert len({e.facts[key] for e in entities}) > 20  # values vary


def test_sample_corpus_probes_keep_the_rules():
    docs = [
        Document(str(f.relative_to(SAMPLE_KB)), f.read_text(encoding="utf-8"), {})
        for f in sorted(SAMPLE_KB.rglob("*.md"))
    ]
    splits = {d.id: ("val" if i % 5 == 0 else "train") for i, d in enumerate(docs)}
    result = build_probes(docs, splits, ProbeSettings())
    assert 100 < len(result.probes) <= 3 * len(docs)
    assert result.by_split("val") and result.by_split("train")
    assert len({p.id for p in result.probes}) == len(result.probes)
    for probe in result.probes:
        assert isinstance(probe, Probe) and probe.split == splits[probe.document_id]
        assert probe.answer_type in ("number", "date", "name", "term") and probe.kind == "cloze"
        assert not mentions(probe.prompt, probe.answer)
        assert len(re.findall(r"\w+", probe.prompt)) >= 3
        assert probe.answer.strip() == probe.answer and len(probe.answer.split()) <= 4
