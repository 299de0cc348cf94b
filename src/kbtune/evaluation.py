"""The seed's ModelEvaluation: rebuild a version's held-out documents from its session's manifest, run
the model on them, and score it (loss, perplexity, token accuracy, ROUGE-L/BLEU of continuations)
against the starting model, so every evaluation reports the gain."""

from __future__ import annotations

import json
import logging
from dataclasses import field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kbtune.data.preparation import DataSettings, load_documents_for_split
from kbtune.data.tokens import pack, tokenize_documents
from kbtune.knowledge.probes import ProbeSettings
from kbtune.knowledge_base import KnowledgeBase
from kbtune.model_manager import SPEC_FILE, ModelManager
from kbtune.settings_base import settings
from kbtune.tracking.store import SessionStore

logger = logging.getLogger(__name__)


@settings
class EvalSettings:
    """conf/eval (`eval.*`): held-out text metrics and the knowledge evaluation."""

    # Held-out text: documents scored (the session's validation split, rebuilt from its manifest); null = all.
    max_documents: int | None = 64
    batch_size: int = 8
    # Continue `prefix_tokens` of a held-out passage for `generate_tokens` tokens (ROUGE-L, BLEU).
    prefix_tokens: int = 32
    generate_tokens: int = 32
    generation_documents: int = 16
    # Also score the starting model (untrained init, or the base checkpoint) to report the gain.
    compare_with_start: bool = True
    # Knowledge: run the fact-probe evaluation when a training session completes.
    after_training: bool = True
    # A folder of .md/.txt files, or a Chroma collection, of text outside the KB the starting model
    # handled: forgetting is the relative perplexity change on it (local/pretrained models only).
    retain: str | None = None
    retain_max_documents: int = 200
    probe_batch_size: int = 16
    # How many of the worst-learned training documents reports list.
    report_worst: int = 10
    probes: ProbeSettings = field(default_factory=ProbeSettings)

    def validate(self) -> list[str]:
        p = []
        if self.max_documents is not None and self.max_documents < 1:
            p.append(f"eval.max_documents: must be >= 1 or null, got {self.max_documents}")
        for key in ("batch_size", "prefix_tokens", "generate_tokens", "retain_max_documents", "probe_batch_size", "report_worst"):
            if getattr(self, key) < 1:
                p.append(f"eval.{key}: must be >= 1, got {getattr(self, key)}")
        if self.generation_documents < 0:
            p.append(f"eval.generation_documents: must be >= 0, got {self.generation_documents}")
        return p + self.probes.validate()


def score_model(model: Any, tokenizer: Any, docs: list[Any], data: DataSettings, settings: EvalSettings) -> dict[str, float]:
    """Loss/perplexity/accuracy over the documents packed as in training, plus continuation metrics.
    Only running sums are kept across batches, so memory does not grow with the test set."""
    import torch
    from torchmetrics.text import BLEUScore, ROUGEScore

    from kbtune.modeling.loss import token_stats

    ids, labels = tokenize_documents(docs, tokenizer, data)
    blocks, _ = pack(ids, tokenizer.eos_token_id, data.block_size)
    label_blocks = pack(labels, tokenizer.eos_token_id, data.block_size)[0] if labels else blocks
    if len(blocks) == 0:  # fewer tokens than one block: score the whole text as one short block
        flat = np.concatenate([np.asarray(x + [tokenizer.eos_token_id]) for x in ids])
        blocks = label_blocks = flat[None, : data.block_size]
    model.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(blocks), settings.batch_size):
            x = torch.as_tensor(blocks[start : start + settings.batch_size], dtype=torch.long)
            y = torch.as_tensor(label_blocks[start : start + settings.batch_size], dtype=torch.long)
            stats = token_stats(model(input_ids=x).logits, y)
            loss_sum += float(stats.nll_sum)
            correct += int(stats.correct)
            tokens += int(stats.tokens)
    loss = loss_sum / max(tokens, 1)
    out = {"loss": loss, "perplexity": float(np.exp(loss)), "accuracy": correct / max(tokens, 1), "tokens": float(tokens)}

    rouge = ROUGEScore(rouge_keys=("rougeL",))
    bleu = BLEUScore(n_gram=4, smooth=True)
    preds: list[str] = []
    refs: list[str] = []
    need = settings.prefix_tokens + settings.generate_tokens
    for seq in [s for s in ids if len(s) >= need][: settings.generation_documents]:
        prompt = torch.as_tensor([seq[: settings.prefix_tokens]])
        with torch.inference_mode():
            gen = model.generate(
                prompt, max_new_tokens=settings.generate_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )  # fmt: skip
        preds.append(tokenizer.decode(gen[0, settings.prefix_tokens :], skip_special_tokens=True))
        refs.append(tokenizer.decode(seq[settings.prefix_tokens : need], skip_special_tokens=True))
    if preds:
        out["rougeL"] = float(rouge(preds, refs)["rougeL_fmeasure"])
        out["bleu"] = float(bleu(preds, [[r] for r in refs]))
        out["generation_samples"] = float(len(preds))
    return out


class ModelEvaluation:
    def __init__(self, kb: KnowledgeBase, store: SessionStore, model_manager: ModelManager, cache_dir: Path):
        self.kb = kb
        self.store = store
        self.model_manager = model_manager
        self.cache_dir = Path(cache_dir)

    def load_test_set(self, session_id: str) -> tuple[list[Any], DataSettings, dict[str, Any]]:
        """The session's validation documents, exactly as split and formatted in training."""
        session = self.store.get_session(session_id)
        manifest = json.loads(self.store.read_text(session_id, "data/manifest.json"))
        data = DataSettings(**{k: v for k, v in session.config.get("data", {}).items() if k != "cache_dir"})
        kb = self.kb
        if manifest["collection"] != kb.collection_name:
            kb = kb.with_settings(collection=manifest["collection"])
        docs = load_documents_for_split(kb, manifest, data, "val")
        return docs, data, manifest

    def evaluate(self, version: str, settings: EvalSettings | None = None, record: bool = True) -> dict[str, float]:
        from kbtune.model_manager import load_model_dir
        from kbtune.modeling.factory import ModelSpec, build_model

        settings = settings or EvalSettings()
        mv, directory = self.model_manager.model_dir(version)
        docs, data, manifest = self.load_test_set(mv.training_session_id)
        docs = [d for d in docs if d.formatted][: settings.max_documents]
        model, tokenizer = load_model_dir(directory)
        results = {f"eval/{k}": v for k, v in score_model(model, tokenizer, docs, data, settings).items()}
        if settings.compare_with_start:
            spec = ModelSpec.from_dict(json.loads((Path(directory) / SPEC_FILE).read_text()))
            # The untrained init (same seed as training) or the base checkpoint, without any adapter.
            start = build_model(replace(spec, lora=None, gradient_checkpointing=False))
            base = score_model(start, tokenizer, docs, data, settings)
            results.update({f"eval/start_{k}": v for k, v in base.items() if k not in ("tokens", "generation_samples")})
            results["eval/perplexity_gain"] = base["perplexity"] - results["eval/perplexity"]
            if "rougeL" in base:
                results["eval/rougeL_gain"] = results["eval/rougeL"] - base["rougeL"]
        results["eval/documents"] = float(len(docs))
        if record:
            self.store.log_metrics(mv.training_session_id, results)
            self.store.update_version_metrics(mv.id, results)
        logger.info("evaluated version %s on %d held-out documents (%s)", mv.version, len(docs), manifest["cache_key"])
        return results
