"""Sample images with the model being trained (validation) or a loaded one (generate), and pass
every one of them through the output hooks before anything is written."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from ..hooks.base import OutputImage, Provenance
from ..hooks.pipeline import OutputPipeline, write_outputs


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:n].lower() or "prompt"


@torch.no_grad()
def emit_images(pipe, prompts: list[str], hooks: OutputPipeline, folder: Path, *, seed: int, n: int = 1,
                steps: int = 25, guidance: float = 7.5, negative_prompt: str | None = None,
                width: int | None = None, height: int | None = None, autocast=None,
                provenance: Provenance | None = None, first_index: int = 0) -> list[Path]:
    """Generate n images per prompt and write those the hooks let through.

    Image k (counting prompt by prompt) uses seed `seed + k` on its own generator, so any single
    image is reproduced by asking for it alone with that seed; its provenance says so. File names
    count from `first_index`, so several calls can write into one folder.
    """
    device = pipe.unet.device if hasattr(pipe, "unet") else pipe.device
    base = provenance or Provenance(prompt="")
    out, refused, k = [], [], 0
    for prompt in prompts:
        seeds = list(range(seed + k, seed + k + n))
        names = [folder / f"{first_index + k + i:02d}-{slug(prompt)}-{i}.png" for i in range(n)]
        k += n
        provs = [replace(base, prompt=prompt, negative_prompt=negative_prompt, seed=s, steps=steps, guidance=guidance,
                         width=width, height=height) for s in seeds]
        refusals = hooks.check_prompt(provs[0])
        if refusals:
            refused += [(name, prov, refusals) for name, prov in zip(names, provs)]
            continue
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        ctx = autocast() if autocast else torch.autocast(device.type, enabled=False)
        with ctx:
            images = pipe(prompt, negative_prompt=negative_prompt, num_images_per_prompt=n, num_inference_steps=steps,
                          guidance_scale=guidance, generator=generators, width=width, height=height).images
        for name, prov, image in zip(names, provs, images):
            prov = replace(prov, width=image.width, height=image.height)
            out.append((name, hooks.process(OutputImage(image=image, provenance=prov))))
    return write_outputs(out, folder, refused)


def grid(images: list, columns: int | None = None):
    """One image holding `images` in rows, each cell the size of the smallest image."""
    import math

    from PIL import Image

    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w = min(i.width for i in images)
    h = min(i.height for i in images)
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for k, img in enumerate(images):
        sheet.paste(img.convert("RGB").resize((w, h)), ((k % cols) * w, (k // cols) * h))
    return sheet
