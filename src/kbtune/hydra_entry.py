"""The Hydra boundary: compose conf/ (compose API or @hydra.main), turn the result into plain dicts,
and check every job of a run or sweep before Hydra creates an output directory or any session exists."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

from kbtune.configuration import ConfigError, load, load_runtime, user_errors
from kbtune.distributed import is_rank_zero

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Keys that moved to their own node, so a user's old override gets a pointer instead of a puzzle.
_MOVED = {"model.learning_rate": "optim.learning_rate", "model.warmup_steps": "optim.warmup_steps",
          "model.weight_decay": "optim.weight_decay", "data.cache_dir": "paths.cache_dir"}  # fmt: skip


def compose(overrides: list[str] | None = None, config_name: str = "train") -> Any:
    """Compose a config with Hydra's compose API; a bad override is a ConfigError naming it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except Exception as exc:  # Hydra's override grammar, unknown keys and groups
        if not type(exc).__module__.startswith(("hydra", "omegaconf")):
            raise
        message = str(exc).split("\n")[0]
        moved = [f"{old} is now {new}" for old, new in _MOVED.items() if f"'{old}'" in message]
        raise ConfigError([message + (f" ({'; '.join(moved)})" if moved else "")]) from exc


def to_container(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain dicts, without Hydra's own node, with absolute paths."""
    from omegaconf import OmegaConf, open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    # Every path interpolates from paths.root: make it absolute so the working directory never matters.
    cfg.paths.root = str(Path(os.path.expanduser(str(cfg.paths.root))).resolve())
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def hydra_context() -> tuple[list[str], dict[str, str]]:
    """Overrides and sweep tags when running under @hydra.main; empty under the compose API."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [], {}
    hc = HydraConfig.get()
    tags = {}
    if str(hc.mode) == "RunMode.MULTIRUN":
        from kbtune.tracking.store import SWEEP_TAG

        tags = {SWEEP_TAG: Path(hc.sweep.dir).as_posix(), "kbtune.sweep_job": str(hc.job.num)}
    return list(hc.overrides.task), tags


def hydra_context_active() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized()


def precheck(cfg: Any, config_name: str | None, checked_data: set[str] | None = None) -> None:
    """Everything checkable before Hydra creates the run's output directory and before any MLflow
    run exists: the config itself, and for training, that the KB yields at least one block per split
    (the prepared data is cached, so the job reuses it). `checked_data` skips data already checked."""
    if not is_rank_zero():
        return  # rank zero checked everything before it launched this process
    from kbtune.project import Project

    data = to_container(cfg)
    if config_name == "evaluate":
        from kbtune.jobs import evaluation_settings

        evaluation_settings(data)
        Project(data, load_runtime(data)).check_store()
        return
    plan, runtime = load(data)
    project = Project(data, runtime)
    # The store first: an unreachable one would otherwise fail the job only after MLflow's retries.
    project.check_store()
    if data.get("resume"):
        return  # the stored session config is validated when the job loads it
    plan = project.plan()  # with base_version: the base's model and the update's data selection
    # The data's checks also read the trainer (batches per epoch) and the checkpoint to start from.
    data_key = repr(
        (plan.data, plan.model, plan.trainer, plan.ckpt_path, plan.seed, runtime.kb, runtime.cache_dir)
    )
    if checked_data is not None:
        if data_key in checked_data:
            return
        checked_data.add(data_key)
    project.prepare(plan)


def sweep_jobs(config: Any) -> list[tuple[str, Any]]:
    """(label, composed config) of each job a multirun will launch, enumerated like Hydra's basic
    sweeper does: the product of the comma-separated command-line sweeps. Ranges a sweeper samples
    (Optuna's `interval(...)`) cannot be enumerated; those jobs are checked with the base value."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    options: list[list[str]] = []
    for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        if not override.is_sweep_override():
            options.append([override.input_line])
        elif override.is_discrete_sweep():
            key = override.get_key_element()
            options.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    swept = [i for i, values in enumerate(options) if len(values) > 1]
    loader = GlobalHydra.instance().config_loader()
    jobs = []
    for combination in itertools.product(*options):
        label = " ".join(combination[i] for i in swept) or "the base config"
        jobs.append((label, loader.load_sweep_config(config, list(combination))))
    return jobs


def precheck_sweep(config: Any, config_name: str | None) -> None:
    """`precheck` for every job of a multirun before the first starts: one error lists each job's
    problems, so a bad value in a sweep stops it before any session is recorded."""
    from hydra.errors import HydraException

    problems: list[str] = []
    checked_data: set[str] = set()
    try:
        jobs = sweep_jobs(config)
    except HydraException as exc:
        raise ConfigError([f"sweep: {exc}"]) from exc
    for label, job_config in jobs:
        try:
            precheck(job_config, config_name, checked_data)
        except ConfigError as exc:
            problems.extend(f"[{label}] {p}" for p in exc.problems)
        except user_errors() as exc:
            problems.append(f"[{label}] {exc}")
    if problems:
        raise ConfigError(problems)


def hydra_validation_callback() -> Any:
    """The Hydra callback conf/hydra/default.yaml installs: precheck on run and multirun start."""
    from hydra.experimental.callback import Callback

    class ValidateBeforeRun(Callback):
        def _check(self, check: Any, config: Any, config_name: str | None) -> None:
            try:
                check(config, config_name)
            except user_errors() as exc:
                print(f"kbtune: error: {exc}", file=sys.stderr)
                sys.exit(2)

        def on_run_start(self, config: Any, config_name: str | None = None, **kwargs: Any) -> None:
            self._check(precheck, config, config_name)

        def on_multirun_start(self, config: Any, config_name: str | None = None, **kwargs: Any) -> None:
            self._check(precheck_sweep, config, config_name)

    return ValidateBeforeRun()
