"""The loss of one batch, with the noise and timestep of each image drawn from that image's own seed
(seed, dataset, item, epoch): an image gets the same noise whichever process trains it and however
many there are, so 1, 2 or 8 processes train the same run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .caches import fork_rng
from .data_loader import Draw

_NOISE, _VAE = 2, 3  # streams, apart from the dataset's crop and caption streams


def draw_seed(seed: int, draw: Draw, stream: int) -> int:
    from ..data.buckets import seeded_rng

    return int(seeded_rng(seed, draw.source, draw.index, draw.epoch, stream).integers(0, 2**63 - 1))


def seeded_noisy(family, c, latents: torch.Tensor, draws: list[Draw], seed: int, noise_offset: float):
    """family.sample_noisy image by image under each image's seed, stacked again."""
    parts = []
    with fork_rng():
        for k, draw in enumerate(draws):
            torch.manual_seed(draw_seed(seed, draw, _NOISE))
            parts.append(family.sample_noisy(c, latents[k:k + 1], noise_offset))
    return tuple(torch.cat(p) for p in zip(*parts))


def vae_seeds(seed: int, draws: list[Draw]) -> list[int]:
    return [draw_seed(seed, d, _VAE) for d in draws]


def masked_mean(err: torch.Tensor, mask: torch.Tensor, unmasked_weight: float, normalize: bool) -> torch.Tensor:
    """Per-image mean of `err` (B, C, h, w) weighted by `mask` (B, 1, h', w' at least h x w: the latent grid
    before `sample_noisy` cropped it to whole patches, so cropped alike here), black weighing
    `unmasked_weight`. `normalize`: divided by the mean weight, a weighted mean (bounded by the largest
    error; an image whose crop holds no white, at weight 0, adds 0)."""
    mask = mask[..., :err.shape[-2], :err.shape[-1]].to(err)
    weight = unmasked_weight + (1.0 - unmasked_weight) * mask
    dims = list(range(1, err.ndim))
    total = (err * weight).mean(dim=dims)
    return total / weight.mean(dim=dims).clamp_min(1e-12) if normalize else total


class BatchLoss:
    """(weighted loss to back-propagate, sum of per-image losses, images) of one batch. `data`: the recipe's
    data section, whose unmasked_weight and normalize_masked_loss apply to batches that come with masks."""

    def __init__(self, family, c, training, conditioning, autocast, data=None):
        self.family, self.c, self.training, self.data = family, c, training, data
        self.conditioning, self.autocast = conditioning, autocast

    def __call__(self, latents: torch.Tensor, batch: dict, captions: list[str], masks: torch.Tensor | None = None):
        """`masks`: (B, 1, h, w) weights on the latent grid (Family.latent_mask), or None: unmasked."""
        tr, family, c = self.training, self.family, self.c
        draws = batch["draw"]
        cond = {**self.conditioning(captions), **family.image_conditioning(c, batch)}
        noisy, timesteps, target = seeded_noisy(family, c, latents, draws, tr.seed, tr.noise_offset)
        with self.autocast():
            pred = family.predict(c, noisy, timesteps, cond)
        err = F.mse_loss(pred.float(), target.float(), reduction="none")
        if masks is None:
            per_image = err.mean(dim=list(range(1, pred.ndim)))
        else:
            per_image = masked_mean(err, masks, self.data.unmasked_weight, self.data.normalize_masked_loss)
        weights = family.loss_weights(c, timesteps, tr.min_snr_gamma)
        if weights is not None:
            per_image = per_image * weights
        share = torch.tensor([d.weight for d in draws], device=per_image.device)
        real = share > 0
        return (per_image * share).sum(), per_image.detach()[real].sum(), int(real.sum())
