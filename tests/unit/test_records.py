"""The records mirror the seed's two SQL tables field for field, and serialise to JSON."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from datetime import datetime, timezone
from pathlib import Path

import pytest

from kbtune.records import ModelVersion, SessionStatus, TrainingSession

SEED = Path(__file__).resolve().parents[3] / "shared" / "seed" / "model-training-feature.md"


def seed_columns(table: str) -> dict[str, str]:
    """Column name -> SQL type of `table` in the seed's CREATE TABLE statement."""
    text = SEED.read_text()
    body = re.search(rf"CREATE TABLE {table} \((.*?)\n\s*\);", text, re.S)
    assert body, f"{table} not found in {SEED}"
    columns = {}
    for line in body.group(1).splitlines():
        line = line.strip().rstrip(",")
        if not line or line.upper().startswith(("FOREIGN", "PRIMARY KEY", "CONSTRAINT")):
            continue
        name, sql_type = line.split()[:2]
        columns[name] = sql_type
    return columns


def own_fields(cls: type) -> list[str]:
    # Fields kept out of equality (source, aliases) are documented extras, not table columns.
    return [f.name for f in dataclasses.fields(cls) if f.compare]


# The seed's columns, copied here so the check also runs where the seed is not beside the repo.
COLUMNS = {
    "training_sessions": ["id", "status", "config", "metrics", "started_at", "completed_at", "error"],
    "model_versions": ["id", "version", "training_session_id", "metrics", "created_at"],
}


@pytest.mark.skipif(not SEED.exists(), reason="the seed spec is not beside the repo")
@pytest.mark.parametrize("table", list(COLUMNS))
def test_copied_columns_are_the_seeds(table):
    assert list(seed_columns(table)) == COLUMNS[table]


@pytest.mark.parametrize(
    "cls, table", [(TrainingSession, "training_sessions"), (ModelVersion, "model_versions")]
)
def test_records_mirror_seed_tables(cls, table):
    assert own_fields(cls) == COLUMNS[table]


REQUIRED = {
    "training_sessions": {"id", "status", "config"},
    "model_versions": {"id", "version", "training_session_id"},
}


@pytest.mark.parametrize(
    "cls, table", [(TrainingSession, "training_sessions"), (ModelVersion, "model_versions")]
)
def test_not_null_columns_have_no_default(cls, table):
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    assert required == REQUIRED[table]
    if SEED.exists():
        text = SEED.read_text()
        body = re.search(rf"CREATE TABLE {table} \((.*?)\n\s*\);", text, re.S).group(1)
        assert {
            line.split()[0] for line in body.splitlines() if "NOT NULL" in line or "PRIMARY KEY" in line
        } == REQUIRED[table]


def test_json_and_datetime_columns_have_matching_types():
    hints = {cls: typing.get_type_hints(cls) for cls in (TrainingSession, ModelVersion)}
    assert hints[TrainingSession]["config"] == dict[str, typing.Any]
    for cls, column in [
        (TrainingSession, "started_at"),
        (TrainingSession, "completed_at"),
        (ModelVersion, "created_at"),
    ]:
        assert datetime in typing.get_args(hints[cls][column])
    for cls in (TrainingSession, ModelVersion):
        assert dict in [typing.get_origin(a) for a in typing.get_args(hints[cls]["metrics"])]


def test_extras_on_model_version_do_not_affect_equality():
    a = ModelVersion(
        "1",
        "v1",
        "run",
        {"val/loss": 1.0},
        datetime(2026, 1, 1, tzinfo=timezone.utc),
        source="a",
        aliases=("latest",),
    )
    b = dataclasses.replace(a, source="b", aliases=())
    assert a == b


def test_status_values_and_terminality():
    assert [s.value for s in SessionStatus] == ["pending", "running", "completed", "failed", "stopped"]
    assert {s for s in SessionStatus if s.is_terminal} == {
        SessionStatus.COMPLETED,
        SessionStatus.FAILED,
        SessionStatus.STOPPED,
    }
    assert SessionStatus("failed") is SessionStatus.FAILED


def test_records_are_frozen():
    session = TrainingSession("r1", SessionStatus.PENDING, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        session.status = SessionStatus.RUNNING  # type: ignore[misc]


def test_session_to_dict_is_json_with_tz_aware_iso_datetimes():
    started = datetime(2026, 3, 1, 12, 0, 5, 123000, tzinfo=timezone.utc)
    completed = datetime(2026, 3, 1, 12, 4, 0, tzinfo=timezone.utc)
    session = TrainingSession(
        id="abc", status=SessionStatus.COMPLETED, config={"model": {"name": "tiny"}, "data": {"block_size": 64}},
        metrics={"val/loss": 2.5, "train/loss": 2.7}, started_at=started, completed_at=completed, error=None,
    )  # fmt: skip
    data = json.loads(json.dumps(session.to_dict()))
    assert list(data) == ["id", "status", "config", "metrics", "started_at", "completed_at", "error"]
    assert data["status"] == "completed"
    assert data["config"] == {"model": {"name": "tiny"}, "data": {"block_size": 64}}
    assert data["metrics"] == {"val/loss": 2.5, "train/loss": 2.7}
    assert datetime.fromisoformat(data["started_at"]) == started
    assert datetime.fromisoformat(data["started_at"]).tzinfo is not None
    assert datetime.fromisoformat(data["completed_at"]) == completed
    assert data["error"] is None


def test_pending_session_to_dict_keeps_nulls():
    data = json.loads(json.dumps(TrainingSession("x", SessionStatus.PENDING, {}).to_dict()))
    assert data == {"id": "x", "status": "pending", "config": {}, "metrics": None, "started_at": None,
                    "completed_at": None, "error": None}  # fmt: skip


def test_version_to_dict_is_json_with_tz_aware_datetime():
    created = datetime(2026, 3, 2, 8, 30, tzinfo=timezone.utc)
    mv = ModelVersion(
        "3",
        "release-1",
        "run-1",
        {"eval/perplexity": 12.5},
        created,
        source="file:///x",
        aliases=("champion", "latest"),
    )
    data = json.loads(json.dumps(mv.to_dict()))
    assert {k: data[k] for k in ("id", "version", "training_session_id", "metrics")} == {
        "id": "3", "version": "release-1", "training_session_id": "run-1", "metrics": {"eval/perplexity": 12.5},
    }  # fmt: skip
    assert datetime.fromisoformat(data["created_at"]) == created
    assert datetime.fromisoformat(data["created_at"]).utcoffset() is not None
    assert data["aliases"] == ["champion", "latest"]
    assert data["source"] == "file:///x"
