"""Class images for prior preservation: found in the class folder, the missing ones generated with
the base model before training and written there, so the next run reuses them.

A generated image that comes back black (a safety filter's replacement, or an fp16 overflow), or
that the recipe's content screens (`prompt_filter`, `safety_checker` output hooks) reject or would
blur or replace, is never kept: it is regenerated with another seed, and left out if that fails
too; the counts are reported. Training on black or blurred class images teaches the model that the
class looks like that. Watermark and provenance hooks do not touch class images: they are training
data, and a model can learn a mark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..devices import is_black as _is_black
from ..devices import run_pipeline
from ..errors import FinetuneError
from ..files import write_atomically
from .images import IMAGE_EXTENSIONS
from .sources import Example

RETRIES = 3


def class_image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def _screen_reason(screen, image, cfg, seed: int) -> str | None:
    """Why this class image cannot be used (None: it can)."""
    if _is_black(image):
        return "black image"
    if screen is None or not screen.hooks:
        return None
    from ..hooks.base import OutputImage, Provenance

    item = screen.process(OutputImage(image.copy(), Provenance(prompt=cfg.class_prompt, seed=seed, kind="class")))
    if item.rejected:
        return item.rejected
    changed = [v for v in item.verdicts if v.action == "transform"]
    return f"{changed[0].hook}: {changed[0].reason}" if changed else None


def ensure_class_images(pipe, cfg, resolution: int, log: Callable[[str], None], progress: bool = True,
                        screen=None) -> list[Path]:
    """Top the class folder up to `cfg.num_class_images` images made by `pipe` from the class prompt.
    `screen`: an OutputPipeline of content screens every new class image must pass unchanged."""
    from tqdm.auto import tqdm

    folder = Path(cfg.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = class_image_files(folder)
    missing = cfg.num_class_images - len(have)
    if missing <= 0:
        return have[: cfg.num_class_images]
    if screen is not None:
        from ..hooks.base import Provenance

        refusals = screen.check_prompt(Provenance(prompt=cfg.class_prompt, negative_prompt=cfg.negative_prompt, kind="class"))
        if refusals:
            raise FinetuneError(f"prior_preservation.class_prompt: {cfg.class_prompt!r} is refused by output hook "
                                f"{refusals[0].hook} ({refusals[0].reason}); no class images can be generated")
    log(f"prior preservation: generating {missing} class images for {cfg.class_prompt!r} into {folder}")
    pipe.set_progress_bar_config(disable=True)
    rejected: dict[str, int] = {}
    left_out = 0
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
            attempt, used_seed = 1, seed
            reason = _screen_reason(screen, image, cfg, seed)
            while reason and attempt < RETRIES:
                rejected[reason] = rejected.get(reason, 0) + 1
                used_seed = seed + attempt * 1_000_003
                image = _generate(pipe, cfg, resolution, [used_seed])[0]
                reason = _screen_reason(screen, image, cfg, used_seed)
                attempt += 1
            if reason:
                rejected[reason] = rejected.get(reason, 0) + 1
                left_out += 1
            else:
                final = folder / f"class-{index:05d}-seed{used_seed}.png"  # the seed that reproduces it
                # A run killed mid-save never leaves a truncated image to train on.
                write_atomically(final, lambda tmp: image.save(tmp, format="PNG"))
            index += 1
            bar.update(1)
    bar.close()
    if rejected:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items()))
        log(f"prior preservation: {sum(rejected.values())} class image(s) rejected ({why}) and retried with other "
            f"seeds; {left_out} left out after {RETRIES} tries")
    return class_image_files(folder)[: cfg.num_class_images]


def _generate(pipe, cfg, resolution: int, seeds: list[int]):
    """Class images for `seeds`, denoised under whatever autocast the caller set up and decoded outside
    it with the VAE in fp32 (`devices.run_pipeline`): fp16 autocast would overflow the SDXL VAE into
    black images, none of which could be kept."""
    import contextlib

    import torch

    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    neg = [cfg.negative_prompt] * len(seeds) if cfg.negative_prompt else None
    # nullcontext: the denoising keeps the caller's autocast (training's); the decode leaves it.
    return run_pipeline(pipe, contextlib.nullcontext, prompt=[cfg.class_prompt] * len(seeds), negative_prompt=neg,
                        num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                        generator=gens, width=resolution, height=resolution)


def class_examples(files: list[Path], class_prompt: str) -> list[Example]:
    return [Example(key=f"class:{p.name}", caption=class_prompt, path=p) for p in files]
