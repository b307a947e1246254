"""Images kept out of training and the held-out validation loss measured on them at each validation
step (what it decides, keep_best and early stopping, is decisions.py's).

- The split (`data.validation_split`) is a seeded permutation of the example keys: the same
  images are held out on every process and in a resumed run; they leave the examples before the
  dataset is built, so no training batch can draw them (and the data fingerprint a resume checks
  covers the training images only). `data.validation_path` names a set of its own instead.
- Their latents and caption embeddings are made by `cache_held_out` while the VAE and the text
  encoders are still on the GPU (from `build_feed`, before either may be offloaded): measuring
  never runs a text encoder that has left. Only a method that trains the text encoder (its
  outputs change as it trains; it is never offloaded then) has its captions encoded when measured.
- The loss is `evaluate.fixed_noise_loss` per image under that image's own seed, so the same
  noise and timesteps every validation: two values differ only by what the model learned; with
  data.masks, weighted by each image's mask as training weighs it (a val_loss that counted the
  background, which the run does not learn, would hide what it does learn on the subject). The
  main process measures, every process receives the value (every one must take the same
  keep_best and early-stopping decisions, which save checkpoints together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import FinetuneError
from .decisions import METRIC, write_row

SPLIT_STREAM = 7  # seeded_rng stream of the split, apart from the dataset's and the loss's streams
REPEATS = 4  # noise and timestep draws per held-out image: a steadier mean than one draw


# ------------------------------------------------------------------ the split, before any model loads


def split_examples(recipe, examples: list, base_dir: Path | None, log) -> tuple[list, list]:
    """(training examples, held-out examples) as `data.validation_split` / `data.validation_path` say."""
    data = recipe.data
    if data.validation_path:
        held = _path_examples(data, base_dir, log)
        log(f"validation: {len(held)} held-out images from {data.validation_path}")
        return examples, held
    if not data.validation_split:
        return examples, []
    n = len(examples)
    k = int(n * data.validation_split + 1e-9)  # 0.3 x 10 is 3.0000000000000004 in floats, 0.29 x 100 28.999...
    if k == 0:
        raise FinetuneError(f"data.validation_split: {data.validation_split} of {n} images holds none out; use at "
                            f"least {math.ceil(1 / data.validation_split - 1e-9)} images, a larger split (at most "
                            "0.5) or data.validation_path")
    held_keys = set(held_out_keys([e.key for e in examples], k, recipe.training.seed))
    log(f"validation: {k} of {n} images held out (data.validation_split {data.validation_split}, "
        f"seed {recipe.training.seed})")
    return [e for e in examples if e.key not in held_keys], [e for e in examples if e.key in held_keys]


def held_out_keys(keys: list[str], k: int, seed: int) -> list[str]:
    """`k` of `keys`, chosen by `seed` alone: the order keys were found in does not matter."""
    from ..data.buckets import seeded_rng

    return [str(key) for key in seeded_rng(seed, SPLIT_STREAM).permutation(sorted(keys))[:k]]


def _path_examples(data, base_dir, log) -> list:
    from ..data import discover_examples

    cfg = data.model_copy(update={"path": data.validation_path, "source": "auto"})
    try:
        return discover_examples(cfg, base_dir, log=log)
    except FinetuneError as e:  # its messages name data.path, the key it was given
        raise FinetuneError(str(e).replace("data.path", "data.validation_path")) from None


# ------------------------------------------------------------------ caches, while the encoders are on the GPU


@dataclass
class HeldOutCache:
    keys: list[str]
    latents: dict  # key -> latent (CPU, weight dtype)
    sizes: dict  # key -> size conditioning (original_size, crop_top_left, target_size)
    captions: dict  # key -> caption as it trains (after the method's rewrite)
    text: object  # TextCache of the captions; None: encoded when measured (the text encoder trains)
    masks: dict | None = None  # key -> data.masks mask on the latent grid; None: unmasked


def cache_held_out(run, accelerator) -> HeldOutCache | None:
    """Latents and (with a frozen text encoder) caption embeddings of the held-out images, shared by
    every process; whole images (centre crop, no flip, no caption dropout), each latent seeded alone."""
    if not getattr(run, "held_out", None):
        return None
    from ..data import ImageCaptionDataset
    from .caches import TextCache, build_latent_cache, build_text_cache, encode_caption
    from .setup import WEIGHT_DTYPES

    tr = run.recipe.training
    cfg = run.recipe.data.model_copy(update={"repeats": 1, "caption_dropout": 0.0, "crop": "center",
                                             "random_flip": False})
    ds = ImageCaptionDataset(run.held_out, cfg, seed=tr.seed)
    encode = lambda px: run.family.encode_images(run.c, px.to(accelerator.device))  # noqa: E731
    latents, sizes, masks = build_latent_cache(ds, encode, tr.seed + 2, WEIGHT_DTYPES[tr.mixed_precision], accelerator,
                                               None, partial(run.family.latent_mask, run.c))
    captions = {e.key: run.method.prepare_caption(e.caption or "") for e in ds.examples}
    text = None
    if not run.method.trains_text_encoder:
        entries = build_text_cache(sorted(set(captions.values())), partial(encode_caption, run.family, run.c),
                                   accelerator, None)
        text = TextCache(entries, accelerator.device)
    return HeldOutCache([e.key for e in ds.examples], latents, sizes, captions, text, masks or None)


# ------------------------------------------------------------------ measuring, during training


class HeldOut:
    """The held-out loss, measured by `measure(step)` at each validation step and at the end."""

    def __init__(self, trainer):
        self.t, self.cache = trainer, trainer.feed.held_out

    def measure(self, step: int) -> dict[str, float]:
        """{"val_loss": value} on every process (measured by the main one), logged and written; {} without
        held-out images."""
        if self.cache is None:
            return {}
        from .distributed import on_main

        value = on_main(self.t.accelerator, self.loss)
        self.t.log(f"step {step}: {METRIC} {value:.4f} on {len(self.cache.keys)} held-out images")
        write_row(self.t, step, {METRIC: value})
        return {METRIC: value}

    def loss(self) -> float:
        """The mean fixed-noise loss over the held-out images, with the model as it is now."""
        t = self.t
        for m in t.trainable:
            m.eval()  # LoRA dropout off: the same weights give the same value
        try:
            return sum(self._image_loss(i, key) for i, key in enumerate(self.cache.keys)) / len(self.cache.keys)
        finally:
            for m in t.trainable:
                m.train()

    def _image_loss(self, i: int, key: str) -> float:
        import torch

        from .evaluate import fixed_noise_loss
        from .setup import WEIGHT_DTYPES

        t, cache, family = self.t, self.cache, self.t.run.family
        caption, tr = cache.captions[key], t.tr
        latent = cache.latents[key][None].to(t.accelerator.device, WEIGHT_DTYPES[tr.mixed_precision])
        with torch.no_grad():
            text = cache.text([caption]) if cache.text is not None else family.encode_prompts(t.c, [caption])
            cond = {**text, **family.image_conditioning(t.c, {k: [v] for k, v in cache.sizes[key].items()})}
            with t.accelerator.autocast():
                return fixed_noise_loss(family, t.c, latent, [caption], seed=_image_seed(tr.seed, i),
                                        repeats=REPEATS, cond=cond, error=self._error(key))

    def _error(self, key: str):
        """The image's loss as training weighs it: by its data.masks mask; None (plain MSE) without one."""
        if self.cache.masks is None or key not in self.cache.masks:
            return None
        import torch.nn.functional as F

        from .objective import masked_mean

        mask, data = self.cache.masks[key][None].to(self.t.accelerator.device), self.t.run.recipe.data
        return lambda pred, target: masked_mean(F.mse_loss(pred.float(), target.float(), reduction="none"), mask,
                                                data.unmasked_weight, data.normalize_masked_loss).mean()


def _image_seed(seed: int, i: int) -> int:
    from ..data.buckets import seeded_rng

    return int(seeded_rng(seed, SPLIT_STREAM, i).integers(0, 2**63 - 1))
