"""The child side of a training worker: `python -m kbtune.worker SESSION_ID [overrides]` runs one
pending session that `kbtune start` or the API created, in its own process so a server stays
responsive and a crash in training cannot take it down. The parent side is worker_control."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def run(session_id: str, overrides: list[str]) -> int:
    """Train the session with the config stored in its record; `overrides` only locate the store."""
    from kbtune.configuration import load_session_plan
    from kbtune.project import Project, open_project
    from kbtune.session_runner import SessionRunner, ensure_final
    from kbtune.updates.base import resolve_update

    store = open_project(overrides).store
    session = store.get_session(session_id)
    try:
        plan, runtime = load_session_plan(session.config)
        project = Project(session.config, runtime)
        plan = resolve_update(project, plan)
        project.ensure_sample_kb()
        SessionRunner(project.service, progress_bar=False).run(plan, session_id=session_id)
    except BaseException as exc:
        # The record says how it ended (a stored config that no longer loads, too); this log
        # (worker.log) keeps the whole traceback.
        ensure_final(store, session_id, exc)
        logger.exception("session %s failed", session_id)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from kbtune.project import configure_environment, configure_logging

    parser = argparse.ArgumentParser(
        prog="python -m kbtune.worker", description="Run one training session (started by kbtune start / the API)."
    )
    parser.add_argument("session_id")
    parser.add_argument("overrides", nargs="*", help="the launcher's Hydra overrides (to find the store)")
    args = parser.parse_args(argv)
    configure_environment()
    configure_logging()
    return run(args.session_id, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
