"""`data.masks`: per-image masks that weight the training loss, so a product photo trains on the product
and not on its background.

A mask is a grayscale image the size of its photo (white: trains, black: weighted by
data.unmasked_weight, grey between), from a folder of files named like the images (masks/shoe.png
for shoe.jpg, masks/sub/a.png for sub/a.jpg), or from each image's own alpha channel (`alpha`); the
photo's pixels are still composited on white, as every RGBA image is (images.to_rgb).

`attach_masks` runs inside the dataset check, once, before training: each usable example becomes a
MaskedExample naming its mask, and an image whose mask is missing, of another size, unreadable or
without a white pixel is reported by name and trains unmasked (weight 1 everywhere). Unmasked rather
than skipped: one forgotten mask must not shrink the set behind the user's back, the check names it,
and the caption fallbacks behave alike (an image without a caption trains with the instance prompt).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..errors import FinetuneError, safe_name
from .images import IMAGE_EXTENSIONS, alpha_channel, load_image, to_rgb
from .sources import Example, resolve_data_path

ALPHA = "alpha"


@dataclass
class MaskedExample(Example):
    """An example of a run with data.masks: its mask file, or its own alpha channel, or neither (it
    trains unmasked)."""

    mask: Path | None = None
    alpha_mask: bool = False

    @property
    def masked(self) -> bool:
        return self.mask is not None or self.alpha_mask

    def mask_digest(self) -> str:
        """What identifies its mask, for cache keys: the mask file's bytes, "alpha" (the image's bytes,
        hashed with the image, hold it) or "unmasked" (a mask of 255s, still cached with the latent)."""
        if self.mask is not None:
            from ..cache import file_sha256

            return file_sha256(self.mask)
        return ALPHA if self.alpha_mask else "unmasked"


def masks_folder(cfg, base_dir: Path | None) -> Path | None:
    """data.masks as a folder, found like data.path (as given, else beside the recipe, else above it);
    None for alpha masks. FinetuneError when it is not there."""
    if cfg.masks is None or cfg.masks == ALPHA:
        return None
    folder = resolve_data_path(cfg.masks, base_dir)
    if not folder.is_dir():
        where = f" (nor in {base_dir})" if base_dir else ""
        raise FinetuneError(f"data.masks: folder {safe_name(cfg.masks)} does not exist here{where}; name a folder of "
                            f"masks, or alpha")
    return folder


def attach_masks(examples: list[Example], cfg, base_dir: Path | None, report) -> list[MaskedExample]:
    """`examples` with their masks, each problem added to `report` (a DatasetReport) under missing_mask,
    mask_size or empty_mask: those examples train unmasked."""
    folder = masks_folder(cfg, base_dir)
    index = _mask_files(folder) if folder is not None else {}
    inside = _inside(folder)
    if folder is not None:
        examples = _without_masks(examples, folder, inside, report)

    def look(example: Example) -> tuple[MaskedExample, tuple[str, str] | None]:
        if folder is None:
            found, problem = None, _alpha_problem(example, cfg.max_pixels)
        else:
            found = index.get(PurePosixPath(example.key).with_suffix("").as_posix())
            problem = _file_problem(example, found, folder, inside, cfg.max_pixels)
        masked = _masked(example, mask=found if problem is None else None,
                         alpha_mask=folder is None and problem is None)
        return masked, problem

    # One after another: load_image records warnings per file, and Python's warning filters are process-wide.
    looked = [look(e) for e in examples]
    for example, problem in looked:
        if problem:
            report.add(problem[0], example.key, problem[1])
    return [e for e, _ in looked]


def _without_masks(examples: list[Example], folder: Path, inside, report) -> list[Example]:
    """The examples that are not files of the masks folder: one inside the data folder is found as images."""
    masks = [e for e in examples if e.path is not None and inside(e.path)]
    if masks and len(masks) == len(examples):
        raise FinetuneError(f"data.masks: every image of data.path is in the masks folder {safe_name(folder)}; put the "
                            "masks in a folder of their own (masks/ beside images/)")
    if masks:
        left_out = {id(e) for e in masks}
        report.usable = [e for e in report.usable if id(e) not in left_out]
        report.total -= len(masks)
        report.notes.append(f"{len(masks)} files in {safe_name(folder)} are masks (data.masks), not training images; "
                            "left out")
    return [e for e in examples if id(e) not in left_out] if masks else examples


def _masked(example: Example, **mask) -> MaskedExample:
    return MaskedExample(**{f.name: getattr(example, f.name) for f in fields(Example)}, **mask)


def _mask_files(folder: Path) -> dict[str, Path]:
    """{image key without its extension: mask file} for every image file under `folder`."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return found


