"""The use cases behind scripts/: train one session (or one job of a sweep) and evaluate a version,
each from a composed config. Hydra calls these; they call the project's services."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from kbtune.configuration import ConfigError, load_session_plan, parse_eval
from kbtune.distributed import is_rank_zero
from kbtune.hydra_entry import hydra_context, hydra_context_active
from kbtune.project import Project, configure_logging
from kbtune.run_identity import run_identity
from kbtune.session_runner import SessionRunner, latest_resumable
from kbtune.updates.base import resolve_update

logger = logging.getLogger(__name__)

# Keys a resumed session may be given again on the command line: they say where things are, not how
# to train.
_LOCATING_KEYS = ("paths.", "tracking", "hydra", "resume", "ckpt_path", "kb.path", "kb.host", "kb.port")


def train(cfg: Any) -> float | None:
    """The main job: validate, (first run) ingest the sample KB, prepare, train, register.
    Returns the monitored metric so a Hydra sweeper can optimise it."""
    configure_logging()
    project = Project.from_config(cfg)
    plan = project.plan()
    if plan.trainer.strategy.startswith(("ddp", "fsdp", "deepspeed")) and not hydra_context_active():
        raise ConfigError([f"trainer.strategy: {plan.trainer.strategy} starts its other ranks by running "
                           f"the training script again; launch it with scripts/train.py"])  # fmt: skip
    overrides, sweep_tags = hydra_context()
    project.ensure_sample_kb()
    if not is_rank_zero():
        # Other ranks train under rank zero's session (see kbtune.distributed); they write no record.
        return _metric(project.service.train_model(plan), plan)
    session_id, plan, project = _continued_session(project, plan, overrides)
    name, tags = run_identity(plan, overrides)
    plan = dataclasses.replace(plan, run_name=name, tags={**plan.tags, **tags, **sweep_tags, "kbtune.origin": "script"})
    outcome = SessionRunner(project.service, progress_bar=True).run(plan, session_id)
    return _metric(outcome, plan)


def _continued_session(project: Project, plan: Any, overrides: list[str]) -> tuple[str | None, Any, Project]:
    """`resume=ID` continues that session with its own stored settings and knowledge base;
    `ckpt_path=last` continues the newest resumable one. Otherwise a new session starts (None)."""
    resume = project.config.get("resume")
    if plan.ckpt_path == "last":
        resume = latest_resumable(project.store, project.service.layout)
    if not resume:
        return None, plan, project
    conflicting = [o for o in overrides if not o.lstrip("+~").startswith(_LOCATING_KEYS)]
    if conflicting:
        raise ConfigError([f"resume: session {resume} continues with its own settings; leave out {' '.join(conflicting)}"])
    previous = project.store.get_session(str(resume))
    stored_plan, runtime = load_session_plan(previous.config)
    project = Project(previous.config, runtime)
    return previous.id, resolve_update(project, stored_plan), project


def _metric(outcome: Any, plan: Any) -> float | None:
    return (outcome.session.metrics or {}).get(plan.callbacks.monitor)


def evaluation_settings(data: dict[str, Any]) -> Any:
    """The `eval` node and `version` of conf/evaluate.yaml, validated (ConfigError lists problems)."""
    problems: list[str] = []
    settings = parse_eval(data, problems)
    if not isinstance(data.get("version"), str) or not data["version"]:
        problems.append("version: the model version to evaluate (a label, a number, latest or an alias)")
    if problems:
        raise ConfigError(problems)
    return settings


def evaluate(cfg: Any) -> dict[str, Any]:
    """`scripts/evaluate.py version=...`: score a version on its session's held-out documents (text
    metrics) and on fact probes from its training and held-out documents (knowledge)."""
    configure_logging()
    project = Project.from_config(cfg)
    settings = evaluation_settings(project.config)
    version = project.config["version"]
    results: dict[str, Any] = dict(project.service.evaluate_model(version, settings))
    report = project.service.evaluate_knowledge(version, settings)
    mv = project.store.get_version(version)
    manifest = json.loads(project.store.read_text(mv.training_session_id, "data/manifest.json"))
    return {"version": mv.version, "version_id": mv.id, "collection": manifest["collection"], **results,
            **report.to_dict(settings.report_worst)}  # fmt: skip
