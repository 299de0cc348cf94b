"""The seed's TrainingService: prepare data, train (one session each), evaluate; every entry point
(scripts, CLI, API worker, notebooks) goes through it."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kbtune.configuration import ConfigError, TrainingPlan
from kbtune.data.preparation import DataPreparation, PreparedData
from kbtune.distributed import RankZeroHandoff, handoff_to_other_ranks, is_rank_zero
from kbtune.knowledge_base import KnowledgeBase
from kbtune.model_manager import MODEL_ARTIFACT, MODEL_TAG, ModelManager, save_model_dir
from kbtune.modeling.factory import ModelSpec, TokenizerProvider
from kbtune.records import SessionStatus, TrainingSession
from kbtune.session_files import SessionLayout
from kbtune.tracking.store import SessionStore
from kbtune.training_loop import TrainingLoop, resolve_attention

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "kbtune.checkpoint_dir"
MANIFEST_TAG = "kbtune.manifest_key"


class StopRequested(Exception):
    """Raised inside a training when a graceful stop was asked for (never escapes the service)."""


@dataclass
class TrainOutcome:
    session: TrainingSession
    version: Any = None
    prepared: PreparedData | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def schedule_problems(plan: TrainingPlan, preparation: DataPreparation) -> list[str]:
    """A step-count validation interval longer than an epoch, which Lightning refuses only once the
    session has started."""
    interval, trainer = plan.trainer.val_check_interval, plan.trainer
    if not isinstance(interval, int) or isinstance(interval, bool) or trainer.fast_dev_run:
        return []
    from kbtune.data.datamodule import train_batches

    # Each rank trains its share; devices=auto (or -1) on this machine's CPU is one process.
    world = (
        trainer.devices * trainer.num_nodes if isinstance(trainer.devices, int) and trainer.devices > 0 else 1
    )
    batches = train_batches(preparation, plan.data.batch_size, plan.seed, world)
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    if interval <= batches:
        return []
    return [f"trainer.val_check_interval: {interval} is more than the {batches} training batches of an epoch "
            f"(data.batch_size={plan.data.batch_size}); use at most {batches}, or a fraction of the epoch such as 0.5"]  # fmt: skip


class TrainingService:
    def __init__(
        self,
        kb: KnowledgeBase,
        store: SessionStore,
        model_manager: ModelManager,
        layout: SessionLayout,
        cache_dir: Path,
        logger_factory: Callable[[str], list[Any]] | None = None,
    ):
        self.kb = kb
        self.store = store
        self.model_manager = model_manager
        self.layout = layout
        self.cache_dir = Path(cache_dir)
        # Builds the Lightning loggers bound to a session's run (the project passes MLflow's).
        self.logger_factory = logger_factory or (lambda session_id: [])

    # -- the seed's three methods -------------------------------------------------------------------
    def prepare_training_data(self, plan: TrainingPlan) -> DataPreparation:
        """Collect, clean, format, split, tokenize and pack (or load from cache). Raises DataError
        before any session exists when the KB cannot produce a dataset."""
        return self.prepare_with(self.kb, plan, self.cache_dir)

    @staticmethod
    def prepare_with(kb: KnowledgeBase, plan: TrainingPlan, cache_dir: Path) -> DataPreparation:
        """The prepared data, and the checks only the data can answer (ConfigError before any session
        exists): the validation interval against the epoch's batches, and a checkpoint to start from
        against the model and block size this plan trains."""
        preparation = DataPreparation(kb, plan.data, TokenizerProvider(plan.model, cache_dir), cache_dir, plan.update)
        preparation.prepare_dataset()
        problems = schedule_problems(plan, preparation)
        if plan.ckpt_path and plan.ckpt_path != "last":
            from kbtune.checkpoints import start_problems

            spec = preparation.tokenizer_factory.resolved_spec()  # type: ignore[attr-defined]
            problems += start_problems(plan.ckpt_path, spec.to_dict(), plan.data.block_size)
        if problems:
            raise ConfigError(problems)
        return preparation

    def train_model(
        self,
        plan: TrainingPlan,
        session_id: str | None = None,
        extra_callbacks: list[Any] | None = None,
        preparation: DataPreparation | None = None,
    ) -> TrainOutcome:
        """Train one session from `plan.ckpt_path` (None: from the start). `session_id` runs that
        existing session (SessionRunner decides where it resumes); None creates one. In a
        multi-process run (trainer=ddp/fsdp) only rank zero creates and updates records."""
        if session_id is None:
            self.check_version_label(plan)
        preparation = preparation or self.prepare_training_data(plan)
        # The tokenizer is built during preparation; the spec learns its vocabulary size from it.
        spec = preparation.tokenizer_factory.resolved_spec()  # type: ignore[attr-defined]
        if not is_rank_zero():
            return self._train_other_rank(plan, spec, preparation, extra_callbacks)
        if session_id is None:
            session = self.store.create_session(plan.config, plan.run_name, plan.tags)
        else:
            session = self.store.get_session(session_id)
            if session.status not in (SessionStatus.PENDING, SessionStatus.STOPPED, SessionStatus.FAILED):
                raise ValueError(
                    f"session {session.id} is {session.status.value}; only pending, stopped or failed sessions can run"
                )
        try:
            return self._run_session(plan, spec, preparation, session.id, extra_callbacks)
        except StopRequested as exc:
            # A graceful stop (kbtune.progress): last.ckpt was written between two optimizer steps.
            session = self.store.update_session(session.id, status=SessionStatus.STOPPED, completed_at=_now())
            logger.info("session %s %s; resume it to continue", session.id, exc)
            return TrainOutcome(session, prepared=preparation.prepare_dataset())
        except BaseException as exc:
            self._record_end(session.id, exc)
            raise

    def check_version_label(self, plan: TrainingPlan) -> None:
        """A taken label would only fail after the whole training: refuse it before any session exists."""
        if not plan.register or plan.version is None:
            return
        taken = next((v for v in self.model_manager.get_model_versions() if v.version == plan.version), None)
        if taken is not None:
            raise FileExistsError(
                f"version: label {plan.version!r} is already taken (version {taken.id}); choose another label"
            )

    def outcome(self, session: TrainingSession) -> TrainOutcome:
        return TrainOutcome(session)

    def _record_end(self, session_id: str, exc: BaseException) -> None:
        """How a session that raised ends: Ctrl-C and SIGTERM (Lightning's SIGTERMException, e.g. a
        scheduler preempting the job) leave the work so far intact, so it is stopped; else failed."""
        from kbtune.session_runner import error_text

        stopped = isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "SIGTERMException"
        status = SessionStatus.STOPPED if stopped else SessionStatus.FAILED
        error = "" if isinstance(exc, KeyboardInterrupt) else error_text(exc)
        self.store.update_session(session_id, status=status, error=error, completed_at=_now())

    def _run_session(self, plan: TrainingPlan, spec: ModelSpec, preparation: DataPreparation, session_id: str,
                     extra_callbacks: list[Any] | None) -> TrainOutcome:  # fmt: skip
        prepared = preparation.prepare_dataset()
        files = self.layout.files(session_id)
        self.store.update_session(session_id, status=SessionStatus.RUNNING, error="")
        self.store.set_tags(
            session_id, {CHECKPOINT_TAG: str(files.checkpoints), MANIFEST_TAG: prepared.manifest["cache_key"]}
        )
        self._log_data(session_id, prepared)
        with self._system_metrics(session_id):
            module, loop, result = self._fit(plan, spec, preparation, session_id, extra_callbacks)
        module = self._gather_for_saving(loop, module, spec, plan)
        self._log_plots(session_id)
        if result.interrupted or getattr(loop.trainer, "kbtune_stop_requested", False):
            session = self.store.update_session(session_id, status=SessionStatus.STOPPED, completed_at=_now())
            logger.info(
                "session %s stopped at step %d; resume it to continue", session_id, result.global_step
            )
            return TrainOutcome(session, prepared=prepared, extra={"result": result})
        self._save_final_model(session_id, module, prepared, spec, plan)
        # A smoke test (trainer.fast_dev_run) proves the path works; its model is not a version.
        version = None
        if plan.register and not plan.trainer.fast_dev_run:
            # Registered before the session reads `completed`, so a client that sees it completed
            # finds its version (the knowledge evaluation below fills the version's figures in later).
            version = self.model_manager.save_model(
                plan.version, session_id, self.store.get_session(session_id).metrics
            )
            if prepared.manifest.get("update"):
                from kbtune.updates.lineage import record_lineage

                record_lineage(self.store, version, prepared.manifest["update"])
        session = self.store.update_session(session_id, status=SessionStatus.COMPLETED, completed_at=_now())
        if version is not None and self._evaluate_after_training(version, plan.eval, session_id):
            session, version = self.store.get_session(session_id), self.store.get_version(version.id)
        logger.info(
            "session %s completed: %s",
            session_id,
            {k: round(v, 4) for k, v in (session.metrics or {}).items() if "/" in k},
        )
        return TrainOutcome(session, version, prepared, extra={"result": result})

    @contextlib.contextmanager
    def _system_metrics(self, session_id: str) -> Iterator[None]:
        """CPU, memory (and GPU where present) of the training, sampled into the session's run."""
        start = getattr(self.store, "system_metrics", None)
        monitor = start(session_id) if start is not None else None
        try:
            yield
        finally:
            if monitor is not None:
                monitor.finish()

    def _fit(self, plan: TrainingPlan, spec: ModelSpec, preparation: DataPreparation, session_id: str,
             extra_callbacks: list[Any] | None) -> tuple[Any, TrainingLoop, Any]:  # fmt: skip
        import pytorch_lightning as pl

        from kbtune.data.datamodule import KBDataModule
        from kbtune.modeling.module import CausalLMModule

        pl.seed_everything(plan.seed, workers=True, verbose=False)
        attention = resolve_attention(plan.trainer, plan.data.block_size)
        module = CausalLMModule(
            spec.to_dict(), asdict(plan.optim), compile=plan.trainer.compile, attention=attention
        )
        datamodule = KBDataModule(preparation, plan.data.batch_size, seed=plan.seed)
        loop = TrainingLoop(plan.trainer, plan.callbacks, self.layout.files(session_id).checkpoints)
        # DDP/FSDP launch the other ranks inside fit(); they inherit this session from the environment.
        data_key = preparation.prepare_dataset().manifest["cache_key"]
        if plan.trainer.strategy != "auto":
            logger.info("other ranks join with KBTUNE_SESSION_ID=%s KBTUNE_DATA_KEY=%s", session_id, data_key)
        with handoff_to_other_ranks(session_id, plan.ckpt_path, data_key):
            result = loop.train(
                module, datamodule, self.logger_factory(session_id), plan.ckpt_path, extra_callbacks
            )
        return module, loop, result

    def _train_other_rank(self, plan: TrainingPlan, spec: ModelSpec, preparation: DataPreparation,
                          extra_callbacks: list[Any] | None) -> TrainOutcome:  # fmt: skip
        """A rank other than zero: train under rank zero's session, write no record."""
        handoff = RankZeroHandoff.from_env()
        prepared = preparation.prepare_dataset()
        if handoff.data_key and handoff.data_key != prepared.manifest["cache_key"]:
            # Every rank prepares its own copy; they must be the same blocks or the shards overlap.
            raise RuntimeError(
                f"this rank prepared data {prepared.manifest['cache_key']} but rank zero trains on "
                f"{handoff.data_key}: the knowledge base changed while the ranks started; start the run again"
            )
        plan = replace(plan, ckpt_path=handoff.ckpt_path)
        module, loop, result = self._fit(plan, spec, preparation, handoff.session_id, extra_callbacks)
        self._gather_for_saving(loop, module, spec, plan)
        return TrainOutcome(
            self.store.get_session(handoff.session_id), prepared=prepared, extra={"result": result}
        )

    @staticmethod
    def _gather_for_saving(loop: TrainingLoop, module: Any, spec: ModelSpec, plan: TrainingPlan) -> Any:
        """The trained module with whole parameters. FSDP leaves each rank a shard: gather the full
        state (a collective every rank joins) into a fresh module on rank zero."""
        strategy = loop.trainer.strategy
        if type(strategy).__name__ != "FSDPStrategy":
            return module
        state = strategy.lightning_module_state_dict()
        if not loop.trainer.is_global_zero:
            return None
        from kbtune.modeling.module import CausalLMModule

        full = CausalLMModule(spec.to_dict(), asdict(plan.optim))
        full.load_state_dict(state)
        return full

    def evaluate_knowledge(self, version: str, settings: Any = None, record: bool = True) -> Any:
        """Did `version` learn its KB? Fact probes from its session's documents, scored for the version
        and its starting model (recall of trained and held-out facts, forgetting, a per-document report)."""
        from kbtune.knowledge.evaluation import KnowledgeEvaluation

        return KnowledgeEvaluation(self.kb, self.store, self.model_manager).evaluate(
            version, settings, record
        )

    def _evaluate_after_training(self, version: Any, settings: Any, session_id: str) -> bool:
        if settings is None or not settings.after_training:
            return False
        self.layout.files(session_id).update_phase("evaluating")
        try:
            self.evaluate_knowledge(version.id, settings)
            return True
        except Exception:
            # The trained model and its version are recorded; a failed evaluation must not undo that.
            logger.warning("session %s: the knowledge evaluation failed (run scripts/evaluate.py version=%s)",
                           session_id, version.version, exc_info=True)  # fmt: skip
            return False

    def evaluate_model(self, version: str, settings: Any = None, record: bool = True) -> dict[str, float]:
        """Score `version` on its session's held-out documents; `record`: store the figures on the
        version and its session (a notebook that only looks passes False)."""
        from kbtune.evaluation import EvalSettings, ModelEvaluation

        evaluation = ModelEvaluation(self.kb, self.store, self.model_manager, self.cache_dir)
        return evaluation.evaluate(version, settings or EvalSettings(), record=record)

    # -- helpers --------------------------------------------------------------------------------
    def _log_plots(self, session_id: str) -> None:
        from kbtune.plots import log_training_plots

        try:
            log_training_plots(self.store, session_id)
        except Exception:
            # The plots only redraw metrics the store already holds: failing to render them must
            # not cost the session its trained model.
            logger.warning("session %s: could not log the training plots", session_id, exc_info=True)

    def _log_data(self, session_id: str, prepared: PreparedData) -> None:
        m = prepared.manifest
        self.store.log_text(session_id, prepared.manifest_text(), "data/manifest.json")
        self.store.set_tags(session_id, {"kbtune.collection": m["collection"], "kbtune.kb": m["kb"]})
        log_input = getattr(self.store, "log_input", None)
        if log_input is not None:
            log_input(
                session_id,
                name=f"{m['collection']}@{m['cache_key'][:8]}",
                digest=m["cache_key"][:36],
                source=m["kb"],
                profile={"documents": m["document_count"], **{f"{k}_blocks": v["blocks"] for k, v in m["splits"].items()},
                         **{f"{k}_tokens": v["tokens"] for k, v in m["splits"].items()}},
                schema={"input_ids": f"int32[{m['settings']['block_size']}]"},
            )  # fmt: skip

    def _save_final_model(
        self, session_id: str, module: Any, prepared: PreparedData, spec: ModelSpec, plan: TrainingPlan
    ) -> None:
        staging = self.layout.files(session_id).model_staging
        model = module.model
        if spec.lora is not None:
            from kbtune.modeling.lora import export_for_saving

            model = export_for_saving(model, merge=plan.save_merged)
        save_model_dir(model, prepared.tokenizer, spec.describing(module.model).to_dict(), staging)
        try:
            uri = self.store.log_artifacts(session_id, staging, MODEL_ARTIFACT)
        except Exception as exc:
            raise self._upload_failed(session_id, exc) from exc
        finally:
            # The artifact store now holds the model (or refused it): the staging copy only takes space.
            shutil.rmtree(staging, ignore_errors=True)
        self.store.set_tags(session_id, {MODEL_TAG: uri})

    def _upload_failed(self, session_id: str, exc: Exception) -> Exception:
        """A model copy into the artifact store that failed (a full disk) leaves a truncated file: remove
        it and name the destination. A remote store's partial upload cannot be removed from here; no tag
        points at it, so no version can be registered from it."""
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        from kbtune.atomic_files import failure

        destination = self.store.artifact_uri(session_id, MODEL_ARTIFACT)
        parsed = urlparse(destination)
        if parsed.scheme in ("", "file"):
            destination = url2pathname(parsed.path)
            shutil.rmtree(destination, ignore_errors=True)
        if isinstance(exc, shutil.Error) and exc.args and exc.args[0]:
            exc = OSError(str(exc.args[0][0][2]))  # copytree's list of (source, destination, reason)
        # A failed copy names its destination file (shutil sets it), else the folder is named.
        return failure(Path(getattr(exc, "filename2", None) or destination), exc)
