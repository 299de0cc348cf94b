"""`kbtune sessions|versions|save|promote|ui`: read and manage the recorded sessions and versions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kbtune.project import open_project


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt_metric(metrics: dict[str, float] | None, key: str) -> str:
    value = (metrics or {}).get(key)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def cmd_sessions(args: argparse.Namespace) -> int:
    from kbtune.records import SessionStatus

    sessions = open_project(args.overrides).store.list_sessions(SessionStatus(args.status) if args.status else None)
    if args.json:
        print(json.dumps([s.to_dict() for s in sessions], indent=2))
        return 0
    rows = [
        {
            "id": s.id, "status": s.status.value, "model": (s.config.get("model") or {}).get("name", "?"),
            "started": s.started_at.strftime("%Y-%m-%d %H:%M:%S") if s.started_at else "",
            "val/loss": _fmt_metric(s.metrics, "val/loss"), "error": (s.error or "").split("\n")[0][:60],
        }
        for s in sessions
    ]  # fmt: skip
    print(_table(rows, ["id", "status", "model", "started", "val/loss", "error"]))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    versions = open_project(args.overrides).manager.get_model_versions()
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=2))
        return 0
    rows = [
        {
            "id": v.id, "version": v.version, "session": v.training_session_id,
            "created": v.created_at.strftime("%Y-%m-%d %H:%M:%S") if v.created_at else "",
            "val/loss": _fmt_metric(v.metrics, "val/loss"), "eval/perplexity": _fmt_metric(v.metrics, "eval/perplexity"),
            "aliases": ",".join(v.aliases),
        }
        for v in versions
    ]  # fmt: skip
    print(_table(rows, ["id", "version", "session", "created", "val/loss", "eval/perplexity", "aliases"]))
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    mv = open_project(args.overrides).manager.save_model(args.label, args.session_id)
    print(json.dumps(mv.to_dict(), indent=2))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    mv = open_project(args.overrides).manager.promote(args.version, args.alias)
    print(f"{args.alias} -> {mv.version} (id {mv.id})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    runtime = open_project(args.overrides).runtime
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", runtime.tracking.uri,
           "--host", args.host, "--port", str(args.port), "--workers", "1"]  # fmt: skip
    if runtime.tracking.artifact_location:
        cmd += ["--artifacts-destination", runtime.tracking.artifact_location]
    print(" ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
    return 0
