"""The API's answers as the OpenAPI schema documents them: every status code a route can give, with
its body, and the links from a started session to its status, stop and resume (which a stateful
fuzzer follows). Documentation only: routes still build their answers themselves."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Problem(BaseModel):
    detail: str


class Conflict(BaseModel):
    """409: another training runs (`running_session_id`), the session's state rules the request out,
    or the knowledge gate refused a promotion (`decision`, with its figures)."""

    detail: str
    running_session_id: str | None = None
    decision: dict[str, Any] | None = None


class FieldProblem(BaseModel):
    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class FieldProblems(BaseModel):
    """422: one item per problem, on its field (`loc`), with the text the CLI prints for the same key."""

    detail: list[FieldProblem]


class Session(BaseModel):
    """A `training_sessions` record."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: Literal["pending", "running", "completed", "failed", "stopped"]
    config: dict[str, Any]
    metrics: dict[str, float | None] | None
    started_at: str | None
    completed_at: str | None
    error: str | None


class SessionState(Session):
    """A session with its live progress (None before the worker wrote any)."""

    progress: dict[str, Any] | None
    stop_requested: bool
    worker_pid: int | None
    resumable: bool
    has_checkpoint: bool


class Version(BaseModel):
    """A `model_versions` record."""

    model_config = ConfigDict(extra="allow")

    id: str
    version: str
    training_session_id: str
    metrics: dict[str, float | None] | None
    created_at: str | None
    aliases: list[str]


class Generated(BaseModel):
    text: str
    tokens: int
    seconds: float
    version: str


_WHY = {
    400: (Problem, "The body is not valid JSON."),
    401: (Problem, "Missing or wrong API token (servers started with one)."),
    403: (Problem, "A state-changing request from another origin (its Origin or Referer)."),
    404: (Problem, "No such session or model version."),
    409: (Conflict, "Busy, or the session's state or the knowledge gate rules the request out."),
    413: (Problem, "The body is over the size limit."),
    415: (Problem, "The body is not JSON."),
    422: (FieldProblems, "Invalid settings, one item per field."),
    503: (
        Problem,
        "The knowledge base or the record store cannot be used now (locked, damaged, unreachable).",
    ),
}
# What every state-changing route may answer before it runs (api_guard), and with a body.
_GUARDED_WRITE = (401, 403, 413, 415)
_BODY = (400, 422)


def documented(*codes: int, ok: tuple[int, Any] | None = None, write: bool = False) -> dict[int | str, Any]:
    """`responses=` for a route: its own error `codes`, the guard's for a write, and its success."""
    chosen = sorted({*codes, *(_GUARDED_WRITE if write else (401,))})
    out: dict[int | str, Any] = {c: {"model": _WHY[c][0], "description": _WHY[c][1]} for c in chosen}
    if ok is not None:
        out[ok[0]] = {"model": ok[1]}
    return out


def _link(operation: str, description: str, **values: Any) -> dict[str, Any]:
    # operationRef, not operationId: FastAPI's generated ids are long and change with function names.
    return {"operationRef": operation, "description": description, **values}


SESSION_LINKS = {
    "status": _link("#/paths/~1training~1status/get", "The session's status.",
                    parameters={"session_id": "$response.body#/id"}),
    "stop": _link("#/paths/~1training~1stop/post", "Stop the session.", parameters={"session_id": "$response.body#/id"}),
    "resume": _link("#/paths/~1training~1start/post", "Resume it (once stopped or failed).",
                    requestBody={"resume": "$response.body#/id"}),
}  # fmt: skip

START = documented(*_BODY, 404, 409, 503, write=True)
START[201] = {"model": SessionState, "description": "The new (or resumed) session.", "links": SESSION_LINKS}
STATUS = documented(404, 422, 503, ok=(200, SessionState))
STOP = documented(404, 409, 422, 503, write=True)
STOP[200] = {"model": SessionState, "description": "The session, its stop requested (unchanged if it ended).",
             "links": {"resume": SESSION_LINKS["resume"], "status": SESSION_LINKS["status"]}}  # fmt: skip
SESSIONS = documented(422, 503, ok=(200, list[Session]))
VERSIONS = documented(503, ok=(200, list[Version]))
KNOWLEDGE = documented(404, 422, 503)
PROMOTE = documented(*_BODY, 404, 409, 503, write=True)
GENERATE = documented(*_BODY, 404, 503, write=True)
GENERATE[200] = {
    "model": Generated,
    "description": 'With `stream` (default): server-sent events, `data: {"text": ...}` per piece, then '
    "`event: done` with the full text, tokens and seconds (or `event: error`). Otherwise JSON.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}
