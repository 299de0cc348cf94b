"""TrainingLoop and ProgressCallback on a tiny model and random blocks, without a KB or a store:
checkpoints where the session layout says, live progress in the session's file, and the graceful
stop (a resumable last.ckpt at the step it stopped)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from kbtune.data.datamodule import KBDataModule
from kbtune.data.preparation import DataSettings, PreparedData
from kbtune.modeling.factory import ModelSpec
from kbtune.modeling.module import CausalLMModule
from kbtune.progress import ProgressCallback, ResumeState
from kbtune.service import StopRequested
from kbtune.session_files import SessionFiles
from kbtune.training_loop import CallbackSettings, TrainerSettings, TrainingLoop

VOCAB = 128
SPEC = ModelSpec(name="tiny", n_layer=1, n_head=2, n_embd=32, intermediate_size=64, vocab_size=VOCAB, max_position=32)


@dataclass
class Blocks:
    """Stands in for DataPreparation: the DataModule only asks it for the prepared arrays."""

    settings: DataSettings

    def prepare_dataset(self) -> PreparedData:
        rng = np.random.default_rng(0)
        train = rng.integers(0, VOCAB, (24, 16)).astype(np.int32)
        val = rng.integers(0, VOCAB, (4, 16)).astype(np.int32)
        return PreparedData(train, val, None, None, None, {}, None)  # type: ignore[arg-type]


def fit(files: SessionFiles, max_steps: int, callbacks: list[Any], ckpt_path: str | None = None) -> Any:
    torch.manual_seed(0)
    module = CausalLMModule(SPEC.to_dict(), {"learning_rate": 1e-3, "warmup_steps": 1})
    data = KBDataModule(Blocks(DataSettings(block_size=16, batch_size=4)), seed=0)  # type: ignore[arg-type]
    settings = TrainerSettings(max_epochs=-1, max_steps=max_steps, precision="32-true", accelerator="cpu",
                               enable_progress_bar=False, val_check_interval=3, log_every_n_steps=1)  # fmt: skip
    loop = TrainingLoop(settings, CallbackSettings(), files.checkpoints)
    return loop.train(module, data, [], ckpt_path, callbacks), loop


def test_checkpoints_land_in_the_session_layout_and_progress_is_written(tmp_path):
    files = SessionFiles(tmp_path / "session")
    result, _ = fit(files, 9, [ProgressCallback(files), ResumeState()])
    assert result.global_step == 9 and not result.interrupted
    assert files.last_checkpoint.exists() and result.last_checkpoint == str(files.last_checkpoint)
    assert result.best_checkpoint and result.best_checkpoint.startswith(str(files.checkpoints))
    assert "val/loss" in result.metrics and np.isfinite(result.metrics["val/loss"])
    progress = json.loads(files.progress.read_text())
    assert progress["phase"] == "finishing" and progress["step"] == 9 and progress["total_steps"] == 9
    assert len(progress["history"]["train"]) == 9 and len(progress["history"]["val"]) == 3
    assert progress["percent"] == 100.0


def test_a_stop_request_ends_fit_with_a_resumable_checkpoint_at_that_step(tmp_path):
    files = SessionFiles(tmp_path / "session")

    class StopAfter(ProgressCallback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                files.request_stop()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    with pytest.raises(StopRequested, match="stopped at step 4"):
        fit(files, 9, [StopAfter(files), ResumeState()])
    checkpoint = torch.load(files.last_checkpoint, weights_only=True)
    assert checkpoint["global_step"] == 4
    assert json.loads(files.progress.read_text())["phase"] == "stopped"
    # Resuming from it finishes the remaining steps in the same folder.
    files.stop.unlink()
    result, _ = fit(files, 9, [ProgressCallback(files), ResumeState()], ckpt_path=str(files.last_checkpoint))
    assert result.global_step == 9


def test_fast_dev_run_is_accepted_and_runs_one_batch(tmp_path):
    files = SessionFiles(tmp_path / "session")
    module = CausalLMModule(SPEC.to_dict(), {"learning_rate": 1e-3, "warmup_steps": 1})
    data = KBDataModule(Blocks(DataSettings(block_size=16, batch_size=4)), seed=0)  # type: ignore[arg-type]
    settings = TrainerSettings(fast_dev_run=True, precision="32-true", accelerator="cpu", enable_progress_bar=False)
    result = TrainingLoop(settings, CallbackSettings(), files.checkpoints).train(module, data, [])
    assert result.global_step == 1
