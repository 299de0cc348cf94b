"""Settings and their validation: a resolved config (plain dicts) becomes the typed settings of a
training (TrainingPlan) and of the project around it (Runtime). Every problem is gathered into one
ConfigError, each naming the key the user types to fix it. No Hydra here (see hydra_entry)."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kbtune.data.preparation import DataSettings
from kbtune.knowledge_base import KBSettings
from kbtune.modeling.factory import LoraSpec, ModelSpec
from kbtune.modeling.optim import OptimSettings
from kbtune.settings_base import settings
from kbtune.training_loop import CallbackSettings, TrainerSettings, cuda_available, precision_problems


class ConfigError(ValueError):
    """Every problem found in a config. Each problem reads `<key>: <what is wrong>`, where <key> is the
    config key to change (`problem_key` reads it back, e.g. for the API to point at a form field)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def problem_key(problem: str) -> str:
    return problem.split(":", 1)[0].strip()


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by input the user can fix: reported as one message, never as a traceback."""
    from kbtune.atomic_files import WriteFailed
    from kbtune.checkpoints import CheckpointError
    from kbtune.data.preparation import DataError
    from kbtune.knowledge_base import KnowledgeBaseError
    from kbtune.model_manager import VersionLabelError
    from kbtune.modeling.factory import ModelError
    from kbtune.tracking.store import NotFoundError
    from kbtune.training_loop import NonFiniteLoss

    return (ConfigError, DataError, KnowledgeBaseError, ModelError, NotFoundError, VersionLabelError,
            FileExistsError, WriteFailed, CheckpointError, NonFiniteLoss)  # fmt: skip


@settings
class TrackingSettings:
    uri: str
    experiment: str = "kbtune"
    registered_model: str = "kbtune"
    artifact_location: str | None = None

    def validate(self) -> list[str]:
        if self.uri.startswith("sqlite:") and not self.uri.startswith("sqlite:////"):
            return [
                f"tracking.uri: a SQLite store needs an absolute path (sqlite:////abs/path.db), got {self.uri}"
            ]
        return []


@settings
class PathSettings:
    """Where kbtune reads and writes (conf/paths): every other path interpolates from `root`."""

    root: str
    data_dir: str
    cache_dir: str
    sessions_dir: str
    mlruns: str


@settings
class RunSettings:
    """The top-level keys of conf/train.yaml: what to do with the session and its model."""

    seed: int = 42
    register: bool = True
    version: str | None = None
    resume: str | None = None
    ckpt_path: str | None = None
    run_name: str | None = None
    save_merged: bool = False
    # experiment=update: start from this version and train on what changed in the KB since its data.
    base_version: str | None = None

    def validate(self) -> list[str]:
        from kbtune.model_manager import VersionLabelError, validate_label

        if self.version is None:
            return []
        try:
            validate_label(self.version)
        except VersionLabelError as exc:
            return [f"version: {exc}"]
        return []


@dataclass(frozen=True)
class Runtime:
    """Settings that are not the training itself: where things live and how to reach them."""

    kb: KBSettings
    tracking: TrackingSettings
    root: Path
    sessions_dir: Path
    cache_dir: Path
    sample_corpus: Path | None


@dataclass(frozen=True)
class TrainingPlan:
    """A validated training request: every setting as a plain value, plus the resolved config dict
    that is stored with the session."""

    data: DataSettings
    model: ModelSpec
    optim: OptimSettings
    trainer: TrainerSettings
    callbacks: CallbackSettings
    config: dict[str, Any]
    eval: Any = None  # EvalSettings (kbtune.evaluation): what runs when the session completes
    seed: int = 42
    register: bool = True
    version: str | None = None
    ckpt_path: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    save_merged: bool = False
    base_version: str | None = None
    update: Any = None  # UpdateBase (kbtune.updates), resolved from base_version by the project


def _tuples(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    # YAML and JSON have lists only; a settings tuple accepts exactly those.
    hints = typing.get_type_hints(cls)
    return {
        k: tuple(v) if isinstance(v, list) and typing.get_origin(hints.get(k)) is tuple else v
        for k, v in values.items()
    }


def parse(cls: type, values: dict[str, Any] | None, prefix: str, problems: list[str], **extra: Any) -> Any:
    """Build settings class `cls` from config section `prefix`, adding every problem (unknown key, wrong
    type, non-finite number, the class's own `validate`) to `problems`; None if it cannot be built."""
    values = _tuples(cls, dict(values or {}))
    try:
        obj = cls(**values, **extra)
    except ValidationError as exc:
        known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        for error in exc.errors():
            key = ".".join(part for part in [prefix, *(str(loc) for loc in error["loc"])] if part)
            if error["type"] == "unexpected_keyword_argument":
                problems.append(f"{key}: unknown key (known: {known})")
            else:
                problems.append(f"{key}: {error['msg'].lower()}, got {error.get('input')!r}")
        return None
    problems.extend(obj.validate() if hasattr(obj, "validate") else [])
    return obj


def runtime_from(data: dict[str, Any], problems: list[str]) -> Runtime | None:
    kb_values = dict(data.get("kb") or {})
    sample = kb_values.pop("sample_corpus", None)
    kb = parse(KBSettings, kb_values, "kb", problems)
    tracking = parse(TrackingSettings, data.get("tracking"), "tracking", problems)
    paths = parse(PathSettings, data.get("paths"), "paths", problems)
    if kb is None or tracking is None or paths is None:
        return None
    return Runtime(kb=kb, tracking=tracking, root=Path(paths.root), sessions_dir=Path(paths.sessions_dir),
                   cache_dir=Path(paths.cache_dir), sample_corpus=Path(sample) if sample else None)  # fmt: skip


def plan_from(data: dict[str, Any], problems: list[str]) -> TrainingPlan | None:
    model_values = dict(data.get("model") or {})
    lora = model_values.pop("lora", None)
    lora_spec = parse(LoraSpec, lora, "model.lora", problems) if lora else None
    parts = {
        "model": parse(ModelSpec, model_values, "model", problems, lora=lora_spec),
        "optim": parse(OptimSettings, data.get("optim"), "optim", problems),
        "data": parse(DataSettings, data.get("data"), "data", problems),
        "trainer": parse(TrainerSettings, data.get("trainer"), "trainer", problems),
        "callbacks": parse(CallbackSettings, data.get("callbacks"), "callbacks", problems),
    }
    run = parse(RunSettings, {k: data[k] for k in RUN_KEYS if k in data}, "", problems)
    evaluation = parse_eval(data, problems)
    if any(part is None for part in parts.values()) or run is None:
        return None
    problems.extend(cross_problems(parts["model"], parts["data"], parts["trainer"]))
    if (parts["data"].replay_fraction or parts["data"].delta_repeat != 1) and not run.base_version:
        problems.append(
            "base_version: required with data.replay_fraction (experiment=update): the version to update, e.g. base_version=champion"
        )
    return TrainingPlan(**parts, config=data, eval=evaluation, seed=run.seed, register=run.register, version=run.version,
                        ckpt_path=run.ckpt_path, run_name=run.run_name, save_merged=run.save_merged,
                        base_version=run.base_version)  # fmt: skip


RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunSettings))