def _inside(folder: Path | None):
    root = folder.resolve() if folder is not None else None
    return lambda path: root is None or path.resolve().is_relative_to(root)


def _file_problem(example: Example, mask: Path | None, folder: Path, inside, max_pixels: int):
    """(category, detail) of what is wrong with an example's mask file, or None."""
    stem = PurePosixPath(example.key).with_suffix("")
    if mask is None:
        return "missing_mask", f"no {stem}.png (or another image named {stem.name}) in {folder}"
    name = mask.relative_to(folder).as_posix()
    if not inside(mask):  # a symlink out of the masks folder: not read, as data folders are confined
        return "missing_mask", f"mask {name} is a symlink leading out of {folder}; not read"
    try:
        img = read_mask(mask, max_pixels)
        size = example.size()
    except FinetuneError as e:
        return "missing_mask", str(e)
    if img.size != size:
        return "mask_size", f"mask {name} is {img.width}x{img.height}, the image {size[0]}x{size[1]}"
    if img.getextrema()[1] == 0:
        return "empty_mask", f"mask {name} is all black"
    return None


def _alpha_problem(example: Example, max_pixels: int):
    try:
        alpha = _with_alpha(example, max_pixels)[1]
    except FinetuneError as e:
        return "missing_mask", str(e)
    if alpha is None:
        return "missing_mask", "no alpha channel (data.masks: alpha)"
    if alpha.getextrema()[1] == 0:
        return "empty_mask", "fully transparent (data.masks: alpha)"
    return None


def read_mask(path: Path, max_pixels: int) -> Image.Image:
    """A mask file as an upright 8-bit grayscale image ("L"); its luminance is the weight."""
    img = load_image(path, max_pixels=max_pixels, rgb=False)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = to_rgb(img, str(path))  # 16-bit and float scaled as images are
    return img if img.mode == "L" else img.convert("L")


def load_with_mask(example: Example, max_pixels: int | None = None) -> tuple[Image.Image, Image.Image | None]:
    """(the example's RGB image, as Example.load gives it; its mask, "L" at the image's size, or None)."""
    max_pixels = max_pixels or example.max_pixels
    if not isinstance(example, MaskedExample) or not example.masked:
        return example.load(), None
    if example.mask is not None:
        return example.load(), read_mask(example.mask, max_pixels)
    return _with_alpha(example, max_pixels)


def _with_alpha(example: Example, max_pixels: int) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image, its alpha channel or None) from one decode."""
    if example.image is not None:
        return to_rgb(example.image, example.key), alpha_channel(example.image)
    if example.path is None and example.data is None:
        raise FinetuneError(f"example {example.key} has no image")
    source, name = (example.path, str(example.path)) if example.path is not None else (example.data, example.key)
    raw = load_image(source, name=name, max_pixels=max_pixels, rgb=False)
    return to_rgb(raw, name), alpha_channel(raw)


def mask_array(mask: Image.Image | None, size: tuple[int, int]) -> np.ndarray:
    """(1, H, W) uint8 weights of a fitted mask; all 255 (train everywhere) for None."""
    if mask is None:
        return np.full((1, size[1], size[0]), 255, dtype=np.uint8)
    return np.asarray(mask, dtype=np.uint8)[None].copy()


def image_mask_digest(example: Example) -> str | None:
    """The cache-key part of an example's mask (None: not a data.masks run's example)."""
    return example.mask_digest() if isinstance(example, MaskedExample) else None
