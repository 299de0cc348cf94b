"""The seed's TrainingService: prepare data, train (one session each), evaluate; every entry point
(scripts, CLI, API worker, notebooks) goes through it."""

from __future__ import annotations

import logging
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kbtune.data.preparation import DataPreparation, DataSettings, PreparedData
from kbtune.distributed import RankZeroHandoff, handoff_to_other_ranks, is_rank_zero
from kbtune.knowledge_base import KnowledgeBase
from kbtune.model_manager import MODEL_ARTIFACT, MODEL_TAG, ModelManager, save_model_dir
from kbtune.modeling.factory import ModelSpec, TokenizerProvider
from kbtune.modeling.optim import OptimSettings
from kbtune.records import SessionStatus, TrainingSession
from kbtune.tracking.store import SessionStore
from kbtune.training_loop import CallbackSettings, TrainerSettings, TrainingLoop

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "kbtune.checkpoint_dir"
MANIFEST_TAG = "kbtune.manifest_key"


class StopRequested(Exception):
    """Raised inside a worker when a graceful stop was asked for (never escapes the service)."""


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
    seed: int = 42
    register: bool = True
    version: str | None = None
    ckpt_path: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    save_merged: bool = False


@dataclass
class TrainOutcome:
    session: TrainingSession
    version: Any = None
    prepared: PreparedData | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _error_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4)
    return f"{type(exc).__name__}: {exc}\n\n" + "".join(tb)


