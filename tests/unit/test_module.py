"""CausalLMModule on a tiny random llama: the loss it trains on, the validation metrics it reports,
its optimizer groups and learning-rate schedule, and checkpoints that hold primitives only."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kbtune.modeling.factory import ModelSpec
from kbtune.modeling.module import CausalLMModule
from kbtune.modeling.optim import OptimSettings, lr_lambda

VOCAB = 300
SPEC = ModelSpec(name="tiny", n_layer=2, n_head=2, n_embd=64, intermediate_size=128, vocab_size=VOCAB,
                 max_position=64)  # fmt: skip
OPTIM = {"learning_rate": 2e-3, "weight_decay": 0.05, "warmup_steps": 5, "min_lr_ratio": 0.2}


def batches(n: int, batch_size: int = 4, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token ids; labels are the ids with some positions ignored (-100), as the prompt and
    padding positions of a QA batch are."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, length), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        labels[torch.rand(batch_size, length, generator=g) < 0.2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def loader(items: list[dict[str, torch.Tensor]]) -> torch.utils.data.DataLoader:
    # One item per precomputed batch, so the loader yields exactly `items`.
    return torch.utils.data.DataLoader(items, batch_size=None)


def trainer(**kwargs: Any):
    import pytorch_lightning as pl

    options = {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, **kwargs}  # fmt: skip
    return pl.Trainer(**options)


def shifted(module: CausalLMModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformers model's next-token logits and targets, flattened: position t predicts t+1."""
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"]).logits
    return logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)


@pytest.fixture
def module() -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(SPEC.to_dict(), OPTIM)


