"""The training dataset: examples -> (pixels at their bucket's shape, caption) items.

Every random choice (crop offset, flip, caption dropout) comes from a generator seeded with
(seed, index, epoch), so an item is the same whichever worker builds it and a resumed run
repeats the data it would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .buckets import nearest_bucket, seeded_rng, training_buckets
from .captions import step_caption
from .masks import MaskedExample, load_with_mask, mask_array
from .sources import Example

# Separate streams, so that asking for a caption alone gives the same dropout as __getitem__ (and
# turning tag shuffling on changes neither the crops nor which captions drop out).
_TRANSFORM, _CAPTION, _TAGS = 0, 1, 2


class ImageCaptionDataset(Dataset):
    def __init__(self, examples: list[Example], cfg, seed: int = 0):
        self.examples = list(examples)
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self.buckets = training_buckets(cfg)
        ids = {b: i for i, b in enumerate(self.buckets)}
        # One header read per image, here, so the sampler can group indices before any decoding.
        per_example = [ids[nearest_bucket(*e.size(), self.buckets)] for e in self.examples]
        self.bucket_of_index = per_example * cfg.repeats  # index i is examples[i % len(examples)]

    def __len__(self) -> int:
        return len(self.bucket_of_index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def deterministic(self) -> bool:
        """True when an example always yields the same pixels (so its latents may be cached)."""
        return self.cfg.crop == "center" and not self.cfg.random_flip

    def example(self, index: int) -> Example:
        return self.examples[index % len(self.examples)]

    def caption(self, index: int, epoch: int | None = None) -> str:
        """The caption item `index` gets in `epoch` (default: the current one): after caption dropout, its
        tags shuffled and dropped as data.shuffle_tags / tag_dropout say (captions.py)."""
        text = self.example(index).caption or ""
        p = self.cfg.caption_dropout
        epoch = self.epoch if epoch is None else epoch
        if p > 0 and seeded_rng(self.seed, index, epoch, _CAPTION).random() < p:
            return ""
        if not self.cfg.captions_vary:
            return text
        return step_caption(text, self.cfg, seeded_rng(self.seed, index, epoch, _TAGS))

    def __getitem__(self, index: int) -> dict:
        return self.item(index, self.epoch)

    def item(self, index: int, epoch: int) -> dict:
        """Item `index` as epoch `epoch` sees it. The epoch is an argument, not state, for DataLoader
        workers: each holds its own copy of the dataset, which set_epoch in the main process never reaches."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        example = self.example(index)
        image, mask = load_with_mask(example)
        width, height = self.buckets[self.bucket_of_index[index]]
        rng = seeded_rng(self.seed, index, epoch, _TRANSFORM)
        pixels, mask, top, left = self._fit(image, width, height, rng, mask)
        item = {
            "pixel_values": pixels,
            "caption": self.caption(index, epoch),
            "key": example.key,
            "original_size": (image.height, image.width),
            "crop_top_left": (top, left),
            "target_size": (height, width),
        }
        if isinstance(example, MaskedExample):  # data.masks: every image of the set has one (255s: unmasked)
            item["mask"] = torch.from_numpy(mask_array(mask, (width, height)))
        return item

    def _fit(self, image: Image.Image, width: int, height: int, rng: np.random.Generator,
             mask: Image.Image | None = None):
        """(pixels [3,H,W] in [-1, 1], the mask fitted alike or None, top, left): the mask takes exactly the
        image's resize, crop and flip."""
        # Scale so the image covers the bucket, then crop the overflow: framing is kept up to the
        # small ratio difference between the image and its bucket.
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        spare_x, spare_y = size[0] - width, size[1] - height
        if self.cfg.crop == "random":
            left, top = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
        else:
            left, top = spare_x // 2, spare_y // 2
        flip = self.cfg.random_flip and rng.random() < 0.5

        def place(im: Image.Image, resample) -> Image.Image:
            im = im.resize(size, resample) if size != im.size else im
            im = im.crop((left, top, left + width, top + height))
            return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im

        image = place(image, Image.Resampling.LANCZOS)
        # Bilinear for the mask: no ringing past black and white at its edges.
        mask = place(mask, Image.Resampling.BILINEAR) if mask is not None else None
        if flip:
            left = spare_x - left  # SDXL's crop conditioning describes the image as the model sees it
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), mask, top, left


def collate(batch: list[dict]) -> dict:
    """Stack pixel_values into [B,3,H,W] (and masks into [B,1,H,W]); every other field becomes a list."""
    stacked = [k for k in ("pixel_values", "mask") if k in batch[0]]
    out = {k: torch.stack([item[k] for item in batch]) for k in stacked}
    for key in batch[0]:
        if key not in stacked:
            out[key] = [item[key] for item in batch]
    return out
