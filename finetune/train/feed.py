"""The run's data as the trainer consumes it: caches built, the step sampler and DataLoader made, and
the loss of one loader batch (instance images, plus class images with prior preservation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .caches import TextCache, build_latent_cache, seeded_encode
from .data_loader import StepSampler, TrainingItems, build_loader
from .objective import BatchLoss, vae_seeds
from .setup import WEIGHT_DTYPES, decide_caching


@dataclass
class Feed:
    sampler: StepSampler
    loader: object
    run: object
    accelerator: object
    latents: dict | None
    cache_text: bool

    def batch_loss(self, forward_c):
        """batch -> (loss to back-propagate, stats) with the models of `forward_c` (accelerate's wrappers)."""
        r, a = self.run, self.accelerator
        # Prompts go through forward_c too: a text encoder that trains must sync its gradients.
        text = TextCache(r.family, forward_c, self.cache_text)
        loss = BatchLoss(r.family, forward_c, r.recipe.training, text, a.autocast)
        pp = r.recipe.prior_preservation
        dtype = WEIGHT_DTYPES[r.recipe.training.mixed_precision]

        def compute(batch: dict):
            inst = batch["instance"]
            total, loss_sum, n = loss(self._latents(inst, dtype), inst, self._captions(inst))
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


def build_feed(run, accelerator) -> Feed:
    from ..data import ImageCaptionDataset
    from ..data.prior import class_examples

    recipe, tr = run.recipe, run.recipe.training
    cache_latents, cache_text = decide_caching(recipe, run.dataset, run.method)
    classes = None
    if run.class_files:
        classes = ImageCaptionDataset(class_examples(run.class_files, recipe.prior_preservation.class_prompt),
                                      recipe.data.model_copy(update={"repeats": 1, "caption_dropout": 0.0}),
                                      seed=tr.seed + 1)
    latents = _latent_caches(run, accelerator, classes) if cache_latents else None
    sampler = StepSampler(run.dataset.bucket_of_index, classes.bucket_of_index if classes else None,
                          tr.batch_size, accelerator.num_processes, tr.gradient_accumulation_steps, tr.seed)
    items = TrainingItems(run.dataset, classes, latents)
    loader = build_loader(items, sampler, recipe.data.num_workers)
    truncated = run.family.count_truncated(run.c, [e.caption or "" for e in run.examples])
    if truncated:
        run.log(f"warning: {truncated} caption(s) are longer than the text encoder's token limit and will be cut")
    return Feed(sampler, loader, run, accelerator, latents[0] if latents else None, cache_text)


def _latent_caches(run, accelerator, classes) -> tuple[dict, dict]:
    tr = run.recipe.training
    dtype = WEIGHT_DTYPES[tr.mixed_precision]
    encode = lambda px: run.family.encode_images(run.c, px.to(accelerator.device))  # noqa: E731
    latents, sizes = build_latent_cache(run.dataset, encode, tr.seed, dtype, accelerator,
                                        "caching latents" if run.progress else None)
    if classes is not None:
        more = build_latent_cache(classes, encode, tr.seed + 1, dtype, accelerator,
                                  "caching class latents" if run.progress else None)
        latents.update(more[0])
        sizes.update(more[1])
    return latents, sizes
