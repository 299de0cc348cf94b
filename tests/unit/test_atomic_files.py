"""Files written whole or not at all: a kill in the middle of a checkpoint write keeps the previous
checkpoint (even with TMPDIR on another filesystem), a full disk names the file and leaves no partial
copy, a half-written checkpoint is recognised and named, and a killed writer's leftovers go on the
next start."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kbtune.atomic_files import WriteFailed, atomic_directory, atomic_file, remove_stale_temps
from kbtune.checkpoint_io import AtomicCheckpointIO
from kbtune.checkpoints import CheckpointError, checkpoint_problem

# A child that saves one checkpoint, then is killed (SIGKILL) halfway through writing the next.
KILLED_WRITER = """
import io, os, signal, sys, torch
from kbtune.checkpoint_io import AtomicCheckpointIO

path = sys.argv[1]
io_ = AtomicCheckpointIO()
io_.save_checkpoint({"step": 1, "w": torch.ones(50_000)}, path)
real_save = torch.save

def save_half_then_die(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_half_then_die
io_.save_checkpoint({"step": 2, "w": torch.zeros(50_000)}, path)
"""


def other_filesystem_tmp(tmp_path: Path) -> Path:
    """A TMPDIR on another filesystem than the checkpoints where there is one (/dev/shm): the case in
    which Lightning's own writer moves a checkpoint into place by copying it."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        directory = shm / f"kbtune-test-{os.getpid()}"
        directory.mkdir(exist_ok=True)
        return directory
    return tmp_path / "tmp"


def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    tmpdir = other_filesystem_tmp(tmp_path)
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", KILLED_WRITER, str(path)], env=env, capture_output=True, timeout=120
        )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]

    assert checkpoint_problem(path) is None
    kept = AtomicCheckpointIO().load_checkpoint(path, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(50_000))
    (leftover,) = path.parent.glob(".last.ckpt.*.kbtune-tmp")
    assert 0 < leftover.stat().st_size < path.stat().st_size  # the cut-short write, beside it

    assert remove_stale_temps(path.parent) == [leftover]
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(WriteFailed) as err:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert str(err.value) == f"could not write {path}: No space left on device; free some space and try again"
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert AtomicCheckpointIO().load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_model_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"x" * 100)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]

    full = f"could not write {target / 'model.safetensors'}: No space left"
    with pytest.raises(WriteFailed, match=full), atomic_directory(target) as staging:
        (staging / "config.json").write_text('{"new": 1}')
        (staging / "model.safetensors").write_bytes(b"y" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # The earlier folder is untouched and no partial copy is left beside it.
    assert (target / "config.json").read_text() == "{}" and (
        target / "model.safetensors"
    ).stat().st_size == 100
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_cut_short_or_damaged_checkpoint_is_named(tmp_path):
    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(10_000.0)}, good)
    data = good.read_bytes()
    empty, truncated, flipped = (
        tmp_path / "empty.ckpt",
        tmp_path / "truncated.ckpt",
        tmp_path / "flipped.ckpt",
    )
    empty.write_bytes(b"")
    truncated.write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF  # inside the tensor's record
    flipped.write_bytes(bytes(damaged))

    assert checkpoint_problem(good) is None
    assert checkpoint_problem(empty) == "is empty (0 bytes): its write was cut short"
    assert checkpoint_problem(truncated).startswith("is not a complete checkpoint")
    assert checkpoint_problem(flipped).startswith("is corrupt (its record")
    with pytest.raises(CheckpointError, match=f"^{truncated} is not a complete checkpoint"):
        AtomicCheckpointIO().load_checkpoint(truncated)


def test_leftovers_of_a_live_writer_are_kept(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = tmp_path / f".last.ckpt.{alive.pid}.kbtune-tmp"
        dead = tmp_path / ".last.ckpt.999999999.kbtune-tmp"
        folder = tmp_path / ".model.999999999.kbtune-tmp"
        for path in (mine, dead):
            path.write_bytes(b"partial")
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
        assert sorted(remove_stale_temps(tmp_path)) == sorted([dead, folder])
        assert mine.exists()
    finally:
        alive.kill()
        alive.wait()


def test_an_interrupted_write_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "state.bin"
    with atomic_file(path) as handle:
        handle.write(b"one")
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as handle:
        handle.write(b"tw")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"one"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
