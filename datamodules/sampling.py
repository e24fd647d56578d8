"""Training loaders that resume exactly: the order of an epoch is a function of (seed, epoch), and a run
resumed mid-epoch starts after the batches its checkpoint already trained on.

Lightning restores the loop counters but not the sampler, so a plain ``shuffle=True`` loader replays a
different order after ``--ckpt_path last``. Here every training sampler is a ``DistributedSampler`` (one
replica when not distributed), so Lightning keeps it under DDP and calls ``set_epoch`` on it, and the
DataLoader draws its worker seeds from its own generator rather than the global RNG, whose state the
checkpoint carries (``ShiftADModule``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that skips the first ``skip`` indices of its next pass (a resumed epoch).

    With ``epoch_keys`` it yields ``epoch * len(dataset) + index``, for datasets whose random draws must
    differ between epochs yet stay reproducible (they split the key with ``divmod``).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 epoch: int = 0, skip: int = 0, epoch_keys: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.set_epoch(epoch)
        self.skip = skip
        self.epoch_keys = epoch_keys

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        if self.epoch_keys:
            offset = self.epoch * len(self.dataset)
            indices = [offset + index for index in indices]
        return iter(indices[skip:])


def resume_point(trainer: Trainer | None, epoch_batches: int) -> tuple[int, int]:
    """(epoch, batches already trained in it) where a resumed fit continues; (0, 0) for a fresh one.

    Read from the loop progress that Lightning restored from the checkpoint before it asks for the
    training loader. ``epoch_batches`` is the number of batches of one epoch.
    """
    if trainer is None or trainer.ckpt_path is None:
        return 0, 0
    epochs = trainer.fit_loop.epoch_progress.current
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        epoch_batches = min(epoch_batches, limit)
    elif limit is not None and limit < 1.0:
        epoch_batches = int(epoch_batches * limit)
    if epochs.processed > epochs.completed or done >= epoch_batches:  # saved at the end of an epoch
        return epochs.completed + 1, 0
    return epochs.completed, done


def batches_per_epoch(samples: int, batch_size: int, drop_last: bool, num_replicas: int = 1) -> int:
    per_rank = math.ceil(samples / num_replicas)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def resumable_loader(dataset: Dataset, batch_size: int, seed: int, trainer: Trainer | None, drop_last: bool = False,
                     num_workers: int = 0, epoch_samples: int | None = None, epoch_keys: bool = False) -> DataLoader:
    """A shuffled training loader that continues a resumed epoch exactly where its checkpoint stopped.

    ``epoch_samples`` is the size of the largest dataset of the epoch, when this loader is cycled with longer
    ones (Lightning's ``max_size_cycle``); by default its own.
    """
    num_replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    own_batches = batches_per_epoch(len(dataset), batch_size, drop_last, num_replicas)
    epoch_batches = batches_per_epoch(epoch_samples or len(dataset), batch_size, drop_last, num_replicas)
    epoch, done = resume_point(trainer, epoch_batches)
    sampler = ResumableSampler(dataset, num_replicas, rank, seed=seed, epoch=epoch,
                               skip=(done % max(own_batches, 1)) * batch_size, epoch_keys=epoch_keys)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
