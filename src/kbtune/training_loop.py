"""The seed's TrainingLoop: a Lightning Trainer with checkpointing, early stopping, LR monitoring and
a progress bar, run over the CausalLMModule and KBDataModule."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kbtune.settings_base import settings

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
ATTENTIONS = ("auto", "sdpa", "eager")
# Blocks up to this length train faster with eager attention in bf16 on a CPU (resolve_attention).
EAGER_ATTENTION_MAX_BLOCK = 256


class NonFiniteLoss(ArithmeticError):
    """Training diverged (a NaN or infinite loss): the session stops before that step changes the weights
    or a checkpoint, so its last checkpoint still holds finite weights."""


@settings
class TrainerSettings:
    max_epochs: int = 3
    max_steps: int = -1
    val_check_interval: float | int = 1.0
    # Validate (and checkpoint) every N epochs: on a small KB trained for many epochs the per-epoch
    # validation and checkpoint are a fixed cost that can exceed the training itself.
    check_val_every_n_epoch: int = 1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    # `auto`: bf16-mixed where the CPU/GPU supports bf16, else 32-true.
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    log_every_n_steps: int = 10
    num_sanity_val_steps: int = 0
    limit_train_batches: float | int = 1.0
    limit_val_batches: float | int = 1.0
    # true (or N): Lightning's smoke test, N batches of each loop; kbtune then registers no version.
    fast_dev_run: bool | int = False
    enable_progress_bar: bool = True
    # torch.compile the decoder for training steps: 1.26x faster steps of model=small in bf16 on a
    # 2-core AMX Xeon, after 12-25 s of compiling: it pays back after ~300 steps
    # (`python benchmarks/run.py --only profile`). Validation stays eager (no second compile).
    compile: bool = False
    # Keep the memory a step frees for the next one (glibc's malloc; see kbtune.host_memory): 1.34x
    # faster steps of model=small on a 2-core AMD EPYC, for a resident size that stays near its peak.
    reuse_freed_memory: bool = True
    # The decoder's attention kernel: sdpa (PyTorch's fused kernel), eager (two batched matmuls and a
    # softmax), or auto (see resolve_attention; opt-in until a benchmark run confirms it).
    attention: str = "sdpa"

    def validate(self) -> list[str]:
        p = []
        if self.max_epochs < 1 and self.max_steps < 1:
            p.append(
                f"trainer.max_epochs: must be >= 1 (or set trainer.max_steps >= 1), got {self.max_epochs}"
            )
        elif self.max_epochs < -1 or self.max_epochs == 0 and self.max_steps < 1:
            p.append(
                f"trainer.max_epochs: must be >= 1 or -1 (unlimited, with trainer.max_steps), got {self.max_epochs}"
            )
        if self.max_steps < -1 or self.max_steps == 0:
            p.append(f"trainer.max_steps: must be >= 1 or -1 (no limit), got {self.max_steps}")
        if self.max_epochs == -1 and self.max_steps < 1:
            p.append("trainer.max_steps: required (>= 1) when trainer.max_epochs=-1")
        if self.accumulate_grad_batches < 1:
            p.append(f"trainer.accumulate_grad_batches: must be >= 1, got {self.accumulate_grad_batches}")
        if self.gradient_clip_val < 0:
            p.append(
                f"trainer.gradient_clip_val: must be >= 0 (0 disables clipping), got {self.gradient_clip_val}"
            )
        if self.compile and self.strategy.startswith("fsdp"):
            p.append("trainer.compile: not supported with trainer=fsdp (FSDP gathers the weights the compiled step reads)")
        if self.attention not in ATTENTIONS:
            p.append(f"trainer.attention: must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.precision not in PRECISIONS:
            p.append(f"trainer.precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.val_check_interval, float) and not 0 < self.val_check_interval <= 1:
            p.append(
                f"trainer.val_check_interval: a fraction must be in (0, 1], got {self.val_check_interval}"
            )
        if (
            isinstance(self.val_check_interval, int)
            and not isinstance(self.val_check_interval, bool)
            and self.val_check_interval < 1
        ):
            p.append(f"trainer.val_check_interval: a step count must be >= 1, got {self.val_check_interval}")
        if self.check_val_every_n_epoch < 1:
            p.append(f"trainer.check_val_every_n_epoch: must be >= 1, got {self.check_val_every_n_epoch}")
        if self.log_every_n_steps < 1:
            p.append(f"trainer.log_every_n_steps: must be >= 1, got {self.log_every_n_steps}")
        return p


@settings
class CallbackSettings:
    save_top_k: int = 1
    save_last: bool = True
    monitor: str = "val/loss"
    early_stopping: bool = False
    early_stopping_patience: int = 3
    early_stopping_min_delta: float = 0.0

    def validate(self) -> list[str]:
        p = []
        if self.save_top_k < -1:
            p.append(f"callbacks.save_top_k: must be >= -1, got {self.save_top_k}")
        if self.early_stopping_patience < 1:
            p.append(f"callbacks.early_stopping_patience: must be >= 1, got {self.early_stopping_patience}")
        return p


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def bf16_supported(accelerator: str = "auto") -> bool:
    """bf16 autocast pays off only with native support: Ampere+ GPUs, or CPUs with AVX512-BF16/AMX."""
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if accelerator in ("auto", "cpu"):
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(settings: TrainerSettings) -> str:
    if settings.precision != "auto":
        return settings.precision
    return "bf16-mixed" if bf16_supported(settings.accelerator) else "32-true"


def trains_on_gpu(settings: TrainerSettings) -> bool:
    return settings.accelerator in ("gpu", "cuda") or (settings.accelerator == "auto" and cuda_available())


def resolve_attention(settings: TrainerSettings, block_size: int) -> str:
    """`auto`: eager attention for bf16 training on a CPU with blocks of at most 256 tokens, else sdpa.

    PyTorch's fused CPU kernel (flash attention) is slow in bf16 at short blocks: forward and backward
    of one layer of model=small (batch 8, 4 heads of 64, block 256) took 24 ms against 12 ms for two
    batched bf16 matmuls and an fp32 softmax, and a whole training step ran 1.12-1.26x faster with
    eager attention (2-core AMD EPYC with avx512_bf16, no AMX). From 512 tokens on the fused kernel
    wins (58 vs 107 ms) and eager's [heads, T, T] weights grow with the square of the block; in fp32
    and on GPUs the fused kernel wins too. Measured on that CPU only: an AMX CPU may differ, and
    `trainer.attention=sdpa` keeps the fused kernel."""
    if settings.attention != "auto":
        return settings.attention
    on_gpu = trains_on_gpu(settings)
    bf16 = resolve_precision(settings).startswith("bf16")
    return "eager" if bf16 and not on_gpu and block_size <= EAGER_ATTENTION_MAX_BLOCK else "sdpa"


def precision_problems(settings: TrainerSettings) -> list[str]:
    """Precisions the device cannot run, caught before anything starts."""
    on_gpu = trains_on_gpu(settings)
    if settings.precision.startswith("16") and not on_gpu:
        return ["trainer.precision: 16-mixed needs a CUDA GPU; on CPU use bf16-mixed, 32-true or auto"]
    if settings.precision.startswith("bf16") and not bf16_supported(settings.accelerator):
        return [
            f"trainer.precision: {settings.precision} is not supported on this device; use 32-true or auto"
        ]
    return []


@dataclass
class TrainResult:
    metrics: dict[str, float]
    best_checkpoint: str | None
    last_checkpoint: str | None
    interrupted: bool
    global_step: int
    epoch: int
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingLoop:
    def __init__(
        self, trainer_settings: TrainerSettings, callback_settings: CallbackSettings, checkpoint_dir: Path
    ):
        self.settings = trainer_settings
        self.callback_settings = callback_settings
        self.checkpoint_dir = Path(checkpoint_dir)
        self.trainer: Any = None

    def build_callbacks(self, loggers: list[Any], extra_callbacks: list[Any] | None = None) -> list[Any]:
        from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

        from kbtune.training_end import StopOnNonFiniteLoss, ValidateFinalModel

        c = self.callback_settings
        checkpoint = ModelCheckpoint(dirpath=str(self.checkpoint_dir), filename="best-{epoch:02d}-{step}",
                                     monitor=c.monitor, mode="min", save_top_k=c.save_top_k, save_last=c.save_last,
                                     auto_insert_metric_name=False)  # fmt: skip
        callbacks: list[Any] = [checkpoint, ValidateFinalModel(), StopOnNonFiniteLoss()]
        if c.early_stopping:
            callbacks.append(
                EarlyStopping(
                    monitor=c.monitor,
                    patience=c.early_stopping_patience,
                    min_delta=c.early_stopping_min_delta,
                )
            )
        if loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return [*callbacks, *(extra_callbacks or [])]

    def build_trainer(self, loggers: list[Any], extra_callbacks: list[Any] | None = None) -> Any:
        import pytorch_lightning as pl

        from kbtune.checkpoint_io import AtomicCheckpointIO

        s = self.settings
        callbacks = self.build_callbacks(loggers, extra_callbacks)
        precision = resolve_precision(s)
        logger.info(
            "trainer: precision %s, accelerator %s, checkpoints in %s",
            precision,
            s.accelerator,
            self.checkpoint_dir,
        )
        self.trainer = pl.Trainer(
            max_epochs=s.max_epochs,
            max_steps=s.max_steps,
            val_check_interval=s.val_check_interval,
            check_val_every_n_epoch=s.check_val_every_n_epoch,
            accumulate_grad_batches=s.accumulate_grad_batches,
            gradient_clip_val=s.gradient_clip_val or None,
            precision=precision,
            accelerator=s.accelerator,
            devices=s.devices,
            strategy=s.strategy,
            num_nodes=s.num_nodes,
            log_every_n_steps=s.log_every_n_steps,
            num_sanity_val_steps=s.num_sanity_val_steps,
            limit_train_batches=s.limit_train_batches,
            limit_val_batches=s.limit_val_batches,
            fast_dev_run=s.fast_dev_run,
            enable_progress_bar=s.enable_progress_bar,
            enable_model_summary=False,
            logger=loggers or False,
            callbacks=callbacks,
            # Checkpoints are written beside themselves and renamed into place: a kill mid-save keeps
            # the previous last.ckpt (Lightning's own writer stages in TMPDIR, maybe another disk).
            plugins=[AtomicCheckpointIO()],
            # The DataModule's sampler already shards by rank, deterministically.
            use_distributed_sampler=False,
            default_root_dir=str(self.checkpoint_dir),
        )
        return self.trainer

    def train(self, module: Any, datamodule: Any, loggers: list[Any], ckpt_path: str | None = None,
              extra_callbacks: list[Any] | None = None) -> TrainResult:  # fmt: skip
        """Fit; a KeyboardInterrupt ends with `interrupted=True` instead of Lightning's sys.exit."""
        import signal

        if self.settings.reuse_freed_memory:
            from kbtune.host_memory import reuse_freed_memory

            reuse_freed_memory()
        trainer = self.build_trainer(loggers, extra_callbacks)
        handler = signal.getsignal(signal.SIGINT)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SystemExit:
            # Lightning turns Ctrl-C into sys.exit(1) after its own graceful shutdown.
            if not trainer.interrupted:
                raise
        finally:
            signal.signal(signal.SIGINT, handler)  # Lightning leaves SIGINT ignored after an interrupt
        ckpt = trainer.checkpoint_callback
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1
        }
        return TrainResult(
            metrics=metrics,
            best_checkpoint=(ckpt.best_model_path or None) if ckpt else None,
            last_checkpoint=(ckpt.last_model_path or None) if ckpt else None,
            interrupted=bool(trainer.interrupted),
            global_step=int(trainer.global_step),
            epoch=int(trainer.current_epoch),
        )
