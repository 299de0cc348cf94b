"""The LightningDataModule over DataPreparation: prepared blocks -> deterministic, resumable loaders."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kbtune.data.preparation import DataPreparation, PreparedData

logger = logging.getLogger(__name__)


class BlockDataset(Dataset):
    def __init__(self, blocks: np.ndarray, labels: np.ndarray | None = None):
        self.blocks = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.int64))
        self.labels = (
            torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)) if labels is not None else None
        )

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids if self.labels is None else self.labels[i]}


class EpochViewDataset(Dataset):
    """The training blocks of the current epoch's view (kbtune.data.augmentation.EpochViews)."""

    def __init__(self, views: Any):
        self.views = views
        self.epoch: int | None = None
        self.current = BlockDataset(*views.blocks(0))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.current, self.epoch = BlockDataset(*self.views.blocks(epoch)), epoch

    def __len__(self) -> int:
        return len(self.current)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.current[i]


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same order as an
    uninterrupted one. `resume_at` drops the indices an interrupted run already trained on, in that
    epoch only: a checkpoint taken at an epoch's end must not empty the next epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0
        self.skip_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, samples: int) -> None:
        self.skip_epoch, self.skip = epoch, samples

    def pending_skip(self) -> int:
        """Samples the next iteration leaves out (Lightning sets the epoch after loading the state)."""
        return self.skip if self.epoch == self.skip_epoch else 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.n))
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        # Every rank gets an equal, disjoint share (the tail that does not divide evenly is dropped).
        per_rank = self.n // self.world_size
        return order[self.rank * per_rank : (self.rank + 1) * per_rank] if self.world_size > 1 else order

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        skip, self.skip = self.pending_skip(), 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return (self.n // self.world_size) if self.world_size > 1 else self.n


class ResumableLoader(DataLoader):
    """A DataLoader Lightning treats as stateful: its state is (epoch, batches consumed), and loading
    it makes the next iteration skip what the interrupted run had already trained on. With a known
    length Lightning fetches no batch ahead, so "consumed" is "trained on" at every checkpoint."""

    def __init__(self, dataset: Dataset, batch_size: int, sampler: EpochShuffleSampler):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, num_workers=0)
        self._consumed = 0

    def __iter__(self) -> Any:
        sampler: EpochShuffleSampler = self.sampler  # type: ignore[assignment]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(sampler.epoch)  # an epoch's view is built before its first batch
        self._consumed = sampler.pending_skip() // self.batch_size
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: EpochShuffleSampler = self.sampler  # type: ignore[assignment]
        return {"epoch": sampler.epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: EpochShuffleSampler = self.sampler  # type: ignore[assignment]
        sampler.set_epoch(state["epoch"])
        sampler.resume_at(state["epoch"], state["batches"] * self.batch_size)


class KBDataModule(pl.LightningDataModule):
    """Usable without Hydra: `KBDataModule(DataPreparation(kb, DataSettings(), tokenizer_factory))`."""

    def __init__(self, preparation: DataPreparation, batch_size: int | None = None, seed: int = 0):
        super().__init__()
        self.preparation = preparation
        self.batch_size = batch_size or preparation.settings.batch_size
        self.seed = seed
        self.data: PreparedData | None = None
        self._train_loader: ResumableLoader | None = None
        self._resume_position: dict[str, int] | None = None

    def prepare_data(self) -> None:
        self.preparation.prepare_dataset()

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = self.preparation.prepare_dataset()

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        assert self.data is not None, "call setup() first"
        rank, world = self._rank()
        dataset = self._train_dataset()
        sampler = EpochShuffleSampler(len(dataset), self.seed, True, rank, world)
        loader = ResumableLoader(dataset, self.batch_size, sampler)
        if self._resume_position is not None:
            loader.load_state_dict(self._resume_position)
            self._resume_position = None
        self._train_loader = loader
        return loader

    def _train_dataset(self) -> Dataset:
        assert self.data is not None
        if self.data.augmentation is None:
            return BlockDataset(self.data.train, self.data.train_labels)
        from kbtune.data.augmentation import EpochViews

        aug = self.data.augmentation
        views = EpochViews(aug["texts"], [tuple(p) for p in aug["qa"]], self.data.tokenizer,
                           self.preparation.settings, self.seed)  # fmt: skip
        return EpochViewDataset(views)

    # The data position also travels as the DataModule's state: Lightning restores a stateful loader
    # only if it builds the loader after loading the checkpoint, but with `max_epochs` set
    # `configure_optimizers` (estimated_stepping_batches) builds it before, and the position is lost.
    def state_dict(self) -> dict[str, Any]:
        # The block size travels too: a checkpoint must not continue with blocks of another length.
        state: dict[str, Any] = {"block_size": self.preparation.settings.block_size}
        if self._train_loader is not None:
            state["train_position"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_position = state.get("train_position")

    def val_dataloader(self) -> DataLoader:
        assert self.data is not None, "call setup() first"
        rank, world = self._rank()
        dataset = BlockDataset(self.data.val, self.data.val_labels)
        sampler = EpochShuffleSampler(len(dataset), self.seed, False, rank, world)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=0)


def train_batches(preparation: DataPreparation, batch_size: int, seed: int = 0, world_size: int = 1) -> int:
    """Training batches per epoch on each rank, as KBDataModule.train_dataloader yields them (with
    per-epoch views, the first epoch's)."""
    datamodule = KBDataModule(preparation, batch_size, seed)
    datamodule.setup()
    blocks = len(datamodule._train_dataset())
    per_rank = blocks // world_size if world_size > 1 else blocks
    return -(-per_rank // datamodule.batch_size)
