"""Image sets -> batches: discovery of (image, caption) examples, the dataset check, robust image
loading, aspect-ratio buckets and the dataset/sampler pair the training loop iterates."""

from .buckets import BucketBatchSampler, bucket_step, make_buckets, nearest_bucket
from .check import DatasetReport, check_dataset, check_examples
from .dataset import ImageCaptionDataset, collate
from .images import IMAGE_EXTENSIONS, image_size, load_image, to_rgb
from .sources import Example, discover_examples

__all__ = [
    "IMAGE_EXTENSIONS",
    "BucketBatchSampler",
    "DatasetReport",
    "Example",
    "ImageCaptionDataset",
    "bucket_step",
    "check_dataset",
    "check_examples",
    "collate",
    "discover_examples",
    "image_size",
    "load_image",
    "make_buckets",
    "nearest_bucket",
    "to_rgb",
]
