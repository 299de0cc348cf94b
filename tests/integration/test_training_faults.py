"""Faults during a training end it with one line naming the cause and lose nothing recorded: a loss
that turns non-finite (no version, the finite checkpoints kept), a full disk while the model is saved
or uploaded (the file named, no partial model anywhere, the session resumable), and a training that
ends between validations (the registered val/loss is the final model's own). Real trainings, store."""

from __future__ import annotations

import errno
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import pytorch_lightning as pl
import torch

from kbtune.atomic_files import WriteFailed
from kbtune.checkpoints import checkpoint_problem
from kbtune.configuration import load
from kbtune.hydra_entry import compose, to_container
from kbtune.model_manager import MODEL_ARTIFACT, MODEL_TAG
from kbtune.project import Project
from kbtune.records import SessionStatus
from kbtune.session_runner import SessionRunner
from kbtune.training_loop import NonFiniteLoss

pytestmark = pytest.mark.slow


def setup(root: Path, kb: dict[str, str], *extra: str) -> tuple[Any, Any]:
    data = to_container(compose([
        f"paths.root={root}", f"kb.path={kb['path']}", f"kb.collection={kb['collection']}", "model=tiny",
        "data.block_size=64", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "eval.after_training=false", *extra,
    ]))  # fmt: skip
    plan, runtime = load(data)
    return plan, Project(data, runtime).service


def local_artifact(service: Any, session_id: str) -> Path:
    return Path(url2pathname(urlparse(service.store.artifact_uri(session_id, MODEL_ARTIFACT)).path))


def assert_nothing_registered(service: Any, session_id: str, error: str) -> None:
    session = service.store.get_session(session_id)
    assert session.status is SessionStatus.FAILED and session.error == error
    assert service.model_manager.get_model_versions() == []
    assert MODEL_TAG not in service.store.get_tags(session_id)


