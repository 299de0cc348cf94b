"""The masked next-token loss: one definition for training, validation, evaluation and benchmarks.
Labels of -100 (prompt tokens of question/answer data) take no loss."""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE = -100


class TokenStats(NamedTuple):
    nll_sum: torch.Tensor  # summed negative log-likelihood of the predicted tokens (fp32)
    tokens: torch.Tensor  # how many tokens were predicted
    correct: torch.Tensor  # how many the argmax got right

    @property
    def loss(self) -> torch.Tensor:
        return self.nll_sum / self.tokens.clamp(min=1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of labels[:, 1:] under logits[:, :-1] (fp32), and the mask of scored positions."""
    target = labels[:, 1:]
    mask = target != IGNORE
    # fp32: bf16 log-softmax over a vocabulary loses the small differences the loss is made of.
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target.clamp(min=0), reduction="none"
    )
    return nll * mask, mask


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> TokenStats:
    nll, mask = token_nll(logits, labels)
    correct = ((logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask).sum()
    return TokenStats(nll.sum(), mask.sum(), correct)
