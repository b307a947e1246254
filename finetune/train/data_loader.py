"""What the loop iterates: a torch DataLoader over the step sampler's draws, prepared by accelerate.

The sampler thinks in global batches: every optimizer step takes `accumulation` global batches of
up to batch_size x processes images, each global batch from one aspect-ratio bucket (the project's
BucketBatchSampler, asked for batches that size), sliced per process. It yields the slices one
after another, process 0's first, so accelerate's batch-sampler sharding (each process takes every
n-th batch) hands each process its own slice. Accumulation windows close at epoch ends.

Each draw carries the weight its loss gets. The loop sums weight x per-image loss; accelerate then
divides by the accumulation steps and DDP averages over processes, so weights of
processes x accumulation / (images in the window) make every step the mean over all the window's
images, on any number of processes. A process whose slice of a small bucket is empty gets a
weight-0 copy of an image: it still runs forward and backward, so no process waits for another.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import BucketBatchSampler
from ..data.dataset import collate

INSTANCE, CLASS = 0, 1
# Per image, for families conditioned on them (SDXL): size before cropping, crop offset, bucket size.
SIZE_FIELDS = ("original_size", "crop_top_left", "target_size")


class Draw(NamedTuple):
    """One image a step trains on: which dataset, which item, in which epoch (its crop, flip, caption
    dropout and noise depend on these alone), and the weight of its loss."""

    source: int
    index: int
    epoch: int
    weight: float


class StepSampler:
    """Per-process slices of global batches, instance images and (with prior preservation) the class
    images paired with them; the order depends on (seed, epoch) only."""

    batch_size = None  # slices vary in size; accelerate's sharding then passes them through as they are

    def __init__(self, instance_buckets: list[int], class_buckets: list[int] | None, batch_size: int,
                 processes: int, accumulation: int, seed: int):
        self.per_process, self.processes, self.accumulation = batch_size, processes, accumulation
        self.instances = BucketBatchSampler(instance_buckets, batch_size * processes, seed=seed)
        self.classes = BucketBatchSampler(class_buckets, batch_size * processes, seed=seed + 1) \
            if class_buckets else None
        self.epoch, self.skip = 0, 0
        self._class_epoch: tuple[int, list] | None = None

    @property
    def global_batches(self) -> int:
        return len(self.instances)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.global_batches / self.accumulation)

    def start_at(self, epoch: int, skip: int = 0) -> None:
        """Iterate `epoch` from global batch `skip` (a resumed run's position, a window boundary)."""
        self.epoch, self.skip = epoch, skip

    def set_epoch(self, epoch: int) -> None:
        # accelerate calls this on a single process; it must not undo start_at's skip.
        if epoch != self.epoch:
            self.start_at(epoch)

    def __len__(self) -> int:
        return (self.global_batches - self.skip) * self.processes

    def __iter__(self):
        self.instances.set_epoch(self.epoch)
        batches = list(self.instances)
        first_class = self.epoch * self.global_batches
        for start in range(self.skip, len(batches), self.accumulation):
            window = range(start, min(start + self.accumulation, len(batches)))
            classes = [self._class_batch(first_class + g) for g in window] if self.classes else None
            yield from self._window([batches[g] for g in window], classes)

    def _window(self, batches: list[list[int]], classes: list[list[tuple[int, int]]] | None):
        scale = self.processes * self.accumulation
        weight = scale / sum(map(len, batches))
        class_weight = scale / sum(map(len, classes)) if classes else 0.0
        for k, batch in enumerate(batches):
            instance = [Draw(INSTANCE, i, self.epoch, weight) for i in batch]
            cls = [Draw(CLASS, i, e, class_weight) for i, e in classes[k]] if classes else []
            for rank in range(self.processes):
                yield self._slice(instance, rank) + (self._slice(cls, rank) if cls else [])

    def _slice(self, draws: list[Draw], rank: int) -> list[Draw]:
        mine = draws[rank * self.per_process:(rank + 1) * self.per_process]
        return mine or [draws[0]._replace(weight=0.0)]

    def _class_batch(self, g: int) -> list[tuple[int, int]]:
        """Class global batch number `g` counted from the run's start, as (index, class epoch) pairs:
        class images cycle through their own epochs alongside the instance images."""
        epoch, k = divmod(g, len(self.classes))
        if self._class_epoch is None or self._class_epoch[0] != epoch:
            self.classes.set_epoch(epoch)
            self._class_epoch = (epoch, list(self.classes))
        return [(i, epoch) for i in self._class_epoch[1][k]]


class TrainingItems(Dataset):
    """Draws -> items. Images whose latents are cached are not decoded: the item is its caption and
    sizes, and the loop takes the latent from the cache."""

    def __init__(self, instances, classes=None, cached: tuple[dict, dict] | None = None):
        self.sources = {INSTANCE: instances, CLASS: classes}
        self.cached = cached  # ({key: latent}, {key: sizes}) for both sources, or None

    def __len__(self) -> int:
        return sum(len(d) for d in self.sources.values() if d is not None)

    def __getitem__(self, draw: Draw) -> dict:
        ds = self.sources[draw.source]
        if self.cached is None:
            return {**ds.item(draw.index, draw.epoch), "draw": draw}
        key = ds.example(draw.index).key
        return {"caption": ds.caption(draw.index, draw.epoch), "key": key, **self.cached[1][key], "draw": draw}


def collate_draws(items: list[dict]) -> dict:
    """{"instance": batch, "class": batch or None}; a batch holds captions, keys, draws, sizes and
    pixel_values (when not cached)."""
    out = {}
    for name, source in (("instance", INSTANCE), ("class", CLASS)):
        mine = [it for it in items if it["draw"].source == source]
        if not mine:
            out[name] = None
        elif "pixel_values" in mine[0]:
            out[name] = collate(mine)
        else:
            out[name] = {k: [it[k] for it in mine] for k in mine[0]}
    return out


def build_loader(items: TrainingItems, sampler: StepSampler, num_workers: int) -> DataLoader:
    """Decoding, resizing and augmentation run in `num_workers` worker processes (kept between epochs)."""
    # A generator of its own: each epoch's iterator draws a seed from it, and drawn from the global
    # RNG that seed would shift dropout's stream between a resumed run and an uninterrupted one.
    return DataLoader(items, batch_sampler=sampler, collate_fn=collate_draws, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(0))
