"""What an incremental update trains on: the documents added or changed since the base version (the
delta) plus a replay sample of the unchanged training documents, so the update learns the change
without forgetting the rest. Every choice is a function of ids, content hashes and the seed: a resume
or a rerun selects exactly the same documents."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

# A training document's role in an update session's data manifest. `carried`: unchanged since the
# base version and not replayed; the update does not train on it but inherits what the base learned.
DELTA, REPLAY, CARRIED = "delta", "replay", "carried"
TRAINED_ROLES = (DELTA, REPLAY)


@dataclass(frozen=True)
class UpdateBase:
    """The base version's training data, as its data manifest recorded it."""

    version: str
    session_id: str
    hashes: dict[str, str]  # document id -> sha256 of its cleaned text at the base version
    replay_fraction: float
    seed: int
    delta_repeat: int = 1

    @classmethod
    def from_store(
        cls, store: Any, version: str, replay_fraction: float, seed: int, delta_repeat: int = 1
    ) -> UpdateBase:
        from kbtune.updates.diff import version_data

        base = version_data(store, version)
        hashes = {doc_id: d["sha256"] for doc_id, d in base.documents.items()}
        return cls(base.version, base.session_id, hashes, replay_fraction, seed, delta_repeat)

    def replayed(self, doc_id: str) -> bool:
        """A stable per-document draw: raising replay_fraction only adds documents to the sample."""
        digest = hashlib.sha256(f"replay:{self.seed}:{doc_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.replay_fraction

    def role(self, doc_id: str, sha256: str) -> str:
        if self.hashes.get(doc_id) != sha256:
            return DELTA
        return REPLAY if self.replayed(doc_id) else CARRIED


def assign_roles(train_docs: list[Any], base: UpdateBase) -> dict[str, int]:
    """Set each training document's `role`; returns the count of each. Held-out documents are never
    given one: they are not in `train_docs`, so the replay sample cannot include them."""
    counts = {DELTA: 0, REPLAY: 0, CARRIED: 0}
    for doc in train_docs:
        doc.role = base.role(doc.id, doc.sha256)
        counts[doc.role] += 1
    return counts


def delta_digest(docs: list[Any]) -> str:
    """Identifies the change an update learned: its delta documents by id and content hash."""
    h = hashlib.sha256()
    for doc in sorted((d for d in docs if getattr(d, "role", "") == DELTA), key=lambda d: d.id):
        h.update(f"{doc.id}\0{doc.sha256}\0".encode())
    return h.hexdigest()[:16]


def select_training(
    train_docs: list[Any], base: UpdateBase | None, all_ids: set[str]
) -> tuple[list[Any], dict[str, Any] | None]:
    """The documents a session trains on, and (for an update) the record of the selection for the
    data manifest. Without a base every training document trains."""
    if base is None:
        return train_docs, None
    counts = assign_roles(train_docs, base)
    # The delta repeated: more exposures for the change than for the replayed rest, in one stream.
    trained = [
        d
        for d in train_docs
        if d.role in TRAINED_ROLES
        for _ in range(base.delta_repeat if d.role == DELTA else 1)
    ]
    if not counts[DELTA]:
        from kbtune.data.settings import DataError

        raise DataError(
            f"base_version: no training document was added or changed since version {base.version} "
            f"(`kbtune kb diff --since {base.version}` lists the changes); nothing to update"
        )
    added = sum(1 for d in train_docs if d.role == DELTA and d.id not in base.hashes)
    counts = {"added": added, "changed": counts[DELTA] - added, **counts,
              "deleted": len(set(base.hashes) - all_ids)}  # fmt: skip
    record = {"base_version": base.version, "base_session": base.session_id, "replay_fraction": base.replay_fraction,
              "delta_repeat": base.delta_repeat,
              "counts": counts, "delta_digest": delta_digest(train_docs)}  # fmt: skip
    return trained, record
