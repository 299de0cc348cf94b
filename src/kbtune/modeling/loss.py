"""The masked next-token loss: one definition for training, validation, evaluation and benchmarks.
Labels of -100 (prompt tokens of question/answer data) take no loss.

Two ways to compute it, with the same result:
- from logits (`token_stats`, `token_nll`): evaluation, knowledge scoring, any model;
- from the last hidden state and the LM head (`head_token_stats`): training and validation of the
  decoders kbtune knows. The LM head's matmul, log-softmax and their gradients run chunk by chunk,
  so the [batch, block, vocab] logits never exist in full. With a vocabulary of 8192 over 2048
  positions those logits are 67 MB in fp32, and building, casting and soft-maxing them took 45% of
  a bf16 step of model=small on a 2-core AMX Xeon (`python benchmarks/run.py --only profile`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

IGNORE = -100
# Rows of the flattened hidden state per chunk of the fused head: 256 x 8192 fp32 logits = 8 MB,
# the fastest of 64..1024 measured on model=small (256 and 512 tie; 1024 spills the cache).
HEAD_CHUNK = 256


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
    # Flattened to [positions, vocab] so the log-softmax runs over contiguous rows (over a transposed
    # [batch, vocab, positions] view it was 3x slower).
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    nll = torch.nn.functional.cross_entropy(flat, target.reshape(-1).clamp(min=0), reduction="none")
    return nll.view(target.shape) * mask, mask


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> TokenStats:
    nll, mask = token_nll(logits, labels)
    correct = ((logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask).sum()
    return TokenStats(nll.sum(), mask.sum(), correct)


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over positions of -log softmax(h @ W^T)[target], and (when asked) the argmax hits.

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits are in
    the cache (d nll / d logits = softmax - onehot); backward only scales them by the incoming
    gradient, which is exact because the output is a scalar that enters the loss linearly."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                compute_dtype: torch.dtype, count_correct: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        grad_h = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        nll_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], HEAD_CHUNK):
            h = hidden[start : start + HEAD_CHUNK].to(compute_dtype)
            t = target[start : start + HEAD_CHUNK]
            mask = t != IGNORE
            rows = t.clamp(min=0)[:, None]
            logits = (h @ w.t()).float()
            if count_correct:
                correct += ((logits.argmax(-1) == t) & mask).sum()
            logp = torch.log_softmax(logits, -1)
            del logits
            picked = logp.gather(1, rows).squeeze(1)
            nll_sum -= (picked * mask).sum()
            if need_h or need_w:
                grad = logp.exp_()  # softmax, in place of the log-probabilities
                grad.scatter_add_(1, rows, torch.full_like(picked[:, None], -1.0))
                if not bool(mask.all()):
                    grad[~mask] = 0.0
                grad = grad.to(compute_dtype)
                if need_h:
                    grad_h[start : start + HEAD_CHUNK] = grad @ w
                if need_w:
                    grad_w += (grad.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(correct)
        return nll_sum, correct

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor, _grad_correct: Any) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        scale = grad_nll.float()
        out_h = (grad_h.float() * scale).to(h_dtype) if grad_h is not None else None
        out_w = (grad_w * scale).to(w_dtype) if grad_w is not None else None
        return out_h, out_w, None, None, None


def head_token_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     count_correct: bool = False) -> TokenStats:  # fmt: skip
    """TokenStats from the last hidden state [batch, T, d] and an LM head weight [vocab, d] with no
    bias: the same values as token_stats(hidden @ weight.T, labels), in the autocast dtype if one is
    active (else the hidden state's). `correct` is counted only when asked (validation): it costs an
    argmax over every logit, ~7% of a training step of model=small."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    target = labels[:, 1:].reshape(-1)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    with torch.autocast(device, enabled=False):
        nll_sum, correct = _ChunkedHeadLoss.apply(flat, weight, target, dtype, count_correct)
    return TokenStats(nll_sum, (target != IGNORE).sum(), correct)
