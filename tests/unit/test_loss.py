"""The chunked LM-head loss gives what the full logits give: the same loss, argmax hits and
gradients, on tied (llama as kbtune builds it) and GPT-2 heads, with ignored positions, across chunk
boundaries, and under bf16 autocast; decoders it cannot prove equal fall back to the full logits."""

from __future__ import annotations

import pytest
import torch

from kbtune.modeling import loss as loss_module
from kbtune.modeling.factory import ModelSpec, build_model
from kbtune.modeling.loss import head_token_stats, token_stats
from kbtune.modeling.module import chunked_head


def model_and_batch(architecture: str, seed: int = 0):
    spec = ModelSpec(name="t", architecture=architecture, n_layer=2, n_head=2, n_embd=32, intermediate_size=64,
                     vocab_size=200, max_position=64)  # fmt: skip
    model = build_model(spec)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[torch.rand(3, 40, generator=g) < 0.2] = -100
    return model, ids, labels


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_chunked_head_matches_the_full_logits(architecture, monkeypatch):
    # Chunks of 16 rows over 3 x 39 positions: several chunks and a ragged last one.
    monkeypatch.setattr(loss_module, "HEAD_CHUNK", 16)
    model, ids, labels = model_and_batch(architecture)
    decoder, head = chunked_head(model)
    full = token_stats(model(input_ids=ids).logits, labels)
    full.loss.backward()
    expected = grads(model)
    chunked = head_token_stats(decoder(input_ids=ids).last_hidden_state, head.weight, labels, count_correct=True)
    chunked.loss.backward()
    got = grads(model)
    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    assert int(chunked.tokens) == int(full.tokens) == int((labels[:, 1:] != -100).sum())
    assert int(chunked.correct) == int(full.correct)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_head_under_bf16_autocast_tracks_the_full_logits():
    model, ids, labels = model_and_batch("llama", seed=1)
    decoder, head = chunked_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = token_stats(model(input_ids=ids).logits, labels).loss
        chunked = head_token_stats(decoder(input_ids=ids).last_hidden_state, head.weight, labels).loss
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(full.item(), rel=1e-2)
    chunked.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_count_of_correct_tokens_is_skipped_unless_asked():
    model, ids, labels = model_and_batch("llama")
    decoder, head = chunked_head(model)
    hidden = decoder(input_ids=ids).last_hidden_state
    assert int(head_token_stats(hidden, head.weight, labels).correct) == 0


def test_a_frozen_head_gets_no_gradient_and_the_rest_does():
    model, ids, labels = model_and_batch("gpt2")
    decoder, head = chunked_head(model)
    head.weight.requires_grad_(False)  # tied: the embedding is frozen with it, as under LoRA
    head_token_stats(decoder(input_ids=ids).last_hidden_state, head.weight, labels).loss.backward()
    assert head.weight.grad is None
    assert decoder.h[0].attn.c_attn.weight.grad is not None


def test_a_decoder_with_scaled_or_biased_logits_falls_back_to_the_full_logits():
    model, _, _ = model_and_batch("llama")
    model.config.model_type = "gemma2"
    assert chunked_head(model) is None
    model, _, _ = model_and_batch("llama")
    model.lm_head = torch.nn.Linear(32, 200, bias=True)
    assert chunked_head(model) is None
