"""The batch sampler the training loop iterates: every batch from one aspect-ratio bucket."""

from __future__ import annotations

import math

from torch.utils.data import Sampler

from .buckets import seeded_rng


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each batch from a single bucket.

    Every index appears exactly once per epoch: a bucket holding fewer images than `batch_size`
    (or a remainder) yields a smaller batch instead of being dropped. The order depends only on
    (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, bucket_of_index: list[int], batch_size: int, seed: int = 0, shuffle: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.bucket_of_index = list(bucket_of_index)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_of_index):
            groups.setdefault(bucket, []).append(index)
        return list(groups.values())

    def __iter__(self):
        rng = seeded_rng(self.seed, self.epoch)
        batches = []
        for indices in self._groups():
            if self.shuffle:
                indices = [indices[j] for j in rng.permutation(len(indices))]
            batches += [indices[k:k + self.batch_size] for k in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return iter(batches)

    def __len__(self) -> int:
        return sum(math.ceil(len(g) / self.batch_size) for g in self._groups())
