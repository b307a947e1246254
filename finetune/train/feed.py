"""The run's data as the trainer consumes it: caches built, the step sampler and DataLoader made, and
the loss of one loader batch (instance images, plus class images with prior preservation)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch

from .caches import TextCache, build_latent_cache, build_text_cache, drawable_captions, encode_caption, seeded_encode
from .data_loader import StepSampler, TrainingItems, build_loader
from .held_out import cache_held_out
from .objective import BatchLoss, vae_seeds
from .setup import WEIGHT_DTYPES, decide_caching


@dataclass
class Feed:
    sampler: StepSampler
    loader: object
    run: object
    accelerator: object
    latents: Mapping | None  # {key: latent}, in memory or read from memory.cache_dir; None: encoded each step
    text: TextCache | None  # every caption's embeddings, made before the first step; None: encoded each step
    held_out: object = None  # held_out.HeldOutCache of the images kept out of training; None: none are
    masks: Mapping | None = None  # {key: data.masks mask on the latent grid} of cached latents; None: none

    @property
    def latents_precomputed(self) -> bool:
        """No VAE is needed by the training step."""
        return self.latents is not None

    @property
    def text_precomputed(self) -> bool:
        """No text encoder is needed by the training step."""
        return self.text is not None

    def batch_loss(self, forward_c):
        """batch -> (loss to back-propagate, stats) with the models of `forward_c` (accelerate's wrappers)."""
        r, a = self.run, self.accelerator
        # Uncached prompts go through forward_c: a text encoder that trains must sync its gradients.
        text = self.text if self.text is not None else partial(r.family.encode_prompts, forward_c)
        loss = BatchLoss(r.family, forward_c, r.recipe.training, text, a.autocast, r.recipe.data)
        pp = r.recipe.prior_preservation
        dtype = WEIGHT_DTYPES[r.recipe.training.mixed_precision]

        def compute(batch: dict):
            inst = batch["instance"]
            total, loss_sum, n = loss(self._latents(inst, dtype), inst, self._captions(inst), self._masks(inst))
            stats = {"loss": float(loss_sum), "images": n}
            if batch.get("class") is not None:
                cls = batch["class"]
                prior, prior_sum, m = loss(self._latents(cls, dtype), cls, self._captions(cls))
                total = total + pp.prior_loss_weight * prior
                stats.update(prior=float(prior_sum), prior_images=m)
            return total, stats

        return compute

    def _captions(self, batch: dict) -> list[str]:
        return [self.run.method.prepare_caption(cap) for cap in batch["caption"]]

    def _latents(self, batch: dict, dtype) -> torch.Tensor:
        device = self.accelerator.device
        if self.latents is not None:
            return torch.stack([self.latents[k] for k in batch["key"]]).to(device, dtype)
        r = self.run
        encode = lambda px: r.family.encode_images(r.c, px.to(device))  # noqa: E731
        return seeded_encode(encode, batch["pixel_values"], vae_seeds(r.recipe.training.seed, batch["draw"])
                             ).to(device, dtype)

    def _masks(self, batch: dict) -> torch.Tensor | None:
        """The batch's data.masks on the latent grid (B, 1, h, w), or None (no masks: class images, or none set)."""
        if self.latents is not None:
            if self.masks is None or batch["key"][0] not in self.masks:
                return None
            return torch.stack([self.masks[k] for k in batch["key"]]).to(self.accelerator.device)
        if "mask" not in batch:
            return None
        return self.run.family.latent_mask(self.run.c, batch["mask"].to(self.accelerator.device))


def build_feed(run, accelerator, text_cached=None) -> Feed:
    """Caches built (captions first, then `text_cached(all encoded)` is called, then latents), the
    step sampler and the DataLoader."""
    from ..data import ImageCaptionDataset
    from ..data.prior import class_examples
    from .disk_cache import DiskCache

    recipe, tr = run.recipe, run.recipe.training
    cache_latents, cache_text = decide_caching(recipe, run.dataset, run.method, run.log)
    classes = None
    if run.class_files:
        # The class prompt as written: its images were made from exactly that prompt.
        fixed = {"repeats": 1, "caption_dropout": 0.0, "shuffle_tags": False, "tag_dropout": 0.0}
        classes = ImageCaptionDataset(class_examples(run.class_files, recipe.prior_preservation.class_prompt),
                                      recipe.data.model_copy(update=fixed), seed=tr.seed + 1)
    folder = recipe.memory.cache_dir
    disk = DiskCache.open(folder, accelerator, run.log) if folder and (cache_latents or cache_text) else None
    if folder and disk is None:
        run.log("memory.cache_dir: this run caches neither latents nor text embeddings (data.cache_latents, "
                "data.cache_text_embeddings); the folder is not used")
    text = _text_cache(run, accelerator, classes, disk) if cache_text else None
    held_out = cache_held_out(run, accelerator)  # while the text encoders and the VAE are still on the GPU
    if text_cached is not None:
        text_cached(text is not None)
    latents = _latent_caches(run, accelerator, classes, disk) if cache_latents else None
    if disk is not None:
        run.log(disk.summary())
    sampler = StepSampler(run.dataset.bucket_of_index, classes.bucket_of_index if classes else None,
                          tr.batch_size, accelerator.num_processes, tr.gradient_accumulation_steps, tr.seed)
    items = TrainingItems(run.dataset, classes, latents[:2] if latents else None)
    loader = build_loader(items, sampler, recipe.data.num_workers)
    truncated = run.family.count_truncated(run.c, [e.caption or "" for e in run.examples])
    if truncated:
        run.log(f"warning: {truncated} caption(s) are longer than the text encoder's token limit and will be cut")
    return Feed(sampler, loader, run, accelerator, latents[0] if latents else None, text, held_out,
                latents[2] if latents else None)


def _latent_caches(run, accelerator, classes, disk) -> tuple[Mapping, dict, Mapping | None]:
    """({key: latent}, {key: sizes}, {key: mask} or None) of the instance and class images (class images
    have no masks): in memory, or on disk (read one at a time when a batch asks)."""
    from ..data.masks import image_mask_digest
    from .disk_cache import DiskEntries, LatentEncoder, latent_identity

    tr = run.recipe.training
    dtype = WEIGHT_DTYPES[tr.mixed_precision]
    encode = lambda px: run.family.encode_images(run.c, px.to(accelerator.device))  # noqa: E731
    shrink = partial(run.family.latent_mask, run.c)
    encoder = LatentEncoder(encode, dtype, latent_identity(run.family, run.c, dtype, accelerator.device), shrink) \
        if disk is not None else None
    latents, sizes, masks = {}, {}, {}
    for dataset, seed, title in ((run.dataset, tr.seed, "caching latents"),
                                 (classes, tr.seed + 1, "caching class latents")):
        if dataset is None:
            continue
        bar = title if run.progress else None
        if disk is not None:
            part = disk.latents(dataset, seed, encoder, bar)
            # The masked entries' files hold their masks too, read (like the latents) when a batch asks.
            masks.update({e.key: part[0][e.key] for e in dataset.examples if image_mask_digest(e) is not None})
        else:
            part = build_latent_cache(dataset, encode, seed, dtype, accelerator, bar, shrink)
            masks.update(part[2])
        latents.update(part[0])
        sizes.update(part[1])
    if disk is not None:
        return DiskEntries(latents, "latent"), sizes, (DiskEntries(masks, "mask") if masks else None)
    return latents, sizes, masks or None


def _text_cache(run, accelerator, classes, disk) -> TextCache:
    """Every caption a batch can hold (each example's after the method's rewrite, the empty one under
    caption dropout, the class prompt), encoded now: in memory, or on disk."""
    from .disk_cache import DiskEntries, text_identity

    captions = sorted({run.method.prepare_caption(cap) for ds in (run.dataset, classes) if ds is not None
                       for cap in drawable_captions(ds)})
    encode = partial(encode_caption, run.family, run.c)
    bar = "encoding captions" if run.progress else None
    if disk is None:
        return TextCache(build_text_cache(captions, encode, accelerator, bar), accelerator.device)
    paths = disk.texts(captions, encode, text_identity(run.family, run.c, accelerator.device), bar)
    return TextCache(DiskEntries(paths), accelerator.device)
