"""`kbtune start|status|stop|serve`: the seed's training routes from the terminal, over the same
worker control the API uses."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kbtune.project import open_project


def _control(overrides: list[str], max_running: int = 1) -> Any:
    return open_project(overrides).control(max_running)


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
    from kbtune.worker_control import SessionConflict, TrainingBusy

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

    from kbtune.worker_control import SessionConflict

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
