"""What a worker's training reports while it runs, and how it stops: `ProgressCallback` writes
`sessions/<id>/progress.json` about once a second and performs the graceful stop; `ResumeState` carries
the random state in checkpoints so a resumed run draws what the uninterrupted one would have."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from kbtune.service import StopRequested
from kbtune.session_files import SessionFiles

logger = logging.getLogger(__name__)

# Points kept per curve: enough for a chart; older points are thinned (every other one) beyond it.
MAX_POINTS = 2000


def _thin(points: list[list[float]]) -> list[list[float]]:
    return (
        points if len(points) <= MAX_POINTS else points[::2] + ([points[-1]] if len(points) % 2 == 0 else [])
    )


class ProgressCallback(pl.Callback):
    """Live progress (epoch, step, percent, ETA, tokens/s, losses and their history) for the API, the
    CLI and the web page; and the graceful stop: when the session's stop file appears, the current
    optimizer step finishes, a full resumable checkpoint is written to `last.ckpt`, and fit ends."""

    def __init__(self, files: SessionFiles, every_s: float = 1.0):
        self.files = files
        self.every_s = every_s
        previous = files.read_progress() or {}
        # A resumed session continues its own chart and clock.
        self.history: dict[str, list[list[float]]] = previous.get("history") or {"train": [], "val": []}
        self.elapsed_before = float(previous.get("elapsed_s") or 0.0)
        self.t0 = time.monotonic()
        self.step0 = 0
        self.total: int | None = None
        self.tokens = 0
        self.last_write = 0.0
        self._step_before = 0
        self._losses: list[float] = []

    # -- hooks -------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.monotonic()
        self.step0 = trainer.global_step
        if self.step0 == 0:
            self.elapsed_before = 0.0
        # Points after the checkpoint were trained again by this run (a crash after the last save).
        for key in ("train", "val"):
            self.history[key] = [p for p in self.history[key] if p[0] <= self.step0]
        total = trainer.estimated_stepping_batches
        self.total = int(total) if total != float("inf") else None
        self._write(trainer, "training")
        if self.files.stop_requested():
            self._stop(trainer, save=False)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self.tokens += int(batch["input_ids"].numel()) * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Lightning hands back the loss divided by the accumulation factor.
            self._losses.append(float(loss.detach()) * trainer.accumulate_grad_batches)
        if trainer.global_step == self._step_before:
            return  # accumulating: no optimizer step finished with this batch
        if self._losses:
            self.history["train"] = _thin(
                [*self.history["train"], [trainer.global_step, sum(self._losses) / len(self._losses)]]
            )
            self._losses = []
        if self.files.stop_requested():
            self._stop(trainer, save=True)
        if time.monotonic() - self.last_write >= self.every_s:
            self._write(trainer, "training")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.history["val"] = _thin([*self.history["val"], [trainer.global_step, float(value)]])
        self._write(trainer, "training")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Saving the model and registering the version come next.
        self._write(trainer, "finishing")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._write(trainer, "stopped" if isinstance(exception, StopRequested) else "failed")

    # -- the stop ------------------------------------------------------------------------------------
    def _stop(self, trainer: pl.Trainer, save: bool) -> None:
        """Ends fit at once. Called between optimizer steps, so the checkpoint is a clean resume point.
        Raising (rather than setting `trainer.should_stop`) is deliberate: `should_stop` first runs a
        validation and then lets ModelCheckpoint save at "epoch end", a checkpoint that resumes at the
        next epoch and skips the rest of this one."""
        if save:
            last = self.files.last_checkpoint
            for callback in trainer.checkpoint_callbacks:
                # Told that last.ckpt is its own, ModelCheckpoint keeps updating it after the resume
                # (instead of starting a `last-v1.ckpt` that a later resume would not find).
                if (
                    getattr(callback, "save_last", False)
                    and Path(callback.dirpath or "").resolve() == last.parent.resolve()
                ):
                    callback.last_model_path = str(last)
            trainer.save_checkpoint(str(last))
            logger.info(
                "stop requested: saved %s at step %d", self.files.last_checkpoint, trainer.global_step
            )
        trainer.should_stop = True
        trainer.kbtune_stop_requested = True  # type: ignore[attr-defined]
        raise StopRequested(f"stopped at step {trainer.global_step} on request")

    # -- the file ------------------------------------------------------------------------------------
    def snapshot(self, trainer: pl.Trainer, phase: str) -> dict[str, Any]:
        step = int(trainer.global_step)
        run_s = max(time.monotonic() - self.t0, 1e-9)
        rate = (step - self.step0) / run_s if step > self.step0 else None
        total = self.total
        train, val = self.history["train"], self.history["val"]
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        return {
            "phase": phase,
            # Lightning counts one past the last epoch once fit ends.
            "epoch": min(int(trainer.current_epoch), epochs - 1) if epochs else int(trainer.current_epoch),
            "max_epochs": epochs,
            "step": step,
            "total_steps": total,
            "percent": round(min(100.0, 100.0 * step / total), 2) if total else None,
            "elapsed_s": round(self.elapsed_before + run_s, 2),
            "eta_s": round((total - step) / rate, 1) if rate and total else None,
            "steps_per_s": round(rate, 3) if rate else None,
            "tokens_per_s": round(self.tokens / run_s, 1) if self.tokens else None,
            "train_loss": train[-1][1] if train else None,
            "val_loss": val[-1][1] if val else None,
            "history": self.history,
            "pid": os.getpid(),
            "updated_at": time.time(),
        }

    def _write(self, trainer: pl.Trainer, phase: str) -> None:
        if not trainer.is_global_zero:
            return
        self.files.write_progress(self.snapshot(trainer, phase))
        self.last_write = time.monotonic()


class ResumeState(pl.Callback):
    """Torch's random state in every checkpoint and back on resume: with dropout, a resumed run then
    trains exactly as the uninterrupted one (Lightning saves no RNG state of its own)."""

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
