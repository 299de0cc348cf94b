"""The one path every training session runs through, whoever started it (`scripts/train.py`, a worker
launched by `kbtune start` or the API): claim the session's folder, write live progress, stop gracefully
on a stop request or SIGTERM, and decide where to resume from."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import traceback
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from kbtune.configuration import ConfigError, TrainingPlan, user_errors
from kbtune.records import SessionStatus, TrainingSession
from kbtune.session_files import SessionFiles

logger = logging.getLogger(__name__)


def resume_point(session: TrainingSession, files: SessionFiles, requested: str | None) -> str | None:
    """The checkpoint a session starts from: when it is continued (stopped, failed, or queued again by
    a resume), its own last.ckpt, or if that is incomplete (a kill or a full disk while it was written
    by an older kbtune) its newest complete checkpoint; else the checkpoint the plan asked for (a new
    session from a file). CheckpointError names the file when none of its own is complete."""
    from kbtune.checkpoints import resumable_checkpoint

    continued = session.status in (SessionStatus.STOPPED, SessionStatus.FAILED, SessionStatus.PENDING)
    own = resumable_checkpoint(files.last_checkpoint) if continued else None
    return str(own) if own is not None else requested


def latest_resumable(store: Any, layout: Any) -> str:
    """`ckpt_path=last`: the newest stopped or failed session that has a checkpoint to continue."""
    for session in store.list_sessions():
        if (
            session.status in (SessionStatus.STOPPED, SessionStatus.FAILED)
            and layout.files(session.id).last_checkpoint.exists()
        ):
            return session.id
    raise ConfigError(["ckpt_path: `last` found no stopped or failed session with a last.ckpt to resume"])


def error_text(exc: BaseException) -> str:
    """What a failed session records: the message alone for the user's own mistakes, else the
    exception with the last frames of its traceback."""
    if isinstance(exc, user_errors()):
        return str(exc)
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4)
    return f"{type(exc).__name__}: {exc}\n\n" + "".join(tb)


@contextlib.contextmanager
def stop_on_sigterm(files: SessionFiles) -> Iterator[None]:
    """SIGTERM (`kill PID`, a scheduler's preemption) stops the session as `kbtune stop` does: the
    current step finishes and a resumable checkpoint is written."""
    previous = signal.signal(signal.SIGTERM, lambda *_: files.request_stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ensure_final(store: Any, session_id: str, exc: BaseException) -> None:
    """No session stays pending or running after its process gave up on it."""
    current = store.get_session(session_id)
    if current.status.is_terminal:
        return
    status = SessionStatus.STOPPED if isinstance(exc, KeyboardInterrupt) else SessionStatus.FAILED
    store.update_session(
        session_id, status=status, error=error_text(exc), completed_at=datetime.now(timezone.utc)
    )


class SessionRunner:
    """Runs sessions of one TrainingService with live progress and graceful stops."""

    def __init__(self, service: Any, progress_bar: bool = False):
        self.service = service
        # A terminal shows Lightning's bar; a worker's log file would only fill with redraws.
        self.progress_bar = progress_bar

    def run(self, plan: TrainingPlan, session_id: str | None = None) -> Any:
        """Train a new session of `plan`, or continue the pending/stopped/failed session `session_id`.
        Everything the user can get wrong is refused before a new session exists."""
        service = self.service
        if session_id is None:
            service.check_version_label(plan)
            preparation = service.prepare_training_data(plan)
            session = service.store.create_session(plan.config, plan.run_name, plan.tags)
        else:
            session, preparation = service.store.get_session(session_id), None
        files = service.layout.files(session.id)
        if session.status in (SessionStatus.STOPPED, SessionStatus.FAILED):
            # Continued in this process (`resume=ID`): the stop that ended it must not end it again.
            files.clear_for_resume()
        files.claim()
        try:
            with stop_on_sigterm(files):
                return self._train(plan, session, files, preparation)
        except BaseException as exc:
            ensure_final(service.store, session.id, exc)
            raise
        finally:
            files.update_phase(service.store.get_session(session.id).status.value)

    def _train(
        self, plan: TrainingPlan, session: TrainingSession, files: SessionFiles, preparation: Any
    ) -> Any:
        from kbtune.progress import ProgressCallback, ResumeState

        if files.stop_requested() and session.status is SessionStatus.PENDING:  # stopped before it began
            stopped = self.service.store.update_session(
                session.id, status=SessionStatus.STOPPED, completed_at=datetime.now(timezone.utc)
            )
            return self.service.outcome(stopped)
        files.update_phase("preparing")
        files.remove_stale_temps()
        ckpt = resume_point(session, files, plan.ckpt_path)
        if ckpt:
            logger.info("session %s starts from %s", session.id, ckpt)
        trainer = dataclasses.replace(
            plan.trainer, enable_progress_bar=self.progress_bar and plan.trainer.enable_progress_bar
        )
        plan = dataclasses.replace(plan, ckpt_path=ckpt, trainer=trainer)
        outcome = self.service.train_model(
            plan,
            session_id=session.id,
            preparation=preparation,
            extra_callbacks=[ProgressCallback(files), ResumeState()],
        )
        logger.info("session %s ended %s", session.id, outcome.session.status.value)
        return outcome
