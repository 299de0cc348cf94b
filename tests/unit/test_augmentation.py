"""Per-epoch views of the training documents: sentence order permuted within sections (every sentence
exactly once, deterministic), documents re-packed each epoch (block boundaries move), document-aligned
blocks that never let a token see another document, question/answer pairs from training documents
only, and an exact resume in the middle of an augmented epoch."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kbtune.data.augmentation import EpochViews, qa_pairs, sections, shuffle_sentences
from kbtune.data.preparation import DataSettings, PreparedData
from kbtune.data.tokens import document_blocks
from kbtune.knowledge.facts import facts_documents
from kbtune.modeling.factory import train_bpe_tokenizer

DOC = "# Harbour\n\nThe pier is 40 m long. It opened in 1901! Who built it? Ada Lind.\n\n## Crew\n\nFour people. One cook."


def _sentences(text: str) -> list[str]:
    return sorted(re.split(r"(?<=[.!?])\s+", re.sub(r"(?m)^#.*$", "", text).strip()))


def test_sections_rebuild_the_text_exactly():
    assert "".join(sections(DOC)) == DOC
    assert [s.split("\n")[0] for s in sections(DOC)] == ["# Harbour", "## Crew"]


def test_sentence_shuffle_keeps_every_sentence_once_headings_first_and_is_deterministic():
    views = {shuffle_sentences(DOC, random.Random(seed)) for seed in range(20)}
    assert len(views) > 5  # the order really changes
    for view in views:
        assert _sentences(view) == _sentences(DOC)
        assert view.startswith("# Harbour\n\n") and "\n\n## Crew\n\n" in view
        # sentences stay in their own section
        assert set(re.split(r"(?<=[.!?]) ", view.split("## Crew")[1].strip())) == {"Four people.", "One cook."}
    assert shuffle_sentences(DOC, random.Random(3)) == shuffle_sentences(DOC, random.Random(3))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [text for _, text, _ in facts_documents(30)]
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


def views(tokenizer, **settings) -> EpochViews:
    texts = [text for _, text, _ in facts_documents(12)]
    return EpochViews(texts, [], tokenizer, DataSettings(block_size=32, **settings), seed=7)


def test_repacking_moves_block_boundaries_between_epochs_and_repeats_for_the_same_epoch(tokenizer):
    v = views(tokenizer, repack=True)
    epoch0, epoch1 = v.blocks(0)[0], v.blocks(1)[0]
    assert epoch0.shape == epoch1.shape  # the same number of blocks every epoch
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(v.blocks(1)[0], epoch1)  # a function of (seed, epoch) alone
    assert np.array_equal(views(tokenizer).blocks(0)[0], views(tokenizer).blocks(1)[0])  # off: fixed blocks


def test_document_blocks_never_let_a_token_see_another_document():
    a, b, c = [5, 6, 7], [8, 9], [10, 11, 12, 13]
    after_a, _, _ = document_blocks([a, b], None, eos_id=0, pad_id=1, block_size=8)
    after_c, labels, _ = document_blocks([c, b], None, eos_id=0, pad_id=1, block_size=8)
    np.testing.assert_array_equal(after_a[1], after_c[1])  # b's block is the same whatever came before
    assert after_c[1].tolist() == [0, 8, 9, 0, 1, 1, 1, 1] and labels[1].tolist()[-4:] == [-100] * 4


def test_a_documents_logits_do_not_depend_on_the_preceding_document(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)).eval()  # fmt: skip
    texts = [text for _, text, _ in facts_documents(3)]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    first, _, _ = document_blocks([ids[0], ids[2]], None, tokenizer.eos_token_id, tokenizer.pad_token_id, 64)
    second, _, _ = document_blocks([ids[1], ids[2]], None, tokenizer.eos_token_id, tokenizer.pad_token_id, 64)
    with torch.no_grad():
        a = model(input_ids=torch.as_tensor(first[-1:], dtype=torch.long)).logits
        b = model(input_ids=torch.as_tensor(second[-1:], dtype=torch.long)).logits
    torch.testing.assert_close(a, b)


def test_question_answer_pairs_come_from_training_documents_only():
    docs = [SimpleNamespace(id=i, text=t, metadata=m) for i, t, m in facts_documents(6)]
    train, held_out = docs[:4], docs[4:]
    pairs = qa_pairs(train, per_document=5, seed=0, qa_prompt="Question: {question}\nAnswer: ")
    assert len(pairs) >= 4 * 4
    held_out_names = [d.metadata["title"] for d in held_out]
    assert not any(name in question for question, _ in pairs for name in held_out_names)
    assert all(question.startswith("Question: ") and question.endswith("...\nAnswer: ") for question, _ in pairs)


@dataclass
class Augmented:
    """Stands in for DataPreparation: fixed validation blocks, training from per-epoch views."""

    settings: DataSettings
    tokenizer: object

    def prepare_dataset(self) -> PreparedData:
        texts = [text for _, text, _ in facts_documents(10)]
        val = np.random.default_rng(0).integers(0, len(self.tokenizer), (4, 32)).astype(np.int32)
        return PreparedData(val, val, None, None, self.tokenizer, {}, None, augmentation={"texts": texts, "qa": []})  # type: ignore[arg-type]


def test_resume_in_the_middle_of_an_augmented_epoch_gives_the_uninterrupted_weights(tokenizer, tmp_path):
    from kbtune.data.datamodule import KBDataModule
    from kbtune.modeling.factory import ModelSpec
    from kbtune.modeling.module import CausalLMModule
    from kbtune.progress import ResumeState
    from kbtune.training_loop import CallbackSettings, TrainerSettings, TrainingLoop

    spec = ModelSpec(name="t", n_layer=1, n_head=2, n_embd=32, intermediate_size=64, vocab_size=len(tokenizer), max_position=32)
    settings = DataSettings(block_size=32, batch_size=2, repack=True, sentence_shuffle=True)

    def fit(folder: str, ckpt: str | None = None, stop_at: int | None = None):
        from kbtune.progress import ProgressCallback
        from kbtune.service import StopRequested
        from kbtune.session_files import SessionFiles

        files = SessionFiles(tmp_path / folder)

        class StopAt(ProgressCallback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == stop_at:
                    files.request_stop()
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

        torch.manual_seed(0)
        module = CausalLMModule(spec.to_dict(), {"learning_rate": 1e-3, "warmup_steps": 1})
        data = KBDataModule(Augmented(settings, tokenizer), seed=0)  # type: ignore[arg-type]
        trainer = TrainerSettings(max_epochs=-1, max_steps=14, precision="32-true", accelerator="cpu",
                                  enable_progress_bar=False, val_check_interval=1.0)  # fmt: skip
        loop = TrainingLoop(trainer, CallbackSettings(), files.checkpoints)
        try:
            loop.train(module, data, [], ckpt, [StopAt(files), ResumeState()])
        except StopRequested:
            files.stop.unlink()
        return module, files

    straight, _ = fit("straight")
    _, files = fit("interrupted", stop_at=9)  # in the middle of an epoch (an epoch is a handful of steps)
    resumed, _ = fit("interrupted", ckpt=str(files.last_checkpoint))
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
