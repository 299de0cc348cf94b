"""Lineage: an update's version records its parent, the delta it learned (counts and digest) and its
replay size; `kbtune versions --tree` draws the versions as a tree of updates from those tags."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PARENT_TAG = "kbtune.parent_version"
UPDATE_TAG = "kbtune.update"


def record_lineage(store: Any, version: Any, update: dict[str, Any]) -> None:
    store.set_version_tags(version.id, {PARENT_TAG: update["base_version"], UPDATE_TAG: json.dumps(update)})


@dataclass
class Node:
    version: Any
    update: dict[str, Any] | None
    children: list[Node] = field(default_factory=list)

    @property
    def parent(self) -> str | None:
        return self.update["base_version"] if self.update else None


def lineage(store: Any) -> list[Node]:
    """The versions as a forest: roots are versions trained from scratch or from a local model, each
    update under its parent (oldest first). Reads tags only."""
    versions = sorted(store.list_versions(), key=lambda v: int(v.id) if str(v.id).isdigit() else 0)
    nodes = {}
    for v in versions:
        raw = store.get_version_tags(v.id).get(UPDATE_TAG)
        nodes[v.version] = Node(v, json.loads(raw) if raw else None)
    roots = []
    for node in nodes.values():
        parent = nodes.get(node.parent) if node.parent else None
        (parent.children if parent else roots).append(node)
    return roots


def _pct(metrics: dict[str, float] | None, key: str) -> str:
    value = (metrics or {}).get(key)
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def describe(node: Node) -> str:
    m = node.version.metrics
    parts = [node.version.version, f"recall {_pct(m, 'knowledge/recall_trained')}",
             f"held-out {_pct(m, 'knowledge/recall_heldout')}"]  # fmt: skip
    if node.update:
        c = node.update["counts"]
        parts.insert(
            1, f"+{c['added']} new, {c['changed']} changed, {c['deleted']} deleted, replay {c['replay']}"
        )
        parts += [
            f"delta {_pct(m, 'knowledge/recall_delta')}",
            f"unchanged {_pct(m, 'knowledge/recall_unchanged')}",
        ]
    return "  ".join(parts)


def render_tree(roots: list[Node]) -> str:
    lines: list[str] = []

    def walk(node: Node, prefix: str, last: bool, top: bool) -> None:
        lines.append(("" if top else prefix + ("└─ " if last else "├─ ")) + describe(node))
        child_prefix = "" if top else prefix + ("   " if last else "│  ")
        for i, child in enumerate(node.children):
            walk(child, child_prefix, i == len(node.children) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return "\n".join(lines) if lines else "(no versions)"
