"""The LightningModule: causal-LM loss, AdamW with warmup + cosine decay, train/val metrics.

It takes a model *spec* (plain values) and builds the transformers model itself, so checkpoints hold
primitives only and load with `weights_only=True`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric, SumMetric

from kbtune.modeling.factory import ModelError, ModelSpec, build_model
from kbtune.modeling.loss import TokenStats, head_token_stats, token_stats
from kbtune.modeling.optim import OptimSettings, lr_lambda


class CausalLMModule(pl.LightningModule):
    def __init__(self, model_spec: dict[str, Any], optim: dict[str, Any] | None = None, compile: bool = False,
                 attention: str | None = None):  # fmt: skip
        super().__init__()
        # Plain dicts only: the checkpoint stays loadable with weights_only=True. Not logged: the
        # session's run already holds the full resolved config as params and an artifact.
        # `compile` is how this process trains, not what the checkpoint holds: a checkpoint loaded to
        # evaluate or export is never compiled.
        # `attention` likewise: the kernel this process computes attention with (trainer.attention),
        # the same function of the same weights, so a checkpoint loads with either.
        self.save_hyperparameters(ignore=["compile", "attention"], logger=False)
        self.spec = ModelSpec.from_dict(model_spec)
        self.optim = OptimSettings(**(optim or {}))
        self.model = build_model(self.spec)
        if self.spec.lora is not None:
            from kbtune.modeling.lora import apply_lora

            self.model = apply_lora(self.model, self.spec.lora)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # Only a change is asked for: a model=local architecture without sdpa support refuses "sdpa".
        if attention is not None and base.config._attn_implementation != attention:
            base.set_attn_implementation(attention)
        # (decoder, LM head) for the chunked loss, or None. In a tuple: as module attributes they would
        # be registered a second time, under other names in state_dict.
        self._head = chunked_head(self.model)
        # trainer.compile: the training steps run a compiled decoder (same module, same weights);
        # validation keeps the eager one, so eval mode and no_grad cost no second compile.
        # In a tuple: a module attribute would register it as a submodule, and checkpoints would hold
        # every weight twice (under _orig_mod).
        self._compiled: tuple[Any, ...] = ()
        if compile:
            if self._head is None:
                raise ModelError(
                    f"trainer.compile: needs a decoder kbtune computes the loss of from its hidden state "
                    f"({', '.join(CHUNKED_HEAD_TYPES)}) with a plain LM head; this model is "
                    f"{self.model.config.model_type!r}: set trainer.compile=false"
                )
            self._compiled = (torch.compile(self._head[0]),)
        self.val_loss = MeanMetric()
        self.val_correct = SumMetric()
        self.val_tokens = SumMetric()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, count_correct: bool = True,
                training: bool = False) -> TokenStats:  # fmt: skip
        if self._head is None or self._sharded():
            return token_stats(self.model(input_ids=input_ids).logits, labels)
        decoder, head = self._head
        if training and self._compiled:
            decoder = self._compiled[0]
        hidden = decoder(input_ids=input_ids).last_hidden_state
        return head_token_stats(hidden, head.weight, labels, count_correct=count_correct)

    def _sharded(self) -> bool:
        # FSDP gathers the parameters in its wrapper's forward; the head must not be read around it.
        return self._trainer is not None and "FSDP" in type(self.trainer.strategy).__name__

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch["input_ids"], batch["labels"], count_correct=False, training=True).loss
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        stats = self(batch["input_ids"], batch["labels"])
        # Weighted by predicted tokens, so val/loss is the per-token mean across the whole split.
        self.val_loss.update(stats.loss.detach(), weight=stats.tokens)
        self.val_correct.update(stats.correct)
        self.val_tokens.update(stats.tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", torch.exp(loss))
        self.log("val/accuracy", self.val_correct.compute() / self.val_tokens.compute().clamp(min=1))
        for metric in (self.val_loss, self.val_correct, self.val_tokens):
            metric.reset()

    def configure_optimizers(self) -> Any:
        o = self.optim
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        # Fused: one kernel over every parameter, ~3x faster than foreach on CPU (~3% of a step of
        # model=small). Not under fp16's GradScaler or a sharded strategy, where clipping needs
        # Lightning's own path (see configure_gradient_clipping).
        implementation = {"fused": True} if self._fused_ok() else {"foreach": True}
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay, "name": "lr"},
             {"params": no_decay, "weight_decay": 0.0, "name": "lr_no_decay"}],
            lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps, **implementation,
        )  # fmt: skip
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(o.warmup_steps, max(0, total - 1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, warmup, total, o.min_lr_ratio)
        )
        # LearningRateMonitor logs `<scheduler name>/<param group name>`: train/lr (and the same rate of
        # the group without weight decay as train/lr_no_decay).
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train"}}

    def _fused_ok(self) -> bool:
        single_or_ddp = type(self.trainer.strategy).__name__ in ("SingleDeviceStrategy", "DDPStrategy")
        return single_or_ddp and not str(self.trainer.precision).startswith("16")

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:  # fmt: skip
        # Lightning refuses to clip a fused optimizer's gradients under any mixed precision, because
        # fused optimizers unscale fp16 gradients themselves. bf16 has no scaler: its gradients are
        # the true ones, so clip them here exactly as Lightning's own path would.
        fused = any(group.get("fused") for group in optimizer.param_groups)
        if gradient_clip_val and fused and str(self.trainer.precision) == "bf16-mixed":
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optim_dict(self) -> dict[str, Any]:
        return asdict(self.optim)


# Decoders whose logits are exactly lm_head(last_hidden_state): a bias-free linear head, no logit
# scaling or soft-capping. Others (and a LoRA-wrapped head) train on the full logits.
CHUNKED_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def chunked_head(model: Any) -> tuple[Any, torch.nn.Linear] | None:
    """(decoder, LM head) when the loss can run on the hidden state with the chunked head, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    config = base.config
    if config.model_type not in CHUNKED_HEAD_TYPES or getattr(config, "final_logit_softcapping", None):
        return None
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return base.get_decoder(), head
