"""A fixed-noise denoising loss: the same noise and timesteps every call, so two models (or one
model before and after training) are compared on equal terms. It goes through the family's own
objective (`sample_noisy`, `predict`), so it measures what training minimises for any family."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .caches import fork_rng


def uncropped_sizes(latents: torch.Tensor, vae_scale: int = 8) -> dict:
    """Size conditioning for whole, uncropped images of the latents' size."""
    h, w = latents.shape[-2] * vae_scale, latents.shape[-1] * vae_scale
    n = latents.shape[0]
    return {"original_size": [(h, w)] * n, "crop_top_left": [(0, 0)] * n, "target_size": [(h, w)] * n}


@torch.no_grad()
def fixed_noise_loss(family, c, latents: torch.Tensor, captions: list[str], seed: int = 0, repeats: int = 4,
                     cond: dict | None = None, error=None) -> float:
    """The mean loss over `repeats` seeded draws of noise and timestep. `cond`: the conditioning made
    beforehand (cached caption embeddings and the images' size conditioning, held_out.py), so no
    text encoder runs here; default: the captions encoded now, for whole uncropped images. `error`:
    (prediction, target) -> the loss (default their mean squared error; held_out.py weighs data.masks)."""
    if cond is None:
        cond = {**family.encode_prompts(c, captions), **family.image_conditioning(c, uncropped_sizes(latents))}
    total = 0.0
    with fork_rng():
        torch.manual_seed(seed)
        for _ in range(repeats):
            noisy, t, target = family.sample_noisy(c, latents, 0.0)
            pred = family.predict(c, noisy, t, cond)
            total += (error(pred, target) if error else F.mse_loss(pred.float(), target.float())).item()
    return total / repeats
