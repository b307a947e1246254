"""Image sets -> batches: discovery of (image, caption) examples, the dataset check, robust image
loading, aspect-ratio buckets and the dataset/sampler pair the training loop iterates.

Names are imported on first use: the dataset check and recipe validation read images and folders
without torch, which only the dataset and sampler need."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "bucket_step": "buckets", "make_buckets": "buckets", "nearest_bucket": "buckets",
    "BucketBatchSampler": "sampler",
    "DatasetReport": "check", "check_dataset": "check", "check_examples": "check",
    "ImageCaptionDataset": "dataset", "collate": "dataset",
    "IMAGE_EXTENSIONS": "images", "image_size": "images", "load_image": "images", "to_rgb": "images",
    "Example": "sources", "discover_examples": "check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
