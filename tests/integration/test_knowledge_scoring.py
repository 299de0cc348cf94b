"""Knowledge scoring on a tiny Llama: batched greedy decoding equals one-at-a-time decoding, a model
trained on invented facts recalls them where its untrained start does not, the metrics omit what was not
measured, and per-document losses and retain-set perplexity agree with the model's own loss."""

from __future__ import annotations

import copy
import math
import random
from types import SimpleNamespace

import pytest
import torch

from kbtune.knowledge.facts import facts_documents
from kbtune.knowledge.probes import Probe, ProbeSettings, build_probes, split_sentences
from kbtune.knowledge.scoring import (
    ProbeResult,
    document_losses,
    document_report,
    greedy_continuations,
    knowledge_metrics,
    normalize_answer,
    score_probes,
    text_perplexity,
    token_f1,
    token_nll,
)
from kbtune.knowledge_base import Document
from kbtune.modeling.factory import train_bpe_tokenizer

N_TRAIN, N_HELDOUT = 8, 2
TRAIN_STEPS = 300


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on two shared cores: a second intra-op thread costs more than it gives (training took
    ~40 s with two threads on a busy machine, ~7 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def kb(tmp_path_factory) -> SimpleNamespace:
    docs = [Document(*d) for d in facts_documents(N_TRAIN + N_HELDOUT, seed=0)]
    splits = {d.id: ("train" if i < N_TRAIN else "val") for i, d in enumerate(docs)}
    tokenizer = train_bpe_tokenizer([d.text for d in docs], 512, tmp_path_factory.mktemp("tokenizer"))
    probes = build_probes(docs, splits, ProbeSettings(max_per_document=5)).probes
    return SimpleNamespace(docs=docs, splits=splits, tokenizer=tokenizer, probes=probes)


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def train_on(model, tokenizer, docs: list[Document], steps: int) -> None:
    """Full-batch AdamW on the documents, their sentences shuffled at every step: a 2-layer model would
    otherwise learn each fact by its position in the document, and probes ask for it out of context."""
    rng = random.Random(0)
    sentences = [split_sentences(d.text) for d in docs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        texts = [
            f"# {d.metadata['title']}\n\n" + " ".join(rng.sample(s, len(s)))
            for d, s in zip(docs, sentences, strict=True)
        ]
        ids = [[tokenizer.eos_token_id, *x, tokenizer.eos_token_id] for x in tokenizer(texts)["input_ids"]]
        width = max(map(len, ids))
        batch = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
        labels = torch.tensor([x + [-100] * (width - len(x)) for x in ids])
        loss = model(input_ids=batch, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def models(kb) -> SimpleNamespace:
    untrained = tiny_llama(len(kb.tokenizer))
    trained = copy.deepcopy(untrained)
    train_on(trained, kb.tokenizer, [d for d in kb.docs if kb.splits[d.id] == "train"], TRAIN_STEPS)
    return SimpleNamespace(untrained=untrained, trained=trained)


@pytest.fixture(scope="module")
def scored(kb, models) -> SimpleNamespace:
    return SimpleNamespace(
        untrained=score_probes(models.untrained, kb.tokenizer, kb.probes, batch_size=8),
        trained=score_probes(models.trained, kb.tokenizer, kb.probes, batch_size=8),
    )


def test_normalize_answer_and_token_f1():
    assert normalize_answer("  The 1,200 Litres, (approx.) 3.5%!") == "1,200 litres approx 3.5"
    assert normalize_answer("An Ada-Lindqvist") == "ada lindqvist"
    assert normalize_answer("March 3, 2021.") == "march 3 2021"
    assert token_f1("the Port Selwyn", "Port Selwyn") == 1.0
    assert token_f1("Port Alder", "Port Selwyn") == pytest.approx(0.5)
    assert token_f1("", "Port Selwyn") == 0.0 and token_f1("", "") == 1.0


def test_token_nll_masks_and_matches_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    nll, _ = token_nll(logits, labels)
    assert nll.shape == (2, 4) and torch.all(nll[0, :2] == 0)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert (nll.sum() / (labels[:, 1:] != -100).sum()).item() == pytest.approx(expected.item(), rel=1e-6)


def generate_alone(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt)["input_ids"]]])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_batched_greedy_equals_one_at_a_time(kb, models):
    prompts = [p.prompt for p in kb.probes[::3]] + [
        "The",
        "At full load the harbour road of the crew of 12 people",
    ]
    side = kb.tokenizer.padding_side
    for model in (models.untrained, models.trained):
        batched = greedy_continuations(model, kb.tokenizer, prompts, max_new_tokens=12, batch_size=4)
        alone = [
            greedy_continuations(model, kb.tokenizer, [p], max_new_tokens=12, batch_size=1)[0]
            for p in prompts
        ]
        assert batched == alone
        assert batched == [generate_alone(model, kb.tokenizer, p, 12) for p in prompts]
        assert all(text for text in batched)
    assert kb.tokenizer.padding_side == side
    assert greedy_continuations(models.trained, kb.tokenizer, [], max_new_tokens=4) == []


