"""Batches for the loop: one bucket per batch, latents from the cache when the pixels are
deterministic, otherwise encoded on the fly from the dataset's pixels."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..data import BucketBatchSampler, collate
from ..errors import FinetuneError


class BatchSource:
    def __init__(self, dataset, batch_size: int, seed: int, encode: Callable[[torch.Tensor], torch.Tensor],
                 cache_latents: bool, dtype: torch.dtype, progress: bool = False, desc: str = "caching latents"):
        self.dataset = dataset
        self.sampler = BucketBatchSampler(dataset.bucket_of_index, batch_size, seed=seed)
        self.encode = encode
        self.dtype = dtype
        self.cache: dict[str, torch.Tensor] | None = None
        if cache_latents:
            self.cache = {}
            self._fill_cache(progress, desc)

    @torch.no_grad()
    def _fill_cache(self, progress: bool, desc: str) -> None:
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self.dataset.examples)), desc=desc, disable=not progress):
            item = self.dataset[i]
            latent = self.encode(item["pixel_values"][None])[0]
            if not torch.isfinite(latent).all():
                raise FinetuneError(f"the VAE produced NaN/inf latents for {item['key']}")
            self.cache[item["key"]] = latent.to(self.dtype)

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> Iterator[dict]:
        ds = self.dataset
        ds.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        for indices in self.sampler:
            if self.cache is not None:
                keys = [ds.example(i).key for i in indices]
                yield {"latents": torch.stack([self.cache[k] for k in keys]),
                       "captions": [ds.caption(i) for i in indices], "keys": keys}
            else:
                batch = collate([ds[i] for i in indices])
                yield {"pixel_values": batch["pixel_values"], "captions": batch["caption"], "keys": batch["key"]}

    def forever(self) -> Iterator[dict]:
        """Epoch after epoch without end (class images cycle alongside the instance images)."""
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1

    def latents(self, batch: dict) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"]
        with torch.no_grad():
            return self.encode(batch["pixel_values"])
