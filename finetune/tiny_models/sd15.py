"""Tiny, shape-faithful Stable Diffusion 1.5 built from configs, for tests and the quickstart.

Module names and block layout follow the real SD1.5 (four UNet levels, two layers per block,
cross-attention transformers, a four-level VAE, a CLIP text encoder), only narrower and with
fewer text-encoder layers, so every adapter key written for it is one a real checkpoint has.
The tokenizer is byte-level BPE without merges: every byte is a token, nothing is downloaded.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from ..files import save_pretrained_atomically
from . import tiny_clip_tokenizer

# Widths: "tiny" for tests and the quickstart; "full" is the real SD1.5's (the published configs of
# stable-diffusion-v1-5: 860M-parameter UNet, CLIP ViT-L/14 text encoder with its 49408-token
# vocabulary, 84M-parameter VAE), random weights, for memory and speed benchmarks where no checkpoint
# can be downloaded. The tokenizer stays the byte-level one: its ids are a subset of the vocabulary.
SIZES = {
    "tiny": dict(unet=(32, 32, 64, 64), groups=8, cross=32, vae=(16, 16, 32, 32), vae_layers=1, vae_groups=8,
                 te=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2), sample=8,
                 vocab=None),
    "full": dict(unet=(320, 640, 1280, 1280), groups=32, cross=768, vae=(128, 256, 512, 512), vae_layers=2,
                 vae_groups=32, te=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12), sample=64, vocab=49408),
}


def build_tiny_sd15(folder: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon", size: str = "tiny",
                    dtype=None):
    """Build an SD1.5-shaped pipeline, save it as a diffusers folder at `folder`, return the path.
    `dtype`: the dtype of the weights written (None: float32; torch.float16 as the hub's fp16 variants)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    dims = SIZES[size]
    torch.manual_seed(seed)
    with default_dtype(dtype):
        unet, vae, text_encoder, tokenizer = _sd15_models(dims)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return save_pretrained_atomically(pipe, folder)


@contextmanager
def default_dtype(dtype):
    """Modules built inside are created in `dtype` (None: as they are): a full-size model built in
    fp16 never exists in fp32, which for SDXL (3.5B parameters) would need 14 GB of RAM."""
    import torch

    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _sd15_models(dims: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=dims["sample"],
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=dims["unet"],
        layers_per_block=2,
        norm_num_groups=dims["groups"],
        cross_attention_dim=dims["cross"],
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=dims["vae"],
        layers_per_block=dims["vae_layers"],
        norm_num_groups=dims["vae_groups"],
        latent_channels=4,
        sample_size=dims["sample"] * 8,
        scaling_factor=0.18215,
    )
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **dims["te"], vocab_size=dims["vocab"] or len(tokenizer), max_position_embeddings=77,
        projection_dim=dims["cross"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu",
    ))
    return unet, vae, text_encoder, tokenizer


def build_sd15_full_random(folder: str | os.PathLike, seed: int = 0, dtype=None):
    """The real SD1.5's shapes with random weights (`builtin:sd15-full-random`: float32, 4.3 GB)."""
    return build_tiny_sd15(folder, seed=seed, size="full", dtype=dtype)

