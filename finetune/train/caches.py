"""Latents and text embeddings computed once. With several processes each encodes its share of the
images and all of them receive the whole cache; every latent is seeded by its image alone, so the
cache holds the same tensors on 1 or 8 processes."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import FinetuneError
from .data_loader import SIZE_FIELDS


def fork_rng():
    """Run a block with its own RNG state, restoring the caller's (CPU and the current GPU)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def seeded_encode(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, seeds: list[int]):
    """Latents of `pixels`, image by image, each VAE sample drawn from its own seed (so an image's
    latent does not depend on the batch it came in or on what ran before)."""
    out = []
    with torch.no_grad(), fork_rng():
        for image, seed in zip(pixels, seeds):
            torch.manual_seed(seed)
            out.append(encode(image[None])[0])
    return torch.stack(out)


def latent_seed(seed: int, example: int, epoch: int = 0) -> int:
    return (seed * 1_000_003 + example) * 1_009 + epoch


def build_latent_cache(dataset, encode, seed: int, dtype: torch.dtype, accelerator,
                       bar: str | None) -> tuple[dict, dict]:
    """({key: latent}, {key: sizes}) for every example of `dataset`, shared by all processes;
    `bar`: the progress bar's title (None: no bar)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    n, rank, world = len(dataset.examples), accelerator.process_index, accelerator.num_processes
    latents, sizes = {}, {}
    for i in tqdm(range(rank, n, world), desc=bar, disable=not bar or not accelerator.is_main_process):
        item = dataset.item(i, 0)
        latent = seeded_encode(encode, item["pixel_values"][None], [latent_seed(seed, i)])[0]
        if not torch.isfinite(latent).all():
            raise FinetuneError(f"the VAE produced NaN/inf latents for {item['key']}")
        latents[item["key"]] = latent.to(dtype).cpu()
        sizes[item["key"]] = {k: item[k] for k in SIZE_FIELDS}
    if world > 1:
        for part in gather_object([(latents, sizes)]):
            latents.update(part[0])
            sizes.update(part[1])
    return latents, sizes


class TextCache:
    """Prompt embeddings by caption, encoded on first use (only when the text encoders are frozen)."""

    def __init__(self, family, c, enabled: bool):
        self.family, self.c, self.enabled = family, c, enabled
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if not self.enabled:
            return self.family.encode_prompts(self.c, captions)
        missing = [cap for cap in dict.fromkeys(captions) if cap not in self.cache]
        if missing:
            with torch.no_grad():
                enc = self.family.encode_prompts(self.c, missing)
            for j, cap in enumerate(missing):
                self.cache[cap] = {k: v[j] for k, v in enc.items()}
        return {k: torch.stack([self.cache[cap][k] for cap in captions]) for k in self.cache[captions[0]]}
