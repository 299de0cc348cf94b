"""A project with two finished tiny trainings, read by the notebook and MLflow UI tests (a module of
its own: this folder's conftest.py belongs to the API tests)."""

from __future__ import annotations

from pathlib import Path

LEARNING_RATES = ("0.003", "0.001")
# One project per test session, whichever test module trains it first.
_trained: dict[str, dict] = {}


def train_two_runs(root: Path, kb: dict[str, str]) -> dict:
    """Two completed sessions that differ only in optim.learning_rate, each registered as a model
    version, with two validation points per run (steps 4 and 8) so curves have a shape."""
    from kbtune.hydra_entry import compose
    from kbtune.jobs import train

    # What the notebooks get through KBTUNE_OVERRIDES: the same KB, model and data as the trainings.
    shared = [
        f"kb.path={kb['path']}",
        f"kb.collection={kb['collection']}",
        "model=tiny",
        "data.block_size=64",
    ]
    training = [
        f"paths.root={root}", *shared, "trainer.max_steps=8", "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    val_losses = [
        train(compose([*training, f"optim.learning_rate={lr}"])) for lr in LEARNING_RATES
    ]
    assert all(v is not None for v in val_losses)
    return {
        "root": root,
        "overrides": shared,
        "val_losses": val_losses,
        "tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db",
    }


def trained_project(tmp_path_factory, kb: dict[str, str]) -> dict:
    """The project, trained the first time a test module asks for it in this test session."""
    if "project" not in _trained:
        _trained["project"] = train_two_runs(tmp_path_factory.mktemp("two-runs"), kb)
    return _trained["project"]
