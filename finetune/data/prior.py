"""Class images for prior preservation: found in the class folder, the missing ones generated with
the base model before training and written there, so the next run reuses them.

A generated image that comes back black (a safety filter's replacement, or an fp16 overflow) is
never kept: it is regenerated with another seed, and left out if that fails too; the count is
reported. Training on black class images teaches the model that the class is black.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .images import IMAGE_EXTENSIONS
from .sources import Example

RETRIES = 3


def class_image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _is_black(image) -> bool:
    return int(np.asarray(image.convert("L")).max()) < 8


def ensure_class_images(pipe, cfg, resolution: int, log: Callable[[str], None], progress: bool = True) -> list[Path]:
    """Top the class folder up to `cfg.num_class_images` images made by `pipe` from the class prompt."""
    from tqdm.auto import tqdm

    folder = Path(cfg.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = class_image_files(folder)
    missing = cfg.num_class_images - len(have)
    if missing <= 0:
        return have[: cfg.num_class_images]
    log(f"prior preservation: generating {missing} class images for {cfg.class_prompt!r} into {folder}")
    pipe.set_progress_bar_config(disable=True)
    rejected = left_out = 0
    index = len(have)
    bar = tqdm(total=missing, desc="class images", disable=not progress)
    # Seeds continue from what the folder holds, so a topped-up folder equals a folder made in one go.
    next_seed = cfg.seed + index
    while index < cfg.num_class_images:
        n = min(cfg.sample_batch_size, cfg.num_class_images - index)
        seeds = list(range(next_seed, next_seed + n))
        next_seed += n
        images = _generate(pipe, cfg, resolution, seeds)
        for seed, image in zip(seeds, images):
            attempt = 1
            while _is_black(image) and attempt < RETRIES:
                rejected += 1
                image = _generate(pipe, cfg, resolution, [seed + attempt * 1_000_003])[0]
                attempt += 1
            if _is_black(image):
                rejected += 1
                left_out += 1
            else:
                final = folder / f"class-{index:05d}-seed{seed}.png"
                tmp = folder / f".tmp-{final.name}"
                image.save(tmp, format="PNG")
                tmp.replace(final)  # a run killed mid-save never leaves a truncated image to train on
            index += 1
            bar.update(1)
    bar.close()
    if rejected:
        log(f"prior preservation: {rejected} black class image(s) rejected and retried with other seeds; {left_out} left out")
    return class_image_files(folder)[: cfg.num_class_images]


def _generate(pipe, cfg, resolution: int, seeds: list[int]):
    import torch

    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    neg = [cfg.negative_prompt] * len(seeds) if cfg.negative_prompt else None
    return pipe([cfg.class_prompt] * len(seeds), negative_prompt=neg, num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale, generator=gens, width=resolution, height=resolution).images


def class_examples(files: list[Path], class_prompt: str) -> list[Example]:
    return [Example(key=f"class:{p.name}", caption=class_prompt, path=p) for p in files]
