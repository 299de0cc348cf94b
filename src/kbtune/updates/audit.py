"""`kbtune audit`: which versions were trained on documents that have since been deleted or changed,
or whose training data contained a given document ("which models saw this page?"). It reads the data
manifests the sessions stored and the KB's documents now; it never loads model weights.

"Trained on" means the document was in the version's training split: its own training documents, and
for an update the documents it inherited from its parent (`carried`), which the parent trained on.
Held-out documents were only scored, so they are reported as `held-out`, not as trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kbtune.updates.diff import version_data


@dataclass
class VersionAudit:
    version: str
    version_id: str
    collection: str
    deleted: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def affected(self) -> bool:
        return bool(self.deleted or self.changed)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "version_id": self.version_id, "collection": self.collection,
                "affected": self.affected, "deleted": self.deleted, "changed": self.changed}  # fmt: skip


def _current_hashes(kb: Any) -> dict[str, str]:
    """id -> sha256 of the cleaned text, as the data manifests record it."""
    from collections import Counter

    from kbtune.data.cleaning import clean_documents

    return {d.id: d.sha256 for d in clean_documents(kb.iter_documents(), Counter())}


class Audit:
    def __init__(self, store: Any, kb: Any):
        self.store = store
        self.kb = kb
        self._hashes: dict[str, dict[str, str]] = {}
        self._data: dict[str, Any] = {}

    def _now(self, collection: str) -> dict[str, str]:
        if collection not in self._hashes:
            kb = (
                self.kb
                if collection == self.kb.collection_name
                else self.kb.with_settings(collection=collection)
            )
            self._hashes[collection] = _current_hashes(kb)
        return self._hashes[collection]

    def _version_data(self, version: Any) -> Any:
        if version.id not in self._data:
            try:
                self._data[version.id] = version_data(self.store, version.id)
            except Exception:  # a version without a stored manifest (recorded before manifests existed)
                self._data[version.id] = None
        return self._data[version.id]

    def versions(self) -> list[VersionAudit]:
        """Every version with the trained documents that were deleted or changed since."""
        out = []
        for v in self.store.list_versions():
            data = self._version_data(v)
            if data is None:
                continue
            collection = data.manifest["collection"]
            now, then = self._now(collection), data.documents
            audit = VersionAudit(v.version, v.id, collection)
            for doc_id in sorted(data.trained_ids()):
                if doc_id not in now:
                    audit.deleted.append(doc_id)
                elif now[doc_id] != then[doc_id]["sha256"]:
                    audit.changed.append(doc_id)
            out.append(audit)
        return out

    def document(self, doc_id: str) -> list[dict[str, Any]]:
        """The versions whose data contained `doc_id`: how (trained or held-out) and whether the text
        they saw is still the KB's (`same`, `changed`, `deleted`)."""
        rows = []
        for v in self.store.list_versions():
            data = self._version_data(v)
            entry = data.documents.get(doc_id) if data is not None else None
            if entry is None:
                continue
            now = self._now(data.manifest["collection"]).get(doc_id)
            rows.append({"version": v.version, "version_id": v.id, "collection": data.manifest["collection"],
                         "split": "trained" if entry["split"] == "train" else "held-out", "role": entry.get("role"),
                         "sha256": entry["sha256"],
                         "now": "deleted" if now is None else "same" if now == entry["sha256"] else "changed"})  # fmt: skip
        return rows
