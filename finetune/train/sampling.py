"""Sample images with the model being trained (validation) or a loaded one (generate), and pass
every one of them through the output hooks before anything is written."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..devices import is_black, run_pipeline
from ..hooks.base import OutputImage, Provenance, Verdict
from ..hooks.pipeline import OutputPipeline, next_index, write_outputs
from ..prompts import excerpt


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:n].lower() or "prompt"


# Images made by one pipeline call: a row asking for hundreds is made, screened and written in
# slices, so memory stays flat and an interruption keeps what is done. Each image has its own
# generator, so slicing does not change which image a seed gives.
BATCH = 8


@dataclass
class Sampling:
    """How images are made: image k (counting prompt by prompt) uses seed `seed + k`."""

    seed: int
    n: int = 1
    steps: int = 25
    guidance: float = 7.5
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    autocast: Callable | None = None  # a context factory (accelerate's autocast while training)
    # (prompt, negative prompt) -> the pipeline's embedding keywords, made before the text encoders
    # left the GPU (`memory.text_encoders: offload`); None: the pipeline encodes the prompt itself.
    embed: Callable[[str, str | None], dict] | None = None


@dataclass
class Destination:
    """Where images go: `folder`, through `hooks`, with `provenance`; file numbers from `first_index`
    (None: on from the highest already in the folder); `log` hears refusals and rejections; `suffix`
    picks the file format (.png, .jpg, .webp)."""

    folder: Path
    hooks: OutputPipeline
    provenance: Provenance | None = None
    first_index: int | None = None
    log: Callable[[str], None] | None = None
    suffix: str = ".png"


@torch.no_grad()
def emit_images(pipe, prompts: list[str], how: Sampling, where: Destination) -> list[Path]:
    """Generate `how.n` images per prompt and write those the hooks let through; one log line per
    refused prompt, per rejected image and per image that came out black.

    Each image has its own generator, so any single image is reproduced by asking for it alone with
    its seed; its provenance says so. A second call into the same folder adds images and never
    replaces one.
    """
    folder, hooks, log = where.folder, where.hooks, where.log
    base = where.provenance or Provenance(prompt="")
    first = next_index(folder) if where.first_index is None else where.first_index
    written, k, n = [], 0, how.n
    for prompt in prompts:
        names = [folder / f"{first + k + i:02d}-{slug(prompt)}-{i}{where.suffix}" for i in range(n)]
        provs = [replace(base, prompt=prompt, negative_prompt=how.negative_prompt, seed=how.seed + k + i,
                         steps=how.steps, guidance=how.guidance, width=how.width, height=how.height)
                 for i in range(n)]
        k += n
        refusals = hooks.check_prompt(provs[0])
        if refusals:
            if log:
                why = "; ".join(f"{v.hook}: {v.reason}" for v in refusals)
                log(f"refused: prompt {excerpt(prompt)} ({n} image(s) not generated): {why}")
            written += write_outputs([], folder, [(name, prov, refusals) for name, prov in zip(names, provs)])
            continue
        for i in range(0, n, BATCH):
            items, black = _generate(pipe, provs[i:i + BATCH], hooks, how)
            for name, item, dark in zip(names[i:i + BATCH], items, black):
                if dark:
                    _report_black(name, item, log)
                if item.rejected and log:
                    log(f"rejected: {name.name} ({item.rejected})")
            written += write_outputs(list(zip(names[i:i + BATCH], items)), folder, log=log)
    return written


def _report_black(name: Path, item: OutputImage, log) -> None:
    """A black image is kept (hooks decide what is written) but never silently: a log line naming it,
    and a verdict in its manifest row."""
    import warnings

    why = "every pixel is black as generated: a numeric overflow (NaN) in the model or its VAE"
    why += ("; try --dtype fp32" if item.provenance.kind == "generate" else ", or weights that have diverged")
    item.verdicts.append(Verdict("finetune", "warning", f"black image: {why}"))
    line = f"warning: black image: {name.name}: {why}"
    if log:
        log(line)
    else:
        warnings.warn(line.removeprefix("warning: "), stacklevel=3)


def _generate(pipe, provs: list[Provenance], hooks: OutputPipeline, how: Sampling) -> tuple[list[OutputImage], list[bool]]:
    """One image per provenance (all of one prompt), each passed through the hooks; and which of them
    came out of the model black. The denoising runs under `autocast`, the VAE decode outside it in
    fp32 (`devices.run_pipeline`): fp16 autocast would otherwise overflow the SDXL VAE into black."""
    p = provs[0]
    generators = [torch.Generator(device="cpu").manual_seed(prov.seed) for prov in provs]
    text = how.embed(p.prompt, p.negative_prompt) if how.embed else {
        "prompt": p.prompt, "negative_prompt": p.negative_prompt}
    images = run_pipeline(pipe, how.autocast, **text, num_images_per_prompt=len(provs), num_inference_steps=p.steps,
                          guidance_scale=p.guidance, generator=generators, width=p.width, height=p.height)
    black = [is_black(image) for image in images]
    screen_batch(hooks, images)
    items = [hooks.process(OutputImage(image=image, provenance=replace(prov, width=image.width, height=image.height)))
             for prov, image in zip(provs, images)]
    return items, black


def screen_batch(hooks: OutputPipeline, images: list) -> None:
    """Let the content screens at the head of the hook list (before anything that may change the image)
    judge the whole batch in one pass: a hook with `screen_batch(images)` (the safety checker) computes
    its verdicts at once, and its `process` then uses them for these very images."""
    for hook in hooks.hooks:
        if not getattr(hook, "screens_content", False):
            break
        batch = getattr(hook, "screen_batch", None)
        if batch is not None:
            batch(images)


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
