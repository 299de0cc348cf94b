"""What users read: run names without private paths or quotes, automatic version labels that do not
skip, and `not found` errors that list aliases the way they are typed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kbtune.run_identity import run_identity
from kbtune.tracking.memory_store import InMemoryStore
from kbtune.tracking.store import NotFoundError, available_versions, next_auto_label


def test_run_names_leave_out_paths_quotes_and_locating_overrides():
    plan = SimpleNamespace(run_name=None, model=SimpleNamespace(name="small"))
    name, tags = run_identity(plan, ["paths.root=/home/me/secret", "kb.path=/data/chroma", "kb.collection='my kb'",
                                     "optim.learning_rate=0.001", "data.template=/abs/dir/tpl"])  # fmt: skip
    assert name == "small-collection=my kb-learning_rate=0.001-template=tpl"
    assert "/home/me" not in name and "'" not in name
    assert tags["kbtune.overrides"].startswith("paths.root=")  # the exact overrides stay in a tag


def test_automatic_labels_count_only_automatic_ones():
    assert next_auto_label([]) == "v1"
    assert next_auto_label(["v1", "custom"]) == "v2"
    assert next_auto_label(["v1", "custom", "v2", "v10x"]) == "v3"


def test_memory_store_labels_do_not_skip_after_a_custom_label():
    store = InMemoryStore()
    session = store.create_session({"model": {}})
    labels = [store.create_version(session.id, "memory://x", label, None).version for label in (None, "custom", None)]
    assert labels == ["v1", "custom", "v2"]
    assert store.get_version("v2").id == "3"


def test_not_found_lists_aliases_as_they_are_typed():
    assert available_versions(["v1"], ["champion"]) == "v1, champion (alias), latest"
    store = InMemoryStore()
    session = store.create_session({"model": {}})
    mv = store.create_version(session.id, "memory://x", None, None)
    store.set_alias(mv.id, "champion")
    with pytest.raises(NotFoundError, match=r"available: v1, champion \(alias\), latest"):
        store.get_version("nope")
