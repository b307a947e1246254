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
    precision: str  # training.mixed_precision: no | fp16 | bf16
    checkpointing: bool
    optimizer: str
    momentum: float
    min_8bit_size: int
    batch: int
    accumulation: int
    resolution: int
    cache_latents: bool
    validation_images: int  # per pipeline call; 0: no validation samples
    validation_size: tuple[int | None, int | None]  # (height, width); None: the model's default
    validation_cfg: bool  # classifier-free guidance doubles the sampling batch
    prior_batch: int  # class images per pipeline call; 0: no prior preservation
    quantize: str  # FLUX: model.flux.quantize
    images: int | None  # images in data.path, if it is a folder on this machine


def settings_from_recipe(recipe) -> Settings:
    tr, val, pp, data = recipe.training, recipe.validation, recipe.prior_preservation, recipe.data
    flux = getattr(recipe.model, "flux", None)
    return Settings(
        method=method_plan(recipe.method), precision=tr.mixed_precision, checkpointing=tr.gradient_checkpointing,
        optimizer=recipe.optimizer.type, momentum=recipe.optimizer.momentum,
        min_8bit_size=recipe.optimizer.min_8bit_size, batch=tr.batch_size,
        accumulation=tr.gradient_accumulation_steps, resolution=data.resolution,
        # "auto" caches when crops and flips are deterministic (finetune/train/setup.py decide_caching).
        cache_latents=(data.crop == "center" and not data.random_flip) if data.cache_latents == "auto"
        else bool(data.cache_latents),
        validation_images=min(val.images_per_prompt, SAMPLE_SLICE) if val.prompts else 0,
        validation_size=(val.height, val.width), validation_cfg=val.guidance_scale > 1,
        prior_batch=pp.sample_batch_size if pp.enabled else 0,
        quantize=getattr(flux, "quantize", "none") if flux is not None else "none",
        images=count_images(data.path))


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
