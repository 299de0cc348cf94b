"""The data settings (conf/data, `data.*`) and the error every data problem raises, naming its key."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from kbtune.settings_base import settings


class DataError(ValueError):
    """The knowledge base or the data settings cannot produce a usable dataset."""


@settings
class DataSettings:
    block_size: int = 256
    val_fraction: float = 0.1
    split_seed: int = 0
    # `text`: continued pretraining on `template`; `qa`: `qa_prompt` + answer, loss on the answer only.
    format: Literal["text", "qa"] = "text"
    template: str = "{text}"
    qa_prompt: str = "Question: {question}\nAnswer: "
    # `qa` only: render question and answer with the tokenizer's chat template instead of `qa_prompt`.
    chat_template: bool = False
    batch_size: int = 8
    tokenize_batch: int = 2000
    # `packed`: documents concatenated with EOS and cut into blocks (no padding, but a block's tokens
    # see the documents before them in it). `document`: one document per block, padded, so a fact can
    # only be predicted from its own document (see conf/data/default.yaml).
    packing: Literal["packed", "document"] = "packed"
    # Per-epoch views (kbtune.data.augmentation), each a function of (seed, epoch): documents shuffled and
    # packed anew; sentences reordered within sections; question/answer pairs per training document.
    repack: bool = False
    sentence_shuffle: bool = False
    qa_pairs: int = 0
    # Views of the training set per epoch: more views, fewer epochs for the same exposures (each epoch
    # also validates and checkpoints, a fixed cost that dominates on a small KB).
    views_per_epoch: int = 1
    # base_version only (experiment=update): the share of unchanged training documents trained again
    # beside the new and changed ones, so the update does not forget them.
    replay_fraction: float = 0.0
    # base_version only: each added or changed document appears this many times per view (each copy
    # in its own sentence order), so the change gets more exposures than the replayed rest.
    delta_repeat: int = 1

    @property
    def augmented(self) -> bool:
        return self.repack or self.sentence_shuffle or self.qa_pairs > 0

    def validate(self) -> list[str]:
        p = []
        if self.block_size < 8:
            p.append(f"data.block_size: must be >= 8, got {self.block_size}")
        if not 0.0 < self.val_fraction < 1.0:
            p.append(f"data.val_fraction: must be strictly between 0 and 1, got {self.val_fraction}")
        if self.batch_size < 1:
            p.append(f"data.batch_size: must be >= 1, got {self.batch_size}")
        if self.format not in ("text", "qa"):
            p.append(f"data.format: must be 'text' or 'qa', got {self.format!r}")
        if self.format == "text" and "{text}" not in self.template:
            p.append(f"data.template: must contain {{text}}, got {self.template!r}")
        if self.format == "qa" and "{question}" not in self.qa_prompt:
            p.append(f"data.qa_prompt: must contain {{question}}, got {self.qa_prompt!r}")
        if self.tokenize_batch < 1:
            p.append(f"data.tokenize_batch: must be >= 1, got {self.tokenize_batch}")
        if self.chat_template and self.format != "qa":
            p.append("data.chat_template: applies to question/answer data only (data=qa or data.format=qa)")
        if self.views_per_epoch < 1:
            p.append(f"data.views_per_epoch: must be >= 1, got {self.views_per_epoch}")
        if self.views_per_epoch > 1 and not (self.repack or self.sentence_shuffle):
            p.append(
                "data.views_per_epoch: only differs from repeating the data with data.repack or data.sentence_shuffle on"
            )
        if not 0.0 <= self.replay_fraction <= 1.0:
            p.append(f"data.replay_fraction: must be between 0 and 1, got {self.replay_fraction}")
        if self.delta_repeat < 1:
            p.append(f"data.delta_repeat: must be >= 1, got {self.delta_repeat}")
        if self.qa_pairs < 0:
            p.append(
                f"data.qa_pairs: must be >= 0 (pairs per training document; 0 = none), got {self.qa_pairs}"
            )
        if self.augmented and self.format != "text":
            p.append("data.repack/sentence_shuffle/qa_pairs: apply to plain-text data (data.format=text)")
        return p

    def fingerprint_fields(self) -> dict[str, Any]:
        """Only the settings that change the prepared tokens (batch size and cache path do not)."""
        keep = ("block_size", "val_fraction", "split_seed", "format", "template", "qa_prompt")
        # Only when on, so caches prepared before the option existed keep their keys.
        keep += ("chat_template",) if self.chat_template else ()
        keep += ("packing",) if self.packing != "packed" else ()
        keep += tuple(k for k in ("repack", "sentence_shuffle", "qa_pairs") if getattr(self, k))
        keep += ("views_per_epoch",) if self.views_per_epoch != 1 else ()
        keep += ("delta_repeat",) if self.delta_repeat != 1 else ()
        return {k: v for k, v in asdict(self).items() if k in keep}
