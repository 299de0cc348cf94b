"""The seed's two tables, `training_sessions` and `model_versions`, as frozen records (stdlib only)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


class SessionStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def is_terminal(self) -> bool:
        return self in (SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.STOPPED)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class TrainingSession:
    """One row of `training_sessions`: id, status, config, metrics, started_at, completed_at, error."""

    id: str
    status: SessionStatus
    config: dict[str, Any]
    metrics: dict[str, float] | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["started_at"] = _iso(self.started_at)
        data["completed_at"] = _iso(self.completed_at)
        return data


@dataclass(frozen=True)
class ModelVersion:
    """One row of `model_versions`: id, version, training_session_id, metrics, created_at."""

    id: str
    version: str
    training_session_id: str
    metrics: dict[str, float] | None = None
    created_at: datetime | None = None
    # Not a column of the seed's table: where the version's files are, and which aliases point at it.
    # Kept out of equality so a record round-trips on the seed's fields alone.
    source: str = field(default="", compare=False)
    aliases: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = _iso(self.created_at)
        data["aliases"] = list(self.aliases)
        return data
