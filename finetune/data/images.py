"""Reading training images: any file PIL can open becomes an 8-bit RGB image the right way up.

Photos carry their rotation in EXIF, PNGs carry alpha, scanners write 16-bit or CMYK files; a
naive `.convert("RGB")` gets each of these subtly wrong (sideways faces, black backgrounds the
model learns, clipped 16-bit values), so every image goes through `to_rgb`.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from ..errors import FinetuneError, safe_name

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

# data.max_pixels' default. A file's header can claim any size, and decoding allocates it (a
# "decompression bomb": a few KB that asks for gigabytes). 128 MP still admits 108 MP phone
# photos (about 384 MB once decoded as RGB); PIL's own limit (89 MP warning, 179 MP error) would
# warn on those and its warning is easy to miss.
DEFAULT_MAX_PIXELS = 128_000_000
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

# EXIF orientations 5-8 turn the picture by 90 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


@contextlib.contextmanager
def pixel_limit(max_pixels: int):
    """PIL's decompression-bomb limit set to `max_pixels`, and its warning (between 1x and 2x the
    limit) raised as an error, so that the limit is exact and a file over it is never decoded.

    Both are process-wide: not for use from several threads at once
    (DataLoader workers are processes, each with its own).
    """
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


class ImageWarning(UserWarning):
    """A library's warning about one image, re-issued with the image's name."""


_reported: set[tuple[str, str]] = set()


@contextlib.contextmanager
def warnings_named(name: str):
    """Warnings raised while reading one image (PIL's EXIF ones, numpy casts), which name no file,
    re-issued as one-line ImageWarnings naming it: once per file and message, as an image is read
    again every epoch (and catch_warnings resets Python's own once-only memory)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        warn_about(name, w.message)


def warn_about(name: str, message) -> None:
    """One ImageWarning naming the image, once per image and message."""
    text = safe_name(" ".join(str(message).split()))[:200]
    if (name, text) not in _reported:
        _reported.add((name, text))
        warnings.warn(f"image {safe_name(name)}: {text}", ImageWarning, stacklevel=3)


def too_many_pixels(found: Exception | int, max_pixels: int) -> str:
    """Why an image is refused, in our terms: its size (a pixel count, or PIL's decompression-bomb
    error, which holds one) and the setting that would allow it."""
    if isinstance(found, Exception):
        match = re.search(r"\((\d+) pixels\)", str(found))
        found = int(match.group(1)) if match else None
    size = f"{found:,} pixels" if found else "too many pixels"
    return f"{size}, over data.max_pixels ({max_pixels:,}): a decompression bomb, or far larger than training needs"


def _open(source, name: str, max_pixels: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError:
        raise FinetuneError(f"image {safe_name(name)} does not exist") from None
    except _BOMB_ERRORS as e:
        raise FinetuneError(f"image {safe_name(name)}: {too_many_pixels(e, max_pixels)}") from None
    except (OSError, ValueError) as e:
        raise FinetuneError(f"cannot read image {safe_name(name)}: {safe_name(e)}") from None


def load_image(path, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, rgb: bool = True) -> Image.Image:
    """Decode `path` (a file path or the encoded bytes of an image) to RGB; errors name the file.
    rgb=False: upright but in the file's own mode, alpha kept (masks, masks.py)."""
    name = name or str(path)
    with warnings_named(name), pixel_limit(max_pixels), _open(path, name, max_pixels) as img:
        try:
            img.load()  # decode now, so a truncated file fails here with its name, not later in a worker
        except _BOMB_ERRORS as e:
            raise FinetuneError(f"image {safe_name(name)}: {too_many_pixels(e, max_pixels)}") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise FinetuneError(f"cannot read image {safe_name(name)}: {safe_name(e)}") from None
        return to_rgb(img, name) if rgb else upright(img)


def image_size(path, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as `load_image` will return it, from the header only (no pixel decoding)."""
    name = name or str(path)
    with warnings_named(name), pixel_limit(max_pixels), _open(path, name, max_pixels) as img:
        return oriented_size(img, name)


def oriented_size(img: Image.Image, name: str = "image") -> tuple[int, int]:
    w, h = img.size
    if w == 0 or h == 0:
        raise FinetuneError(f"image {safe_name(name)} has no pixels ({w}x{h})")
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block must not make a readable image unusable
        orientation = None
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def upright(img: Image.Image) -> Image.Image:
    """A copy turned as its EXIF orientation says (as stored when that EXIF is unusable)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # keep the image as stored rather than reject it for unusable EXIF
        return img.copy()


def alpha_channel(img: Image.Image) -> Image.Image | None:
    """An image's transparency as an upright "L" image (255: opaque), or None when it has none."""
    if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
        return None
    return upright(img).convert("RGBA").getchannel("A")


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Upright, 8-bit RGB; transparency becomes white rather than whatever the hidden pixels hold."""
    if img.width == 0 or img.height == 0:
        raise FinetuneError(f"image {safe_name(name)} has no pixels ({img.width}x{img.height})")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # keep the image as stored rather than reject it for unusable EXIF
        pass
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_l(img)
    elif img.mode == "F":
        img = _float_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise FinetuneError(f"cannot convert image {safe_name(name)} (mode {img.mode}) to RGB: {safe_name(e)}") from None
    return img


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    # 16-bit data spans 0..65535; dividing by 257 maps 65535 to 255 exactly (clipping would turn
    # almost every pixel white). Mode "I" is how some readers hand over 16-bit files, so it is
    # treated as 16-bit too; values beyond that range are clipped.
    a = np.asarray(img).astype(np.float64)
    a = np.clip(a, 0, 65535) / 257.0
    return Image.fromarray(np.rint(a).astype(np.uint8))


def _float_to_l(img: Image.Image) -> Image.Image:
    # Float images are usually 0..1; anything brighter than 1 is taken to be on the 0..255 scale.
    a = np.nan_to_num(np.asarray(img).astype(np.float64))
    if a.size and a.max() <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8))
