"""Each training session runs in its own worker process (`python -m kbtune.worker SESSION_ID [overrides]`)
so a server stays responsive and a crash in training cannot take it down. This module is the worker's
`main` and the other side of it, used by the API and the CLI: launch a worker, ask it to stop, read its
progress, and notice when it died. Light at import: `kbtune --help` and status reads load no torch."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kbtune.records import SessionStatus, TrainingSession

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


@dataclasses.dataclass(frozen=True)
class SessionFiles:
    """The files a worker shares with whoever watches it, all in `sessions/<id>/`."""

    directory: Path

    @property
    def progress(self) -> Path:
        return self.directory / "progress.json"

    @property
    def stop(self) -> Path:
        return self.directory / "stop"

    @property
    def worker(self) -> Path:
        return self.directory / "worker.json"

    @property
    def log(self) -> Path:
        return self.directory / "worker.log"

    @property
    def last_checkpoint(self) -> Path:
        # The same folder and name as the TrainingLoop's ModelCheckpoint(save_last=True).
        return self.directory / "checkpoints" / "last.ckpt"

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        # Readers poll these files: write a sibling and rename, so they never see half a file.
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_progress(self, data: dict[str, Any]) -> None:
        self._write_json(self.progress, data)

    def read_progress(self) -> dict[str, Any] | None:
        return self._read_json(self.progress)

    def write_worker(self, data: dict[str, Any]) -> None:
        self._write_json(self.worker, data)

    def read_worker(self) -> dict[str, Any] | None:
        return self._read_json(self.worker)

    def request_stop(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stop.write_text(datetime.now(timezone.utc).isoformat())

    def stop_requested(self) -> bool:
        return self.stop.exists()


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

    def __init__(
        self, store: Any, sessions_dir: Path, overrides: list[str] | None = None, max_running: int = 1
    ):
        self.store = store
        self.sessions_dir = Path(sessions_dir)
        # The server's (or CLI's) own overrides: the worker composes them to find the same store.
        self.overrides = list(overrides or [])
        self.max_running = max_running
        # Workers this process started, and how those that ended exited (pid, return code).
        self._procs: dict[str, subprocess.Popen] = {}
        self._exits: dict[str, tuple[int, int]] = {}
        self._validate_lock = threading.Lock()

    def files(self, session_id: str) -> SessionFiles:
        return SessionFiles(self.sessions_dir / session_id)

    # -- starting ----------------------------------------------------------------------------------
    def validate(self, overrides: list[str]) -> tuple[dict[str, Any], str, dict[str, str]]:
        """The resolved config, run name and tags of a start request; ConfigError/KnowledgeBaseError
        before anything is recorded."""
        from kbtune import pipeline
        from kbtune.knowledge_base import SAMPLE_COLLECTION, KnowledgeBase

        all_overrides = [*self.overrides, *overrides]
        # Hydra's compose API keeps one global state, and Chroma's first client for a path is not
        # thread-safe either: two requests validate one after the other.
        with self._validate_lock:
            try:
                cfg = pipeline.compose(all_overrides)
            except Exception as exc:  # Hydra's override grammar and unknown keys
                if type(exc).__module__.startswith(("hydra", "omegaconf")):
                    raise pipeline.ConfigError([str(exc).split("\n")[0]]) from exc
                raise
            plan, runtime = pipeline.load(cfg)
            if runtime.kb.collection != SAMPLE_COLLECTION:  # only the sample collection is created on demand
                KnowledgeBase.connect(runtime.kb).count()
        name, tags = pipeline.run_identity(plan, overrides)
        tags["kbtune.git_commit"] = pipeline.git_commit(pipeline.CONF_DIR.parent)
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
            files = self.files(session.id)
            # The old worker file would make the pending session look dead; the stop file would stop it.
            files.worker.unlink(missing_ok=True)
            files.stop.unlink(missing_ok=True)
            self.store.update_session(session.id, status=SessionStatus.PENDING, error="")
            self._spawn(session.id)
        return self.store.get_session(session.id)

    @contextlib.contextmanager
    def _launch_lock(self) -> Iterator[None]:
        # One lock file per store's sessions folder: the check and the launch are one step for every
        # process (API threads, a CLI start beside a server).
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        with open(self.sessions_dir / ".launch.lock", "w") as handle:
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
        import psutil

        files = self.files(session_id)
        files.directory.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYTHONUNBUFFERED": "1"}  # fmt: skip
        command = [sys.executable, "-m", "kbtune.worker", session_id, *self.overrides]
        with open(files.log, "ab") as log:
            # Its own session: Ctrl-C on a server's terminal does not reach the training.
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)  # fmt: skip
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:
            created = None
        files.write_worker({"pid": proc.pid, "create_time": created, "started_at": time.time()})
        self._procs[session_id] = proc
        logger.info("session %s: worker pid %d started (log %s)", session_id, proc.pid, files.log)

    # -- watching ----------------------------------------------------------------------------------
    def worker_alive(self, session_id: str) -> tuple[bool | None, str]:
        """(alive, how it ended). None: no kbtune worker runs this session (e.g. scripts/train.py)."""
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

    def reconcile(self, session: TrainingSession) -> TrainingSession:
        """The session as it really is: pending/running with a dead worker becomes failed."""
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
                f"session {session.id} does not run in a kbtune worker (scripts/train.py or a notebook): "
                "stop it where it runs (Ctrl-C)"
            )
        self.files(session.id).request_stop()
        logger.info("session %s: stop requested", session.id)
        return session


# -- the worker process ----------------------------------------------------------------------------
def _error_text(exc: BaseException) -> str:
    from kbtune.pipeline import user_errors

    if isinstance(exc, user_errors()):
        return str(exc)
    import traceback

    return f"{type(exc).__name__}: {exc}\n\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4)
    )


def run(session_id: str, overrides: list[str]) -> int:
    from kbtune import pipeline
    from kbtune.progress import ProgressCallback, ResumeState

    problems: list[str] = []
    runtime = pipeline.runtime_from(pipeline.to_container(pipeline.compose(overrides)), problems)
    if problems:
        raise pipeline.ConfigError(problems)
    store = pipeline.build_store(runtime.tracking)
    session = store.get_session(session_id)
    files = SessionFiles(runtime.sessions_dir / session_id)
    # `kill PID` (SIGTERM) stops as gracefully as `kbtune stop`.
    signal.signal(signal.SIGTERM, lambda *_: files.request_stop())
    try:
        if files.stop_requested():  # stopped before it began
            store.update_session(
                session_id, status=SessionStatus.STOPPED, completed_at=datetime.now(timezone.utc)
            )
            return 0
        plan, session_runtime = pipeline.load_session_plan(session.config)
        files.write_progress(
            {**(files.read_progress() or {}), "phase": "preparing", "updated_at": time.time()}
        )
        service = pipeline.build_service(session_runtime)
        pipeline.ensure_sample_kb(service.kb, session_runtime)
        if session.status is SessionStatus.PENDING and files.last_checkpoint.exists():
            # A resume queued by WorkerControl.resume: continue from the stop's checkpoint.
            plan = dataclasses.replace(plan, ckpt_path=str(files.last_checkpoint))
        # The worker's log is a file: Lightning's progress bar would only fill it with redraws.
        plan = dataclasses.replace(plan, trainer=dataclasses.replace(plan.trainer, enable_progress_bar=False))
        outcome = service.train_model(
            plan, session_id=session_id, extra_callbacks=[ProgressCallback(files), ResumeState()]
        )
        logger.info("session %s ended %s", session_id, outcome.session.status.value)
        return 0
    except BaseException as exc:
        current = store.get_session(session_id)
        if not current.status.is_terminal:
            store.update_session(session_id, status=SessionStatus.FAILED, error=_error_text(exc),
                                 completed_at=datetime.now(timezone.utc))  # fmt: skip
        logger.exception("session %s failed", session_id)
        return 1
    finally:
        progress = files.read_progress() or {}
        files.write_progress(
            {**progress, "phase": store.get_session(session_id).status.value, "updated_at": time.time()}
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kbtune.worker",
        description="Run one training session (started by kbtune start / the API).",
    )
    parser.add_argument("session_id")
    parser.add_argument("overrides", nargs="*", help="the launcher's Hydra overrides (to find the store)")
    args = parser.parse_args(argv)
    for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"), ("KBTUNE_ROOT", str(Path.cwd()))):  # fmt: skip
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args.session_id, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
