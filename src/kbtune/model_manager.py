"""The seed's ModelManager: save a session's model as a labelled version, load versions, list them."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from kbtune.records import ModelVersion, SessionStatus, TrainingSession
from kbtune.tracking.store import NotFoundError, SessionStore

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
MODEL_TAG = "kbtune.model_artifact"
SPEC_FILE = "kbtune_model_spec.json"
# \Z, not $: `$` also matches before a trailing newline, which would let "x\n" through.
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
# Numbers and v<number> name the registry's own versions; `latest` always means the newest.
# Case-insensitive, as MLflow reserves `Latest` and `V3` for aliases.
_RESERVED = re.compile(r"^(v?\d+|latest)\Z", re.IGNORECASE)
# MLflow's alias names allow no '.', unlike labels.
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}\Z")


class VersionLabelError(ValueError):
    pass


def validate_label(label: str) -> None:
    if not label or not _LABEL.match(label) or ".." in label:
        raise VersionLabelError(
            f"version label {label!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, without '..' or path separators"
        )
    if _RESERVED.match(label):
        raise VersionLabelError(
            f"version label {label!r} is reserved (numbers, v<number> and 'latest' are automatic)"
        )


def save_model_dir(model: Any, tokenizer: Any, spec: dict[str, Any], directory: Path) -> Path:
    """A Hugging Face directory: safetensors weights, config, tokenizer, and the spec that built it.
    It appears whole or not at all: a failed write (a full disk) raises WriteFailed naming the file
    and leaves no partial model behind."""
    from kbtune.atomic_files import atomic_directory

    with atomic_directory(directory) as staging:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return directory


def load_model_dir(directory: Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Model (eval mode) and tokenizer from a saved directory; safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if (directory / "adapter_config.json").exists():
        from kbtune.modeling.lora import load_adapter_dir

        model = load_adapter_dir(directory, trust_remote_code=trust_remote_code)
    else:
        if not any(directory.glob("*.safetensors")):
            raise FileNotFoundError(f"{directory} has no safetensors weights")
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), use_safetensors=True, trust_remote_code=trust_remote_code, dtype=torch.float32
        )
    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer


def _why_no_model(session: TrainingSession) -> str:
    if session.status in (SessionStatus.STOPPED, SessionStatus.FAILED):
        return f"it is {session.status.value} (continue it with `kbtune start --resume {session.id}`)"
    if session.status is SessionStatus.COMPLETED:
        return "it completed, but no model was stored with it"
    return f"it is {session.status.value}; save it once it completes"


class ModelManager:
    def __init__(self, store: SessionStore, cache_dir: Path | str = "data/cache"):
        self.store = store
        self.cache_dir = Path(cache_dir)

    def save_model(
        self, version: str | None, session_id: str, metrics: dict[str, float] | None = None
    ) -> ModelVersion:
        """Register `session_id`'s trained model as a new version labelled `version` (None: automatic).
        A taken label is an error and overwrites nothing."""
        if version is not None:
            validate_label(version)
            if any(version in v.aliases for v in self.store.list_versions()):
                # get_version resolves aliases before labels: the new version would be unreachable by name.
                raise VersionLabelError(
                    f"version label {version!r} is already an alias; choose another label"
                )
        session = self.store.get_session(session_id)
        tags = self.store.get_tags(session_id)
        if MODEL_TAG not in tags:
            raise NotFoundError(f"session {session_id}: no trained model to save; {_why_no_model(session)}")
        if metrics is None:
            metrics = session.metrics
        mv = self.store.create_version(session_id, tags[MODEL_TAG], version, metrics)
        logger.info("model version %s (id %s) saved from session %s", mv.version, mv.id, session_id)
        return mv

    def model_dir(self, version: str = "latest") -> tuple[ModelVersion, Path]:
        mv = self.store.get_version(version)
        return mv, self.store.download(mv.source, self.cache_dir / "models" / mv.id)

    def load_model(self, version: str = "latest", trust_remote_code: bool = False) -> tuple[Any, Any]:
        """(model, tokenizer) ready for `generate`, for a label, a number, `latest` or an alias."""
        mv, directory = self.model_dir(version)
        logger.info("loading model version %s from %s", mv.version, directory)
        return load_model_dir(directory, trust_remote_code)

    def get_model_versions(self) -> list[ModelVersion]:
        return self.store.list_versions()

    def promote(self, version: str, alias: str = "champion") -> ModelVersion:
        if _RESERVED.match(alias) or not _ALIAS.match(alias):
            raise VersionLabelError(
                f"alias {alias!r} is not allowed (letters, digits, '_', '-'; not latest or v<number>)"
            )
        mv = self.store.get_version(version)
        if any(v.version == alias for v in self.store.list_versions()):
            # An alias would shadow the label of that name in get_version.
            raise VersionLabelError(f"alias {alias!r} is already a version label; choose another alias")
        self.store.set_alias(mv.id, alias)
        return self.store.get_version(mv.id)
