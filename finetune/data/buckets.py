"""Aspect-ratio bucketing: non-square images train at a nearby shape of about the same area
instead of being cropped to a square, and every batch holds images of one shape.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler

from ..errors import FinetuneError


def bucket_step(resolution: int) -> int:
    # 64 keeps latent sides multiples of 8 (friendly to the UNet's downsampling). A resolution that
    # is not a multiple of 64 could not have its own square bucket, and below 256 a 64-pixel step
    # leaves (almost) only the square, so those use the VAE's factor of 8.
    return 64 if resolution % 64 == 0 and resolution >= 256 else 8


def make_buckets(resolution: int, step: int | None = None, min_size: int | None = None,
                 max_size: int | None = None) -> list[tuple[int, int]]:
    """(width, height) shapes with area <= resolution**2, sides multiples of `step` within
    [min_size, max_size] (default resolution/2 .. resolution*2), always including the square."""
    step = step or bucket_step(resolution)
    lo = math.ceil((min_size or resolution // 2) / step) * step
    hi = (max_size or resolution * 2) // step * step
    if not lo <= resolution <= hi:
        raise FinetuneError(f"data.bucketing: bucket sides {lo}..{hi} (min_size..max_size, in steps of "
                            f"{step}) must include data.resolution {resolution}")
    max_area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(lo, hi + 1, step):
        height = min(hi, max_area // width // step * step)  # the tallest shape that fits the area
        if height >= lo:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def training_buckets(cfg) -> list[tuple[int, int]]:
    """The shapes a DataConfig trains at: its buckets, or only the square when bucketing is off."""
    if cfg.bucketing.enabled:
        return make_buckets(cfg.resolution, min_size=cfg.bucketing.min_size, max_size=cfg.bucketing.max_size)
    return [(cfg.resolution, cfg.resolution)]


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (ties: the larger bucket)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def seeded_rng(*seeds: int) -> np.random.Generator:
    # SeedSequence wants non-negative entropy; masking keeps negative seeds usable and distinct.
    return np.random.default_rng([s & 0xFFFF_FFFF_FFFF_FFFF for s in seeds])


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
