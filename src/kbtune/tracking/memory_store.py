"""SessionStore held in memory, for tests and notebooks: MlflowStore's records and version resolution
without MLflow (kbtune's errors where MLflow raises its own), artifacts in a temporary directory the
store owns and deletes."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname
from uuid import uuid4

from kbtune.records import ModelVersion, SessionStatus, TrainingSession
from kbtune.tracking.store import NotFoundError, available_versions, next_auto_label

SCHEME = "memory"
# The alias names the MLflow registry refuses, refused here too so code tried on this store does
# not fail later on MLflow: `latest` and v<number> would shadow the automatic references.
_ALIAS = re.compile(r"^[\w\-]{1,255}\Z")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)\Z", re.IGNORECASE)


def _json_copy(value: Any) -> Any:
    # MlflowStore keeps configs and version metrics as JSON: going through JSON here too gives the
    # same values back (tuples as lists, keys as strings) and a copy the caller cannot mutate.
    return json.loads(json.dumps(value, sort_keys=True))


@dataclass
class _Session:
    id: str
    config: dict[str, Any]
    started_at: datetime
    order: int
    status: SessionStatus = SessionStatus.PENDING
    completed_at: datetime | None = None
    error: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # key -> every (step, order, value) logged, so history and "latest" are both answerable.
    metrics: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def record(self) -> TrainingSession:
        # As on MLflow, "latest" is the value at the highest step (ties: the one logged last).
        latest = {key: max(points)[2] for key, points in self.metrics.items()}
        return TrainingSession(
            id=self.id,
            status=self.status,
            config=_json_copy(self.config),
            metrics=latest or None,
            started_at=self.started_at,
            completed_at=self.completed_at,
            error=self.error or None,  # "" is how a resumed session's old error is cleared
        )


class _SystemSampler:
    """CPU and memory sampled into a session's `system/...` metrics every `interval_s`, under the
    names MLflow's system metrics monitor uses, until `finish()`."""

    def __init__(self, store: InMemoryStore, session_id: str, interval_s: float, first_step: int):
        self._stop = threading.Event()
        args = (store, session_id, interval_s, first_step)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True, name="system-metrics")
        self._thread.start()

    def _run(self, store: InMemoryStore, session_id: str, interval_s: float, step: int) -> None:
        import psutil

        while not self._stop.wait(interval_s):
            memory = psutil.virtual_memory()
            sample = {"system/cpu_utilization_percentage": psutil.cpu_percent(),
                      "system/system_memory_usage_megabytes": memory.used / 1e6,
                      "system/system_memory_usage_percentage": memory.percent}  # fmt: skip
            store.log_metrics(session_id, sample, step=step)
            step += 1

    def finish(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Version:
    number: int
    label: str
    session_id: str
    source: str
    created_at: datetime
    metrics: dict[str, float] | None
    tags: dict[str, str] = field(default_factory=dict)


class InMemoryStore:
    """Every SessionStore method plus MlflowStore's `log_input` and `system_metrics`; one lock makes
    it thread-safe."""

    def __init__(self, registered_model: str = "kbtune"):
        self.tracking_uri = f"{SCHEME}://"
        self.registered_model = registered_model
        self._lock = threading.RLock()
        self._order = itertools.count()
        self._sessions: dict[str, _Session] = {}
        self._versions: dict[int, _Version] = {}
        self._aliases: dict[str, int] = {}
        self._next_number = 1
        self._dir = Path(tempfile.mkdtemp(prefix="kbtune-memory-store-")).resolve()
        # Deleted with the store, or earlier by close(); downloads without a destination live beside
        # the artifacts, so reading a version never changes what the store holds.
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)

    @property
    def artifact_root(self) -> Path:
        """The directory holding every session's artifacts, as `<root>/<session id>/<path>`."""
        return self._dir / "artifacts"

    def close(self) -> None:
        """Delete the artifacts now rather than when the store is garbage-collected."""
        self._cleanup()

    def __enter__(self) -> InMemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions -------------------------------------------------------------------------------
    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise NotFoundError(f"training session {session_id!r} not found") from None

    def create_session(
        self, config: dict[str, Any], run_name: str | None = None, tags: dict[str, str] | None = None
    ) -> TrainingSession:
        """`run_name` only names a run in MLflow's UI; no record field holds it, so it is not kept."""
        with self._lock:
            session = _Session(
                id=uuid4().hex,  # the shape of an MLflow run id
                config=_json_copy(config),
                started_at=datetime.now(timezone.utc),
                order=next(self._order),
                tags={k: str(v) for k, v in (tags or {}).items()},
            )
            self._sessions[session.id] = session
            return session.record()

    def get_session(self, session_id: str) -> TrainingSession:
        with self._lock:
            return self._session(session_id).record()

    def list_sessions(self, status: SessionStatus | None = None, limit: int = 1000) -> list[TrainingSession]:
        """Newest first, optionally only those with `status`, at most `limit`."""
        wanted = SessionStatus(status) if status else None
        with self._lock:
            sessions = sorted(self._sessions.values(), key=lambda s: (s.started_at, s.order), reverse=True)
            matching = [s for s in sessions if wanted is None or s.status is wanted]
            return [s.record() for s in matching[: max(0, limit)]]

    def update_session(
        self,
        session_id: str,
        status: SessionStatus | None = None,
        error: str | None = None,
        completed_at: datetime | None = None,
    ) -> TrainingSession:
        """Only the fields given change; an error has no length limit here."""
        with self._lock:
            session = self._session(session_id)
            if error is not None:
                session.error = error
            if completed_at is not None:
                session.completed_at = completed_at
            if status is not None:
                session.status = SessionStatus(status)
            return session.record()

    def log_metrics(self, session_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        with self._lock:
            session = self._session(session_id)
            for key, value in metrics.items():
                session.metrics.setdefault(key, []).append((step or 0, next(self._order), float(value)))

    def metric_history(self, session_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs in step order; a step logged again (a resumed session) keeps its latest value."""
        with self._lock:
            latest: dict[int, float] = {}
            for step, _, value in sorted(self._session(session_id).metrics.get(key, [])):
                latest[step] = value
            return sorted(latest.items())

    def set_tags(self, session_id: str, tags: dict[str, str]) -> None:
        with self._lock:
            self._session(session_id).tags.update({k: str(v) for k, v in tags.items()})

    def get_tags(self, session_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._session(session_id).tags)

    def log_input(
        self,
        session_id: str,
        name: str,
        digest: str,
        source: str,
        profile: dict[str, Any],
        schema: dict[str, Any],
    ) -> None:
        """Record the prepared data as the session's input dataset, as MlflowStore does."""
        dataset = {
            "name": name,
            "digest": digest,
            "source": source,
            "profile": _json_copy(profile),
            "schema": _json_copy(schema),
        }
        with self._lock:
            self._session(session_id).inputs.append(dataset)

    def inputs(self, session_id: str) -> list[dict[str, Any]]:
        """The datasets `log_input` recorded for a session, oldest first."""
        with self._lock:
            return _json_copy(self._session(session_id).inputs)

    def system_metrics(self, session_id: str, interval_s: float = 5.0) -> _SystemSampler:
        """Start sampling CPU and memory into the session as `system/...` metrics, continuing after
        the steps an earlier (resumed) run sampled; the caller calls `.finish()` on the result."""
        with self._lock:
            steps = [step for key, points in self._session(session_id).metrics.items() if key.startswith("system/")
                     for step, _, _ in points]  # fmt: skip
        return _SystemSampler(self, session_id, interval_s, max(steps) + 1 if steps else 0)

    # -- artifacts ------------------------------------------------------------------------------
    def _artifact_path(self, session_id: str, artifact_path: str) -> Path:
        self._session(session_id)
        base = self.artifact_root / session_id
        path = (base / artifact_path).resolve()
        if path != base and base not in path.parents:
            raise ValueError(f"artifact path {artifact_path!r} leaves the session's artifacts")
        return path

    def log_artifacts(self, session_id: str, local_dir: Path, artifact_path: str) -> str:
        """Copy the folder's files under `artifact_path`: the caller may delete its own copy."""
        with self._lock:
            shutil.copytree(local_dir, self._artifact_path(session_id, artifact_path), dirs_exist_ok=True)
            return self.artifact_uri(session_id, artifact_path)

    def log_text(self, session_id: str, text: str, artifact_file: str) -> None:
        with self._lock:
            path = self._artifact_path(session_id, artifact_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")

    def read_text(self, session_id: str, artifact_file: str) -> str:
        with self._lock:
            path = self._artifact_path(session_id, artifact_file)
            if not path.is_file():
                raise FileNotFoundError(f"training session {session_id!r} has no artifact {artifact_file!r}")
            return path.read_text(encoding="utf-8")

    def artifact_uri(self, session_id: str, artifact_path: str = "") -> str:
        with self._lock:
            self._session(session_id)
        base = f"{SCHEME}://{session_id}"
        return f"{base}/{artifact_path}" if artifact_path else base

    def download(self, uri: str, dst: Path | None = None) -> Path:
        """A copy of a `memory://` artifact in `dst` (default: a fresh folder the store deletes with
        itself), named as the artifact; a local path, as on MlflowStore, is read in place."""
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            return Path(url2pathname(parsed.path))
        if parsed.scheme != SCHEME:
            raise ValueError(f"{uri!r} is not an artifact of this store ({SCHEME}://<session>/<path>)")
        relative = parsed.path.lstrip("/")
        with self._lock:
            source = self._artifact_path(parsed.netloc, relative)
            if not source.exists():
                raise FileNotFoundError(f"no artifact at {uri!r}")
            if dst is None:
                (self._dir / "downloads").mkdir(exist_ok=True)
                dst = Path(tempfile.mkdtemp(dir=self._dir / "downloads"))
            target = Path(dst) / (source.name if relative else parsed.netloc)
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target)
            return target

    # -- model versions -------------------------------------------------------------------------
    def _record(self, v: _Version) -> ModelVersion:
        return ModelVersion(
            id=str(v.number),
            version=v.label,
            training_session_id=v.session_id,
            metrics=_json_copy(v.metrics) if v.metrics is not None else None,
            created_at=v.created_at,
            source=v.source,
            aliases=tuple(sorted(a for a, n in self._aliases.items() if n == v.number)),
        )

    def _newest_first(self) -> list[_Version]:
        return sorted(self._versions.values(), key=lambda v: v.number, reverse=True)

    def create_version(
        self, session_id: str, source: str, label: str | None, metrics: dict[str, float] | None
    ) -> ModelVersion:
        """Register `source` as the next version number. Labels are unique (a taken one raises
        FileExistsError and uses up no number); without one the label is `v<number>`."""
        with self._lock:
            self._session(session_id)
            if label:
                taken = [v.number for v in self._versions.values() if v.label == label]
                if taken:
                    raise FileExistsError(
                        f"model version label {label!r} already exists (version {min(taken)})"
                    )
            number = self._next_number
            self._next_number += 1
            self._versions[number] = _Version(
                number=number,
                label=label or next_auto_label([v.label for v in self._versions.values()]),
                session_id=session_id,
                source=source,
                created_at=datetime.now(timezone.utc),
                metrics=_json_copy(metrics) if metrics else None,
            )
            return self._record(self._versions[number])

    def _resolve(self, ref: str) -> _Version:
        # The order MlflowStore resolves in: `latest`, aliases, numbers, then labels (v<number> is
        # the label of a version saved without one).
        versions = self._newest_first()
        number: int | None = None
        if ref == "latest":
            number = versions[0].number if versions else None
        elif ref in self._aliases:
            number = self._aliases[ref]
        elif ref.isascii() and ref.isdigit():
            number = int(ref)
        else:
            number = next((v.number for v in versions if v.label == ref), None)
        if number not in self._versions:
            hint = available_versions([v.label for v in versions], list(self._aliases))
            raise NotFoundError(
                f"model version {ref!r} not found in {self.registered_model!r} (available: {hint})"
            )
        return self._versions[number]

    def get_version(self, ref: str) -> ModelVersion:
        """`ref` is a label, a version number, `latest`, or an alias such as `champion`."""
        with self._lock:
            return self._record(self._resolve(ref))

    def list_versions(self) -> list[ModelVersion]:
        """Newest (highest number) first."""
        with self._lock:
            return [self._record(v) for v in self._newest_first()]

    def update_version_metrics(self, version_id: str, metrics: dict[str, float]) -> ModelVersion:
        """Merge `metrics` into the version's (new values win); `version_id` may be any reference."""
        with self._lock:
            version = self._resolve(version_id)
            version.metrics = _json_copy({**(version.metrics or {}), **metrics})
            return self._record(version)

    def set_version_tags(self, version_id: str, tags: dict[str, str]) -> None:
        with self._lock:
            self._resolve(str(version_id)).tags.update(tags)

    def get_version_tags(self, version_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._resolve(str(version_id)).tags)

    def set_alias(self, version_id: str, alias: str) -> None:
        """Point `alias` at version number `version_id`, moving it from any other version."""
        if not _ALIAS.match(alias) or _RESERVED_ALIAS.match(alias):
            raise ValueError(
                f"alias {alias!r} is not allowed (letters, digits, '_', '-'; not latest or v<number>)"
            )
        with self._lock:
            number = int(version_id) if version_id.isascii() and version_id.isdigit() else None
            if number not in self._versions:
                raise NotFoundError(f"model version {version_id!r} not found in {self.registered_model!r}")
            self._aliases[alias] = number
