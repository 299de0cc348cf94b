"""The API's `POST /models/{version}/generate`: a version's continuation of a prompt, streamed as
server-sent events or answered as JSON, from models kept loaded in a memory-bounded cache."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Generator, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

CACHE_ENV = "KBTUNE_MODEL_CACHE_MB"
DEFAULT_CACHE_MB = 2048
# Proxies (nginx) buffer responses unless told not to; a buffered stream arrives all at once.
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class GenerateRequest(BaseModel):
    """Greedy unless `temperature` > 0; `seed` makes sampling repeatable."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=8000)
    # Tighter than the library's 2048: one request may not hold a server thread for minutes.
    max_new_tokens: int = Field(128, ge=1, le=512)
    temperature: float = Field(0.0, ge=0, le=5, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = True


def model_cache(environ: Any = os.environ) -> Any:
    """A ModelCache sized by KBTUNE_MODEL_CACHE_MB (default 2048 MB of parameters and buffers)."""
    from kbtune.configuration import ConfigError
    from kbtune.generation import ModelCache

    raw = environ.get(CACHE_ENV, "").strip()
    try:
        mb = float(raw) if raw else float(DEFAULT_CACHE_MB)
    except ValueError:
        mb = -1.0
    if not (math.isfinite(mb) and mb >= 0):
        raise ConfigError([f"{CACHE_ENV}: must be a number of megabytes >= 0, got {raw!r}"])
    return ModelCache(int(mb * 1e6))


def add_generation_routes(app: FastAPI, store: Any, manager: Any, cache: Any, guarded: list[Any]) -> None:
    from kbtune.api_responses import GENERATE

    # A sync endpoint: FastAPI runs it in its threadpool, and Starlette iterates the sync event
    # generator there too, so decoding never holds the event loop (or the training routes) up.
    @app.post("/models/{version}/generate", dependencies=guarded, responses=GENERATE)
    def generate(version: str, request: GenerateRequest) -> Any:
        """The version's continuation of `prompt`. `stream` (default): server-sent events, one
        `data: {"text": piece}` per piece, then `event: done` with the full text, tokens and seconds;
        otherwise JSON. Unknown versions 404."""
        from kbtune.generation import GenerationSettings, GenerationStats, stream_generate

        mv = store.get_version(version)
        model, tokenizer = cache.get(mv.id, lambda: manager.load_model(mv.id))
        settings = GenerationSettings(
            request.max_new_tokens, request.temperature, request.top_p, request.seed
        )
        stats = GenerationStats()
        started = time.perf_counter()
        pieces = stream_generate(model, tokenizer, request.prompt, settings, stats)
        if request.stream:
            events = _events(pieces, stats, started, mv.version)
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        text = "".join(pieces)
        return {"text": text, "tokens": stats.tokens, "seconds": round(time.perf_counter() - started, 4),
                "version": mv.version}  # fmt: skip


def _events(pieces: Generator[str, None, None], stats: Any, started: float, version: str) -> Iterator[str]:
    text = []
    try:
        for piece in pieces:
            text.append(piece)
            yield _event({"text": piece})
    except Exception as exc:  # the status line is sent already: report the failure in the stream
        logger.exception("generation from version %s failed", version)
        yield _event({"detail": f"generation failed: {exc}"}, "error")
        return
    finally:
        pieces.close()  # a client that left stops the decoding here
    done = {"text": "".join(text), "tokens": stats.tokens, "seconds": round(time.perf_counter() - started, 4),
            "version": version}  # fmt: skip
    yield _event(done, "done")


def _event(data: dict[str, Any], name: str | None = None) -> str:
    # json.dumps escapes newlines, so each event's data stays on one `data:` line.
    return (f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"
