"""`python scripts/train.py -m ...`: one session per combination, grouped under the sweep (a shared
tag and a parent MLflow run that is not a session); a bad value anywhere in the sweep stops it
before the first job records anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kbtune.records import SessionStatus
from kbtune.tracking.mlflow_store import MlflowStore
from kbtune.tracking.run_schema import SWEEP_PARENT_TAG
from kbtune.tracking.store import SWEEP_TAG
from tests.conftest import REPO

# Subprocesses or several trainings: outside `make test-fast`, always in `make test` (CI).
pytestmark = pytest.mark.slow

PARENT_RUN_TAG = "mlflow.parentRunId"


def multirun(root: Path, kb: dict[str, str], sweep: list[str]) -> subprocess.CompletedProcess:
    overrides = [
        f"paths.root={root}", f"kb.path={kb['path']}", f"kb.collection={kb['collection']}", "model=tiny",
        "data.block_size=64", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "register=false", *sweep,
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "-m", *overrides],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip


def test_a_two_value_sweep_gives_two_grouped_sessions(tmp_path, small_kb):
    proc = multirun(tmp_path, small_kb, ["optim.learning_rate=1e-3,3e-4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = MlflowStore(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    sessions = store.list_sessions()
    assert len(sessions) == 2
    assert sorted(s.config["optim"]["learning_rate"] for s in sessions) == [3e-4, 1e-3]
    assert all(s.status is SessionStatus.COMPLETED and s.metrics["val/loss"] > 0 for s in sessions)

    tags = [store.get_tags(s.id) for s in sessions]
    (sweep,) = {t[SWEEP_TAG] for t in tags}
    assert Path(sweep, "multirun.yaml").is_file()  # the sweep id is Hydra's multirun directory
    assert sorted(t["kbtune.sweep_job"] for t in tags) == ["0", "1"]
    # Run names say what differs, so the UI's run list reads without opening each run.
    assert sorted(store.client.get_run(s.id).info.run_name.split("-")[-1] for s in sessions) == [
        "learning_rate=0.0003",
        "learning_rate=0.001",
    ]
    # Both nest under one parent run in the MLflow UI; the parent is not a session.
    (parent,) = {t[PARENT_RUN_TAG] for t in tags}
    assert parent not in {s.id for s in sessions}
    assert store.get_tags(parent)[SWEEP_PARENT_TAG] == sweep
    assert store.client.get_run(parent).info.status == "FINISHED"


def test_a_bad_value_in_a_sweep_stops_it_before_any_job(tmp_path, small_kb):
    proc = multirun(tmp_path, small_kb, ["data.block_size=64,100000", "optim.learning_rate=1e-3,3e-4"])
    assert proc.returncode == 2
    # One error naming each bad combination and the key to change.
    for lr in ("0.001", "0.0003"):
        assert (
            f"[data.block_size=100000 optim.learning_rate={lr}] data.block_size: 100000 exceeds"
            in proc.stderr
        )
    assert "[data.block_size=64" not in proc.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "multirun").exists()
