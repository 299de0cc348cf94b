"""The `kbtune` command. Thin over kbtune's services; heavy libraries are imported inside the
commands so `kbtune --help` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


def _setup_env() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("KBTUNE_ROOT", str(Path.cwd()))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _runtime(overrides: list[str]) -> Any:
    from kbtune import pipeline

    problems: list[str] = []
    runtime = pipeline.runtime_from(pipeline.to_container(pipeline.compose(overrides)), problems)
    if problems:
        raise pipeline.ConfigError(problems)
    return runtime


def _store(overrides: list[str]) -> Any:
    from kbtune import pipeline

    return pipeline.build_store(_runtime(overrides).tracking)


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


# -- commands ------------------------------------------------------------------------------------
def cmd_kb_ingest(args: argparse.Namespace) -> int:
    from kbtune.ingestion import ingest_folder
    from kbtune.knowledge_base import KnowledgeBase

    overrides = [f"kb.collection={args.collection}", *args.overrides]
    if args.kb_path:
        overrides.append(f"kb.path={args.kb_path}")
    runtime = _runtime(overrides)
    report = ingest_folder(KnowledgeBase.connect(runtime.kb), Path(args.path), max_chars=args.max_chars)
    print(
        f"{report.files} files -> {report.documents} documents in {runtime.kb.describe()}: "
        f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged, {report.removed} removed"
    )
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    from kbtune.records import SessionStatus

    sessions = _store(args.overrides).list_sessions(SessionStatus(args.status) if args.status else None)
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
    from kbtune.model_manager import ModelManager

    versions = ModelManager(_store(args.overrides)).get_model_versions()
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
    from kbtune.model_manager import ModelManager

    mv = ModelManager(_store(args.overrides)).save_model(args.label, args.session_id)
    print(json.dumps(mv.to_dict(), indent=2))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from kbtune.model_manager import ModelManager

    mv = ModelManager(_store(args.overrides)).promote(args.version, args.alias)
    print(f"{args.alias} -> {mv.version} (id {mv.id})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    runtime = _runtime(args.overrides)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", runtime.tracking.uri,
           "--host", args.host, "--port", str(args.port), "--workers", "1"]  # fmt: skip
    if runtime.tracking.artifact_location:
        cmd += ["--artifacts-destination", runtime.tracking.artifact_location]
    print(" ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kbtune",
        description="Fine-tune a local causal LM on a Chroma knowledge base; sessions and versions in MLflow. "
        "Commands take Hydra overrides (e.g. tracking.uri=..., kb.path=...) after their own options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    kb = sub.add_parser("kb", help="knowledge-base commands").add_subparsers(dest="kb_command", required=True)
    ingest = kb.add_parser("ingest", help="ingest a folder of .md/.txt files into a Chroma collection")
    ingest.add_argument("path", help="folder to read recursively")
    ingest.add_argument("--collection", required=True, help="Chroma collection (created if missing)")
    ingest.add_argument("--kb-path", help="embedded Chroma directory (default: kb.path from the config)")
    ingest.add_argument("--max-chars", type=int, default=2000, help="split sections longer than this")
    ingest.set_defaults(func=cmd_kb_ingest)

    p = add("sessions", cmd_sessions, "list training sessions, newest first")
    p.add_argument("--status", choices=["pending", "running", "completed", "failed", "stopped"])
    p.add_argument("--json", action="store_true")
    p = add("versions", cmd_versions, "list model versions with their metrics, newest first")
    p.add_argument("--json", action="store_true")
    p = add("save", cmd_save, "register a completed session's model as a new labelled version")
    p.add_argument("session_id")
    p.add_argument("--label", help="version label (letters, digits, . _ -); default automatic")
    p = add("promote", cmd_promote, "point an alias (default: champion) at a version")
    p.add_argument("version")
    p.add_argument("--alias", default="champion")
    p = add("ui", cmd_ui, "open the MLflow UI on the project's store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like key=value)")
    args.overrides = rest
    _setup_env()
    from kbtune.pipeline import user_errors

    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        print(f"kbtune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
