"""`kbtune kb diff`: the documents added, changed and deleted in the KB since a version's training
data, by id and content hash (the sha256 of the cleaned text the data manifest records)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kbtune.data.cleaning import CleanDoc
from kbtune.data.preparation import DataPreparation
from kbtune.data.settings import DataSettings


@dataclass(frozen=True)
class VersionData:
    """What a version was trained on, read from its session's data manifest (no weights loaded)."""

    version: str
    session_id: str
    manifest: dict[str, Any]
    settings: DataSettings

    @property
    def documents(self) -> dict[str, dict[str, str]]:
        return {d["id"]: d for d in self.manifest["documents"]}

    def trained_ids(self) -> set[str]:
        """Documents in the training split: the ones the version learned from (the validation split
        was only scored). An update's manifest lists its delta and replay as `train`."""
        return {d["id"] for d in self.manifest["documents"] if d["split"] == "train"}


def version_data(store: Any, ref: str) -> VersionData:
    mv = store.get_version(ref)
    session = store.get_session(mv.training_session_id)
    manifest = json.loads(store.read_text(mv.training_session_id, "data/manifest.json"))
    data = DataSettings(**{k: v for k, v in (session.config.get("data") or {}).items() if k != "cache_dir"})
    return VersionData(mv.version, mv.training_session_id, manifest, data)


def current_documents(kb: Any, settings: DataSettings) -> tuple[dict[str, CleanDoc], Counter]:
    """The KB's documents as training would see them now: cleaned, formatted, split by the version's
    seed (a document's split depends only on its id, so it is the split training would give it)."""
    # The data stage's own collect step (no tokenizer or cache involved), so a diff sees exactly the
    # documents a training would.
    docs, drops = DataPreparation(kb, settings, tokenizer_factory=None, cache_dir=Path(".")).collect()
    return {d.id: d for d in docs}, drops


@dataclass
class KBDiff:
    since: str
    session_id: str
    collection: str
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # id -> sha256 now (added and changed) or at the version (deleted), for the digest and the audit.
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Identifies the change itself: the same edits since the same version give the same digest."""
        h = hashlib.sha256(self.since.encode())
        for kind in ("added", "changed", "deleted"):
            for doc_id in sorted(getattr(self, kind)):
                h.update(f"{kind}\0{doc_id}\0{self.hashes.get(doc_id, '')}\0".encode())
        return h.hexdigest()[:16]

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("added", "changed", "deleted", "unchanged")}

    def summary(self, label: str = "") -> str:
        c = self.counts()
        return (f"{c['added']} new, {c['changed']} changed, {c['deleted']} deleted since "
                f"{label + ' ' if label else ''}{self.since} ({c['unchanged']} unchanged)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"since": self.since, "session_id": self.session_id, "collection": self.collection,
                "counts": self.counts(), "digest": self.digest, "added": self.added, "changed": self.changed,
                "deleted": self.deleted}  # fmt: skip


def diff(base: VersionData, now: dict[str, CleanDoc], collection: str) -> KBDiff:
    """Compare the version's manifest with the KB's documents now. Every document of the manifest
    counts, both splits: a held-out document that changed is a change of the KB too."""
    out = KBDiff(base.version, base.session_id, collection)
    then = base.documents
    for doc_id in sorted(now):
        old = then.get(doc_id)
        kind = "added" if old is None else "changed" if old["sha256"] != now[doc_id].sha256 else "unchanged"
        getattr(out, kind).append(doc_id)
        if kind != "unchanged":
            out.hashes[doc_id] = now[doc_id].sha256
    for doc_id in sorted(set(then) - set(now)):
        out.deleted.append(doc_id)
        out.hashes[doc_id] = then[doc_id]["sha256"]
    return out


def default_base(store: Any) -> str:
    """The champion if one is set, else the latest version."""
    try:
        return store.get_version("champion").version
    except Exception:  # no alias of that name (each store says so with its own error type)
        return store.get_version("latest").version


def diff_since(project: Any, since: str | None = None) -> KBDiff:
    """The KB (the project's, or the version's own collection when none was named) against `since`."""
    base = version_data(project.store, since or default_base(project.store))
    kb = project.kb
    named = any(o.lstrip("+").startswith("kb.collection=") for o in project.overrides)
    if base.manifest["collection"] != kb.collection_name and not named:
        kb = kb.with_settings(collection=base.manifest["collection"])
    now, _ = current_documents(kb, base.settings)
    return diff(base, now, kb.collection_name)