class TrainingService:
    def __init__(
        self,
        kb: KnowledgeBase,
        store: SessionStore,
        model_manager: ModelManager,
        sessions_dir: Path,
        cache_dir: Path,
        logger_factory: Callable[[str], list[Any]] | None = None,
    ):
        self.kb = kb
        self.store = store
        self.model_manager = model_manager
        self.sessions_dir = Path(sessions_dir)
        self.cache_dir = Path(cache_dir)
        # Builds the Lightning loggers bound to a session's run (the pipeline passes MLflow's).
        self.logger_factory = logger_factory or (lambda session_id: [])

    def session_dir(self, session_id: str) -> Path:
        return self.sessions_dir / session_id

    # -- the seed's three methods -------------------------------------------------------------------
    def prepare_training_data(self, plan: TrainingPlan) -> DataPreparation:
        """Collect, clean, format, split, tokenize and pack (or load from cache). Raises DataError
        before any session exists when the KB cannot produce a dataset."""
        return self.prepare_with(self.kb, plan, self.cache_dir)

    @staticmethod
    def prepare_with(kb: KnowledgeBase, plan: TrainingPlan, cache_dir: Path) -> DataPreparation:
        preparation = DataPreparation(kb, plan.data, TokenizerProvider(plan.model, cache_dir))
        preparation.prepare_dataset()
        return preparation

    def train_model(
        self,
        plan: TrainingPlan,
        session_id: str | None = None,
        extra_callbacks: list[Any] | None = None,
        preparation: DataPreparation | None = None,
        on_session: Callable[[TrainingSession], None] | None = None,
    ) -> TrainOutcome:
        """Train one session. With `session_id` of an existing pending session it runs that one; of a
        stopped/failed session it resumes from its last checkpoint in the same session.
        In a multi-process run (trainer=ddp/fsdp) only rank zero creates and updates records."""
        if plan.register and plan.version is not None:
            # A taken label would only fail after the whole training; refuse before any session exists.
            taken = next((v for v in self.model_manager.get_model_versions() if v.version == plan.version), None)
            if taken is not None:
                raise FileExistsError(f"version: label {plan.version!r} is already taken (version {taken.id}); choose another label")
        preparation = preparation or self.prepare_training_data(plan)
        prepared = preparation.prepare_dataset()
        # The tokenizer is built during preparation; the spec learns its vocabulary size from it.
        spec = preparation.tokenizer_factory.resolved_spec()  # type: ignore[attr-defined]
        if not is_rank_zero():
            return self._train_other_rank(plan, spec, preparation, extra_callbacks)
        ckpt_path = plan.ckpt_path
        if session_id is None:
            session = self.store.create_session(plan.config, plan.run_name, plan.tags)
        else:
            session = self.store.get_session(session_id)
            if session.status in (SessionStatus.STOPPED, SessionStatus.FAILED):
                last = self.session_dir(session.id) / "checkpoints" / "last.ckpt"
                ckpt_path = str(last) if last.exists() else None
                logger.info("resuming session %s from %s", session.id, ckpt_path or "the start (no checkpoint)")
            elif session.status is not SessionStatus.PENDING:
                raise ValueError(f"session {session.id} is {session.status.value}; only pending, stopped or failed sessions can run")
        if on_session:
            on_session(session)
        directory = self.session_dir(session.id)
        checkpoint_dir = directory / "checkpoints"
        try:
            self.store.update_session(session.id, status=SessionStatus.RUNNING, error="")
            self.store.set_tags(session.id, {CHECKPOINT_TAG: str(checkpoint_dir), MANIFEST_TAG: prepared.manifest["cache_key"]})
            self._log_data(session.id, prepared)
            module, loop, result = self._fit(plan, spec, preparation, session.id, ckpt_path, extra_callbacks)
            module = self._gather_for_saving(loop, module, spec, plan)
            stopped = result.interrupted or bool(getattr(loop.trainer, "kbtune_stop_requested", False))
            self._log_plots(session.id)
            if stopped:
                session = self.store.update_session(
                    session.id, status=SessionStatus.STOPPED, completed_at=datetime.now(timezone.utc)
                )
                logger.info("session %s stopped at step %d; resume it to continue", session.id, result.global_step)
                return TrainOutcome(session, prepared=prepared, extra={"result": result})
            self._save_final_model(session.id, module, prepared, spec, plan)
            session = self.store.update_session(
                session.id, status=SessionStatus.COMPLETED, completed_at=datetime.now(timezone.utc)
            )
            version = None
            if plan.register:
                version = self.model_manager.save_model(plan.version, session.id, session.metrics)
            logger.info("session %s completed: %s", session.id, {k: round(v, 4) for k, v in (session.metrics or {}).items() if "/" in k})
            return TrainOutcome(session, version, prepared, extra={"result": result})
        except StopRequested as exc:
            # A graceful stop (kbtune.progress): last.ckpt was written between two optimizer steps.
            session = self.store.update_session(session.id, status=SessionStatus.STOPPED, completed_at=datetime.now(timezone.utc))
            logger.info("session %s %s; resume it to continue", session.id, exc)
            return TrainOutcome(session, prepared=prepared)
        except KeyboardInterrupt:
            self.store.update_session(session.id, status=SessionStatus.STOPPED, completed_at=datetime.now(timezone.utc))
            raise
        except Exception as exc:
            # Lightning turns SIGTERM (e.g. a scheduler preempting the job) into SIGTERMException:
            # the work so far is intact, so the session is stopped, not failed.
            status = SessionStatus.STOPPED if type(exc).__name__ == "SIGTERMException" else SessionStatus.FAILED
            self.store.update_session(
                session.id, status=status, error=_error_text(exc), completed_at=datetime.now(timezone.utc)
            )
            raise
        except BaseException as exc:
            self.store.update_session(
                session.id, status=SessionStatus.FAILED, error=_error_text(exc), completed_at=datetime.now(timezone.utc)
            )
            raise

    def _fit(self, plan: TrainingPlan, spec: ModelSpec, preparation: DataPreparation, session_id: str,
             ckpt_path: str | None, extra_callbacks: list[Any] | None) -> tuple[Any, TrainingLoop, Any]:  # fmt: skip
        import pytorch_lightning as pl

        from kbtune.data.datamodule import KBDataModule
        from kbtune.modeling.module import CausalLMModule

        pl.seed_everything(plan.seed, workers=True, verbose=False)
        module = CausalLMModule(spec.to_dict(), plan.optim.__dict__)
        datamodule = KBDataModule(preparation, plan.data.batch_size, seed=plan.seed)
        loop = TrainingLoop(plan.trainer, plan.callbacks, self.session_dir(session_id) / "checkpoints")
        # DDP/FSDP launch the other ranks inside fit(); they inherit this session from the environment.
        data_key = preparation.prepare_dataset().manifest["cache_key"]
        if plan.trainer.strategy != "auto":
            logger.info("other ranks join with KBTUNE_SESSION_ID=%s KBTUNE_DATA_KEY=%s", session_id, data_key)
        with handoff_to_other_ranks(session_id, ckpt_path, data_key):
            result = loop.train(module, datamodule, self.logger_factory(session_id), ckpt_path, extra_callbacks)
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
        module, loop, result = self._fit(plan, spec, preparation, handoff.session_id, handoff.ckpt_path, extra_callbacks)
        self._gather_for_saving(loop, module, spec, plan)
        return TrainOutcome(self.store.get_session(handoff.session_id), prepared=prepared, extra={"result": result})

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

        full = CausalLMModule(spec.to_dict(), plan.optim.__dict__)
        full.load_state_dict(state)
        return full

    def evaluate_model(self, version: str, settings: Any = None) -> dict[str, float]:
        from kbtune.evaluation import EvalSettings, ModelEvaluation

        evaluation = ModelEvaluation(self.kb, self.store, self.model_manager, self.cache_dir)
        return evaluation.evaluate(version, settings or EvalSettings())

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
        import json

        m = prepared.manifest
        self.store.log_text(session_id, json.dumps(m, indent=1), "data/manifest.json")
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

    def _save_final_model(self, session_id: str, module: Any, prepared: PreparedData, spec: ModelSpec, plan: TrainingPlan) -> None:
        staging = self.session_dir(session_id) / "model"
        if staging.exists():
            shutil.rmtree(staging)
        model = module.model
        if spec.lora is not None:
            from kbtune.modeling.lora import export_for_saving

            model = export_for_saving(model, merge=plan.save_merged)
        save_model_dir(model, prepared.tokenizer, spec.to_dict(), staging)
        uri = self.store.log_artifacts(session_id, staging, MODEL_ARTIFACT)
        self.store.set_tags(session_id, {MODEL_TAG: uri})
        # The artifact store now holds the model; the staging copy would only duplicate it.
        shutil.rmtree(staging, ignore_errors=True)
