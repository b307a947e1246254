"""What the memory of a run depends on, read from its recipe: a small frozen record, so `plan --vram`
can try a change (`dataclasses.replace`) and name it as the recipe key that makes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .method import MethodPlan, method_plan

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SAMPLE_SLICE = 8  # images per pipeline call when sampling (finetune/train/sampling.py BATCH)


@dataclass(frozen=True)
class Settings:
    method: MethodPlan
    precision: str  # training.mixed_precision made concrete: no | fp16 | bf16
    checkpointing: bool
    optimizer: str
    momentum: float
    min_8bit_size: int
    batch: int
    accumulation: int
    resolution: int
    cache_latents: bool
    validation_images: int  # per pipeline call; 0: no validation samples
    validation_size: tuple[int | None, int | None]  # (height, width); None: the training resolution
    validation_cfg: bool  # classifier-free guidance doubles the sampling batch
    prior_batch: int  # class images per pipeline call; 0: no prior preservation
    quantize: str  # memory.quantize_base: none | int8 | nf4 | torchao-int8
    fp8: bool  # memory.fp8_base
    offload_blocks: int  # memory.offload_blocks: the denoiser's first N repeated blocks parked in CPU memory
    cache_text: bool  # text-encoder outputs computed once (data.cache_text_embeddings resolved)
    text_offload: bool  # the text encoders leave the GPU once their outputs are cached
    vae_offload: bool  # the VAE leaves the GPU once the latents are cached
    host_caches: bool  # the caches live in host RAM (memory.cache_dir unset: on disk otherwise)
    images: int | None  # images in data.path, if it is a folder on this machine
    captions_vary: bool = False  # data.shuffle_tags / tag_dropout: captions cannot be encoded once
    ema: str | None = None  # training.ema.device (accelerator | cpu); None: no average kept


def settings_from_recipe(recipe) -> Settings:
    tr, val, pp, data, mem = recipe.training, recipe.validation, recipe.prior_preservation, recipe.data, recipe.memory
    mp = method_plan(recipe.method)
    # "auto" resolves as finetune/train/setup.py decide_caching does: latents when crops and flips are
    # deterministic, text when no text encoder trains.
    latents = ((data.crop == "center" and not data.random_flip) if data.cache_latents == "auto"
               else bool(data.cache_latents))
    auto = not mp.trains_text and not data.captions_vary  # shuffled or dropped tags: encoded every step
    text = auto if data.cache_text_embeddings == "auto" else bool(data.cache_text_embeddings)
    return Settings(
        # The plan is for a GPU run, where "auto" is bf16 (fp16 on GPUs before Ampere: the same bytes).
        method=mp, precision="bf16" if tr.mixed_precision == "auto" else tr.mixed_precision,
        checkpointing=tr.gradient_checkpointing, optimizer=recipe.optimizer.type,
        momentum=recipe.optimizer.momentum, min_8bit_size=recipe.optimizer.min_8bit_size, batch=tr.batch_size,
        accumulation=tr.gradient_accumulation_steps, resolution=data.resolution, cache_latents=latents,
        validation_images=min(val.images_per_prompt, SAMPLE_SLICE) if val.prompts else 0,
        validation_size=(val.height, val.width), validation_cfg=val.guidance_scale > 1,
        prior_batch=pp.sample_batch_size if pp.enabled else 0, quantize=mem.quantize_base, fp8=mem.fp8_base,
        offload_blocks=mem.offload_blocks,
        # "auto" offloads what is cached: on a GPU, which is what the plan is for.
        cache_text=text, text_offload=text and mem.text_encoders != "keep",
        vae_offload=latents and mem.vae != "keep", host_caches=mem.cache_dir is None,
        images=count_images(data.path), captions_vary=data.captions_vary, ema=tr.ema.device if tr.ema else None)


def count_images(path: str, limit: int = 100_000) -> int | None:
    """Image files under a data folder (by suffix, nothing opened); None if it is not a folder here."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    n = 0
    for p in folder.rglob("*"):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            n += 1
            if n >= limit:
                break
    return n
