"""The DDPM training objective shared by the UNet families (epsilon and v-prediction)."""

from __future__ import annotations

from typing import TYPE_CHECKING

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch


def sample_noisy(noise_scheduler, latents: torch.Tensor, noise_offset: float = 0.0):
    import torch

    noise = torch.randn_like(latents)
    if noise_offset:
        # Offset noise (per sample and channel) lets the model learn very dark and bright images.
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction_type}")
    return noisy, timesteps, target


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    import torch
    from diffusers.training_utils import compute_snr

    # Min-SNR-gamma (Hang et al. 2023): per-sample weight min(SNR, gamma) / SNR, over SNR + 1 for v-prediction.
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr
