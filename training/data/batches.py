"""One epoch's global batches of distinct subjects, and this process's collated rows of each.

Every process cuts the same global batches (the order depends on ``seed`` and the epoch only) and takes its
``batch_size`` rows of each; ``EpochBatches`` is a map-style dataset whose item ``k`` is this process's rows of
global batch ``k``, so one ``DataLoader`` per epoch (its workers prefetching whole batches) serves every step.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, default_collate

from .dataset import SubjectDataset


def global_batches(num_items: int, global_batch: int, *, epoch: int, seed: int) -> list[list[int]]:
    """Shuffles subjects per epoch (same on every process) and cuts them into global batches; the last,
    incomplete one is dropped. Shapes: -> (num_items // global_batch) lists of ``global_batch`` indices."""
    if num_items < global_batch:
        raise ValueError(f"the data has {num_items} subjects, fewer than one global batch of {global_batch} "
                         "distinct subjects (batch_size x processes); add subjects or lower batch_size")
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[i:i + global_batch] for i in range(0, num_items - global_batch + 1, global_batch)]


class ReplacementCandidates:
    """Subjects that may stand in for the one at ``position`` of global ``batch`` if it is unreadable, made
    lazily (iterated only after a failure: nothing is built per sample otherwise).

    Outside the batch, starting after its first subject, and dealt round-robin to the batch positions
    (position p gets candidates p, p + G, p + 2G, ... of G = len(batch)): a replacement never duplicates a
    subject of the global batch, nor the replacement at another position (on this process or another),
    so the contrastive losses never see the same subject twice. Where the data has too few subjects outside
    the batch for every position to get its own, the others follow (a duplicate is then possible but rare:
    it needs several unreadable subjects in one small dataset's batch).
    """

    def __init__(self, batch: Sequence[int], position: int, num_items: int) -> None:
        self.batch, self.position, self.num_items = tuple(batch), position, num_items

    def __iter__(self):
        members = set(self.batch)
        outside = [i for i in ((self.batch[0] + k) % self.num_items for k in range(1, self.num_items))
                   if i not in members]
        own = outside[self.position::len(self.batch)]
        yield from own
        taken = set(own)
        yield from (i for i in outside if i not in taken)


def replacement_candidates(batch: Sequence[int], position: int, num_items: int) -> list[int]:
    """:class:`ReplacementCandidates` as a list."""
    return list(ReplacementCandidates(batch, position, num_items))


class EpochBatches(Dataset):
    """Item ``k``: rows ``rank * batch_size ... (rank + 1) * batch_size`` of global batch ``k`` of ``epoch``,
    collated (``default_collate`` of ``SubjectDataset`` samples: reference (b, 3, R, R), target (b, 3, S, S), ...).
    """

    def __init__(self, dataset: SubjectDataset, *, epoch: int, batch_size: int, rank: int, world: int,
                 seed: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), found {rank}")
        self.dataset, self.epoch, self.batch_size, self.rank = dataset, epoch, batch_size, rank
        self.batches = global_batches(len(dataset), batch_size * world, epoch=epoch, seed=seed)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        batch, n = self.batches[k], len(self.dataset)
        positions = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return default_collate([self.dataset.sample(batch[p], self.epoch, ReplacementCandidates(batch, p, n))
                                for p in positions])
