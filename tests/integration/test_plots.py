"""Every training logs its loss curves and learning-rate schedule as PNG artifacts under `plots/`,
whether it completes or is stopped; the store's metric history behind them is ordered by step."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl

from kbtune.configuration import load
from kbtune.hydra_entry import compose, to_container
from kbtune.plots import training_figures
from kbtune.project import Project
from kbtune.records import SessionStatus
from kbtune.tracking.mlflow_store import MlflowStore

PNG = b"\x89PNG\r\n\x1a\n"
STEPS = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
]


class StopAt(pl.Callback):
    """Asks for a graceful stop after `step` optimizer steps, as the service's stop request does."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.kbtune_stop_requested = True
            trainer.should_stop = True


def train(project: dict, extra_callbacks: list | None = None):
    plan, runtime = load(to_container(compose([*project["overrides"], *STEPS, "register=false"])))
    service = Project({}, runtime).service
    return service, service.train_model(plan, extra_callbacks=extra_callbacks)


def plot_files(store, session_id: str) -> dict[str, bytes]:
    directory = Path(store.download(store.artifact_uri(session_id, "plots")))
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_completed_training_logs_loss_and_lr_plots(project):
    service, outcome = train(project)
    session = outcome.session
    assert session.status is SessionStatus.COMPLETED
    files = plot_files(service.store, session.id)
    assert set(files) == {"loss_curves.png", "lr_schedule.png"}
    assert all(data.startswith(PNG) and len(data) > 5_000 for data in files.values())
    # What the plots draw: one learning rate per step, validation after steps 3 and 6.
    lr = service.store.metric_history(session.id, "train/lr")
    assert [step for step, _ in lr] == list(range(6))
    assert lr[0][1] < max(v for _, v in lr)  # warmup rises
    assert [step for step, _ in service.store.metric_history(session.id, "val/loss")] == [2, 5]


def test_stopped_training_logs_plots_too(project):
    service, outcome = train(project, extra_callbacks=[StopAt(3)])
    assert outcome.session.status is SessionStatus.STOPPED
    assert set(plot_files(service.store, outcome.session.id)) == {"loss_curves.png", "lr_schedule.png"}
    assert len(service.store.metric_history(outcome.session.id, "train/loss")) == 3


def test_figures_only_for_the_metrics_present():
    assert set(training_figures({"train/loss": [(0, 2.0), (1, 1.5)]})) == {"loss_curves.png"}
    assert set(training_figures({"val/loss": [(5, 1.0)], "train/lr": [(0, 1e-3)]})) == {
        "loss_curves.png",
        "lr_schedule.png",
    }
    assert training_figures({"train/loss": [], "val/loss": [], "train/lr": []}) == {}


def test_metric_history_is_ordered_by_step_with_the_latest_value_per_step(tmp_path):
    store = MlflowStore(f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "artifacts"))
    session = store.create_session({"model": {"name": "tiny"}})
    for step, value in [(2, 4.0), (0, 6.0), (1, 5.0), (2, 3.5)]:  # step 2 logged again, as after a resume
        store.log_metrics(session.id, {"train/loss": value}, step=step)
        time.sleep(0.002)  # distinct timestamps: the later value must win
    assert store.metric_history(session.id, "train/loss") == [(0, 6.0), (1, 5.0), (2, 3.5)]
    assert store.metric_history(session.id, "val/loss") == []
