"""`trainer=ddp` on CPU: two gloo processes launched by Lightning from scripts/train.py train one
session; only rank zero writes records, and each rank trains on its half of the same prepared blocks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_two_process_cpu_ddp_records_one_session_and_one_version(tmp_path, small_kb):
    from kbtune.model_manager import ModelManager
    from kbtune.records import SessionStatus
    from kbtune.tracking.mlflow_store import MlflowStore

    overrides = [
        f"paths.root={tmp_path}", f"kb.path={small_kb['path']}", f"kb.collection={small_kb['collection']}",
        "model=tiny", "data.block_size=64", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.max_epochs=2", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=5", "version=ddp-run",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *overrides],
        capture_output=True, text=True, timeout=480, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    store = MlflowStore(f"sqlite:///{tmp_path}/mlruns/mlflow.db", artifact_location=f"{tmp_path}/mlruns/artifacts")
    sessions = store.list_sessions()
    assert len(sessions) == 1, [(s.id, s.status) for s in sessions]
    session = sessions[0]
    assert session.status is SessionStatus.COMPLETED and not session.error
    versions = ModelManager(store).get_model_versions()
    assert [(v.version, v.training_session_id) for v in versions] == [("ddp-run", session.id)]

    # Each rank took half of the train blocks per epoch (the sampler shards by rank), so the run
    # took half the optimizer steps a single process would.
    manifest = json.loads(store.read_text(session.id, "data/manifest.json"))
    per_rank = manifest["splits"]["train"]["blocks"] // 2
    last = tmp_path / "sessions" / session.id / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2 * math.ceil(per_rank / 8)
    # One run's metric stream: validation logged once per epoch, by rank zero only.
    assert len(store.metric_history(session.id, "val/loss")) == 2
    # Rank zero's prepared data is the only cache entry (`sources` indexes it): the other rank reused it,
    # and no half-written entry of either rank was left behind.
    entries = sorted(p.name for p in (tmp_path / "data" / "cache" / "datasets").iterdir())
    assert len(entries) == 2 and entries[1] == "sources", entries
