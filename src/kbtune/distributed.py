"""How the processes of one multi-process training (Lightning DDP/FSDP) agree on their session.

Lightning's launcher re-runs the training script for ranks 1..N-1. Rank zero creates the session and
hands its id, the checkpoint to resume from and the prepared data's key to those processes in their
environment; they train under that session and never write a record."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SESSION_ENV = "KBTUNE_SESSION_ID"
CKPT_ENV = "KBTUNE_CKPT_PATH"
DATA_KEY_ENV = "KBTUNE_DATA_KEY"
# Set by torchrun, Lightning's launcher, SLURM and jsrun (the keys Lightning itself reads).
_RANK_KEYS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_rank_zero() -> bool:
    """Whether this process is rank zero as its launcher announced it (true when not launched as a
    rank at all). A node other than the first has no rank zero, whatever its local ranks."""
    if os.environ.get("RANK") is not None:
        return int(os.environ["RANK"]) == 0
    if int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0) != 0:
        return False
    return all(int(os.environ.get(key) or 0) == 0 for key in _RANK_KEYS[1:])


@dataclass(frozen=True)
class RankZeroHandoff:
    """What rank zero told the other ranks."""

    session_id: str
    ckpt_path: str | None
    data_key: str

    @classmethod
    def from_env(cls) -> RankZeroHandoff:
        session_id = os.environ.get(SESSION_ENV)
        if not session_id:
            raise RuntimeError(
                f"this process is a non-zero rank of a multi-process run but {SESSION_ENV} is not set: "
                f"ranks other than zero train under the session rank zero created. Lightning's launcher passes "
                f"it on one node; on other nodes export {SESSION_ENV} (and {DATA_KEY_ENV}) from rank zero's log"
            )
        return cls(session_id, os.environ.get(CKPT_ENV) or None, os.environ.get(DATA_KEY_ENV, ""))


@contextmanager
def handoff_to_other_ranks(session_id: str, ckpt_path: str | None, data_key: str) -> Iterator[None]:
    """Publish the session to processes launched from here (children inherit the environment at
    launch), and withdraw it afterwards so a later session in this process starts clean."""
    values = {SESSION_ENV: session_id, CKPT_ENV: ckpt_path or "", DATA_KEY_ENV: data_key}
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
