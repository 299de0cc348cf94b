"""The composition root: the one library module that reads Hydra/OmegaConf. It validates a composed
config into plain settings (every problem at once, before any side effect) and wires the services."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kbtune.data.preparation import DataSettings
from kbtune.distributed import is_rank_zero
from kbtune.knowledge_base import SAMPLE_COLLECTION, KBSettings
from kbtune.modeling.factory import LoraSpec, ModelSpec
from kbtune.modeling.optim import OptimSettings
from kbtune.training_loop import CallbackSettings, TrainerSettings, cuda_available, precision_problems

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
_OPTIM_KEYS = {f.name for f in dataclasses.fields(OptimSettings)}


class ConfigError(ValueError):
    """Every problem found in a config, each naming the key to change."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by input the user can fix: reported as one message, never as a traceback."""
    from kbtune.data.preparation import DataError
    from kbtune.knowledge_base import KnowledgeBaseError
    from kbtune.model_manager import VersionLabelError
    from kbtune.modeling.factory import ModelError
    from kbtune.tracking.store import NotFoundError

    return (ConfigError, DataError, KnowledgeBaseError, ModelError, NotFoundError, VersionLabelError, FileExistsError)


@dataclass(frozen=True)
class TrackingSettings:
    uri: str
    experiment: str = "kbtune"
    registered_model: str = "kbtune"
    artifact_location: str | None = None


@dataclass(frozen=True)
class Runtime:
    """Settings that are not the training itself: where things live and how to reach them."""

    kb: KBSettings
    tracking: TrackingSettings
    root: Path
    sessions_dir: Path
    cache_dir: Path
    sample_corpus: Path | None


