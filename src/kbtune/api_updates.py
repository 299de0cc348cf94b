"""The KB's change and the audit on the API: `GET /kb/diff` (what changed since a version) and
`GET /audit` (versions trained on documents since deleted or changed, or the versions that saw one
document). They read the KB and the stored data manifests, never model weights."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse

from kbtune.api_responses import Problem

_NO_PROJECT = {"detail": "this server was built without a project (a knowledge base) to compare with"}
RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such version"},
    503: {"model": Problem, "description": "the server has no knowledge base to read"},
}


def add_update_routes(app: FastAPI, project: Any, guarded: list[Any]) -> None:
    @app.get("/kb/diff", dependencies=guarded, responses=RESPONSES)
    def kb_diff(since: str | None = Query(None, max_length=200)) -> Any:
        """Documents added, changed and deleted in the KB since `since`'s training data (default: the
        champion, else the latest version), by id, with counts and the change's digest."""
        from kbtune.updates.diff import diff_since

        if project is None:
            return JSONResponse(status_code=503, content=_NO_PROJECT)
        change = diff_since(project, since)
        label = "champion" if "champion" in project.store.get_version(change.since).aliases else ""
        return {**change.to_dict(), "summary": change.summary(label)}

    @app.get("/audit", dependencies=guarded, responses=RESPONSES)
    def audit(document: str | None = Query(None, max_length=1000)) -> Any:
        """Without `document`: every version, with the trained documents since deleted or changed
        (`affected`). With it: the versions whose data contained that document, and how."""
        from kbtune.updates.audit import Audit

        if project is None:
            return JSONResponse(status_code=503, content=_NO_PROJECT)
        found = Audit(project.store, project.kb)
        if document:
            return {"document": document, "versions": found.document(document)}
        return {"versions": [a.to_dict() for a in found.versions()]}
