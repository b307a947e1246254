"""Batches for the loop: one bucket per batch, latents from the cache when the pixels are
deterministic, otherwise encoded on the fly from the dataset's pixels."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..data import BucketBatchSampler, collate
from ..errors import FinetuneError


# Per image, for families conditioned on them (SDXL): size before cropping, crop offset, bucket size.
SIZE_FIELDS = ("original_size", "crop_top_left", "target_size")


def fork_rng():
    """Run a block with its own RNG state, restoring the caller's (CPU and the current GPU)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


class BatchSource:
    def __init__(self, dataset, batch_size: int, seed: int, encode: Callable[[torch.Tensor], torch.Tensor],
                 cache_latents: bool, dtype: torch.dtype, progress: bool = False, desc: str = "caching latents"):
        self.dataset = dataset
        self.sampler = BucketBatchSampler(dataset.bucket_of_index, batch_size, seed=seed)
        self.encode = encode
        self.seed = seed
        self.dtype = dtype
        self.cache: dict[str, torch.Tensor] | None = None
        self.sizes: dict[str, dict] = {}
        if cache_latents:
            self.cache = {}
            self._fill_cache(progress, desc)

    @torch.no_grad()
    def _fill_cache(self, progress: bool, desc: str) -> None:
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self.dataset.examples)), desc=desc, disable=not progress):
            item = self.dataset[i]
            # The VAE samples its latent: seeded per image and apart from the training RNG, so the
            # cache is the same whatever ran before it (class images generated or found, a resume).
            with fork_rng():
                torch.manual_seed(self.seed * 1_000_003 + i)
                latent = self.encode(item["pixel_values"][None])[0]
            if not torch.isfinite(latent).all():
                raise FinetuneError(f"the VAE produced NaN/inf latents for {item['key']}")
            self.cache[item["key"]] = latent.to(self.dtype)
            self.sizes[item["key"]] = {k: item[k] for k in SIZE_FIELDS}

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """This epoch's batches, after the first `skip` (a resumed run's position; not loaded)."""
        ds = self.dataset
        ds.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        for n, indices in enumerate(self.sampler):
            if n < skip:
                continue
            if self.cache is not None:
                keys = [ds.example(i).key for i in indices]
                yield {"latents": torch.stack([self.cache[k] for k in keys]),
                       "captions": [ds.caption(i) for i in indices], "keys": keys,
                       **{f: [self.sizes[k][f] for k in keys] for f in SIZE_FIELDS}}
            else:
                batch = collate([ds[i] for i in indices])
                yield {"pixel_values": batch["pixel_values"], "captions": batch["caption"], "keys": batch["key"],
                       **{f: batch[f] for f in SIZE_FIELDS}}

    def forever(self, skip: int = 0) -> Iterator[dict]:
        """Epoch after epoch without end (class images cycle alongside the instance images),
        after the first `skip` batches."""
        epoch, skip = divmod(skip, len(self))
        while True:
            yield from self.epoch(epoch, skip)
            epoch, skip = epoch + 1, 0

    def latents(self, batch: dict) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"]
        with torch.no_grad():
            return self.encode(batch["pixel_values"])
