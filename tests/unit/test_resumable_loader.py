"""The training loader's data position: what an interrupted epoch resumes with, and that a position
saved at an epoch's end never empties the next epoch."""

from __future__ import annotations

import numpy as np

from kbtune.data.datamodule import BlockDataset, EpochShuffleSampler, ResumableLoader


def _loader(n: int = 10, batch_size: int = 3, seed: int = 5) -> ResumableLoader:
    blocks = np.arange(n, dtype=np.int64).reshape(n, 1)
    return ResumableLoader(BlockDataset(blocks), batch_size, EpochShuffleSampler(n, seed))


def _ids(batches) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in batches]


def test_a_resumed_epoch_yields_exactly_the_batches_not_yet_trained():
    uninterrupted = _loader()
    uninterrupted.sampler.set_epoch(2)
    expected = _ids(uninterrupted)

    first = _loader()
    first.sampler.set_epoch(2)
    it = iter(first)
    trained = _ids([next(it), next(it)])
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 2}

    resumed = _loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # what Lightning does at the epoch's start, after loading the state
    assert trained + _ids(resumed) == expected
    # The next epoch is whole again, in its own order.
    resumed.sampler.set_epoch(3)
    third = _loader()
    third.sampler.set_epoch(3)
    assert _ids(resumed) == _ids(third)


def test_a_position_saved_at_an_epoch_end_leaves_the_next_epoch_whole():
    first = _loader()
    first.sampler.set_epoch(0)
    assert len(_ids(first)) == 4
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 4}

    resumed = _loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    fresh = _loader()
    fresh.sampler.set_epoch(1)
    assert _ids(resumed) == _ids(fresh) and len(_ids(fresh)) == 4
