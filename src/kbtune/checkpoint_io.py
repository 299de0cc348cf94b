"""Lightning's checkpoint writer for kbtune's trainer: each checkpoint is written whole or not at all,
with its temporary file beside it (kbtune.atomic_files), and a checkpoint that cannot be read names
its file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from kbtune.atomic_files import atomic_file
from kbtune.checkpoints import CheckpointError, checkpoint_problem


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO stages a checkpoint in TMPDIR and moves it into place; where TMPDIR is another
    filesystem that move is a copy, and a kill during it leaves last.ckpt truncated (even empty)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        import torch

        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_file(path) as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except (RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(
                f"{path} {checkpoint_problem(Path(path)) or f'cannot be read: {exc}'}"
            ) from exc
