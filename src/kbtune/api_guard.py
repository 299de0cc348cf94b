"""What the API refuses before any route runs: state-changing requests from another origin (a page
elsewhere auto-submitting a form to the loopback server), bodies that are not JSON, and bodies over a
size limit; and how it words errors it did not raise itself (422s truncated, a KB or store that
cannot be used now as 503)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

# The largest start request (64 overrides of 500 characters, JSON-escaped) is under 200 KB, a
# generation prompt under 50 KB; a limit far above both that still parses in milliseconds.
MAX_BODY_BYTES = 1 << 20
# How much of a client's value or message an error echoes back.
MAX_ECHO_CHARS = 200
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin or Referer value; None for `null` or anything unparsable."""
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname or port is None:
        return None
    return parts.scheme, parts.hostname.lower(), port


def _own_origin(scope: dict[str, Any], headers: dict[str, str]) -> tuple[str, str, int] | None:
    # The Host the client addressed: TrustedHostMiddleware (on a loopback server) has vetted it.
    return _origin_of(f"{scope.get('scheme', 'http')}://{headers.get('host', '')}")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _refusal(scope: dict[str, Any], headers: dict[str, str]) -> tuple[int, str] | None:
    if scope["method"] not in STATE_CHANGING:
        return None
    claimed = headers.get("origin") or headers.get("referer")
    if claimed is not None:
        own = _own_origin(scope, headers)
        theirs = _origin_of(claimed)
        # Compared in full, scheme and port included: another loopback port is another site.
        if own is None or theirs != own:
            shown = claimed[:MAX_ECHO_CHARS]
            return 403, f"cross-origin request refused: {shown!r} is not this server's origin; send state-changing requests from this server's page or without an Origin header (curl, scripts)"  # fmt: skip
    length = headers.get("content-length")
    has_body = headers.get("transfer-encoding") is not None or (length is not None and length.strip() != "0")
    content_type = headers.get("content-type")
    # A form's urlencoded or multipart body is never JSON, even an empty one: refuse it by its type.
    if (content_type is not None or has_body) and not _is_json(content_type or ""):
        shown = (content_type or "none")[:MAX_ECHO_CHARS]
        return 415, f"request bodies must be JSON (Content-Type: application/json), got {shown}"
    # A malformed Content-Length never gets here: the HTTP server (h11) refuses it.
    if length is not None and length.strip().isdigit() and int(length) > MAX_BODY_BYTES:
        return 413, f"request body of {int(length)} bytes is over the limit of {MAX_BODY_BYTES} bytes"
    return None


def _send_error(status: int, detail: str) -> Any:
    body = json.dumps({"detail": detail}).encode()
    return [
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]},
        {"type": "http.response.body", "body": body},
    ]  # fmt: skip


class RequestGuard:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which would buffer the generation stream): the
    checks of `_refusal`, and a byte count on bodies sent without Content-Length (chunked)."""

    def __init__(self, app: Any, max_body: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = _refusal(scope, headers)
        if refusal is not None:
            for message in _send_error(*refusal):
                await send(message)
            return
        received = 0

        async def counted() -> Any:
            # Raised from inside the route's body read, as an HTTPException FastAPI answers as is.
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPException(413, f"request body is over the limit of {self.max_body} bytes")
            return message

        await self.app(scope, counted, send)


def short(value: Any) -> Any:
    """`value` (or its JSON) cut to MAX_ECHO_CHARS, saying how long it was."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return value if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + f"... ({len(text)} characters)"


def add_guards(app: FastAPI) -> None:
    """The middleware, and error answers that never echo a whole oversized value."""
    from kbtune.knowledge_base import KnowledgeBaseUnavailable
    from kbtune.tracking.reachability import StoreUnavailable

    app.add_middleware(RequestGuard)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = []
        for error in exc.errors():
            item = {"loc": list(error.get("loc", [])), "msg": short(str(error.get("msg", ""))),
                    "type": error.get("type", "value_error")}  # fmt: skip
            if "input" in error:
                item["input"] = short(error["input"])
            detail.append(item)
        return JSONResponse(status_code=422, content={"detail": detail})

    # Not the request's fault and not permanent: 503, naming the store, so a client may retry.
    @app.exception_handler(KnowledgeBaseUnavailable)
    def kb_unavailable(request: Request, exc: KnowledgeBaseUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.exception_handler(StoreUnavailable)
    def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})
