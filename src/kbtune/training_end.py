"""How fit ends so that what a session records is true: the trained model is validated at the end
when the last validation came earlier (the registered val/loss is the saved model's own), and the
first non-finite loss stops training before it reaches the weights or a checkpoint."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl

from kbtune.training_loop import NonFiniteLoss


class ValidateFinalModel(pl.Callback):
    """Lightning validates on its schedule only: training that ends mid-epoch (trainer.max_steps), after
    the last multiple of an integer trainer.val_check_interval, or in an epoch that
    trainer.check_val_every_n_epoch skips keeps an earlier model's val/loss, or none (and
    ModelCheckpoint warns that val/loss is missing). Stopping on the last batch makes Lightning
    validate right there, inside fit, before ModelCheckpoint writes its final checkpoint."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if not self._last_batch(trainer, batch_idx):
            return
        # A stop requested after a batch makes Lightning validate (as it does for early stopping).
        trainer.should_stop = True
        every = trainer.check_val_every_n_epoch
        if every and (trainer.current_epoch + 1) % every:
            # This epoch would skip validation altogether; the run ends with it, so lift the skip.
            trainer.check_val_every_n_epoch = None

    @staticmethod
    def _last_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        return last_epoch and batch_idx + 1 >= trainer.num_training_batches


class StopOnNonFiniteLoss(pl.Callback):
    """A NaN or infinite loss (diverged training, e.g. too high a learning rate) would otherwise train on
    and register a model of NaN weights. Checked before the backward pass, so the step never happens,
    and after each validation, before ModelCheckpoint saves."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        value = float(loss.detach()) * trainer.accumulate_grad_batches
        # Every rank decides together: a rank that raised alone would leave the others waiting in
        # the gradient all-reduce.
        if trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False):
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
            raise NonFiniteLoss(
                f"non-finite loss at step {trainer.global_step + 1} (train/loss={value}, learning rate {lr}): "
                f"training diverged; lower optim.learning_rate. The checkpoints before it are kept"
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("val/loss")
        # val/loss is already reduced over the ranks, so all of them see the same value here.
        if value is not None and not trainer.sanity_checking and not math.isfinite(float(value)):
            raise NonFiniteLoss(
                f"non-finite loss at step {trainer.global_step} (val/loss={float(value)}): training diverged; "
                f"lower optim.learning_rate. The checkpoints before it are kept"
            )
