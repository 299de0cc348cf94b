"""`python scripts/train.py` as a user runs it: the MLflow run, checkpoints, the saved model; and
bad input that stops before anything is written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

# Subprocesses or several trainings: outside `make test-fast`, always in `make test` (CI).
pytestmark = pytest.mark.slow


def run_train(python: str, overrides: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, str(REPO / "scripts" / "train.py"), *overrides],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_kb):
    import sys

    root = tmp_path_factory.mktemp("e2e")
    overrides = [
        f"paths.root={root}", f"kb.path={small_kb['path']}", f"kb.collection={small_kb['collection']}",
        "model=tiny", "data.block_size=64", "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=5", "version=e2e-first",
    ]  # fmt: skip
    proc = run_train(sys.executable, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def test_run_is_recorded_in_mlflow(trained):
    from mlflow.tracking import MlflowClient

    root, _ = trained
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("kbtune")
    assert exp.artifact_location.startswith(f"file://{root}/mlruns/artifacts") or exp.artifact_location.startswith(f"{root}/mlruns/artifacts")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["kbtune.status"] == "completed"
    assert run.data.params["model.name"] == "tiny" and run.data.params["trainer.max_epochs"] == "3"
    assert run.data.params["data.block_size"] == "64"
    for key in ("train/loss", "val/loss", "val/perplexity", "val/accuracy", "train/lr"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert len(history) == 3, "one validation per epoch"
    assert history[-1].value < history[0].value, "validation loss should fall over 3 epochs"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"kbtune", "data", "model"} <= artifacts
    files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json"} <= files
    config = json.loads(Path(root, "mlruns", "artifacts", run.info.run_id, "artifacts", "kbtune", "config.json").read_text())
    assert config["model"]["name"] == "tiny" and config["kb"]["collection"] == "testkb"
    manifest = json.loads(Path(root, "mlruns", "artifacts", run.info.run_id, "artifacts", "data", "manifest.json").read_text())
    assert manifest["collection"] == "testkb" and manifest["splits"]["val"]["documents"] > 0
    (version,) = client.search_model_versions("name='kbtune'")
    assert version.run_id == run.info.run_id and version.tags["kbtune.label"] == "e2e-first"


def test_checkpoints_are_on_disk(trained):
    root, _ = trained
    (session_dir,) = list((root / "sessions").iterdir())
    names = {p.name for p in (session_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    import torch

    ckpt = torch.load(session_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["model_spec"]["name"] == "tiny"


def test_saved_model_reloads_with_transformers_and_generates(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = trained
    (model_dir,) = list(Path(root, "mlruns", "artifacts").glob("*/artifacts/model"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("The Heron buoy", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0][ids.shape[1]:]), str)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["kb.collection=no-such-collection"], "kb.collection: collection 'no-such-collection' does not exist"),
        (["data.block_size=250", "data.val_fraction=0.5", "model.max_position=100000", "data.block_size=90000"], "data.block_size"),
        (["model=gigantic"], "Could not find 'model/gigantic'"),
        (["model=local"], "model.path: required"),
        (["trainer.max_epochs=-1"], "trainer.max_steps"),
        (["trainer.epochs=3"], "trainer.epochs"),
        (["data.val_fraction=0"], "data.val_fraction"),
    ],
)
def test_bad_input_stops_before_any_run_or_output_directory(python, project, overrides, message):
    root = project["root"]
    base = [o for o in project["overrides"] if not o.startswith("model=")]
    proc = run_train(python, [*base, *overrides], timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (root / "outputs").exists(), "Hydra output directory was created"
    assert not (root / "mlruns").exists(), "an MLflow store was created"
    assert not (root / "sessions").exists()


@pytest.mark.slow
def test_a_script_session_shows_progress_in_status_and_stops_with_kbtune_stop(tmp_path, small_kb, python):
    """scripts/train.py runs the same session path as a worker: `kbtune status` reads its live
    progress and `kbtune stop` ends it with a resumable checkpoint."""
    import os
    import signal
    import sys
    import time

    locate = [f"paths.root={tmp_path}"]
    overrides = [*locate, f"kb.path={small_kb['path']}", f"kb.collection={small_kb['collection']}", "model=tiny",
                 "data.block_size=64", "trainer.max_epochs=200", "trainer.enable_progress_bar=false"]  # fmt: skip
    proc = subprocess.Popen([python, str(REPO / "scripts" / "train.py"), *overrides], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip

    def kbtune(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kbtune", *args, *locate], capture_output=True, text=True,
                              timeout=120, cwd=REPO)  # fmt: skip

    try:
        deadline, status = time.monotonic() + 400, {}
        while time.monotonic() < deadline:
            out = kbtune("status", "--json")
            if out.returncode == 0:
                status = json.loads(out.stdout)
                if (status.get("progress") or {}).get("step", 0) >= 3:
                    break
            time.sleep(2)
        assert status.get("status") == "running" and status["worker_pid"] == proc.pid, status
        assert status["progress"]["phase"] == "training" and status["progress"]["total_steps"] > 3
        stop = kbtune("stop", status["id"], "--timeout", "120")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    final = json.loads(kbtune("status", status["id"], "--json").stdout)
    assert final["status"] == "stopped" and final["resumable"] and final["has_checkpoint"]
    assert final["progress"]["phase"] == "stopped"


@pytest.mark.slow
def test_fast_dev_run_trains_one_batch_and_registers_nothing(tmp_path, small_kb, python):
    from kbtune.tracking.mlflow_store import MlflowStore

    overrides = [f"paths.root={tmp_path}", f"kb.path={small_kb['path']}", f"kb.collection={small_kb['collection']}",
                 "model=tiny", "data.block_size=64", "trainer.fast_dev_run=true"]  # fmt: skip
    proc = run_train(python, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = MlflowStore(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (session,) = store.list_sessions()
    assert session.status.value == "completed"
    assert store.list_versions() == []
