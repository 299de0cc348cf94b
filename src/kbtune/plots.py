"""Training plots: loss curves and the learning-rate schedule from a session's metric history, drawn
with matplotlib and logged as PNG artifacts under `plots/` at the end of every training."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kbtune.tracking.store import SessionStore

logger = logging.getLogger(__name__)

PLOTS_ARTIFACT = "plots"
LOSS_KEYS = ("train/loss", "val/loss")
LR_KEY = "train/lr"

Curve = Sequence[tuple[int, float]]


def draw_loss(ax: Any, history: Mapping[str, Curve], label: str = "", color: Any = None) -> None:
    """Train loss as a line and validation loss as markers on one axis; several runs can share it
    (one `label`/`color` per run)."""
    prefix = f"{label} " if label else ""
    train, val = history.get("train/loss") or [], history.get("val/loss") or []
    if train:
        line = ax.plot(
            *zip(*train, strict=True), color=color, alpha=0.55, linewidth=1, label=f"{prefix}train/loss"
        )[0]
        color = line.get_color()
    if val:
        ax.plot(*zip(*val, strict=True), color=color, marker="o", linewidth=2, label=f"{prefix}val/loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)


def draw_lr(ax: Any, points: Curve, label: str = "", color: Any = None) -> None:
    if points:
        ax.plot(*zip(*points, strict=True), color=color, label=label or LR_KEY)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)


def training_figures(history: Mapping[str, Curve], title: str = "") -> dict[str, Any]:
    """{file name: Figure} for the metrics present in `history`. Figures are built without pyplot,
    so nothing touches the global backend or leaks figures in long-lived processes."""
    from matplotlib.figure import Figure

    figures: dict[str, Any] = {}
    if any(history.get(k) for k in LOSS_KEYS):
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
        draw_loss(ax, history)
        ax.set_title(f"loss {title}".strip())
        ax.legend()
        figures["loss_curves.png"] = fig
    if history.get(LR_KEY):
        fig = Figure(figsize=(7, 3), layout="constrained")
        ax = fig.add_subplot()
        draw_lr(ax, history[LR_KEY])
        ax.set_title(f"learning-rate schedule {title}".strip())
        figures["lr_schedule.png"] = fig
    return figures


def session_history(
    store: SessionStore, session_id: str, keys: Sequence[str] = (*LOSS_KEYS, LR_KEY)
) -> dict[str, list[tuple[int, float]]]:
    return {key: store.metric_history(session_id, key) for key in keys}


def log_training_plots(store: SessionStore, session_id: str) -> list[str]:
    """Render the session's plots and log them under `plots/`; returns the artifact paths logged."""
    figures = training_figures(session_history(store, session_id), title=session_id[:8])
    if not figures:
        return []
    with tempfile.TemporaryDirectory(prefix="kbtune-plots-") as tmp:
        for name, fig in figures.items():
            fig.savefig(Path(tmp) / name, dpi=110)
        store.log_artifacts(session_id, Path(tmp), PLOTS_ARTIFACT)
    logged = [f"{PLOTS_ARTIFACT}/{name}" for name in figures]
    logger.info("session %s: logged %s", session_id, ", ".join(logged))
    return logged
