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


class BatchLoss:
    """(weighted loss to back-propagate, sum of per-image losses, images) of one batch."""

    def __init__(self, family, c, training, conditioning, autocast):
        self.family, self.c, self.training = family, c, training
        self.conditioning, self.autocast = conditioning, autocast

    def __call__(self, latents: torch.Tensor, batch: dict, captions: list[str]):
        tr, family, c = self.training, self.family, self.c
        draws = batch["draw"]
        cond = {**self.conditioning(captions), **family.image_conditioning(c, batch)}
        noisy, timesteps, target = seeded_noisy(family, c, latents, draws, tr.seed, tr.noise_offset)
        with self.autocast():
            pred = family.predict(c, noisy, timesteps, cond)
        per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        weights = family.loss_weights(c, timesteps, tr.min_snr_gamma)
        if weights is not None:
            per_image = per_image * weights
        share = torch.tensor([d.weight for d in draws], device=per_image.device)
        real = share > 0
        return (per_image * share).sum(), per_image.detach()[real].sum(), int(real.sum())
