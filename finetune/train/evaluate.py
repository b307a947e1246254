"""A fixed-noise denoising loss: the same noise and timesteps every call, so two models (or one
model before and after training) are compared on equal terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def fixed_noise_loss(family, c, latents: torch.Tensor, captions: list[str], seed: int = 0, repeats: int = 4) -> float:
    gen = torch.Generator().manual_seed(seed)
    sched = c.noise_scheduler
    cond = family.encode_prompts(c, captions)
    total = 0.0
    for _ in range(repeats):
        noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        pred = family.predict(c, noisy, t, cond)
        total += F.mse_loss(pred.float(), target.float()).item()
    return total / repeats
