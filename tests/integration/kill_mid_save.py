"""Run by test_checkpoint_faults as `python kill_mid_save.py N OVERRIDES...`: trains a new session and
SIGKILLs itself halfway through writing last.ckpt for the N-th time, as a kill during a checkpoint
save does (the test sets TMPDIR to another filesystem, where Lightning's own writer copies)."""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

from kbtune.configuration import load
from kbtune.hydra_entry import compose, to_container
from kbtune.project import Project
from kbtune.session_runner import SessionRunner


def main() -> None:
    kill_at, overrides = int(sys.argv[1]), sys.argv[2:]
    real_save = torch.save
    saves = [0]

    def save(obj, f, *args, **kwargs):
        if "last.ckpt" in str(getattr(f, "name", "")):
            saves[0] += 1
            if saves[0] == kill_at:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    plan, runtime = load(to_container(compose(overrides)))
    SessionRunner(Project({}, runtime).service).run(plan)


if __name__ == "__main__":
    main()
