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

    sessions = open_project(args.overrides).store.list_sessions(
        SessionStatus(args.status) if args.status else None
    )
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


def _pct(metrics: dict[str, float] | None, key: str) -> str:
    value = (metrics or {}).get(key)
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def cmd_versions(args: argparse.Namespace) -> int:
    project = open_project(args.overrides)
    if args.detail:
        return _version_detail(project, args.detail, args.json)
    if args.tree:
        from kbtune.updates.lineage import lineage, render_tree

        print(render_tree(lineage(project.store)))
        return 0
    versions = project.manager.get_model_versions()
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=2))
        return 0
    # Knowledge first: what the version learned of its KB, then how it continues text.
    rows = [
        {
            "id": v.id, "version": v.version, "session": v.training_session_id[:12],
            "created": v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "",
            "recall": _pct(v.metrics, "knowledge/recall_trained"), "start": _pct(v.metrics, "knowledge/start/recall_trained"),
            "held-out": _pct(v.metrics, "knowledge/recall_heldout"),
            "forgetting": _pct(v.metrics, "knowledge/retain_perplexity_change"),
            "val/loss": _fmt_metric(v.metrics, "val/loss"), "aliases": ",".join(v.aliases),
        }
        for v in versions
    ]  # fmt: skip
    print(
        _table(
            rows,
            [
                "id",
                "version",
                "session",
                "created",
                "recall",
                "start",
                "held-out",
                "forgetting",
                "val/loss",
                "aliases",
            ],
        )
    )
    if versions:
        print(
            "\nrecall: closed-book recall of facts from the training documents (start: the starting model's);"
            "\nheld-out: of facts from held-out documents; forgetting: perplexity change on eval.retain."
            "\nkbtune versions --detail VERSION lists the worst-learned documents."
        )
    return 0


def _version_detail(project: Any, ref: str, as_json: bool) -> int:
    from kbtune.knowledge.evaluation import REPORT_ARTIFACT, worst_trained

    mv = project.store.get_version(ref)
    try:
        documents = json.loads(project.store.read_text(mv.training_session_id, REPORT_ARTIFACT))
    except Exception:  # not evaluated yet
        documents = []
    worst = worst_trained(documents, 10)
    if as_json:
        print(json.dumps({**mv.to_dict(), "worst_trained": worst}, indent=2))
        return 0
    print(
        f"version {mv.version} (id {mv.id}), session {mv.training_session_id}, aliases {', '.join(mv.aliases) or '-'}"
    )
    for key, value in sorted((mv.metrics or {}).items()):
        print(f"  {key:45s} {value:.4f}" if isinstance(value, (int, float)) else f"  {key:45s} {value}")
    if not documents:
        print(f"\nnot evaluated for knowledge yet: python scripts/evaluate.py version={mv.version}")
        return 0
    rows = [{"document": d["document_id"], "probes": d["probes"], "recall": f"{d['recall']:.0%}",
             "before": f"{d['recall_before']:.0%}" if d["recall_before"] is not None else "-",
             "loss": _fmt_metric(d, "loss_after"), "loss before": _fmt_metric(d, "loss_before")} for d in worst]  # fmt: skip
    print("\nworst-learned training documents:")
    print(_table(rows, ["document", "probes", "recall", "before", "loss", "loss before"]))
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    mv = open_project(args.overrides).manager.save_model(args.label, args.session_id)
    print(json.dumps(mv.to_dict(), indent=2))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Gated on knowledge: refused (exit 1, with the figures) when trained-fact recall drops below the
    current holder's on the same probes or forgetting exceeds --max-forgetting; --force overrides."""
    from kbtune.knowledge.promotion import PromotionRefused

    project = open_project(args.overrides)
    try:
        decision = project.promotion().promote(args.version, args.alias, args.max_forgetting, args.force)
    except PromotionRefused as exc:
        print(f"kbtune: refused: {exc}", file=sys.stderr)
        return 1
    print(decision.summary())
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
