"""The training REST API and web page (`kbtune serve`): the seed's `POST /start`, `GET /status` and
`POST /stop` under `/training`, the session and version listings, generation from a version, and the
page at `/`. Thin over WorkerControl (which runs each training in its own worker process) and the store."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kbtune import api_responses as docs
from kbtune.records import SessionStatus

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]
# MLflow run ids are hex; anything else cannot name a session (and never reaches a path).
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Each start setting and the config key it overrides. A ConfigError naming the key is reported on
# the field, with the same text the CLI prints.
FIELD_KEYS = {
    "model": "model",
    "max_epochs": "trainer.max_epochs",
    "max_steps": "trainer.max_steps",
    "learning_rate": "optim.learning_rate",
    "warmup_steps": "optim.warmup_steps",
    "batch_size": "data.batch_size",
    "block_size": "data.block_size",
    "collection": "kb.collection",
    "val_check_interval": "trainer.val_check_interval",
    "precision": "trainer.precision",
    "seed": "seed",
    "version": "version",
    "register": "register",
}
KEY_FIELDS = {key: name for name, key in FIELD_KEYS.items()}
# Advanced settings travel as command-line overrides; these would reach paths, the store, Hydra itself
# or another session, which a request may not choose.
_FORBIDDEN_OVERRIDES = ("hydra", "paths", "tracking", "kb.path", "kb.host", "kb.port", "kb.sample_corpus",
                        "model.path", "resume", "ckpt_path", "run_name")  # fmt: skip
_OVERRIDE = re.compile(r"^[+~]?([A-Za-z_][\w.]*)(@[\w.]+)?=(.*)\Z", re.DOTALL)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StartRequest(BaseModel):
    """A new training's settings (any left out keep the server's config), or `resume` alone."""

    # Strict: `"3"` is not an epoch count and `true` is not a batch size.
    model_config = ConfigDict(extra="forbid", strict=True)

    resume: str | None = Field(None, max_length=64)
    model: Literal["tiny", "small", "local"] | None = None
    max_epochs: int | None = None
    max_steps: int | None = None
    learning_rate: float | None = None
    warmup_steps: int | None = None
    batch_size: int | None = None
    block_size: int | None = None
    collection: str | None = Field(None, max_length=512)
    val_check_interval: int | float | None = None
    precision: str | None = Field(None, max_length=32)
    seed: int | None = None
    version: str | None = Field(None, max_length=200)
    # `register` itself would shadow BaseModel.register.
    register_version: bool | None = Field(None, alias="register")
    # Anything else the command line accepts, e.g. ["finetune=lora", "data=qa",
    # "trainer.accumulate_grad_batches=4"], validated like scripts/train.py's overrides.
    overrides: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("overrides")
    @classmethod
    def _overrides_allowed(cls, values: list[str]) -> list[str]:
        for value in values:
            match = _OVERRIDE.match(value)
            if match is None or len(value) > 500:
                raise ValueError(f"{value[:80]!r} is not an override of the form key=value")
            key = match.group(1)
            if key.split(".")[0] in _FORBIDDEN_OVERRIDES or key.startswith(_FORBIDDEN_OVERRIDES[3:]):
                raise ValueError(f"{key} cannot be set through the API (it locates files, the store or a session)")
            if re.search(r"\$\{|['\"\\]", match.group(3)) or any(ord(c) < 32 for c in value):
                raise ValueError(f"{key}: the value must not contain quotes, backslashes, '${{' or control characters")
        return values

    @field_validator("resume", "collection", "version", "precision")
    @classmethod
    def _plain_text(cls, value: str | None) -> str | None:
        # These become quoted Hydra overrides: no quotes or escapes to break out of them, and no
        # `${...}`, which OmegaConf would resolve (e.g. reading the server's environment).
        if value is not None and (re.search(r"['\"\\]|\$\{", value) or any(ord(c) < 32 for c in value)):
            raise ValueError("must not contain quotes, backslashes, '${' or control characters")
        return value

    @model_validator(mode="after")
    def _resume_alone(self) -> StartRequest:
        if self.resume is not None:
            others = [name for name in self.settings() if name != "resume"]
            if others:
                raise ValueError(
                    f"resume continues a session with its own config; leave out {', '.join(others)}"
                )
        return self

    def settings(self) -> dict[str, Any]:
        """The settings given, by their JSON names."""
        given = self.model_dump(by_alias=True, exclude_none=True)
        if not given.get("overrides"):
            given.pop("overrides", None)
        return given

    def to_overrides(self, local_model: str | None) -> list[str]:
        out: list[str] = []
        given = self.settings()
        for name, key in FIELD_KEYS.items():
            value = given.get(name)
            if value is None:
                continue
            if name == "model":
                out.append(f"model={value}")
                if value == "local":
                    if local_model is None:
                        raise ConfigErrorOnField(
                            "model",
                            "model: `local` needs the server started with --local-model DIR (the API takes no paths)",
                        )
                    out.append(f"model.path='{local_model}'")
            elif isinstance(value, bool):
                out.append(f"{key}={str(value).lower()}")
            elif isinstance(value, str):
                out.append(f"{key}='{value}'")
            else:
                out.append(f"{key}={value!r}")
        return [*out, *self.overrides]


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    alias: str = Field("champion", max_length=100)
    max_forgetting: float = Field(0.05, ge=0, le=10, allow_inf_nan=False)
    force: bool = False


class ConfigErrorOnField(ValueError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def _field_of(problem: str) -> str | None:
    """The form field a config problem belongs to; other keys came from `overrides`."""
    from kbtune.configuration import problem_key

    key = problem_key(problem)
    return KEY_FIELDS.get(key) or ("model" if key.startswith("model.") else "overrides")


def unprocessable(problems: list[tuple[str | None, str]]) -> JSONResponse:
    """422 in FastAPI's own shape, so the page shows config problems like pydantic's."""
    from kbtune.api_guard import short
    detail = [
        {"loc": ["body", field] if field else ["body"], "msg": short(msg), "type": "value_error.config"}
        for field, msg in problems
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


def create_app(
    overrides: list[str] | None = None,
    token: str | None = None,
    max_running: int = 1,
    local_model: str | None = None,
    allowed_hosts: list[str] | None = None,
    control: Any = None,
    promotion: Any = None,
    manager: Any = None,
) -> FastAPI:
    """The app over the store and sessions folder that `overrides` (the server's Hydra overrides)
    select (or `control`, a WorkerControl given directly, e.g. by tests, with the ModelManager that
    loads versions for generation as `manager`). `token`: require
    `Authorization: Bearer <token>` on every API route. `allowed_hosts`: answer only requests for these Host names (a loopback server's guard against DNS rebinding)."""
    from kbtune.api_guard import add_guards
    from kbtune.project import open_project

    project = None
    if control is None:
        project = open_project(list(overrides or []))
        control = project.control(max_running, as_defaults=True)
    local_model = str(Path(local_model).expanduser().resolve()) if local_model else None

    def require_token(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong API token (send Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    app = FastAPI(title="kbtune", description="Start, watch and stop trainings; list sessions and model "
                  "versions; generate text from a version.")  # fmt: skip
    app.state.control = control
    guarded = [Depends(require_token)]
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    _add_error_handlers(app)
    add_guards(app)
    _add_training_routes(app, control, guarded, local_model)
    _add_listing_routes(app, control, guarded, token, promotion or (project.promotion if project else None))
    _add_model_routes(app, control, guarded, manager or (project.manager if project else None))
    from kbtune.api_updates import add_update_routes

    add_update_routes(app, project, guarded)
    return app


def _add_model_routes(app: FastAPI, control: Any, guarded: list[Any], manager: Any) -> None:
    """Generation from a version (its own module: kbtune.api_generate), with this server's model cache."""
    from kbtune.api_generate import add_generation_routes, model_cache
    from kbtune.model_manager import ModelManager

    app.state.model_cache = model_cache()
    add_generation_routes(app, control.store, manager or ModelManager(control.store), app.state.model_cache, guarded)


def _add_error_handlers(app: FastAPI) -> None:
    """Domain errors as HTTP answers: unknown session or version 404, busy or conflicting 409."""
    from kbtune.tracking.store import NotFoundError
    from kbtune.worker_control import SessionConflict, TrainingBusy

    @app.exception_handler(NotFoundError)
    def not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        from kbtune.api_guard import short

        return JSONResponse(status_code=404, content={"detail": short(str(exc))})  # ids come from the URL

    @app.exception_handler(TrainingBusy)
    def busy(request: Request, exc: TrainingBusy) -> JSONResponse:
        return JSONResponse(
            status_code=409, content={"detail": str(exc), "running_session_id": exc.session_id}
        )

    @app.exception_handler(SessionConflict)
    def session_conflict(request: Request, exc: SessionConflict) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})


def _session_id_ok(session_id: str | None) -> str | None:
    from kbtune.tracking.store import NotFoundError

    if session_id is not None and not _SESSION_ID.match(session_id):
        raise NotFoundError(f"training session {session_id!r} not found")
    return session_id


def _add_training_routes(app: FastAPI, control: Any, guarded: list[Any], local_model: str | None) -> None:
    """The seed's three routes: start, status, stop."""
    from kbtune.configuration import ConfigError
    from kbtune.knowledge_base import KnowledgeBaseError, KnowledgeBaseUnavailable
    from kbtune.tracking.reachability import StoreUnavailable

    @app.post("/training/start", status_code=201, dependencies=guarded, responses=docs.START)
    def start(request: StartRequest) -> Any:
        """Start a training in a worker process (or resume a stopped/failed session); returns the
        session with its progress. 409 while another training runs, 422 for invalid settings."""
        if request.resume is not None:
            session = control.resume(_session_id_ok(request.resume) or "")
            return control.describe(session)
        try:
            session = control.start(request.to_overrides(local_model), origin="api")
        except (KnowledgeBaseUnavailable, StoreUnavailable):
            raise  # the server's stores, not the request: 503 (api_guard)
        except ConfigErrorOnField as exc:
            return unprocessable([(exc.field, str(exc))])
        except ConfigError as exc:
            return unprocessable([(_field_of(p), p) for p in exc.problems])
        except KnowledgeBaseError as exc:
            return unprocessable([(_field_of(str(exc)), str(exc))])
        return control.describe(session)

    @app.get("/training/status", dependencies=guarded, responses=docs.STATUS)
    def status(session_id: str | None = None) -> Any:
        """The running session, else the most recent one (or `session_id`), with live progress."""
        return control.status(_session_id_ok(session_id))

    @app.post("/training/stop", dependencies=guarded, responses=docs.STOP)
    def stop(session_id: str | None = None) -> Any:
        """Ask the running session (or `session_id`) to stop after its current optimizer step, with a
        resumable checkpoint. Returns at once; the session reads `stopped` a moment later. A session
        that already ended is returned unchanged."""
        return control.describe(control.stop(_session_id_ok(session_id)))


def _add_listing_routes(app: FastAPI, control: Any, guarded: list[Any], token: str | None, promotion: Any) -> None:
    """Sessions, versions (their knowledge, gated promotion), health and the page."""
    store = control.store

    @app.get("/training/sessions", dependencies=guarded, responses=docs.SESSIONS)
    def sessions(
        status: Literal["pending", "running", "completed", "failed", "stopped"] | None = None,
        limit: int = Query(100, ge=1, le=1000),
    ) -> Any:
        found = store.list_sessions(SessionStatus(status) if status else None, limit=limit)
        return [control.reconcile(s).to_dict() for s in found]

    @app.get("/models/versions", dependencies=guarded, responses=docs.VERSIONS)
    def versions() -> Any:
        return [v.to_dict() for v in store.list_versions()]

    @app.get("/models/{version}/knowledge", dependencies=guarded, responses=docs.KNOWLEDGE)
    def knowledge(version: str) -> Any:
        """A version's knowledge figures and its worst-learned training documents (never loads weights)."""
        from kbtune.knowledge.evaluation import REPORT_ARTIFACT, worst_trained

        mv = store.get_version(version)
        try:
            documents = json.loads(store.read_text(mv.training_session_id, REPORT_ARTIFACT))
        except Exception:  # not evaluated yet
            documents = []
        figures = {k: v for k, v in (mv.metrics or {}).items() if k.startswith("knowledge/")}
        return {**mv.to_dict(), "knowledge": figures, "evaluated": bool(documents),
                "worst_trained": worst_trained(documents, 10)}  # fmt: skip

    @app.post("/models/{version}/promote", dependencies=guarded, responses=docs.PROMOTE)
    def promote(version: str, request: PromoteRequest) -> Any:
        """Point `alias` at the version if it passes the knowledge gate (409 with the figures if not;
        `force` overrides). The decision is recorded on the version either way."""
        from kbtune.knowledge.promotion import PromotionRefused

        if promotion is None:
            return JSONResponse(status_code=503, content={"detail": "this server was built without a project to evaluate versions in"})
        try:
            decision = promotion().promote(version, request.alias, request.max_forgetting, request.force)
        except PromotionRefused as exc:
            return JSONResponse(status_code=409, content={"detail": str(exc), "decision": json.loads(exc.decision.to_json())})
        except ValueError as exc:  # an alias name that is not allowed
            return unprocessable([("alias", str(exc))])
        return json.loads(decision.to_json())

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok", "auth": token is not None}

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
