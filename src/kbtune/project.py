"""The composition root: `open_project(overrides)` turns Hydra overrides into a ready Project (validated
settings, the store, the knowledge base, the services, the worker control). scripts/, the CLI, the API,
the worker and the notebooks all start here; the process environment is set here, once."""

from __future__ import annotations

import logging
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

from kbtune.configuration import Runtime, TrainingPlan, load, load_runtime

logger = logging.getLogger(__name__)

# Offline by design and quiet in logs: no telemetry lookups, no per-file progress bars, no tokenizer
# threads competing with the training's (forked workers would deadlock them anyway).
ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Lightning's log lines that advertise products or report absent hardware: noise in every session log.
_NOISE = ("litlogger", "litmodels", "Tip:", "TPU available", "HPU available", "GPU available: False",
          "was configured so", "Loading `train_dataloader` to estimate")


def configure_environment(root: Path | None = None) -> None:
    """Environment defaults for this process and its children (a user's own settings win)."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("KBTUNE_ROOT", str(root or Path.cwd()))
    # Libraries' deprecation notices are for their API's users (us), not for kbtune's users.
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def child_environment() -> dict[str, str]:
    configure_environment()
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(marker in message for marker in _NOISE)


def configure_logging(level: int = logging.INFO) -> None:
    """For entry points only (importing kbtune configures nothing). Under Hydra, whose job logging
    already configured the handlers, this only quiets them."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("", "pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())
    for name in ("httpx", "alembic", "chromadb.telemetry", "urllib3", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # transformers draws a bar per file it writes or loads: noise in a session's log.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class Project:
    """One project (a store, a KB, a sessions folder) and the services over it, built on first use so
    a status read never loads torch and a config check never creates a store."""

    def __init__(self, config: dict[str, Any], runtime: Runtime, overrides: list[str] | None = None):
        self.config = config
        self.runtime = runtime
        self.overrides = list(overrides or [])

    @classmethod
    def from_config(cls, cfg: Any, overrides: list[str] | None = None) -> Project:
        from kbtune.hydra_entry import to_container

        data = to_container(cfg)
        return cls(data, load_runtime(data), overrides)

    def plan(self) -> TrainingPlan:
        """The validated training settings of this config (ConfigError lists every problem)."""
        from kbtune.updates.base import resolve_update

        return resolve_update(self, load(self.config)[0])

    # -- collaborators -------------------------------------------------------------------------------
    @cached_property
    def store(self) -> Any:
        from kbtune.tracking.mlflow_store import MlflowStore

        t = self.runtime.tracking
        self.check_store()
        if t.uri.startswith("sqlite:"):
            Path(t.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        logger.info("tracking store: %s (experiment %r)", t.uri, t.experiment)
        return MlflowStore(t.uri, t.experiment, t.registered_model, t.artifact_location)

    def check_store(self) -> None:
        """StoreUnavailable (naming tracking.uri) within seconds unless the store answers; creates nothing."""
        from kbtune.tracking.reachability import check_store

        check_store(self.runtime.tracking.uri, self.runtime.tracking.experiment)

    @cached_property
    def kb(self) -> Any:
        from kbtune.knowledge_base import KnowledgeBase

        return KnowledgeBase.connect(self.runtime.kb)

    @cached_property
    def manager(self) -> Any:
        from kbtune.model_manager import ModelManager

        return ModelManager(self.store, self.runtime.cache_dir)

    @cached_property
    def service(self) -> Any:
        from kbtune.service import TrainingService
        from kbtune.session_files import SessionLayout

        return TrainingService(self.kb, self.store, self.manager, SessionLayout(self.runtime.sessions_dir),
                               self.runtime.cache_dir, self._session_loggers)  # fmt: skip

    def promotion(self) -> Any:
        """Alias changes gated on knowledge (kbtune promote, the API's promote route)."""
        from kbtune.knowledge.evaluation import KnowledgeEvaluation
        from kbtune.knowledge.promotion import GatedPromotion

        return GatedPromotion(self.store, self.manager, KnowledgeEvaluation(self.kb, self.store, self.manager))

    def control(self, max_running: int = 1, as_defaults: bool = False) -> Any:
        """Worker control over this project's sessions. Its base overrides are composed under every
        start request and passed to workers to find the store: by default the ones that locate the
        store (the CLI); `as_defaults`: all of this project's (a server's overrides are the defaults of
        its requests). The training settings themselves travel in the session record."""
        from kbtune.worker_control import WorkerControl

        base = self.overrides if as_defaults else [
            o for o in self.overrides if o.lstrip("+~").startswith(("paths.", "tracking.", "tracking="))
        ]  # fmt: skip
        return WorkerControl(self.store, self.runtime.sessions_dir, base, max_running)

    def _session_loggers(self, session_id: str) -> list[Any]:
        from pytorch_lightning.loggers import MLFlowLogger

        t = self.runtime.tracking
        return [MLFlowLogger(experiment_name=t.experiment, tracking_uri=t.uri, run_id=session_id)]

    # -- the knowledge base ----------------------------------------------------------------------------
    def ensure_sample_kb(self) -> None:
        from kbtune.ingestion import ensure_sample_kb

        ensure_sample_kb(self.kb, self.runtime.sample_corpus)

    def check_collection(self) -> None:
        """KnowledgeBaseError (naming the ingest command) unless the collection exists or is the
        sample, which is created on first use."""
        from kbtune.knowledge_base import SAMPLE_COLLECTION

        kb = self.kb  # connecting checks the store itself (locked, corrupted), the sample's too
        if self.runtime.kb.collection != SAMPLE_COLLECTION:
            kb.count()

    def prepare(self, plan: TrainingPlan) -> Any:
        """Prepared data for `plan` (cached by content): DataError before any session exists."""
        from kbtune.service import TrainingService

        self.ensure_sample_kb()
        return TrainingService.prepare_with(self.kb, plan, self.runtime.cache_dir)


def open_project(overrides: list[str] | None = None, config_name: str = "train") -> Project:
    """Compose conf/<config_name>.yaml with `overrides` into a Project (ConfigError if invalid)."""
    from kbtune.hydra_entry import compose

    configure_environment()
    return Project.from_config(compose(overrides, config_name), overrides)
