"""`kbtune sessions` / `kbtune versions` / `save` / `promote` as subprocesses after two trainings
(one through scripts/train.py, one through the pipeline in-process) on a temporary project root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kbtune.hydra_entry import compose
from kbtune.jobs import train
from kbtune.project import Project, open_project

# Each `kbtune` call starts a Python that imports Lightning (~8 s here); two trainings come first.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}


def kbtune_command() -> list[str]:
    entry = Path(sys.executable).parent / "kbtune"
    return [str(entry)] if entry.exists() else [sys.executable, "-m", "kbtune.cli"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd, env=ENV)


@pytest.fixture(scope="module")
def two_trainings(tmp_path_factory, small_kb) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cli")
    base = [f"paths.root={root}", f"kb.path={small_kb['path']}", f"kb.collection={small_kb['collection']}",
            "model=tiny", "data.block_size=64", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=2", "eval.after_training=false"]  # fmt: skip
    proc = run([sys.executable, str(REPO / "scripts" / "train.py"), *base], cwd=root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    train(compose([*base, "version=second-run"]))
    return {"root": root, "overrides": [f"paths.root={root}"]}


def cli(two_trainings: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    return run([*kbtune_command(), *args, *two_trainings["overrides"]], cwd=two_trainings["root"])


@pytest.fixture(scope="module")
def listings(two_trainings) -> dict[str, subprocess.CompletedProcess]:
    """Each listing once: every `kbtune` call pays the CLI's start-up (seconds on this machine)."""
    return {" ".join(args): cli(two_trainings, *args) for args in
            [("versions", "--json"), ("versions",), ("sessions", "--json"), ("sessions",), ("sessions", "--status", "failed")]}  # fmt: skip


def test_versions_lists_two_versions_with_metrics(listings):
    proc = listings["versions --json"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    versions = json.loads(proc.stdout)
    assert [v["version"] for v in versions] == ["second-run", "v1"]  # newest first
    assert [v["id"] for v in versions] == ["2", "1"]
    for v in versions:
        assert v["metrics"]["val/loss"] > 0 and v["metrics"]["train/loss"] > 0
        assert v["created_at"] and v["training_session_id"]

    table = listings["versions"]
    assert table.returncode == 0, table.stderr[-3000:]
    table_text, _, legend = table.stdout.strip().partition("\n\n")
    lines = table_text.splitlines()
    # Knowledge first (not evaluated here: "-"), then the training's own figures.
    assert lines[0].split() == ["id", "version", "session", "created", "recall", "start", "held-out", "forgetting",
                                "val/loss", "aliases"]  # fmt: skip
    assert len(lines) == 3 and "recall: closed-book recall" in legend
    assert lines[1].split()[:3] == ["2", "second-run", versions[0]["training_session_id"][:12]]
    assert lines[2].split()[:3] == ["1", "v1", versions[1]["training_session_id"][:12]]
    assert f"{versions[0]['metrics']['val/loss']:.4f}" in lines[1]


def test_sessions_lists_two_completed_sessions(listings):
    versions = json.loads(listings["versions --json"].stdout)
    proc = listings["sessions --json"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    sessions = json.loads(proc.stdout)
    assert [s["id"] for s in sessions] == [v["training_session_id"] for v in versions]
    for s in sessions:
        assert s["status"] == "completed" and s["completed_at"] and s["started_at"]
        assert s["config"]["model"]["name"] == "tiny" and s["config"]["data"]["block_size"] == 64
        assert s["metrics"]["val/loss"] > 0
        assert s["error"] is None

    lines = listings["sessions"].stdout.strip().splitlines()
    assert lines[0].split() == ["id", "status", "model", "started", "val/loss", "error"]
    assert [line.split()[:3] for line in lines[1:]] == [[s["id"], "completed", "tiny"] for s in sessions]

    failed = listings["sessions --status failed"]
    assert failed.returncode == 0 and failed.stdout.strip() == "(none)"


def test_promote_save_and_errors(two_trainings, listings):
    sessions = json.loads(listings["sessions --json"].stdout)
    promoted = cli(two_trainings, "promote", "v1")
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    # Gated on knowledge: with no champion yet, v1 passes (its figures are evaluated and recorded).
    assert promoted.stdout.strip().startswith("champion -> v1: promoted: passes the knowledge gate")

    saved = cli(two_trainings, "save", sessions[-1]["id"], "--label", "by-hand")
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert json.loads(saved.stdout)["version"] == "by-hand"

    taken = cli(two_trainings, "save", sessions[-1]["id"], "--label", "by-hand")
    assert taken.returncode == 2 and "already exists" in taken.stderr and "Traceback" not in taken.stderr

    versions = {v["version"]: v for v in json.loads(cli(two_trainings, "versions", "--json").stdout)}
    assert list(versions) == ["by-hand", "second-run", "v1"]
    assert versions["v1"]["aliases"] == ["champion"] and versions["second-run"]["aliases"] == []
    assert versions["by-hand"]["training_session_id"] == sessions[-1]["id"]


def test_latest_loads_and_generates(two_trainings):
    import torch

    from kbtune.model_manager import ModelManager

    runtime = open_project(two_trainings["overrides"]).runtime
    manager = ModelManager(Project({}, runtime).store, runtime.cache_dir)
    model, tokenizer = manager.load_model("latest")
    prompt = tokenizer("The firmware", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip()


def test_cli_on_an_empty_root(tmp_path):
    proc = run([*kbtune_command(), "versions", f"paths.root={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "(none)"