def test_trained_model_recalls_its_facts(kb, scored):
    assert len(kb.probes) == 5 * (N_TRAIN + N_HELDOUT)
    trained, untrained = knowledge_metrics(scored.trained), knowledge_metrics(scored.untrained)
    assert trained["probes_trained"] == 5 * N_TRAIN and trained["probes_heldout"] == 5 * N_HELDOUT
    assert trained["recall_trained"] >= 0.8
    assert untrained["recall_trained"] <= 0.1
    assert trained["f1_trained"] >= 0.8 > untrained["f1_trained"]
    assert trained["mc_accuracy_trained"] > untrained["mc_accuracy_trained"]
    # Invented facts the model never read cannot be recalled.
    assert trained["recall_heldout"] <= 0.2
    answers = {p.id: p.answer for p in kb.probes}
    for result in scored.trained:
        if result.exact:
            assert normalize_answer(result.prediction).startswith(normalize_answer(answers[result.probe_id]))


def test_document_report(kb, scored):
    report = document_report(scored.trained)
    assert set(report) == {d.id for d in kb.docs}
    for doc_id, row in report.items():
        assert row["probes"] == 5 and row["split"] == kb.splits[doc_id]
        mine = [r for r in scored.trained if r.document_id == doc_id]
        assert row["recall"] == pytest.approx(sum(r.exact for r in mine) / 5)


def test_metrics_omit_rates_of_an_empty_split(kb, models):
    train_only = [p for p in kb.probes if p.split == "train"][:6]
    metrics = knowledge_metrics(score_probes(models.trained, kb.tokenizer, train_only))
    assert set(metrics) == {
        "recall_trained",
        "f1_trained",
        "mc_accuracy_trained",
        "probes_trained",
        "probes_heldout",
    }
    assert metrics["probes_heldout"] == 0.0
    assert knowledge_metrics([]) == {"probes_trained": 0.0, "probes_heldout": 0.0}


def test_no_distractors_no_multiple_choice(kb, models):
    bare = [
        Probe(p.id, p.document_id, p.split, p.kind, p.prompt, p.answer, p.answer_type) for p in kb.probes[:4]
    ]
    results = score_probes(models.trained, kb.tokenizer, bare, batch_size=2)
    assert all(isinstance(r, ProbeResult) and r.mc_correct is None for r in results)
    assert "mc_accuracy_trained" not in knowledge_metrics(results)


def test_qa_probe_scored_after_its_prompt(kb, models):
    probe = Probe(
        "q#qa",
        "q",
        "val",
        "qa",
        "Question: Who designed it?\nAnswer: ",
        "Ada Lindqvist",
        "qa",
        ("Bram Holm",),
    )
    (result,) = score_probes(models.trained, kb.tokenizer, [probe], max_new_tokens=6)
    assert result.kind == "qa" and result.mc_correct is not None
    assert len(kb.tokenizer(result.prediction, add_special_tokens=False)["input_ids"]) <= 6


def test_document_losses_and_perplexity(kb, models):
    texts = {d.id: d.text for d in kb.docs if kb.splits[d.id] == "train"}
    before = document_losses(models.untrained, kb.tokenizer, texts, block_size=128)
    after = document_losses(models.trained, kb.tokenizer, texts, block_size=128)
    assert set(before) == set(after) == set(texts)
    assert all(math.isfinite(v) for v in [*before.values(), *after.values()])
    assert all(after[k] < before[k] for k in texts)
    # Read whole in one window, a document's loss is the model's own mean loss after a BOS token.
    doc_id, text = next(iter(texts.items()))
    ids = torch.tensor([[kb.tokenizer.bos_token_id, *kb.tokenizer(text)["input_ids"]]])
    with torch.inference_mode():
        own = models.trained(input_ids=ids, labels=ids).loss.item()
    assert after[doc_id] == pytest.approx(own, rel=1e-4)
    chunked = document_losses(
        models.trained, kb.tokenizer, {**texts, "empty": ""}, block_size=16, batch_size=3
    )
    assert set(chunked) == set(texts) and all(math.isfinite(v) for v in chunked.values())

    retain = list(texts.values())
    ppl_before = text_perplexity(models.untrained, kb.tokenizer, retain, block_size=64)
    ppl_after = text_perplexity(models.trained, kb.tokenizer, retain, block_size=64)
    assert math.isfinite(ppl_before) and 1.0 < ppl_after < ppl_before
    short = "The Velmora mill."  # shorter than one block: still scored, with its EOS
    ids = torch.tensor([[*kb.tokenizer(short)["input_ids"], kb.tokenizer.eos_token_id]])
    with torch.inference_mode():
        own = models.trained(input_ids=ids, labels=ids).loss.item()
    assert text_perplexity(models.trained, kb.tokenizer, [short], block_size=64) == pytest.approx(
        math.exp(own), rel=1e-4
    )
    with pytest.raises(ValueError, match="no tokens"):
        text_perplexity(models.trained, kb.tokenizer, [], block_size=64)


def test_scoring_keeps_the_models_mode(kb, models):
    model = models.trained
    model.train()
    score_probes(model, kb.tokenizer, kb.probes[:2])
    document_losses(model, kb.tokenizer, {"d": kb.docs[0].text}, block_size=32)
    assert model.training
    model.eval()
    text_perplexity(model, kb.tokenizer, [kb.docs[0].text], block_size=32)
    assert not model.training
