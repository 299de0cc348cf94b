"""A session's checkpoints survive the faults that used to lose them: a kill in the middle of writing
last.ckpt (with TMPDIR on another filesystem), a truncated last.ckpt on resume (the newest complete
checkpoint is used instead, or the error names the file), and a checkpoint of another model or block
size given to a new session (refused before any session exists). Real trainings, store and signals."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from kbtune.checkpoints import CheckpointError, checkpoint_problem
from kbtune.configuration import ConfigError, load
from kbtune.hydra_entry import compose, to_container
from kbtune.progress import ProgressCallback, ResumeState
from kbtune.project import Project
from kbtune.records import SessionStatus
from kbtune.session_runner import SessionRunner

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def overrides(root: Path, kb: dict[str, str], *extra: str) -> list[str]:
    return [
        f"paths.root={root}", f"kb.path={kb['path']}", f"kb.collection={kb['collection']}", "model=tiny",
        "data.block_size=64", "trainer.max_steps=8", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "eval.after_training=false", *extra,
    ]  # fmt: skip


def project_for(root: Path, kb: dict[str, str], *extra: str) -> tuple[Any, Project]:
    data = to_container(compose(overrides(root, kb, *extra)))
    plan, runtime = load(data)
    return plan, Project(data, runtime)


class StopAt(pl.Callback):
    """Asks for the graceful stop (as `kbtune stop` does) once `step` optimizer steps are done."""

    def __init__(self, files: Any, step: int):
        self.files, self.step = files, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            self.files.request_stop()


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, small_kb) -> dict[str, Any]:
    """A session stopped at step 5 of 8: best-*.ckpt from the validation at step 2 or 4, last.ckpt at
    step 5; a copy of both in `backup`."""
    root = tmp_path_factory.mktemp("stopped")
    plan, project = project_for(root, small_kb)
    service = project.service
    session = service.store.create_session(plan.config, "stopped-at-5", {})
    files = service.layout.files(session.id)
    callbacks = [StopAt(files, 5), ProgressCallback(files), ResumeState()]
    outcome = service.train_model(plan, session_id=session.id, extra_callbacks=callbacks)
    assert outcome.session.status is SessionStatus.STOPPED
    shutil.copytree(files.checkpoints, root / "backup")
    return {
        "root": root,
        "kb": small_kb,
        "plan": plan,
        "project": project,
        "session": session,
        "files": files,
    }


def test_a_truncated_last_checkpoint_resumes_from_the_newest_complete_one(stopped, caplog):
    plan, service, files = stopped["plan"], stopped["project"].service, stopped["files"]
    session_id, last = stopped["session"].id, files.last_checkpoint
    (best,) = files.checkpoints.glob("best-*.ckpt")
    best_step = int(best.stem.rsplit("-", 1)[1])

    # Every checkpoint cut short: the resume stops with one line naming the file and what to do.
    for ckpt in (last, best):
        os.truncate(ckpt, ckpt.stat().st_size // 2)
    with pytest.raises(CheckpointError) as err:
        SessionRunner(service).run(plan, session_id)
    message = str(err.value)
    assert message.startswith(f"{last} is not a complete checkpoint (") and "\n" not in message
    assert message.endswith(
        f"delete {files.checkpoints} to train this session again from the start, or start a new session"
    )
    assert service.store.get_session(session_id).status is SessionStatus.STOPPED  # still resumable
    assert last.exists() and best.exists()  # nothing deleted

    # With best-*.ckpt whole again, the resume uses it (with a warning) and completes.
    shutil.copy2(stopped["root"] / "backup" / best.name, best)
    with caplog.at_level(logging.WARNING, logger="kbtune.checkpoints"):
        outcome = SessionRunner(service).run(plan, session_id)
    assert any(str(last) in r.getMessage() and str(best) in r.getMessage() for r in caplog.records)
    assert outcome.session.status is SessionStatus.COMPLETED and outcome.version is not None
    # It continued from best's step: the validations up to it ran once, the later ones once more
    # (the logged step is Lightning's, one behind the optimizer steps done).
    logged = sorted(step + 1 for step, _ in service.store.metric_history(session_id, "val/loss"))
    assert logged == sorted([2, 4] + [s for s in (2, 4, 6, 8) if s > best_step])
    assert checkpoint_problem(last) is None  # written anew, whole


def test_a_kill_while_last_ckpt_is_written_keeps_the_one_before(tmp_path, small_kb):
    shm = Path("/dev/shm")
    other_fs = shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev
    tmpdir = Path(shm / f"kbtune-kill-{os.getpid()}") if other_fs else tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    args = [sys.executable, str(HERE / "kill_mid_save.py"), "2", *overrides(tmp_path, small_kb)]
    try:
        proc = subprocess.run(
            args, env={**os.environ, "TMPDIR": str(tmpdir)}, capture_output=True, timeout=600
        )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]

    plan, project = project_for(tmp_path, small_kb)
    (session,) = project.store.list_sessions()
    files = project.service.layout.files(session.id)
    # The second write of last.ckpt (step 4) died halfway; the first (step 2) is whole and in place.
    assert checkpoint_problem(files.last_checkpoint) is None
    assert torch.load(files.last_checkpoint, weights_only=True)["global_step"] == 2
    (leftover,) = files.checkpoints.glob(".last.ckpt.*.kbtune-tmp")

    session = project.control().reconcile(session)  # its worker is gone: failed, resumable
    assert session.status is SessionStatus.FAILED
    outcome = SessionRunner(project.service).run(plan, session.id)
    assert outcome.session.status is SessionStatus.COMPLETED and outcome.version is not None
    assert not leftover.exists()
    assert not list(files.directory.rglob("*.kbtune-tmp"))


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["model.n_embd=32"], "model.n_embd: 32 differs from the 64 of the model in ckpt_path={ckpt}"),
        (
            ["data.block_size=32"],
            "data.block_size: 32 differs from the 64 the checkpoint {ckpt} was trained with",
        ),
    ],
)
def test_a_checkpoint_of_another_model_or_block_size_is_refused_before_a_session(stopped, extra, problem):
    ckpt = stopped["root"] / "backup" / "last.ckpt"
    plan, project = project_for(stopped["root"], stopped["kb"], f"ckpt_path={ckpt}", *extra)
    before = project.store.list_sessions()
    with pytest.raises(ConfigError) as err:
        SessionRunner(project.service).run(plan)
    assert err.value.problems == [problem.format(ckpt=ckpt)]
    assert project.store.list_sessions() == before


def test_a_cut_short_checkpoint_given_to_a_new_session_is_named_before_a_session(stopped):
    ckpt = stopped["root"] / "cut-short.ckpt"
    data = (stopped["root"] / "backup" / "last.ckpt").read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])
    plan, project = project_for(stopped["root"], stopped["kb"], f"ckpt_path={ckpt}")
    before = project.store.list_sessions()
    with pytest.raises(ConfigError) as err:
        SessionRunner(project.service).run(plan)
    (problem,) = err.value.problems
    assert problem.startswith(f"ckpt_path: {ckpt} is not a complete checkpoint ({len(data) // 3} bytes")
    assert project.store.list_sessions() == before
