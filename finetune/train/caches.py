"""Latents and text embeddings computed once, before the first step. With several processes each
encodes its share and all of them receive the whole cache; every latent is seeded by its image
alone and every caption is encoded on its own, so the cache holds the same tensors on 1 or 8
processes (and in memory or on disk: disk_cache.py)."""

from __future__ import annotations

from collections.abc import Mapping
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


def encode_item(dataset, i: int, encode, seed: int, dtype: torch.dtype,
                shrink_mask: Callable | None = None) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """(latent on the CPU in `dtype`, sizes, mask) of example `i` of `dataset`; the mask (data.masks) on the
    latent grid by `shrink_mask` (Family.latent_mask), float32 on the CPU, or None when the item has none."""
    item = dataset.item(i, 0)
    latent = seeded_encode(encode, item["pixel_values"][None], [latent_seed(seed, i)])[0]
    if not torch.isfinite(latent).all():
        raise FinetuneError(f"the VAE produced NaN/inf latents for {item['key']}")
    mask = shrink_mask(item["mask"][None])[0].float().cpu() if "mask" in item and shrink_mask else None
    return latent.to(dtype).cpu(), {k: item[k] for k in SIZE_FIELDS}, mask


def progress(items, bar: str | None, accelerator):
    from tqdm.auto import tqdm

    return tqdm(items, desc=bar, disable=not bar or not accelerator.is_main_process)


def my_share(items: list, accelerator) -> list:
    return items[accelerator.process_index::accelerator.num_processes]


def gather_dicts(accelerator, *parts: dict) -> tuple[dict, ...]:
    """Each process's dicts updated with every other process's (a collective: all processes call it)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        for theirs in gather_object([parts]):
            for mine, other in zip(parts, theirs):
                mine.update(other)
    return parts


def build_latent_cache(dataset, encode, seed: int, dtype: torch.dtype, accelerator,
                       bar: str | None, shrink_mask: Callable | None = None) -> tuple[dict, dict, dict]:
    """({key: latent}, {key: sizes}, {key: mask} of the masked ones) for every example of `dataset`, shared
    by all processes; `bar`: the progress bar's title (None: no bar)."""
    latents, sizes, masks = {}, {}, {}
    for i in progress(my_share(list(range(len(dataset.examples))), accelerator), bar, accelerator):
        key = dataset.examples[i].key
        latents[key], sizes[key], mask = encode_item(dataset, i, encode, seed, dtype, shrink_mask)
        if mask is not None:
            masks[key] = mask
    return gather_dicts(accelerator, latents, sizes, masks)


def drawable_captions(dataset) -> set[str]:
    """Every caption `ImageCaptionDataset.caption` can hand out: each example's, and the empty one
    when caption dropout is on (any item may draw it in some epoch). Not for shuffled or dropped tags
    (`data.captions_vary`): their orders and subsets are too many to encode, and such runs encode per step."""
    if dataset.cfg.captions_vary:
        raise RuntimeError("internal error: captions that vary per step were asked to be cached; please report this")
    captions = {e.caption or "" for e in dataset.examples}
    if dataset.cfg.caption_dropout > 0:
        captions.add("")
    return captions


def encode_caption(family, c, caption: str) -> dict[str, torch.Tensor]:
    """One caption's embeddings, on the CPU. Alone, never in a batch: a caption's embedding then does not
    depend on which captions were encoded with it (nor on which were already on disk)."""
    with torch.no_grad():
        enc = family.encode_prompts(c, [caption])
    return {k: v[0].to("cpu", copy=True) for k, v in enc.items()}


def build_text_cache(captions: list[str], encode, accelerator, bar: str | None) -> dict[str, dict]:
    """{caption: embeddings} for every caption, shared by all processes."""
    mine = {cap: encode(cap) for cap in progress(my_share(captions, accelerator), bar, accelerator)}
    return gather_dicts(accelerator, mine)[0]


class TextCache:
    """Prompt embeddings by caption, every caption the run can draw computed before the first step (in
    memory, or on disk and read as batches ask): the training step never runs a text encoder."""

    def __init__(self, entries: Mapping[str, dict[str, torch.Tensor]], device):
        self.entries, self.device = entries, device

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        rows = {}
        for cap in dict.fromkeys(captions):
            if cap not in self.entries:
                # A silent encoder call here would run an encoder that may have left the GPU.
                raise RuntimeError(f"internal error: caption {cap!r} was not encoded before training "
                                   f"({len(self.entries)} captions were); please report this")
            rows[cap] = self.entries[cap]
        return {k: torch.stack([rows[cap][k] for cap in captions]).to(self.device) for k in rows[captions[0]]}
