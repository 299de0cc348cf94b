"""The parent side of training workers, used by the API and the CLI: start a session in its own
process (`python -m kbtune.worker`), ask a session to stop, read its live progress, and notice when its
process died. Any session that claims its folder (see session_files) can be watched and stopped here,
whether a worker or `scripts/train.py` runs it. Light at import: status reads load no torch."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kbtune.records import SessionStatus, TrainingSession
from kbtune.session_files import SessionFiles, SessionLayout

logger = logging.getLogger(__name__)

EXITED_UNEXPECTEDLY = "training process exited unexpectedly"


class TrainingBusy(RuntimeError):
    """A start while the store already runs as many trainings as it allows."""

    def __init__(self, running: TrainingSession):
        self.session_id = running.id
        super().__init__(
            f"a training is already running: session {running.id} ({running.status.value}); "
            f"stop it first (kbtune stop {running.id}, or POST /training/stop)"
        )


class SessionConflict(RuntimeError):
    """A request the session's state rules out: resuming a running or completed session, stopping
    one that no kbtune worker runs."""


def describe_exit(returncode: int | None, pid: int | None) -> str:
    if returncode is None:
        return f"process {pid} is gone"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = ": out of memory, or killed" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {returncode}"


class WorkerControl:
    """Starts, stops and watches the training workers of one store. A status read notices a worker
    that died (killed, out of memory) and marks its session failed instead of leaving it running."""

    def __init__(self, store: Any, sessions_dir: Path, overrides: list[str] | None = None, max_running: int = 1):
        self.store = store
        self.layout = SessionLayout(Path(sessions_dir))
        # The launcher's own overrides that locate the store: the worker composes them to find it.
        self.overrides = list(overrides or [])
        self.max_running = max_running
        # Workers this process started, and how those that ended exited (pid, return code).
        self._procs: dict[str, subprocess.Popen] = {}
        self._exits: dict[str, tuple[int, int]] = {}
        # Workers replaced by a resume before their exit was collected (a session reads `stopped`
        # while its process still tears down): reaped here, else they would stay zombies.
        self._replaced: list[subprocess.Popen] = []
        self._validate_lock = threading.Lock()

    def files(self, session_id: str) -> SessionFiles:
        return self.layout.files(session_id)

    # -- starting ----------------------------------------------------------------------------------
    def validate(self, overrides: list[str]) -> tuple[dict[str, Any], str, dict[str, str]]:
        """The resolved config, run name and tags of a start request; ConfigError/KnowledgeBaseError
        before anything is recorded."""
        from kbtune.project import open_project
        from kbtune.run_identity import run_identity

        # Hydra's compose API keeps one global state, and Chroma's first client for a path is not
        # thread-safe either: two requests validate one after the other.
        with self._validate_lock:
            project = open_project([*self.overrides, *overrides])
            plan = project.plan()
            project.check_collection()
        name, tags = run_identity(plan, overrides)
        return plan.config, name, tags

    def start(self, overrides: list[str], origin: str = "cli") -> TrainingSession:
        config, name, tags = self.validate(overrides)
        tags["kbtune.origin"] = origin
        with self._launch_lock():
            self._check_capacity()
            session = self.store.create_session(config, name, tags)
            self._spawn(session.id)
        return session

    def resume(self, session_id: str) -> TrainingSession:
        """Continue a stopped or failed session from its last checkpoint, in the same session."""
        with self._launch_lock():
            session = self.reconcile(self.store.get_session(session_id))
            if session.status not in (SessionStatus.STOPPED, SessionStatus.FAILED):
                raise SessionConflict(
                    f"session {session.id} is {session.status.value}; only stopped or failed sessions can be resumed"
                )
            self._check_capacity()
            self.files(session.id).clear_for_resume()
            self.store.update_session(session.id, status=SessionStatus.PENDING, error="")
            self._spawn(session.id)
        return self.store.get_session(session.id)

    @contextlib.contextmanager
    def _launch_lock(self) -> Iterator[None]:
        # One lock file per store's sessions folder: the check and the launch are one step for every
        # process (API threads, a CLI start beside a server).
        lock = self.layout.lock_file()
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _check_capacity(self) -> None:
        active = self.active()
        if self.max_running > 0 and len(active) >= self.max_running:
            raise TrainingBusy(active[0])

    def _spawn(self, session_id: str) -> None:
        from kbtune.project import child_environment

        files = self.files(session_id)
        files.directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "kbtune.worker", session_id, *self.overrides]
        with open(files.log, "ab") as log:
            # Its own session: Ctrl-C on a server's terminal does not reach the training.
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=child_environment(), start_new_session=True)  # fmt: skip
        # Claimed here as well as by the worker itself: a status read between the two sees it alive.
        files.claim(proc.pid)
        if session_id in self._procs:
            self._replaced.append(self._procs[session_id])
        self._procs[session_id] = proc
        logger.info("session %s: worker pid %d started (log %s)", session_id, proc.pid, files.log)

    # -- watching ----------------------------------------------------------------------------------
    def worker_alive(self, session_id: str) -> tuple[bool | None, str]:
        """(alive, how it ended). None: no process claimed this session (e.g. a notebook's training)."""
        import psutil

        info = self.files(session_id).read_worker()
        if info is None:
            return None, ""
        pid = info.get("pid")
        self._reap()
        if session_id in self._procs and self._procs[session_id].pid == pid:
            return True, ""
        if self._exits.get(session_id, (None, None))[0] == pid:
            return False, describe_exit(self._exits[session_id][1], pid)
        try:
            process = psutil.Process(pid)
            same = (
                info.get("create_time") is not None and abs(process.create_time() - info["create_time"]) < 1.0
            )
            if same and process.status() != psutil.STATUS_ZOMBIE:
                return True, ""
        except psutil.NoSuchProcess:
            pass
        return False, describe_exit(None, pid)

    def _reap(self) -> None:
        """Collect the exit of every worker this process started that has ended (no zombies)."""
        for session_id, proc in list(self._procs.items()):
            code = proc.poll()
            if code is not None:
                self._exits[session_id] = (proc.pid, code)
                self._procs.pop(session_id, None)
        self._replaced = [proc for proc in self._replaced if proc.poll() is None]

    def reconcile(self, session: TrainingSession) -> TrainingSession:
        """The session as it really is: pending/running with a dead worker becomes failed."""
        self._reap()  # every read collects ended workers, so none stays a zombie until the next start
        if session.status not in (SessionStatus.PENDING, SessionStatus.RUNNING):
            return session
        alive, how = self.worker_alive(session.id)
        if alive is not False:
            return session
        # It may have finished between the two reads: only a session still open after its worker
        # is gone is a crash.
        fresh = self.store.get_session(session.id)
        if fresh.status.is_terminal:
            return fresh
        logger.warning("session %s: worker gone (%s); marking it failed", session.id, how)
        return self.store.update_session(
            session.id, status=SessionStatus.FAILED, error=f"{EXITED_UNEXPECTEDLY} ({how})",
            completed_at=datetime.now(timezone.utc),
        )  # fmt: skip

    def active(self) -> list[TrainingSession]:
        """Pending and running sessions whose worker is alive, newest first."""
        self._reap()
        found = []
        for status in (SessionStatus.RUNNING, SessionStatus.PENDING):
            for session in self.store.list_sessions(status):
                session = self.reconcile(session)
                if session.status is status and self.worker_alive(session.id)[0]:
                    found.append(session)
        return sorted(
            found, key=lambda s: s.started_at or datetime.min.replace(tzinfo=timezone.utc), reverse=True
        )

    def current(self, session_id: str | None = None) -> TrainingSession:
        """The named session, else the running one, else the most recent; NotFoundError if none."""
        from kbtune.tracking.store import NotFoundError

        if session_id:
            return self.reconcile(self.store.get_session(session_id))
        active = self.active()
        if active:
            return active[0]
        recent = self.store.list_sessions(limit=1)
        if not recent:
            raise NotFoundError("no training sessions yet: start one")
        return self.reconcile(recent[0])

    def status(self, session_id: str | None = None) -> dict[str, Any]:
        session = self.current(session_id)
        return self.describe(session)

    def describe(self, session: TrainingSession) -> dict[str, Any]:
        """The session record plus its live progress, as the API and `kbtune status --json` show it."""
        files = self.files(session.id)
        info = files.read_worker() or {}
        open_ = not session.status.is_terminal
        return {
            **session.to_dict(),
            "progress": files.read_progress(),
            "stop_requested": open_ and files.stop_requested(),
            "worker_pid": info.get("pid") if open_ else None,
            "resumable": session.status in (SessionStatus.STOPPED, SessionStatus.FAILED),
            "has_checkpoint": files.last_checkpoint.exists(),
        }

    # -- stopping ----------------------------------------------------------------------------------
    def stop(self, session_id: str | None = None) -> TrainingSession:
        """Ask the session's worker to stop after its current optimizer step. A session that already
        ended is returned unchanged."""
        session = self.current(session_id)
        if session.status.is_terminal:
            return session
        if self.worker_alive(session.id)[0] is None:
            raise SessionConflict(
                f"session {session.id} was not started by kbtune start, the API or scripts/train.py "
                "(a notebook?): stop it where it runs (interrupt the kernel)"
            )
        self.files(session.id).request_stop()
        logger.info("session %s: stop requested", session.id)
        return session
