"""What a session is called in the MLflow UI: a readable run name from the model and the overrides
that differ, and tags naming the overrides and the code that trained it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

# Overrides that only say where things live: they would make every run name differ for nothing.
_LOCATING = ("hydra", "paths.", "tracking", "kb.path", "kb.host", "kb.port", "model=", "model.path", "hparams_search")
REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit(root: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _short(override: str) -> str:
    """`optim.learning_rate=0.001` -> `learning_rate=0.001`; `kb.collection='my kb'` -> `collection=my kb`;
    a path value keeps its last part only (run names are read in a table, and paths are private)."""
    key, _, value = override.lstrip("+~").partition("=")
    value = value.strip("'\"")
    if "/" in value:
        value = value.rstrip("/").rsplit("/", 1)[-1]
    return f"{key.rsplit('.', 1)[-1]}={value}"


def run_identity(plan: Any, overrides: list[str]) -> tuple[str, dict[str, str]]:
    """(run name, tags) for a session of `plan` started with the command-line `overrides`."""
    shown = [_short(o) for o in overrides if not o.lstrip("+~").startswith(_LOCATING)]
    name = plan.run_name or "-".join([plan.model.name, *shown])[:200]
    tags = {"kbtune.overrides": " ".join(overrides)[:5000], "kbtune.git_commit": git_commit()}
    return name, tags
