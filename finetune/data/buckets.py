"""Aspect-ratio bucketing: non-square images train at a nearby shape of about the same area
instead of being cropped to a square, and every batch holds images of one shape.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import FinetuneError


def bucket_step(resolution: int) -> int:
    # 64 keeps latent sides multiples of 8 (friendly to the UNet's downsampling). A resolution that
    # is not a multiple of 64 could not have its own square bucket, and below 256 a 64-pixel step
    # leaves (almost) only the square, so those use the VAE's factor of 8.
    return 64 if resolution % 64 == 0 and resolution >= 256 else 8


def make_buckets(resolution: int, step: int | None = None, min_size: int | None = None,
                 max_size: int | None = None) -> list[tuple[int, int]]:
    """(width, height) shapes with area <= resolution**2, sides multiples of `step` within
    [min_size, max_size] (default resolution/2 .. resolution*2), always including the square."""
    step = step or bucket_step(resolution)
    lo = math.ceil((min_size or resolution // 2) / step) * step
    hi = (max_size or resolution * 2) // step * step
    if not lo <= resolution <= hi:
        raise FinetuneError(f"data.bucketing: bucket sides {lo}..{hi} (min_size..max_size, in steps of "
                            f"{step}) must include data.resolution {resolution}")
    max_area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(lo, hi + 1, step):
        height = min(hi, max_area // width // step * step)  # the tallest shape that fits the area
        if height >= lo:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def training_buckets(cfg) -> list[tuple[int, int]]:
    """The shapes a DataConfig trains at: its buckets, or only the square when bucketing is off."""
    if cfg.bucketing.enabled:
        return make_buckets(cfg.resolution, min_size=cfg.bucketing.min_size, max_size=cfg.bucketing.max_size)
    return [(cfg.resolution, cfg.resolution)]


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (ties: the larger bucket)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def seeded_rng(*seeds: int) -> np.random.Generator:
    # SeedSequence wants non-negative entropy; masking keeps negative seeds usable and distinct.
    return np.random.default_rng([s & 0xFFFF_FFFF_FFFF_FFFF for s in seeds])
