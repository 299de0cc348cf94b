"""The scale-out backends against real servers on loopback, started and stopped by the tests: a
shared MLflow tracking server (`tracking=server`) and a Chroma server (`kb=chroma_http`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kbtune.configuration import load
from kbtune.hydra_entry import compose, to_container
from kbtune.jobs import train
from kbtune.project import Project
from kbtune.records import SessionStatus
from tests.conftest import SAMPLE_KB, hash_embedder

pytestmark = [pytest.mark.server, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(command: list[str], health_url: str, log: Path, timeout: float = 90) -> Iterator[subprocess.Popen]:
    """Run a server in its own process group until the test is done; the whole group is stopped
    (mlflow server spawns workers and job runners that would outlive a plain kill)."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{health_url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        # Whatever of the group ignored SIGTERM (or outlived its parent) goes now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    port = free_port()
    root = tmp_path / "mlflow-server"
    root.mkdir()
    command = [
        venv_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with serve(command, f"http://127.0.0.1:{port}/health", tmp_path / "mlflow-server.log"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def chroma_server(tmp_path) -> Iterator[int]:
    port = free_port()
    command = [venv_bin("chroma"), "run", "--path", str(tmp_path / "chroma-server"), "--host", "127.0.0.1", "--port", str(port)]
    with serve(command, f"http://127.0.0.1:{port}/api/v2/heartbeat", tmp_path / "chroma-server.log"):
        yield port


def quick(project: dict, *extra: str) -> list[str]:
    kept = [o for o in project["overrides"] if not o.startswith("trainer.max_epochs")]
    return [*kept, "trainer.max_epochs=1", *extra]


def test_training_records_to_a_shared_mlflow_server(project, mlflow_server, tmp_path):
    from kbtune.model_manager import ModelManager
    from kbtune.tracking.mlflow_store import MlflowStore

    cfg = compose(quick(project, "tracking=server", f"tracking.uri={mlflow_server}", "version=served"))
    assert train(cfg) is not None

    store = MlflowStore(mlflow_server)
    (session,) = store.list_sessions()
    assert session.status is SessionStatus.COMPLETED and session.metrics["val/loss"] > 0
    assert session.config["tracking"]["uri"] == mlflow_server
    (version,) = ModelManager(store).get_model_versions()
    assert version.version == "served" and version.training_session_id == session.id

    # Artifacts went through the server into its artifact store, not into the project's mlruns/.
    served = tmp_path / "mlflow-server" / "artifacts"
    assert list(served.rglob("model.safetensors")) and list(served.rglob("manifest.json"))
    assert not (project["root"] / "mlruns").exists()
    # A fresh client loads the version by downloading it over HTTP.
    model, tokenizer = ModelManager(store, tmp_path / "client-cache").load_model("served")
    ids = tokenizer("The Heron buoy", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5


def test_training_reads_a_chroma_server(project, chroma_server, tmp_path):
    from kbtune.ingestion import ingest_folder
    from kbtune.knowledge_base import KBSettings, KnowledgeBase

    settings = KBSettings(backend="chroma_http", host="127.0.0.1", port=chroma_server, collection="served-kb")
    ingest_folder(KnowledgeBase.connect(settings), SAMPLE_KB / "part_a" / "engineering", embed=hash_embedder)

    overrides = [o for o in quick(project) if not o.startswith("kb.")]
    cfg = compose([*overrides, "kb=chroma_http", f"kb.port={chroma_server}", "kb.collection=served-kb"])
    assert train(cfg) is not None

    _, runtime = load(to_container(cfg))
    store = Project({}, runtime).store
    (session,) = store.list_sessions()
    assert session.status is SessionStatus.COMPLETED
    manifest = json.loads(store.read_text(session.id, "data/manifest.json"))
    assert manifest["kb"] == f"http://127.0.0.1:{chroma_server}#served-kb"
    trained_ids = {d["id"] for d in manifest["documents"]}
    served_ids = {d.id for d in KnowledgeBase.connect(settings).iter_documents()}
    assert trained_ids <= served_ids and len(trained_ids) == manifest["document_count"] > 0
