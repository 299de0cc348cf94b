"""`base_version=VERSION` (experiment=update): the session starts from that version's weights and
tokenizer and trains on what changed since its data. Resolved once per plan, from the store, before
anything is written; a resume resolves it again to the same documents."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kbtune.configuration import ConfigError, TrainingPlan
from kbtune.updates.selection import UpdateBase

BASE_TAG = "kbtune.base_version"


def resolve_update(project: Any, plan: TrainingPlan) -> TrainingPlan:
    """The plan with the base version's model (a local model in the version's cached files, so its
    tokenizer is kept: old and new text tokenize alike) and the UpdateBase that selects the data."""
    if plan.base_version is None:
        return plan
    from kbtune.model_manager import SPEC_FILE
    from kbtune.modeling.factory import ModelSpec

    mv, directory = project.manager.model_dir(plan.base_version)
    saved = json.loads((directory / SPEC_FILE).read_text())
    problems = []
    if saved.get("lora"):
        problems.append(f"base_version: {mv.version} is a LoRA adapter; an update needs whole weights "
                        f"(train the base with save_merged=true, or update from another version)")  # fmt: skip
    base_data = project.store.get_session(mv.training_session_id).config.get("data") or {}
    for key in ("split_seed", "val_fraction"):
        # The split decides which documents are held out; another split would train on the base's
        # held-out documents and make the held-out recall meaningless.
        if key in base_data and base_data[key] != getattr(plan.data, key):
            problems.append(f"data.{key}: must equal the base version's ({base_data[key]}) so held-out "
                            f"documents stay held out, got {getattr(plan.data, key)}")  # fmt: skip
    if problems:
        raise ConfigError(problems)
    model = ModelSpec(name=f"{saved.get('name', 'model')}", source="local", path=str(directory),
                      dropout=plan.model.dropout, dtype="float32")  # fmt: skip
    d = plan.data
    base = UpdateBase.from_store(project.store, mv.version, d.replay_fraction, d.split_seed, d.delta_repeat)
    return dataclasses.replace(plan, model=model, update=base, tags={**plan.tags, BASE_TAG: mv.version})
