"""The one owner of a session's folder layout (`sessions/<id>/`): checkpoints, the live progress file,
the stop request, the process record and its log. Everyone else asks this module for a path."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LAST_CHECKPOINT = "last.ckpt"


@dataclasses.dataclass(frozen=True)
class SessionFiles:
    """The files of one session, shared by the process that trains it and whoever watches it."""

    directory: Path

    @property
    def checkpoints(self) -> Path:
        # ModelCheckpoint writes last.ckpt and best-*.ckpt here.
        return self.directory / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def model_staging(self) -> Path:
        # The final model is written here, uploaded as the run's artifact, then removed.
        return self.directory / "model"

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

    def update_phase(self, phase: str) -> None:
        self.write_progress({**(self.read_progress() or {}), "phase": phase, "updated_at": time.time()})

    def write_worker(self, data: dict[str, Any]) -> None:
        self._write_json(self.worker, data)

    def read_worker(self) -> dict[str, Any] | None:
        return self._read_json(self.worker)

    def claim(self, pid: int | None = None) -> None:
        """Record the process that trains this session, so `kbtune stop`, the page and status reads
        can reach it and notice when it dies, whoever started it."""
        import psutil

        pid = pid or os.getpid()
        try:
            created = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            created = None
        self.write_worker({"pid": pid, "create_time": created, "started_at": time.time()})

    def request_stop(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stop.write_text(datetime.now(timezone.utc).isoformat())

    def stop_requested(self) -> bool:
        return self.stop.exists()

    def remove_stale_temps(self) -> None:
        """Remove what a process killed mid-write left (a half-written checkpoint or model folder)."""
        from kbtune.atomic_files import remove_stale_temps

        remove_stale_temps(self.checkpoints)
        remove_stale_temps(self.directory)

    def clear_for_resume(self) -> None:
        # The old process record would make the resumed session look dead; the stop file would stop it.
        self.worker.unlink(missing_ok=True)
        self.stop.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class SessionLayout:
    """All sessions of one project: `<sessions_dir>/<session id>/`."""

    sessions_dir: Path

    def files(self, session_id: str) -> SessionFiles:
        return SessionFiles(Path(self.sessions_dir) / session_id)

    def lock_file(self) -> Path:
        return Path(self.sessions_dir) / ".launch.lock"