# -- typed conversion ----------------------------------------------------------------------------
def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (dict, list, tuple):
        return isinstance(value, (dict, list, tuple) if origin is not dict else dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def settings_from(cls: type, values: dict[str, Any] | None, prefix: str, problems: list[str], **extra: Any) -> Any:
    """Build a settings dataclass from a config section, recording unknown keys and wrong types."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = dict(extra)
    for key, value in values.items():
        if key not in names:
            problems.append(f"{prefix}.{key}: unknown key (known: {', '.join(sorted(names))})")
        elif not _type_ok(value, hints[key]):
            problems.append(f"{prefix}.{key}: expected {getattr(hints[key], '__name__', hints[key])}, got {value!r}")
        else:
            kwargs[key] = tuple(value) if isinstance(value, list) and typing.get_origin(hints[key]) is tuple else value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        problems.append(f"{prefix}: {exc}")
        return None
    if hasattr(obj, "validate"):
        problems.extend(obj.validate())
    return obj


# -- composing -----------------------------------------------------------------------------------
def compose(overrides: list[str] | None = None, config_name: str = "train") -> Any:
    """Compose a config with Hydra's compose API (tests, the API server, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def to_container(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain dicts, without Hydra's own node, with absolute paths."""
    from omegaconf import OmegaConf, open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    # Every path interpolates from paths.root: make it absolute so the working directory never matters.
    cfg.paths.root = str(Path(os.path.expanduser(str(cfg.paths.root))).resolve())
    return OmegaConf.to_container(cfg, resolve=True)


def runtime_from(data: dict[str, Any], problems: list[str]) -> Runtime | None:
    kb_values = dict(data.get("kb") or {})
    sample = kb_values.pop("sample_corpus", None)
    kb = settings_from(KBSettings, kb_values, "kb", problems)
    tracking = settings_from(TrackingSettings, data.get("tracking"), "tracking", problems)
    paths = data.get("paths") or {}
    if tracking is not None and tracking.uri.startswith("sqlite:") and not tracking.uri.startswith("sqlite:////"):
        problems.append(f"tracking.uri: a SQLite store needs an absolute path (sqlite:////abs/path.db), got {tracking.uri}")
    if kb is None or tracking is None:
        return None
    return Runtime(
        kb=kb,
        tracking=tracking,
        root=Path(paths["root"]),
        sessions_dir=Path(paths["sessions_dir"]),
        cache_dir=Path(paths["cache_dir"]),
        sample_corpus=Path(sample) if sample else None,
    )


def plan_from(data: dict[str, Any], problems: list[str]) -> Any:
    from kbtune.service import TrainingPlan

    model_values = dict(data.get("model") or {})
    optim = settings_from(OptimSettings, {k: model_values.pop(k) for k in list(model_values) if k in _OPTIM_KEYS}, "model", problems)
    lora = model_values.pop("lora", None)
    lora_spec = settings_from(LoraSpec, lora, "model.lora", problems) if lora else None
    model = settings_from(ModelSpec, model_values, "model", problems, lora=lora_spec)
    data_settings = settings_from(DataSettings, data.get("data"), "data", problems)
    trainer = settings_from(TrainerSettings, data.get("trainer"), "trainer", problems)
    callbacks = settings_from(CallbackSettings, data.get("callbacks"), "callbacks", problems)
    run = {k: data.get(k) for k in ("seed", "register", "version", "ckpt_path", "run_name", "save_merged")}
    if not isinstance(run["seed"], int):
        problems.append(f"seed: expected an integer, got {run['seed']!r}")
    if run["version"] is not None:
        from kbtune.model_manager import VersionLabelError, validate_label

        try:
            validate_label(str(run["version"]))
        except VersionLabelError as exc:
            problems.append(f"version: {exc}")
    if trainer is not None:
        problems.extend(precision_problems(trainer))
    if model is not None and data_settings is not None and model.source == "scratch" and data_settings.block_size > model.max_position:
        problems.append(
            f"data.block_size: {data_settings.block_size} exceeds the model's model.max_position={model.max_position}"
        )
    if model is not None and data_settings is not None:
        problems.extend(local_model_problems(model, data_settings))
    if trainer is not None and trainer.strategy.startswith("fsdp") and (trainer.accelerator not in ("gpu", "cuda", "auto") or not cuda_available()):
        problems.append("trainer.strategy: fsdp shards the model over CUDA GPUs and cannot run on this machine's CPU; use trainer=ddp or trainer=default")
    if None in (optim, model, data_settings, trainer, callbacks):
        return None
    return TrainingPlan(
        data=data_settings, model=model, optim=optim, trainer=trainer, callbacks=callbacks, config=data,
        seed=run["seed"], register=bool(run["register"]), version=run["version"], ckpt_path=run["ckpt_path"],
        run_name=run["run_name"], save_merged=bool(run.get("save_merged") or False),
    )  # fmt: skip


def local_model_problems(model: ModelSpec, data: DataSettings) -> list[str]:
    """What the model's own files rule out: a block longer than its context, LoRA targets it lacks,
    a chat template a scratch tokenizer cannot have."""
    from kbtune.modeling.factory import local_context_length, local_dir_problems

    problems = []
    if data.chat_template and model.source != "local":
        problems.append("data.chat_template: needs the chat template of a local model's tokenizer (model=local model.path=DIR)")
    if model.source == "local" and not local_dir_problems(model.path, model.trust_remote_code):
        context = local_context_length(str(model.path))
        if context is not None and data.block_size > context:
            problems.append(
                f"data.block_size: {data.block_size} exceeds the {context}-token context of {model.path} "
                f"(its config.json); set data.block_size <= {context}"
            )
    if model.lora is not None and model.lora.target_modules:
        from kbtune.modeling.lora import lora_problems

        problems.extend(lora_problems(model))
    return problems


def load(cfg: Any) -> tuple[Any, Runtime]:
    """Validate a composed train config into (TrainingPlan, Runtime), or raise one ConfigError."""
    problems: list[str] = []
    data = to_container(cfg)
    runtime = runtime_from(data, problems)
    plan = plan_from(data, problems)
    if problems:
        raise ConfigError(problems)
    return plan, runtime


# -- wiring --------------------------------------------------------------------------------------
def build_store(tracking: TrackingSettings) -> Any:
    from kbtune.tracking.mlflow_store import MlflowStore

    if tracking.uri.startswith("sqlite:"):
        Path(tracking.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    logger.info("tracking store: %s (experiment %r)", tracking.uri, tracking.experiment)
    return MlflowStore(tracking.uri, tracking.experiment, tracking.registered_model, tracking.artifact_location)


def mlflow_logger_factory(tracking: TrackingSettings) -> Any:
    def make(session_id: str) -> list[Any]:
        from pytorch_lightning.loggers import MLFlowLogger

        class SessionLogger(MLFlowLogger):
            # The full resolved config is already the run's params and artifact; Lightning's
            # hparams (the model spec) would only duplicate it under other names.
            def log_hyperparams(self, params: Any) -> None:
                return None

        return [SessionLogger(experiment_name=tracking.experiment, tracking_uri=tracking.uri, run_id=session_id)]

    return make


def build_service(runtime: Runtime) -> Any:
    from kbtune.knowledge_base import KnowledgeBase
    from kbtune.model_manager import ModelManager
    from kbtune.service import TrainingService

    kb = KnowledgeBase.connect(runtime.kb)
    store = build_store(runtime.tracking)
    manager = ModelManager(store, runtime.cache_dir)
    return TrainingService(kb, store, manager, runtime.sessions_dir, runtime.cache_dir, mlflow_logger_factory(runtime.tracking))


def ensure_sample_kb(kb: Any, runtime: Runtime) -> None:
    """Create the sample collection from the shipped corpus the first time it is used; any other
    missing collection is the user's to create (KnowledgeBase raises with the ingest command)."""
    if runtime.kb.collection != SAMPLE_COLLECTION or runtime.sample_corpus is None or kb.exists():
        return
    from kbtune.ingestion import ingest_folder

    logger.info("first run: ingesting the sample corpus %s into %r", runtime.sample_corpus, SAMPLE_COLLECTION)
    ingest_folder(kb, runtime.sample_corpus)


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_identity(plan: Any, overrides: list[str]) -> tuple[str, dict[str, str]]:
    """A readable run name (model + key overrides) and tags for the MLflow UI."""
    shown = [o for o in overrides if not o.startswith(("hydra", "paths.", "tracking", "kb", "model=", "hparams_search"))]
    # `model.learning_rate=0.001` -> `learning_rate=0.001` (split the key only: values hold dots too).
    short = [f"{key.rsplit('.', 1)[-1]}={value}" for key, _, value in (o.partition("=") for o in shown)]
    name = plan.run_name or "-".join([plan.model.name, *short])[:200]
    return name, {"kbtune.overrides": " ".join(overrides)[:5000]}


def hydra_context_active() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized()


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


def train(cfg: Any) -> float | None:
    """The main job: validate, (first run) ingest the sample KB, prepare, train, register.
    Returns the monitored metric so a Hydra sweeper can optimise it."""
    from kbtune.service import TrainingPlan

    plan, runtime = load(cfg)
    if plan.trainer.strategy.startswith(("ddp", "fsdp", "deepspeed")) and not hydra_context_active():
        raise ConfigError([
            f"trainer.strategy: {plan.trainer.strategy} starts its other ranks by running the training script "
            f"again; launch it with scripts/train.py"
        ])  # fmt: skip
    overrides, sweep_tags = hydra_context()
    service = build_service(runtime)
    ensure_sample_kb(service.kb, runtime)
    resume = cfg.get("resume")
    session_id = None
    if plan.ckpt_path == "last":
        # Other ranks train under rank zero's session (see kbtune.distributed); by now it is running.
        session_id = latest_resumable(service) if is_rank_zero() else None
        plan = dataclasses.replace(plan, ckpt_path=None)
    if resume:
        previous = service.store.get_session(str(resume))
        plan, _ = load_session_plan(previous.config)
        session_id = previous.id
    preparation = service.prepare_training_data(plan)
    name, tags = run_identity(plan, overrides)
    tags.update(sweep_tags)
    # The commit of the code that trains (this checkout), wherever paths.root puts the outputs.
    tags["kbtune.git_commit"] = git_commit(CONF_DIR.parent)
    plan = dataclasses.replace(plan, run_name=name, tags={**plan.tags, **tags})
    assert isinstance(plan, TrainingPlan)
    outcome = service.train_model(plan, session_id=session_id, preparation=preparation)
    metrics = outcome.session.metrics or {}
    return metrics.get(plan.callbacks.monitor)


def latest_resumable(service: Any) -> str:
    from kbtune.records import SessionStatus

    for session in service.store.list_sessions():
        last = service.session_dir(session.id) / "checkpoints" / "last.ckpt"
        if session.status in (SessionStatus.STOPPED, SessionStatus.FAILED) and last.exists():
            return session.id
    raise ConfigError(["ckpt_path: `last` found no stopped or failed session with a last.ckpt to resume"])


def load_session_plan(config: dict[str, Any]) -> tuple[Any, Runtime]:
    """Rebuild the plan a session was started with, from its stored config (for resume)."""
    problems: list[str] = []
    runtime = runtime_from(config, problems)
    plan = plan_from(json.loads(json.dumps(config)), problems)
    if problems:
        raise ConfigError([f"stored session config: {p}" for p in problems])
    return plan, runtime


def evaluate(cfg: Any) -> dict[str, float]:
    from kbtune.evaluation import EvalSettings

    problems: list[str] = []
    data = to_container(cfg)
    runtime = runtime_from(data, problems)
    settings = settings_from(EvalSettings, data.get("eval"), "eval", problems)
    if not isinstance(data.get("version"), str) or not data["version"]:
        problems.append("version: the model version to evaluate (a label, a number, latest or an alias)")
    if problems:
        raise ConfigError(problems)
    service = build_service(runtime)
    return service.evaluate_model(data["version"], settings)


def precheck(cfg: Any, config_name: str | None, checked_data: set[str] | None = None) -> None:
    """Everything checkable before Hydra creates the run's output directory and before any MLflow
    run exists: the config itself, and for training, that the KB yields at least one block per split
    (the prepared data is cached, so the job reuses it). `checked_data` skips data already checked."""
    if not is_rank_zero():
        return  # rank zero checked everything before it launched this process
    if config_name == "evaluate":
        problems: list[str] = []
        from kbtune.evaluation import EvalSettings

        data = to_container(cfg)
        runtime_from(data, problems)
        settings_from(EvalSettings, data.get("eval"), "eval", problems)
        if problems:
            raise ConfigError(problems)
        return
    plan, runtime = load(cfg)
    if cfg.get("resume"):
        return  # the stored session config is validated when the job loads it
    data_key = repr((plan.data, plan.model, runtime.kb, runtime.cache_dir))
    if checked_data is not None:
        if data_key in checked_data:
            return
        checked_data.add(data_key)
    from kbtune.knowledge_base import KnowledgeBase
    from kbtune.service import TrainingService

    kb = KnowledgeBase.connect(runtime.kb)
    ensure_sample_kb(kb, runtime)
    TrainingService.prepare_with(kb, plan, runtime.cache_dir)


def sweep_jobs(config: Any) -> list[tuple[str, Any]]:
    """(label, composed config) of each job a multirun will launch, enumerated like Hydra's basic
    sweeper does: the product of the comma-separated command-line sweeps. Ranges a sweeper samples
    (Optuna's `interval(...)`) cannot be enumerated; those jobs are checked with the base value."""
    import itertools

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
    from hydra.experimental.callback import Callback

    class ValidateBeforeRun(Callback):
        def _check(self, check: Any, config: Any, config_name: str | None) -> None:
            import sys

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