def test_a_diverging_learning_rate_stops_at_the_first_non_finite_loss(tmp_path, small_kb):
    plan, service = setup(tmp_path, small_kb, "optim.learning_rate=1e30", "trainer.max_steps=8")
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss at step \d \(train/loss=(nan|inf)") as err:
        SessionRunner(service).run(plan)
    (session,) = service.store.list_sessions()
    assert "\n" not in str(err.value) and "optim.learning_rate" in str(err.value)
    assert_nothing_registered(service, session.id, str(err.value))


class PoisonWeightsAt(pl.Callback):
    """Turns the embeddings infinite before the batch after `step`, as an overflowing update does."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.get_input_embeddings().weight.fill_(float("inf"))


def test_non_finite_weights_keep_the_last_finite_checkpoint(tmp_path, small_kb):
    plan, service = setup(tmp_path, small_kb, "trainer.max_steps=8", "trainer.val_check_interval=2",
                          "trainer.limit_val_batches=2")  # fmt: skip
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss at step 5 \(train/loss=nan") as err:
        service.train_model(plan, extra_callbacks=[PoisonWeightsAt(4)])
    (session,) = service.store.list_sessions()
    assert_nothing_registered(service, session.id, str(err.value))
    last = service.layout.files(session.id).last_checkpoint
    kept = torch.load(last, weights_only=True)
    assert kept["global_step"] == 4  # written at the validation before the fault, and not after it
    assert all(torch.isfinite(t).all() for t in kept["state_dict"].values())


def fake_disk_full(path: str, data: bytes) -> None:
    """What a write to a full disk does: part of the file lands, then ENOSPC."""
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_the_model_is_saved_names_the_file_and_leaves_no_model(
    tmp_path, small_kb, monkeypatch
):
    import safetensors.torch
    import transformers.modeling_utils

    def save_file(tensors, filename, metadata=None):
        fake_disk_full(filename, safetensors.torch.save(tensors, metadata=metadata))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    plan, service = setup(tmp_path, small_kb, "trainer.max_steps=2")
    with pytest.raises(WriteFailed) as err:
        SessionRunner(service).run(plan)
    (session,) = service.store.list_sessions()
    files = service.layout.files(session.id)
    model_file = files.model_staging / "model.safetensors"
    assert (
        str(err.value)
        == f"could not write {model_file}: No space left on device; free some space and try again"
    )
    assert_nothing_registered(service, session.id, str(err.value))
    assert not files.model_staging.exists() and not list(files.directory.rglob("*.kbtune-tmp"))
    assert not local_artifact(service, session.id).exists()
    assert checkpoint_problem(files.last_checkpoint) is None

    # Nothing recorded was lost: with space again, resuming saves the model and registers it.
    monkeypatch.undo()
    outcome = SessionRunner(service).run(plan, session.id)
    assert outcome.session.status is SessionStatus.COMPLETED and outcome.version is not None
    assert (local_artifact(service, session.id) / "model.safetensors").stat().st_size > 0


def test_a_full_disk_while_the_model_is_uploaded_leaves_no_partial_artifact(tmp_path, small_kb, monkeypatch):
    copyfile = shutil.copyfile

    def copy_to_full_disk(src, dst, *args, **kwargs):
        if str(dst).endswith("model.safetensors") and "artifacts" in str(dst):
            try:
                fake_disk_full(dst, Path(src).read_bytes())
            except OSError as exc:
                exc.filename, exc.filename2 = str(src), str(dst)  # as shutil's own copy reports it
                raise
        return copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy_to_full_disk)
    plan, service = setup(tmp_path, small_kb, "trainer.max_steps=2")
    with pytest.raises(WriteFailed) as err:
        SessionRunner(service).run(plan)
    (session,) = service.store.list_sessions()
    artifact = local_artifact(service, session.id)
    assert str(err.value) == (
        f"could not write {artifact / 'model.safetensors'}: No space left on device; free some space and try again"
    )
    assert_nothing_registered(service, session.id, str(err.value))
    assert not artifact.exists()  # no truncated model.safetensors among the failed run's artifacts
    assert not service.layout.files(session.id).model_staging.exists()


def test_the_registered_val_loss_is_the_final_models(tmp_path, small_kb):
    from kbtune.modeling.loss import token_stats

    # Validation every 3 steps; training ends at step 5, mid-epoch and between two validations.
    plan, service = setup(tmp_path, small_kb, "trainer.max_steps=5", "trainer.val_check_interval=3",
                          "trainer.precision=32-true")  # fmt: skip
    outcome = SessionRunner(service).run(plan)
    history = dict(service.store.metric_history(outcome.session.id, "val/loss"))
    assert sorted(history) == [2, 4]  # after steps 3 and 5 (logged one step behind)
    registered = outcome.version.metrics["val/loss"]
    assert registered == history[4] != history[2]

    model, _ = service.model_manager.load_model(outcome.version.version)
    val = torch.from_numpy(outcome.prepared.val.astype("int64"))
    with torch.inference_mode():
        recomputed = float(token_stats(model(input_ids=val).logits, val).loss)
    assert math.isclose(registered, recomputed, rel_tol=1e-4)


def test_a_few_steps_are_validated_before_the_version_is_registered(tmp_path, small_kb):
    plan, service = setup(tmp_path, small_kb, "trainer.max_steps=2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = SessionRunner(service).run(plan)
    assert not [w for w in caught if "could not find the monitored key" in str(w.message)]
    assert "val/loss" in outcome.version.metrics
    assert [step for step, _ in service.store.metric_history(outcome.session.id, "val/loss")] == [1]
    checkpoints = service.layout.files(outcome.session.id).checkpoints
    assert [p.name for p in checkpoints.glob("best-*.ckpt")] == ["best-00-2.ckpt"]


@pytest.mark.parametrize(
    ("schedule", "validated_after"),
    [
        # Every other epoch is validated; the third and last is not, by that schedule.
        (
            ["trainer.max_epochs=3", "trainer.limit_train_batches=4", "trainer.check_val_every_n_epoch=2"],
            [8, 12],
        ),
        # Every 2 batches of a 5-batch epoch: the last batch is not a multiple.
        (
            ["trainer.max_epochs=1", "trainer.limit_train_batches=5", "trainer.val_check_interval=2"],
            [2, 4, 5],
        ),
    ],
)
def test_a_training_that_ends_off_the_validation_schedule_is_validated_at_its_end(tmp_path, small_kb, schedule,
                                                                                 validated_after):  # fmt: skip
    plan, service = setup(tmp_path, small_kb, *schedule)
    outcome = SessionRunner(service).run(plan)
    history = service.store.metric_history(outcome.session.id, "val/loss")
    assert [step + 1 for step, _ in history] == validated_after  # logged one step behind
    assert outcome.version.metrics["val/loss"] == history[-1][1]
