"""The notebooks run top to bottom in a real Jupyter kernel against a store with two tiny trainings,
and are kept in git without outputs."""

from __future__ import annotations

import re
import shlex
import sys

import nbformat
import pytest

from tests.conftest import REPO
from tests.e2e.two_runs import trained_project

# Subprocesses or several trainings: outside `make test-fast`, always in `make test` (CI).
pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_kb) -> dict:
    return trained_project(tmp_path_factory, small_kb)


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> str:
    """A `python3` kernelspec for this interpreter, first on JUPYTER_PATH: a user-level python3
    kernel elsewhere on the machine would otherwise win and run another Python."""
    from ipykernel.kernelspec import write_kernel_spec

    jupyter_path = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(jupyter_path / "kernels" / "python3")
    return str(jupyter_path)


@pytest.fixture
def notebook_env(monkeypatch, kernel_path, two_runs) -> dict:
    monkeypatch.setenv("JUPYTER_PATH", kernel_path)
    monkeypatch.setenv("KBTUNE_ROOT", str(two_runs["root"]))
    monkeypatch.setenv("KBTUNE_OVERRIDES", shlex.join(two_runs["overrides"]))
    for var in ("KBTUNE_VERSION", "KBTUNE_COMPARE_VERSION", "KBTUNE_SWEEP_KEY"):
        monkeypatch.delenv(var, raising=False)
    return two_runs


def execute(name: str) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    """All text the notebook printed or displayed, and the number of images it drew."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif "data" in out:
                images += "image/png" in out["data"]
                text.append(out["data"].get("text/plain", ""))
            elif out.output_type == "error":
                text.append("\n".join(out.traceback))
    return "\n".join(text), images


def test_the_notebook_kernel_is_this_interpreter(monkeypatch, kernel_path):
    from jupyter_client.manager import KernelManager

    monkeypatch.setenv("JUPYTER_PATH", kernel_path)
    assert KernelManager(kernel_name="python3").format_kernel_cmd()[0] == sys.executable


def test_notebooks_are_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_knowledge_base.ipynb",
        "02_compare_runs.ipynb",
        "03_model_versions.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name
        assert nb.metadata.kernelspec.name == "python3"


def test_knowledge_base_notebook(notebook_env, small_kb):
    from kbtune.knowledge_base import KBSettings, KnowledgeBase

    text, images = outputs(execute("01_knowledge_base"))
    count = KnowledgeBase.connect(
        KBSettings(path=small_kb["path"], collection=small_kb["collection"])
    ).count()
    assert f"documents:   {count}" in text
    kept = re.search(rf"kept (\d+) of {count} documents", text)
    assert kept and 0 < int(kept.group(1)) <= count
    assert "dropped: {'duplicate': 1, 'empty': 1, 'none': 1}" in text  # the cleaning demonstration
    assert "train blocks: (" in text and "validation blocks: (" in text
    assert images == 1  # character and token histograms, one figure


def test_compare_runs_notebook(notebook_env):
    from kbtune.tracking.mlflow_store import MlflowStore

    nb = execute("02_compare_runs")
    text, images = outputs(nb)
    sessions = MlflowStore(notebook_env["tracking_uri"]).list_sessions()
    assert len(sessions) == 2
    assert all(s.id[:8] in text for s in sessions)
    assert "optim.learning_rate" in text  # the one hyperparameter the two runs differ in
    assert images == 2  # the loss curves of both runs on one plot, val/loss against the learning rate


def test_model_versions_notebook(notebook_env):
    from kbtune.tracking.mlflow_store import MlflowStore

    store = MlflowStore(notebook_env["tracking_uri"])
    before = {v.id: v.metrics for v in store.list_versions()}
    text, images = outputs(execute("03_model_versions"))
    versions = store.list_versions()
    assert len(versions) == 2
    # The notebook evaluated both versions and showed the figures, but only reads the store unless
    # KBTUNE_RECORD=1 asks it to write.
    assert {v.id: v.metrics for v in versions} == before
    assert text.count("eval/perplexity_gain") >= 1
    assert "knowledge/recall_trained" in text and "knowledge/start/recall_trained" in text
    for v in versions:
        assert "eval/perplexity" not in (v.metrics or {})
        assert v.version in text
    assert "model continues" in text and "document continues" in text
