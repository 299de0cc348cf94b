"""`data=qa`: documents with question/answer metadata (the ingested `## Q:` sections of the sample
FAQs) become prompt + answer sequences whose labels mask the prompt, so the loss is on the answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kbtune.configuration import ConfigError, load
from kbtune.data.preparation import DataError, DataPreparation, DataSettings
from kbtune.hydra_entry import compose, to_container
from kbtune.jobs import train
from kbtune.knowledge_base import KBSettings, KnowledgeBase
from kbtune.modeling.factory import ModelSpec, TokenizerProvider
from kbtune.project import Project
from tests.conftest import SAMPLE_KB, seed_kb
from tests.integration.local_checkpoints import CHATML, make_local_checkpoint


@pytest.fixture(scope="module")
def faq_kb(tmp_path_factory) -> KnowledgeBase:
    path = tmp_path_factory.mktemp("faq") / "chroma"
    seed_kb(path, "faq", folder=SAMPLE_KB / "part_b" / "support")
    return KnowledgeBase.connect(KBSettings(path=str(path), collection="faq"))


def prepare(kb: KnowledgeBase, spec: ModelSpec, cache: Path, **settings):
    preparation = DataPreparation(kb, DataSettings(format="qa", **settings), TokenizerProvider(spec, cache), cache)
    return preparation, preparation.prepare_dataset()


def documents_in_stream(ids: np.ndarray, labels: np.ndarray, eos: int) -> list[tuple[list[int], list[int]]]:
    """(masked ids, learned ids) of each complete document in a packed split; EOS ends a document."""
    docs, masked, learned = [], [], []
    for token, label in zip(ids.reshape(-1).tolist(), labels.reshape(-1).tolist(), strict=True):
        assert label in (-100, token)  # a label is the token itself or masked, never anything else
        if label == -100:
            assert not learned, "a prompt token after answer tokens: the mask is not prompt-then-answer"
            masked.append(token)
        elif token == eos and not (masked and not learned):
            docs.append((masked, learned))
            masked, learned = [], []
        else:
            learned.append(token)
    return docs


def test_qa_labels_mask_the_prompt_and_keep_the_answer(faq_kb, tmp_path):
    spec = ModelSpec(name="tiny", n_layer=1, n_head=2, n_embd=32, intermediate_size=64, vocab_size=512)
    preparation, data = prepare(faq_kb, spec, tmp_path, block_size=64)
    tok = data.tokenizer
    docs = [d for d in preparation.collect()[0] if d.split == "train"]
    assert len(docs) > 40 and all(d.metadata.get("question") for d in docs)

    stream = documents_in_stream(data.train, data.train_labels, tok.eos_token_id)
    assert len(stream) >= len(docs) - 2  # only the tail cut by packing is missing
    for doc, (masked, learned) in zip(docs, stream, strict=False):
        assert tok.decode(masked) == f"Question: {doc.metadata['question']}\nAnswer: "
        assert tok.decode(learned) == doc.formatted and doc.formatted.strip() in doc.text
    learned_share = float((data.train_labels != -100).mean())
    assert 0.3 < learned_share < 0.95  # the loss covers the answers, not the whole block


def test_chat_template_of_a_local_model_renders_the_prompt_it_masks(faq_kb, tmp_path):
    model_dir = make_local_checkpoint(tmp_path / "chat-model", "llama", chat_template=CHATML, pretrain_steps=0)
    spec = ModelSpec(name="local", source="local", path=str(model_dir))
    preparation, data = prepare(faq_kb, spec, tmp_path / "cache", block_size=128, chat_template=True)
    tok = data.tokenizer
    docs = [d for d in preparation.collect()[0] if d.split == "train"]
    stream = documents_in_stream(data.train, data.train_labels, tok.eos_token_id)
    for doc, (masked, learned) in list(zip(docs, stream, strict=False))[:10]:
        question = doc.metadata["question"]
        assert tok.decode(masked) == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        assert tok.decode(learned) == f"{doc.formatted}<|im_end|>\n"  # learns to end its turn

    # The same settings without the template prepare different data (a different cache entry).
    _, plain = prepare(faq_kb, spec, tmp_path / "cache", block_size=128)
    assert plain.manifest["cache_key"] != data.manifest["cache_key"]


def test_chat_template_needs_a_tokenizer_that_has_one(faq_kb, tmp_path, project):
    model_dir = make_local_checkpoint(tmp_path / "plain-model", "gpt2", pretrain_steps=0)
    with pytest.raises(DataError, match="data.chat_template"):
        prepare(faq_kb, ModelSpec(source="local", path=str(model_dir)), tmp_path / "cache", chat_template=True)

    with pytest.raises(ConfigError) as err:
        load(to_container(compose([*project["overrides"], "data=qa", "data.chat_template=true"])))
    assert "data.chat_template" in str(err.value) and "model=local" in str(err.value)


@pytest.mark.slow
def test_qa_training_runs_end_to_end(project, faq_kb):
    kept = [o for o in project["overrides"] if not o.startswith(("kb.", "trainer.max_epochs", "data.block_size"))]
    overrides = [*kept, f"kb.path={faq_kb.settings.path}", "kb.collection=faq", "data=qa", "data.block_size=64",
                 "trainer.max_epochs=1"]  # fmt: skip
    cfg = compose(overrides)
    assert train(cfg) is not None
    plan, runtime = load(to_container(cfg))
    assert plan.data.format == "qa"
    (session,) = Project({}, runtime).store.list_sessions()
    assert session.metrics["val/loss"] > 0 and session.config["data"]["format"] == "qa"
