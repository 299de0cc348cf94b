"""How a training session is laid out on an MLflow run: the tag names kbtune writes, how MLflow's run
status mirrors the session's, and the config flattened into params. Plain values only (no MLflow)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from kbtune.records import SessionStatus

STATUS_TAG = "kbtune.status"
ERROR_TAG = "kbtune.error"
COMPLETED_TAG = "kbtune.completed_at"
LABEL_TAG = "kbtune.label"
METRICS_TAG = "kbtune.metrics"
CONFIG_ARTIFACT = "kbtune/config.json"
ERROR_ARTIFACT = "kbtune/error.txt"
GIT_COMMIT_TAG = "kbtune.git_commit"
# Marks the run that groups a sweep's sessions (value: the sweep id); it is not a session itself.
SWEEP_PARENT_TAG = "kbtune.sweep_parent"
# MLflow's own tags the UI reads: nesting under a parent run, and the source commit on the run page.
_PARENT_RUN_TAG = "mlflow.parentRunId"
_GIT_COMMIT_UI_TAG = "mlflow.source.git.commit"

# How MLflow's own run status mirrors ours, so the MLflow UI tells the same story.
_RUN_STATUS = {
    SessionStatus.PENDING: "SCHEDULED",
    SessionStatus.RUNNING: "RUNNING",
    SessionStatus.COMPLETED: "FINISHED",
    SessionStatus.FAILED: "FAILED",
    SessionStatus.STOPPED: "KILLED",
}
_FROM_RUN_STATUS = {v: k for k, v in _RUN_STATUS.items()}


def _dt(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; long values are truncated (the full config is an artifact)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            out[name] = text if len(text) <= 500 else text[:480] + "...(truncated)"
    return out
