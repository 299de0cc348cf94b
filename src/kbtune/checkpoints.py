"""Which checkpoint a training starts from: a continued session from a complete one of its own (naming
any that is not), a new session only from a checkpoint of the model and block size it trains. Light to
import (torch loads inside the checks); Lightning's writer is kbtune.checkpoint_io."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The model spec fields that decide the shapes and the meaning of the weights; the others (dropout,
# dtype, gradient checkpointing) may change when training continues.
WEIGHT_KEYS = ("source", "architecture", "n_layer", "n_head", "n_embd", "intermediate_size", "vocab_size",
               "max_position", "path", "lora")  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (missing, empty, truncated, a failed checksum), or None.
    torch.save writes a zip whose records carry CRC32s, so this reads the file once without unpickling."""
    import torch.serialization

    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "does not exist"
    if size == 0:
        return "is empty (0 bytes): its write was cut short"
    try:
        with zipfile.ZipFile(path) as archive:
            # Checksums exist only where torch wrote them (its default).
            bad = archive.testzip() if torch.serialization.get_crc32_options() else None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        return f"is not a complete checkpoint ({size} bytes, truncated or overwritten: {exc})"
    return f"is corrupt (its record {bad} fails its checksum)" if bad else None


def resumable_checkpoint(last: Path) -> Path | None:
    """Where a continued session resumes: `last` when it is complete, else the newest complete
    checkpoint beside it (with a warning). None when the session has no checkpoint at all;
    CheckpointError when it has some but none is complete."""
    candidates = sorted(last.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    if not candidates:
        return None
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    for candidate in (c for c in candidates if c != last):
        if checkpoint_problem(candidate) is None:
            logger.warning(
                "%s %s; resuming from %s, the newest complete checkpoint", last, problem, candidate
            )
            return candidate
    raise CheckpointError(
        f"{last} {problem}, and {last.parent} holds no other complete checkpoint: delete {last.parent} to "
        f"train this session again from the start, or start a new session"
    )


def start_problems(path: str, spec: dict[str, Any], block_size: int) -> list[str]:
    """Why the checkpoint `path` cannot start this training: not a complete checkpoint, another
    model's weights, another tokenizer, or another data.block_size (each `key: message`)."""
    import torch

    problem = checkpoint_problem(Path(path))
    if problem:
        return [f"ckpt_path: {path} {problem}"]
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        return [f"ckpt_path: {path} is not a kbtune training checkpoint ({str(exc).splitlines()[0]})"]
    saved = (checkpoint.get("hyper_parameters") or {}).get("model_spec")
    if not isinstance(saved, dict):
        return [f"ckpt_path: {path} is not a kbtune training checkpoint (it holds no model spec)"]
    problems = [
        f"model.{key}: {spec.get(key)!r} differs from the {saved[key]!r} of the model in ckpt_path={path}"
        for key in WEIGHT_KEYS
        if key in saved and saved[key] != spec.get(key)
    ]
    if (
        not problems
        and spec.get("source") == "scratch"
        and _name(saved.get("tokenizer_dir")) != _name(spec.get("tokenizer_dir"))
    ):
        problems.append(
            f"ckpt_path: {path} was trained with another tokenizer ({saved.get('tokenizer_dir')}) than this "
            f"knowledge base and data settings build ({spec.get('tokenizer_dir')}); its token ids would mean other tokens"
        )
    trained = (checkpoint.get("KBDataModule") or {}).get("block_size")
    if trained is not None and trained != block_size:
        problems.append(
            f"data.block_size: {block_size} differs from the {trained} the checkpoint {path} was trained with"
        )
    return problems


def _name(directory: str | None) -> str | None:
    # A scratch tokenizer's folder is named by its content, wherever the cache lives.
    return Path(directory).name if directory else None
