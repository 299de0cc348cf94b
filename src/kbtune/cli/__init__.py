"""The `kbtune` command (also `python -m kbtune`). Thin over kbtune's services; heavy libraries are
imported inside the commands so `kbtune --help` stays fast."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kbtune.cli.kb import cmd_kb_facts, cmd_kb_ingest
from kbtune.cli.model import DTYPES, FORMATS, add_sampling_flags, cmd_chat, cmd_export, cmd_generate
from kbtune.cli.records import cmd_promote, cmd_save, cmd_sessions, cmd_ui, cmd_versions
from kbtune.cli.training import cmd_serve, cmd_start, cmd_status, cmd_stop
from kbtune.cli.updates import cmd_audit, cmd_kb_diff


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

    _add_record_commands(sub, add)
    _add_training_commands(add)
    _add_model_commands(add)
    return parser


def _add_record_commands(sub: Any, add: Any) -> None:
    kb = sub.add_parser("kb", help="knowledge-base commands").add_subparsers(dest="kb_command", required=True)
    ingest = kb.add_parser("ingest", help="ingest a folder of .md/.txt files into a Chroma collection")
    ingest.add_argument("path", help="folder to read recursively")
    ingest.add_argument("--collection", required=True, help="Chroma collection (created if missing)")
    ingest.add_argument("--kb-path", help="embedded Chroma directory (default: kb.path from the config)")
    ingest.add_argument("--max-chars", type=int, default=2000, help="split sections longer than this")
    ingest.add_argument(
        "--prune",
        action="store_true",
        help="also delete documents whose file is no longer in the folder (the collection mirrors it)",
    )
    ingest.set_defaults(func=cmd_kb_ingest)
    facts = kb.add_parser("facts", help="write a planted-facts KB (invented entities, one document each)")
    facts.add_argument("--collection", default="kbtune-facts", help="Chroma collection (created if missing)")
    facts.add_argument("--entities", type=int, default=100, help="how many entities (5 facts each)")
    facts.add_argument("--seed", type=int, default=0)
    facts.add_argument("--kb-path", help="embedded Chroma directory (default: kb.path from the config)")
    facts.set_defaults(func=cmd_kb_facts)
    diff = kb.add_parser("diff", help="documents added, changed and deleted since a version's training data")
    diff.add_argument(
        "--since", metavar="VERSION", help="a label, number or alias (default: champion, else latest)"
    )
    diff.add_argument("--json", action="store_true", help="every id, the counts and the change's digest")
    diff.add_argument("--limit", type=int, default=20, help="ids listed per kind (default 20)")
    diff.set_defaults(func=cmd_kb_diff)
    p = add("audit", cmd_audit, "versions trained on documents since deleted or changed (reads no weights)")
    p.add_argument(
        "--document", metavar="ID", help="instead: the versions whose data contained this document"
    )
    p.add_argument("--json", action="store_true")

    p = add("sessions", cmd_sessions, "list training sessions, newest first")
    p.add_argument("--status", choices=["pending", "running", "completed", "failed", "stopped"])
    p.add_argument("--json", action="store_true")
    p = add("versions", cmd_versions, "list model versions with their knowledge and metrics, newest first")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--detail", metavar="VERSION", help="one version: all metrics and its worst-learned documents"
    )
    p.add_argument("--tree", action="store_true", help="versions as a tree of incremental updates")
    p = add("save", cmd_save, "register a completed session's model as a new labelled version")
    p.add_argument("session_id")
    p.add_argument("--label", help="version label (letters, digits, . _ -); default automatic")
    p = add("promote", cmd_promote, "point an alias (default: champion) at a version, gated on knowledge")
    p.add_argument("version")
    p.add_argument("--alias", default="champion")
    p.add_argument(
        "--max-forgetting",
        type=float,
        default=0.05,
        help="largest retain-set perplexity increase allowed (0.05 = 5%%)",
    )
    p.add_argument("--force", action="store_true", help="promote even if the knowledge gate refuses")
    p = add("ui", cmd_ui, "open the MLflow UI on the project's store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)


def _add_training_commands(add: Any) -> None:
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


def _add_model_commands(add: Any) -> None:
    p = add(
        "generate", cmd_generate, "stream a version's continuation of PROMPT (greedy unless --temperature)"
    )
    p.add_argument("version", help="a label, a number, latest, or an alias such as champion")
    p.add_argument("prompt")
    add_sampling_flags(p)
    p = add("chat", cmd_chat, "chat with a version: one reply per line typed; /exit or Ctrl-D ends")
    p.add_argument("version", help="a label, a number, latest, or an alias such as champion")
    add_sampling_flags(p)
    p = add(
        "export",
        cmd_export,
        "write a version as safetensors or GGUF, with a model card (and an Ollama Modelfile)",
    )
    p.add_argument("version", help="a label, a number, latest, or an alias such as champion")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument(
        "--out",
        metavar="DIR",
        help="an empty or new folder (default: <paths.root>/exports/<version>-<format>)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="f32",
        help="f32 (default, lossless), f16; bf16 for safetensors only, q8_0 for gguf only",
    )


def main(argv: list[str] | None = None) -> int:
    from kbtune.configuration import user_errors
    from kbtune.project import configure_environment, configure_logging

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like key=value)")
    args.overrides = rest
    configure_environment()
    configure_logging()
    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        print(f"kbtune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
