"""SessionStore on MLflow: a session is a run, a model version is a registered model version. The only
module that touches MLflow's types; it hides the differences between the SQLite store under `mlruns/`
and an `mlflow server` (version numbers int vs str, aliases missing from `search_model_versions`)."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from kbtune.records import ModelVersion, SessionStatus, TrainingSession
from kbtune.tracking import run_schema as rs
from kbtune.tracking.store import SWEEP_TAG, NotFoundError, available_versions, next_auto_label

logger = logging.getLogger(__name__)

class MlflowStore:
    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "kbtune",
        registered_model: str = "kbtune",
        artifact_location: str | None = None,
    ):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.registered_model = registered_model
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._artifact_location = artifact_location
        self._experiment_id: str | None = None

    # -- experiment / registered model ----------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=self._artifact_location
                    )
                except Exception:  # created concurrently by another process
                    exp = self.client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.registered_model)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    self.registered_model, description="Models trained by kbtune on a knowledge base"
                )
            except MlflowException:
                self.client.get_registered_model(self.registered_model)  # created concurrently

    # -- sessions -------------------------------------------------------------------------------
    def create_session(
        self, config: dict[str, Any], run_name: str | None = None, tags: dict[str, str] | None = None
    ) -> TrainingSession:
        from mlflow.entities import Param

        tags = {**(tags or {}), rs.STATUS_TAG: SessionStatus.PENDING.value}
        if rs.GIT_COMMIT_TAG in tags:
            tags[rs._GIT_COMMIT_UI_TAG] = tags[rs.GIT_COMMIT_TAG]
        parent = self._sweep_run(tags[SWEEP_TAG]) if tags.get(SWEEP_TAG) else None
        if parent is not None:
            tags[rs._PARENT_RUN_TAG] = parent
            self.client.update_run(parent, status="RUNNING")
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        self.client.update_run(run_id, status=rs._RUN_STATUS[SessionStatus.PENDING])
        self.client.log_text(run_id, json.dumps(config, indent=2, sort_keys=True), rs.CONFIG_ARTIFACT)
        params = [Param(k, v) for k, v in rs.flatten(config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[start : start + 100])
        logger.info("session %s created (run %r in experiment %r)", run_id, run.info.run_name, self.experiment_name)
        return self.get_session(run_id)

    def _sweep_run(self, sweep: str) -> str | None:
        """The parent run that nests a sweep's sessions in the MLflow UI, created with the first one.
        Two jobs starting at once may both create it: the oldest is kept and the other deleted."""
        if "'" in sweep:  # cannot be quoted in a search filter; the sessions still share the sweep tag
            return None
        query = f"tags.`{rs.SWEEP_PARENT_TAG}` = '{sweep}'"

        def oldest() -> Any:
            found = self.client.search_runs(
                [self.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"], max_results=1
            )
            return found[0] if found else None

        existing = oldest()
        if existing is not None:
            return existing.info.run_id
        name = "sweep " + "/".join(Path(sweep).parts[-2:])
        run = self.client.create_run(self.experiment_id, run_name=name, tags={SWEEP_TAG: sweep, rs.SWEEP_PARENT_TAG: sweep})
        winner = oldest()
        if winner.info.run_id != run.info.run_id:
            self.client.delete_run(run.info.run_id)
        logger.info("sweep %s groups its sessions under run %s", sweep, winner.info.run_id)
        return winner.info.run_id

    def _run(self, session_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(session_id)
        except MlflowException as exc:
            raise NotFoundError(f"training session {session_id!r} not found") from exc
        if run.info.experiment_id != self.experiment_id:
            raise NotFoundError(f"training session {session_id!r} not found in experiment {self.experiment_name!r}")
        return run

    def _load_text(self, uri: str) -> str:
        # Not mlflow.artifacts.load_text: it resolves `mlflow-artifacts:` URIs against the global
        # tracking URI, not this store's server, and so fails over HTTP.
        import tempfile

        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=self.tracking_uri)
            return Path(path).read_text(encoding="utf-8")

    def _session(self, run: Any) -> TrainingSession:
        tags = run.data.tags
        status = SessionStatus(tags[rs.STATUS_TAG]) if rs.STATUS_TAG in tags else rs._FROM_RUN_STATUS.get(run.info.status, SessionStatus.FAILED)
        try:
            config = json.loads(self._load_text(f"{run.info.artifact_uri}/{rs.CONFIG_ARTIFACT}"))
        except Exception:  # a run not created by kbtune, or its artifact not written yet
            config = {}
        completed = tags.get(rs.COMPLETED_TAG)
        return TrainingSession(
            id=run.info.run_id,
            status=status,
            config=config,
            metrics=dict(run.data.metrics) or None,
            started_at=rs._dt(run.info.start_time),
            completed_at=datetime.fromisoformat(completed) if completed else None,
            error=tags.get(rs.ERROR_TAG) or None,  # "" is how a resumed session's old error is cleared
        )

    def get_session(self, session_id: str) -> TrainingSession:
        return self._session(self._run(session_id))

    def list_sessions(self, status: SessionStatus | None = None, limit: int = 1000) -> list[TrainingSession]:
        query = f"tags.`{rs.STATUS_TAG}` = '{SessionStatus(status).value}'" if status else ""
        runs: list[Any] = []
        token = None
        while len(runs) < limit:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                max_results=min(500, limit - len(runs)), page_token=token,
            )  # fmt: skip
            runs.extend(page)
            token = page.token
            if not token:
                break
        # Only kbtune's own runs (e.g. not a Hydra sweep's parent run) are sessions.
        return [self._session(r) for r in runs if rs.STATUS_TAG in r.data.tags]

    def update_session(
        self,
        session_id: str,
        status: SessionStatus | None = None,
        error: str | None = None,
        completed_at: datetime | None = None,
    ) -> TrainingSession:
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        run = self._run(session_id)
        tags: dict[str, str] = {}
        if error is not None:
            if len(error) > MAX_TAG_VAL_LENGTH:
                self.client.log_text(session_id, error, rs.ERROR_ARTIFACT)
                error = error[: MAX_TAG_VAL_LENGTH - 60] + f"\n...(truncated; full text in {rs.ERROR_ARTIFACT})"
            tags[rs.ERROR_TAG] = error
        if completed_at is not None:
            tags[rs.COMPLETED_TAG] = completed_at.isoformat()
        if status is not None:
            tags[rs.STATUS_TAG] = SessionStatus(status).value
        self.set_tags(session_id, tags)
        if status is not None:
            status = SessionStatus(status)
            if status.is_terminal:
                end = int((completed_at or datetime.now(timezone.utc)).timestamp() * 1000)
                self.client.set_terminated(session_id, status=rs._RUN_STATUS[status], end_time=end)
                parent = run.data.tags.get(rs._PARENT_RUN_TAG)
                if parent:  # the sweep is idle until its next session starts
                    self.client.set_terminated(parent, status="FINISHED", end_time=end)
            else:
                self.client.update_run(session_id, status=rs._RUN_STATUS[status])
        return self.get_session(session_id)

    def log_metrics(self, session_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(session_id, metrics=batch)

    def metric_history(self, session_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs in step order. A resumed session logs the steps after its last
        checkpoint again: each step keeps its latest value."""
        self._run(session_id)
        latest: dict[int, tuple[int, float]] = {}
        for m in self.client.get_metric_history(session_id, key):
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        return [(step, value) for step, (_, value) in sorted(latest.items())]

    def log_artifacts(self, session_id: str, local_dir: Path, artifact_path: str) -> str:
        self.client.log_artifacts(session_id, str(local_dir), artifact_path)
        return self.artifact_uri(session_id, artifact_path)

    def log_text(self, session_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(session_id, text, artifact_file)

    def read_text(self, session_id: str, artifact_file: str) -> str:
        return self._load_text(self.artifact_uri(session_id, artifact_file))

    def set_tags(self, session_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(session_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def get_tags(self, session_id: str) -> dict[str, str]:
        return dict(self._run(session_id).data.tags)

    def artifact_uri(self, session_id: str, artifact_path: str = "") -> str:
        base = self._run(session_id).info.artifact_uri
        return f"{base}/{artifact_path}" if artifact_path else base

    def system_metrics(self, session_id: str, interval_s: float = 5.0) -> Any:
        """Start sampling CPU, memory, disk (and GPU where present) into the session's run as
        `system/...` metrics; the caller calls `.finish()` on what it returns."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(session_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=self.tracking_uri)  # fmt: skip
        monitor.start()
        return monitor

    def log_input(self, session_id: str, name: str, digest: str, source: str, profile: dict[str, Any], schema: dict[str, Any]) -> None:
        """Record the prepared data as the run's input dataset (shown in the MLflow UI)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name, digest=digest, source_type="chroma", source=json.dumps({"uri": source}),
            schema=json.dumps(schema), profile=json.dumps(profile),
        )  # fmt: skip
        self.client.log_inputs(session_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])

    # -- model versions -------------------------------------------------------------------------
    def _version(self, mv: Any, aliases: dict[str, int] | None = None) -> ModelVersion:
        number = int(mv.version)  # int from SQLite, str over REST
        tags = dict(mv.tags or {})
        aliases = aliases if aliases is not None else self._aliases()
        return ModelVersion(
            id=str(number),
            version=tags.get(rs.LABEL_TAG) or f"v{number}",
            training_session_id=mv.run_id,
            metrics=json.loads(tags[rs.METRICS_TAG]) if rs.METRICS_TAG in tags else None,
            created_at=rs._dt(mv.creation_timestamp),
            source=mv.source,
            aliases=tuple(sorted(a for a, n in aliases.items() if n == number)),
        )

    def _aliases(self) -> dict[str, int]:
        # search_model_versions leaves aliases out on SQLite; the registered model always has them.
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(self.registered_model)
        except MlflowException:
            return {}
        return {alias: int(number) for alias, number in (rm.aliases or {}).items()}

    def _all_versions(self) -> list[Any]:
        out: list[Any] = []
        token = None
        while True:
            page = self.client.search_model_versions(
                f"name='{self.registered_model}'", max_results=200, page_token=token
            )
            out.extend(page)
            token = page.token
            if not token:
                return sorted(out, key=lambda mv: int(mv.version), reverse=True)

    def create_version(
        self, session_id: str, source: str, label: str | None, metrics: dict[str, float] | None
    ) -> ModelVersion:
        """Register `source` as a new version. Labels are unique: the registry's version numbers are
        allocated atomically, so of two versions racing for one label the lower number keeps it and
        the other is deleted again (lock-free, and works the same over REST)."""
        self._ensure_registered_model()
        tags = {rs.LABEL_TAG: label or ""}
        if metrics:
            tags[rs.METRICS_TAG] = json.dumps(metrics, sort_keys=True)
        mv = self.client.create_model_version(self.registered_model, source=source, run_id=session_id, tags=tags)
        number = int(mv.version)
        if label:
            rivals = [
                int(o.version)
                for o in self._all_versions()
                if (o.tags or {}).get(rs.LABEL_TAG) == label and int(o.version) != number
            ]
            if any(n < number for n in rivals):
                self.client.delete_model_version(self.registered_model, str(number))
                raise FileExistsError(f"model version label {label!r} already exists (version {min(rivals)})")
        else:
            self._claim_auto_label(number)
        return self.get_version(str(number))

    def _claim_auto_label(self, number: int) -> None:
        """v<k> after the highest automatic label. Two saves racing for one v<k>: the lower version
        number keeps it and the other takes the next (lock-free, like labels)."""
        for _ in range(100):
            others = [o for o in self._all_versions() if int(o.version) != number]
            label = next_auto_label([(o.tags or {}).get(rs.LABEL_TAG) or "" for o in others if int(o.version) < number])
            self.client.set_model_version_tag(self.registered_model, str(number), rs.LABEL_TAG, label)
            if not any((o.tags or {}).get(rs.LABEL_TAG) == label and int(o.version) < number for o in self._all_versions()):
                return

    def get_version(self, ref: str) -> ModelVersion:
        """`ref` is a label, a version number, `latest`, or an alias such as `champion`."""
        from mlflow.exceptions import MlflowException

        versions = self._all_versions()
        aliases = self._aliases()
        number: int | None = None
        if ref == "latest":
            number = int(versions[0].version) if versions else None
        elif ref in aliases:
            number = aliases[ref]
        elif ref.isdigit():
            number = int(ref)
        else:
            for mv in versions:
                if ((mv.tags or {}).get(rs.LABEL_TAG) or f"v{mv.version}") == ref:
                    number = int(mv.version)
                    break
        match = next((mv for mv in versions if int(mv.version) == number), None)
        if match is None:
            hint = available_versions([self._version(mv, aliases).version for mv in versions], list(aliases))
            raise NotFoundError(f"model version {ref!r} not found in {self.registered_model!r} (available: {hint})")
        try:
            return self._version(self.client.get_model_version(self.registered_model, str(number)), aliases)
        except MlflowException as exc:  # deleted between the listing and now
            raise NotFoundError(f"model version {ref!r} not found") from exc

    def list_versions(self) -> list[ModelVersion]:
        aliases = self._aliases()
        return [self._version(mv, aliases) for mv in self._all_versions()]

    def update_version_metrics(self, version_id: str, metrics: dict[str, float]) -> ModelVersion:
        current = self.get_version(version_id)
        merged = {**(current.metrics or {}), **metrics}
        self.client.set_model_version_tag(self.registered_model, current.id, rs.METRICS_TAG, json.dumps(merged, sort_keys=True))
        return self.get_version(current.id)

    def set_alias(self, version_id: str, alias: str) -> None:
        self.client.set_registered_model_alias(self.registered_model, alias, version_id)

    def set_version_tags(self, version_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.registered_model, str(version_id), key, value)

    def get_version_tags(self, version_id: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.registered_model, str(version_id)).tags or {})

    def download(self, uri: str, dst: Path | None = None) -> Path:
        """A local directory with the artifact's files: read in place for local stores, else downloaded."""
        import mlflow

        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            return Path(url2pathname(parsed.path))
        if dst is not None:
            dst.mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None, tracking_uri=self.tracking_uri))
