"""Sample images with the model being trained (validation) or a loaded one (generate)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:n].lower() or "prompt"


@torch.no_grad()
def sample(pipe, prompts: list[str], *, seed: int, n: int = 1, steps: int = 25, guidance: float = 7.5,
           negative_prompt: str | None = None, width: int | None = None, height: int | None = None,
           autocast=None):
    """[(prompt, index, PIL image)] for every prompt, n images each, reproducible from `seed`."""
    device = pipe.unet.device if hasattr(pipe, "unet") else pipe.device
    results = []
    for p_i, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + p_i)
        ctx = autocast() if autocast else torch.autocast(device.type, enabled=False)
        with ctx:
            images = pipe(prompt, negative_prompt=negative_prompt, num_images_per_prompt=n,
                          num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                          width=width, height=height).images
        results += [(prompt, i, img) for i, img in enumerate(images)]
    return results


def save_samples(results, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (prompt, i, image) in enumerate(results):
        path = folder / f"{k:02d}-{slug(prompt)}-{i}.png"
        image.save(path)
        paths.append(path)
    return paths