def parse_eval(data: dict[str, Any], problems: list[str]) -> Any:
    """The `eval` node (EvalSettings with its nested `eval.probes`)."""
    from kbtune.evaluation import EvalSettings
    from kbtune.knowledge.probes import ProbeSettings

    values = dict(data.get("eval") or {})
    probes = parse(ProbeSettings, values.pop("probes", None), "eval.probes", problems) or ProbeSettings()
    return parse(EvalSettings, values, "eval", problems, probes=probes)


def cross_problems(model: ModelSpec, data: DataSettings, trainer: TrainerSettings) -> list[str]:
    """Problems no single section shows: sizes that must agree, and what this machine cannot run."""
    problems = list(precision_problems(trainer))
    if trainer.precision == "bf16-true" and model.lora is None:
        # Lightning's bf16-true casts the weights to bf16 and the optimizer updates them there: an
        # update below bf16's resolution (~0.4% of a weight) is lost, so full fine-tuning stalls.
        problems.append(
            "trainer.precision: bf16-true updates bf16 weights with no fp32 master copy, so small updates "
            "are lost in full fine-tuning; use bf16-mixed (or auto), or finetune=lora"
        )
    if model.source == "scratch" and data.block_size > model.max_position:
        problems.append(
            f"data.block_size: {data.block_size} exceeds the model's model.max_position={model.max_position}"
        )
    problems.extend(local_model_problems(model, data))
    if trainer.strategy.startswith("fsdp") and (
        trainer.accelerator not in ("gpu", "cuda", "auto") or not cuda_available()
    ):
        problems.append(
            "trainer.strategy: fsdp shards the model over CUDA GPUs and cannot run on this machine's CPU; use trainer=ddp or trainer=default"
        )
    return problems


def local_model_problems(model: ModelSpec, data: DataSettings) -> list[str]:
    """What the model's own files rule out: a block longer than its context, LoRA targets it lacks,
    a chat template a scratch tokenizer cannot have."""
    from kbtune.modeling.factory import local_context_length, local_dir_problems

    problems = []
    if data.chat_template and model.source != "local":
        problems.append(
            "data.chat_template: needs the chat template of a local model's tokenizer (model=local model.path=DIR)"
        )
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


def load(data: dict[str, Any]) -> tuple[TrainingPlan, Runtime]:
    """Validate a resolved train config into (TrainingPlan, Runtime), or raise one ConfigError."""
    problems: list[str] = []
    runtime = runtime_from(data, problems)
    plan = plan_from(data, problems)
    if problems or plan is None or runtime is None:
        raise ConfigError(problems)
    return plan, runtime


def load_runtime(data: dict[str, Any]) -> Runtime:
    problems: list[str] = []
    runtime = runtime_from(data, problems)
    if problems or runtime is None:
        raise ConfigError(problems)
    return runtime


def load_session_plan(config: dict[str, Any]) -> tuple[TrainingPlan, Runtime]:
    """Rebuild the plan a session was started with, from its stored config (for resume)."""
    try:
        return load(json.loads(json.dumps(config)))
    except ConfigError as exc:
        raise ConfigError([f"stored session config: {p}" for p in exc.problems]) from exc
