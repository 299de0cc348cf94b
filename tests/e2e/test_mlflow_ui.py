"""`kbtune ui` serves the project's store: through the MLflow server's REST API (what the UI's pages
read) both runs are there with their params, metrics, tags, dataset input, plots and model versions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.e2e.two_runs import LEARNING_RATES, trained_project

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_kb) -> dict:
    return trained_project(tmp_path_factory, small_kb)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(two_runs, tmp_path_factory):
    """The UI as a user starts it; in its own process group, since mlflow spawns helper processes
    that must go with it."""
    port = free_port()
    log = (tmp_path_factory.mktemp("ui") / "ui.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kbtune.cli", "ui", "--port", str(port), f"paths.root={two_runs['root']}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"kbtune ui exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the MLflow UI did not answer /health within 120 s")
            time.sleep(0.5)
        log.seek(0)
        yield {"base": base, "command": log.readline()}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def api(ui: dict, method: str, path: str, **kwargs) -> dict:
    response = httpx.request(method, f"{ui['base']}/api/2.0/mlflow/{path}", timeout=30, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def runs(ui) -> list[dict]:
    experiment = api(ui, "GET", "experiments/get-by-name", params={"experiment_name": "kbtune"})["experiment"]
    found = api(
        ui, "POST", "runs/search", json={"experiment_ids": [experiment["experiment_id"]], "max_results": 50}
    )
    return found["runs"]


def test_ui_command_serves_the_project_store(ui, two_runs):
    # The first line kbtune prints is the exact mlflow command (the one the README shows).
    root = two_runs["root"]
    assert f"mlflow ui --backend-store-uri sqlite:///{root}/mlruns/mlflow.db" in ui["command"]
    assert f"--artifacts-destination {root}/mlruns/artifacts" in ui["command"]


def test_both_runs_with_params_metrics_and_tags(runs):
    assert len(runs) == 2
    params = [{p["key"]: p["value"] for p in run["data"]["params"]} for run in runs]
    # Params are the flattened config, so the compare view lines the runs up key by key.
    assert sorted(float(p["optim.learning_rate"]) for p in params) == sorted(
        float(lr) for lr in LEARNING_RATES
    )
    assert all(p["model.name"] == "tiny" and p["data.block_size"] == "64" for p in params)
    for run in runs:
        assert run["info"]["status"] == "FINISHED"
        assert run["info"]["run_name"].startswith("tiny")
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"train/loss", "train/lr", "val/loss", "val/perplexity", "val/accuracy"} <= metrics
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["kbtune.status"] == "completed" and tags["kbtune.collection"] == "testkb"
        assert len(tags["kbtune.manifest_key"]) == 24 and tags["kbtune.git_commit"]
        assert tags["mlflow.source.git.commit"] == tags["kbtune.git_commit"]


def test_the_data_manifest_is_each_runs_input_dataset(runs):
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        (entry,) = run["inputs"]["dataset_inputs"]
        dataset = entry["dataset"]
        assert dataset["name"] == f"testkb@{tags['kbtune.manifest_key'][:8]}"
        assert dataset["digest"] == tags["kbtune.manifest_key"] and dataset["source_type"] == "chroma"
        profile = json.loads(dataset["profile"])
        assert profile["documents"] > 0 and profile["train_blocks"] > 0 and profile["val_blocks"] > 0
        assert {"key": "mlflow.data.context", "value": "training"} in entry["tags"]


def test_metric_history_and_plots_are_served(ui, runs):
    for run in runs:
        run_id = run["info"]["run_id"]
        history = api(ui, "GET", "metrics/get-history", params={"run_id": run_id, "metric_key": "val/loss"})[
            "metrics"
        ]
        assert sorted(m["step"] for m in history) == [3, 7]
        listed = api(ui, "GET", "artifacts/list", params={"run_id": run_id, "path": "plots"})["files"]
        assert {f["path"] for f in listed} == {"plots/loss_curves.png", "plots/lr_schedule.png"}
        # The artifact view fetches files through this route.
        png = httpx.get(
            f"{ui['base']}/get-artifact",
            params={"path": "plots/loss_curves.png", "run_uuid": run_id},
            timeout=30,
        )
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_model_versions_link_to_their_runs(ui, runs):
    versions = api(ui, "GET", "model-versions/search", params={"filter": "name='kbtune'"})["model_versions"]
    assert sorted(v["run_id"] for v in versions) == sorted(r["info"]["run_id"] for r in runs)
