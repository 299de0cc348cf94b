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


# -- training: start / status / stop / serve ---------------------------------------------------
def _control(overrides: list[str], max_running: int = 1) -> Any:
    from kbtune import pipeline
    from kbtune.worker import WorkerControl

    runtime = _runtime(overrides)
    # The worker needs only what finds the store; the training settings travel in the session record.
    base = [o for o in overrides if o.lstrip("+~").startswith(("paths.", "tracking.", "tracking="))]
    return WorkerControl(pipeline.build_store(runtime.tracking), runtime.sessions_dir, base, max_running)


def _session_arg(args: argparse.Namespace) -> None:
    # `kbtune status paths.root=X`: an override, not a session id.
    if args.session_id and "=" in args.session_id:
        args.overrides.insert(0, args.session_id)
        args.session_id = None


def _bar(percent: float | None, width: int = 28) -> str:
    filled = int(round((percent or 0) / 100 * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _status_line(status: dict[str, Any]) -> str:
    p = status.get("progress") or {}
    state = "stopping" if status.get("stop_requested") else status["status"]
    percent = 100.0 if status["status"] == "completed" else (p.get("percent") or 0.0)
    parts = [_bar(percent), f"{percent:5.1f}%"]
    if p.get("total_steps"):
        parts.append(f"step {p.get('step', 0)}/{p['total_steps']}")
    if p.get("max_epochs"):
        parts.append(f"epoch {p.get('epoch', 0) + 1}/{p['max_epochs']}")
    for key, label in (("train_loss", "train/loss"), ("val_loss", "val/loss")):
        if isinstance(p.get(key), (int, float)):
            parts.append(f"{label} {p[key]:.4f}")
    if p.get("tokens_per_s"):
        parts.append(f"{p['tokens_per_s']:,.0f} tok/s")
    if status["status"] == "running" and p.get("eta_s") is not None:
        parts.append(f"ETA {_duration(p['eta_s'])}")
    parts.append(f"({state}{', ' + p['phase'] if p.get('phase') == 'preparing' else ''})")
    return "  ".join(parts)


def _status_text(status: dict[str, Any]) -> str:
    model = (status.get("config", {}).get("model") or {}).get("name", "?")
    p = status.get("progress") or {}
    lines = [f"session  {status['id']}  ({status['status']}, model {model}, started {status.get('started_at') or '-'})",
             _status_line(status), f"elapsed  {_duration(p.get('elapsed_s'))}"]  # fmt: skip
    if status["status"] == "failed" and status.get("error"):
        lines.append("error    " + status["error"].strip().replace("\n", "\n         "))
    if status.get("resumable"):
        lines.append(f"resume   kbtune start --resume {status['id']}")
    return "\n".join(lines)


def _watch(control: Any, session_id: str | None, interval: float = 1.0) -> int:
    """Redraw one progress line until the session ends (Ctrl-C leaves the training running)."""
    import time

    tty = sys.stdout.isatty()
    status = control.status(session_id)
    session_id = status["id"]  # pinned: a training started later is not this one
    print(f"session {session_id}")
    last = ""
    try:
        while True:
            line = _status_line(status)
            if tty:
                print("\r" + line.ljust(len(last)), end="", flush=True)
            elif line != last:
                print(line, flush=True)
            last = line
            if status["status"] in ("completed", "failed", "stopped"):
                break
            time.sleep(interval)
            status = control.status(session_id)
    except KeyboardInterrupt:
        print("\n(watch ended; the training goes on: kbtune stop to stop it)")
        return 130
    if tty:
        print()
    if status["status"] == "failed":
        print(f"error: {status.get('error') or 'unknown'}", file=sys.stderr)
        return 1
    if status.get("resumable"):
        print(f"resume with: kbtune start --resume {session_id}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from kbtune.worker import SessionConflict, TrainingBusy

    control = _control(args.overrides, args.max_running)
    try:
        if args.resume:
            extra = [o for o in args.overrides if o not in control.overrides]
            if extra:
                print(
                    f"kbtune: error: --resume continues the session with its own config; leave out {' '.join(extra)}",
                    file=sys.stderr,
                )
                return 2
            session = control.resume(args.resume)
        else:
            session = control.start(args.overrides)
    except (TrainingBusy, SessionConflict) as exc:
        print(f"kbtune: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"session {session.id} {'resumed' if args.resume else 'started'}; worker log: {control.files(session.id).log}"
    )
    if args.watch:
        return _watch(control, session.id)
    print(f"watch: kbtune status --watch {session.id}    stop: kbtune stop {session.id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _session_arg(args)
    control = _control(args.overrides)
    if args.watch:
        return _watch(control, args.session_id)
    status = control.status(args.session_id)
    print(json.dumps(status, indent=2) if args.json else _status_text(status))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    import time

    from kbtune.worker import SessionConflict

    _session_arg(args)
    control = _control(args.overrides)
    asked = time.monotonic()
    try:
        session = control.stop(args.session_id)
    except SessionConflict as exc:
        print(f"kbtune: error: {exc}", file=sys.stderr)
        return 2
    if session.status.is_terminal:
        print(f"session {session.id} is already {session.status.value}")
        return 0
    print(f"stop requested for session {session.id}: it finishes its current step and saves a checkpoint")
    if args.no_wait:
        return 0
    while time.monotonic() - asked < args.timeout:
        session = control.reconcile(control.store.get_session(session.id))
        if session.status.is_terminal:
            print(f"session {session.id} {session.status.value} after {time.monotonic() - asked:.1f} s")
            if session.status.value in ("stopped", "failed"):
                print(f"resume with: kbtune start --resume {session.id}")
            return 0 if session.status.value != "failed" else 1
        time.sleep(0.25)
    print(f"kbtune: error: session {session.id} did not stop within {args.timeout:.0f} s", file=sys.stderr)
    return 1


def cmd_serve(args: argparse.Namespace) -> int:
    from kbtune.api import LOOPBACK_HOSTS, create_app, is_loopback

    token = args.token or os.environ.get("KBTUNE_API_TOKEN") or None
    loopback = is_loopback(args.host)
    if not loopback and not token:
        print(
            f"kbtune: error: refusing to serve on {args.host} without an API token: set KBTUNE_API_TOKEN "
            "(or pass --token); clients then send `Authorization: Bearer <token>`. Or bind 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    app = create_app(args.overrides, token=token, max_running=args.max_running, local_model=args.local_model,
                     allowed_hosts=LOOPBACK_HOSTS if loopback else None)  # fmt: skip
    print(
        f"kbtune: serving http://{args.host}:{args.port}/ (API under /training and /models, docs at /docs)",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=args.access_log)
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
    p = add("start", cmd_start, "start a training in a background worker (overrides as in scripts/train.py)")
    p.add_argument(
        "--resume", metavar="SESSION_ID", help="continue a stopped or failed session from its last checkpoint"
    )
    p.add_argument("--watch", action="store_true", help="then show its progress until it ends")
    p.add_argument(
        "--max-running", type=int, default=1, help="trainings allowed at once on this store (0: no limit)"
    )
    p = add("status", cmd_status, "progress of the running (or most recent) training, or of SESSION_ID")
    p.add_argument("session_id", nargs="?")
    p.add_argument("--watch", action="store_true", help="a live progress bar until the session ends")
    p.add_argument("--json", action="store_true")
    p = add(
        "stop",
        cmd_stop,
        "stop the running training (or SESSION_ID) after its current step, with a checkpoint",
    )
    p.add_argument("session_id", nargs="?")
    p.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the session to stop")
    p = add("serve", cmd_serve, "serve the training API and web page (http://127.0.0.1:8000/)")
    p.add_argument("--host", default="127.0.0.1", help="any non-loopback address requires an API token")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="API token (prefer the KBTUNE_API_TOKEN environment variable)")
    p.add_argument(
        "--max-running", type=int, default=1, help="trainings allowed at once on this store (0: no limit)"
    )
    p.add_argument("--local-model", metavar="DIR", help="the model directory `model: local` requests train")
    p.add_argument("--access-log", action="store_true", help="log every request")
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