def test_training_step_is_the_masked_next_token_cross_entropy(module):
    batch = batches(1)[0]
    loss = module.training_step(batch, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    logits, target = shifted(module, batch)
    expected = F.cross_entropy(logits, target, ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Ignored positions really are ignored: the mean over the kept tokens only, by hand.
    kept = target != -100
    by_hand = -torch.log_softmax(logits[kept], -1).gather(1, target[kept, None]).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # An untrained model is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(VOCAB)) < 1.0
    loss.backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_validation_metrics_cover_the_whole_split(module):
    val = batches(3, seed=1)
    val[2]["labels"][:, 8:] = -100  # batches with different token counts: weights matter
    metrics = trainer().validate(module, dataloaders=loader(val), verbose=False)[0]

    losses, correct, tokens = [], 0, 0
    for batch in val:
        logits, target = shifted(module, batch)
        kept = target != -100
        losses.append(F.cross_entropy(logits[kept], target[kept], reduction="none"))
        correct += (logits[kept].argmax(-1) == target[kept]).sum().item()
        tokens += kept.sum().item()
    per_token = torch.cat(losses).mean().item()  # every predicted token once, whatever its batch
    assert metrics["val/loss"] == pytest.approx(per_token, rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    assert metrics["val/accuracy"] == pytest.approx(correct / tokens)


def test_weight_decay_applies_to_matrices_only(module):
    fit = trainer()
    fit.fit(module, train_dataloaders=loader(batches(2)))
    optimizer = fit.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert {id(p) for p in decay["params"]} == {id(p) for p in trainable if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in trainable if p.dim() < 2}
    assert no_decay["params"], "the norms' 1-D weights"
    assert decay["weight_decay"] == OPTIM["weight_decay"] and no_decay["weight_decay"] == 0.0
    # Each tensor once, the tied input/output embedding included.
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    # Single device, float32: the fused implementation (see configure_optimizers).
    assert decay["fused"] and no_decay["fused"]


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    warmup, total, floor = 10, 100, 0.1
    assert lr_lambda(0, warmup, total, floor) == pytest.approx(1 / warmup)
    assert lr_lambda(warmup - 1, warmup, total, floor) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_lambda(warmup, warmup, total, floor) == pytest.approx(1.0)  # the cosine starts there
    assert lr_lambda((warmup + total) // 2, warmup, total, floor) == pytest.approx((1 + floor) / 2)
    assert lr_lambda(total, warmup, total, floor) == pytest.approx(floor)
    assert lr_lambda(total + 50, warmup, total, floor) == pytest.approx(floor)  # stays at the floor
    ramp = [lr_lambda(s, warmup, total, floor) for s in range(warmup)]
    decay = [lr_lambda(s, warmup, total, floor) for s in range(warmup, total + 1)]
    assert ramp == sorted(ramp) and decay == sorted(decay, reverse=True)
    assert lr_lambda(0, 0, total, floor) == pytest.approx(1.0)  # no warmup: the peak from step 0


def test_trainer_steps_follow_the_schedule(module):
    fit = trainer()
    fit.fit(module, train_dataloaders=loader(batches(2)))
    # Two steps, so warmup is cut to one step and the second step ends at the floor.
    lr = fit.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(OPTIM["learning_rate"] * OPTIM["min_lr_ratio"])
    assert fit.global_step == 2


def primitives_only(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and primitives_only(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(primitives_only(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_checkpoint_holds_primitives_and_loads_with_weights_only(module, tmp_path: Path):
    assert dict(module.hparams) == {"model_spec": SPEC.to_dict(), "optim": OPTIM}
    fit = trainer()
    fit.fit(module, train_dataloaders=loader(batches(2)))
    path = tmp_path / "last.ckpt"
    fit.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=True)
    assert primitives_only(checkpoint["hyper_parameters"])
    assert checkpoint["hyper_parameters"] == {"model_spec": SPEC.to_dict(), "optim": OPTIM}
    restored = CausalLMModule.load_from_checkpoint(path, weights_only=True)
    assert restored.spec == SPEC and restored.optim == OptimSettings(**OPTIM)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[name]), name


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler (scripts/test-deps.sh installs g++)")
def test_a_compiled_training_step_gives_the_eager_loss_gradients_and_checkpoint_keys():
    torch.manual_seed(0)
    eager = CausalLMModule(SPEC.to_dict(), OPTIM)
    torch.manual_seed(0)
    compiled = CausalLMModule(SPEC.to_dict(), OPTIM, compile=True)
    batch = batches(1)[0]
    expected, got = eager.training_step(batch, 0), compiled.training_step(batch, 0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    got.backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The compiled decoder is not a submodule: checkpoints keep the eager model's keys.
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert type(compiled._compiled[0]).__name__ == "OptimizedModule"
    assert "compile" not in compiled.hparams


def test_compile_is_refused_where_the_loss_needs_the_full_logits(monkeypatch):
    from kbtune.modeling import module as module_file
    from kbtune.modeling.factory import ModelError
    from kbtune.training_loop import TrainerSettings

    monkeypatch.setattr(module_file, "chunked_head", lambda model: None)
    with pytest.raises(ModelError, match=r"trainer.compile.*trainer.compile=false"):
        CausalLMModule(SPEC.to_dict(), OPTIM, compile=True)
    assert any("trainer.compile" in p for p in TrainerSettings(compile=True, strategy="fsdp").validate())


def test_eager_attention_trains_on_the_same_loss_and_gradients_and_is_not_checkpointed():
    """trainer.attention picks the kernel only: the same function of the same weights (bf16 autocast,
    as where `auto` picks eager), and a checkpoint that loads with either."""
    torch.manual_seed(0)
    fused = CausalLMModule(SPEC.to_dict(), OPTIM, attention="sdpa")
    torch.manual_seed(0)
    eager = CausalLMModule(SPEC.to_dict(), OPTIM, attention="eager")
    assert eager.model.config._attn_implementation == "eager"
    assert fused.model.config._attn_implementation == "sdpa"
    batch = batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = fused.training_step(batch, 0), eager.training_step(batch, 0)
    assert got.item() == pytest.approx(expected.item(), rel=2e-3)
    expected.backward()
    got.backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0.05, atol=2e-3, msg=name)
    assert "attention" not in eager.hparams


def test_auto_attention_is_eager_only_for_bf16_on_a_cpu_at_short_blocks(monkeypatch):
    from kbtune import training_loop
    from kbtune.training_loop import EAGER_ATTENTION_MAX_BLOCK, TrainerSettings, resolve_attention

    monkeypatch.setattr(training_loop, "cuda_available", lambda: False)
    assert TrainerSettings().attention == "sdpa"  # auto is opt-in until a benchmark run confirms it
    cpu_bf16 = TrainerSettings(precision="bf16-mixed", accelerator="cpu", attention="auto")
    assert resolve_attention(cpu_bf16, EAGER_ATTENTION_MAX_BLOCK) == "eager"
    assert resolve_attention(cpu_bf16, EAGER_ATTENTION_MAX_BLOCK + 1) == "sdpa"
    assert resolve_attention(TrainerSettings(precision="32-true", accelerator="cpu", attention="auto"), 128) == "sdpa"
    assert resolve_attention(TrainerSettings(precision="bf16-mixed", accelerator="gpu", attention="auto"), 128) == "sdpa"
    # An explicit choice wins over the rule.
    assert resolve_attention(TrainerSettings(precision="32-true", attention="eager"), 1024) == "eager"
    assert resolve_attention(TrainerSettings(precision="bf16-mixed", accelerator="cpu", attention="sdpa"), 128) == "sdpa"
    problems = TrainerSettings(attention="flash").validate()
    assert problems == ["trainer.attention: must be one of auto, sdpa, eager, got 'flash'"]
