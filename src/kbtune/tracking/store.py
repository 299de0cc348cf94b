"""The record store kbtune talks to: sessions and model versions as the seed's records.

Only `mlflow_store.py` implements it; everything else (service, model manager, API, notebooks) sees
this Protocol and the records in `kbtune.records`, never MLflow's types."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from kbtune.records import ModelVersion, SessionStatus, TrainingSession

# Sessions launched by one Hydra multirun share this tag (its value: the sweep's output directory).
SWEEP_TAG = "kbtune.sweep"


class NotFoundError(LookupError):
    """A session or model version that the store does not hold."""


class SessionStore(Protocol):
    tracking_uri: str

    # sessions (= runs)
    def create_session(self, config: dict[str, Any], run_name: str | None = None, tags: dict[str, str] | None = None) -> TrainingSession: ...
    def get_session(self, session_id: str) -> TrainingSession: ...
    def list_sessions(self, status: SessionStatus | None = None, limit: int = 1000) -> list[TrainingSession]: ...
    def update_session(
        self,
        session_id: str,
        status: SessionStatus | None = None,
        error: str | None = None,
        completed_at: datetime | None = None,
    ) -> TrainingSession: ...
    def log_metrics(self, session_id: str, metrics: dict[str, float], step: int | None = None) -> None: ...
    def metric_history(self, session_id: str, key: str) -> list[tuple[int, float]]: ...
    def log_artifacts(self, session_id: str, local_dir: Path, artifact_path: str) -> str: ...
    def log_text(self, session_id: str, text: str, artifact_file: str) -> None: ...
    def read_text(self, session_id: str, artifact_file: str) -> str: ...
    def set_tags(self, session_id: str, tags: dict[str, str]) -> None: ...
    def get_tags(self, session_id: str) -> dict[str, str]: ...
    def artifact_uri(self, session_id: str, artifact_path: str = "") -> str: ...

    # model versions (= registered model versions)
    def create_version(self, session_id: str, source: str, label: str | None, metrics: dict[str, float] | None) -> ModelVersion: ...
    def get_version(self, ref: str) -> ModelVersion: ...
    def list_versions(self) -> list[ModelVersion]: ...
    def update_version_metrics(self, version_id: str, metrics: dict[str, float]) -> ModelVersion: ...
    def set_alias(self, version_id: str, alias: str) -> None: ...
    def set_version_tags(self, version_id: str, tags: dict[str, str]) -> None: ...
    def get_version_tags(self, version_id: str) -> dict[str, str]: ...
    def download(self, uri: str, dst: Path | None = None) -> Path: ...


_AUTO_LABEL = re.compile(r"^v(\d+)\Z")


def next_auto_label(labels: list[str]) -> str:
    """The label of a version saved without one: v1, v2, ... counting only such labels, so a custom
    label in between does not make the sequence skip."""
    numbers = [int(m.group(1)) for label in labels if (m := _AUTO_LABEL.match(label))]
    return f"v{max(numbers, default=0) + 1}"


def available_versions(labels: list[str], aliases: list[str]) -> str:
    """What `not found` errors list: the labels, the aliases as they are typed, and `latest`."""
    shown = [*labels, *(f"{a} (alias)" for a in sorted(aliases)), *(["latest"] if labels else [])]
    return ", ".join(shown) or "none"
