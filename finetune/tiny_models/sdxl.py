"""SDXL built locally from configs: "tiny" for tests (`builtin:tiny-sdxl`), "full" for benchmarks
(`builtin:sdxl-full-random`).

Both are shape-faithful to the real SDXL: the same UNet block types and order (no attention at the
first level, transformer depth growing with depth), `text_time` added conditioning fed by the second
text encoder's pooled projection and six size/crop numbers, two CLIP text encoders whose
penultimate hidden states are concatenated (so cross-attention width is their sum), the SDXL VAE
scaling factor and an Euler scheduler. "tiny" has tiny widths; module names and block layout are
the real ones, so every key we export is one a real SDXL checkpoint has. "full" has the published
configs' sizes (stable-diffusion-xl-base-1.0: a 2.6B-parameter UNet, CLIP ViT-L and OpenCLIP ViT-bigG
text encoders, the 84M-parameter VAE) with random weights, written in fp16 by default (6.9 GB, as the
hub's fp16 variant; 13.9 GB in fp32) for memory measurements where no checkpoint can be downloaded.
"""

from __future__ import annotations

import os

import torch

from ..files import save_pretrained_atomically
from . import tiny_clip_tokenizer
from .sd15 import SIZES, default_dtype

# Text encoder widths; real SDXL: 768 (CLIP ViT-L) and 1280 (OpenCLIP bigG). They must differ, as
# the real ones do: diffusers' single-file reader tells the two encoders apart by width.
TE_HIDDEN, TE2_HIDDEN = 32, 48
TIME_EMBED = 8  # real: 256

SDXL_SIZES = {
    "tiny": dict(unet=(32, 32, 64), depth=(1, 1, 2), head_dim=(2, 4, 8), groups=8, sample=8, time_embed=TIME_EMBED,
                 te=dict(hidden_size=TE_HIDDEN, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
                 # Ten layers, not two: diffusers' single-file reader recognises SDXL by the bigG
                 # encoder's tenth block (`conditioner.embedders.1.model.transformer.resblocks.9`).
                 te2=dict(hidden_size=TE2_HIDDEN, intermediate_size=64, num_attention_heads=4, num_hidden_layers=10),
                 vocab=None, vae=SIZES["tiny"]),
    "full": dict(unet=(320, 640, 1280), depth=(1, 2, 10), head_dim=(5, 10, 20), groups=32, sample=128,
                 time_embed=256,
                 te=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
                 te2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32),
                 vocab=49408, vae=SIZES["full"]),
}


def build_tiny_sdxl(folder: str | os.PathLike, seed: int = 0, size: str = "tiny", dtype=None):
    """Build an SDXL-shaped pipeline, save it as a diffusers folder at `folder`, return the path.
    `dtype`: the dtype of the weights written (None: float32)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    dims = SDXL_SIZES[size]
    torch.manual_seed(seed)
    with default_dtype(dtype):
        unet, vae, text_encoder, text_encoder_2, tokenizer = _sdxl_models(dims)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    return save_pretrained_atomically(pipe, folder)


def build_sdxl_full_random(folder: str | os.PathLike, seed: int = 0, dtype=torch.float16):
    """The real SDXL's shapes with random weights, fp16 on disk unless `dtype` says otherwise."""
    return build_tiny_sdxl(folder, seed=seed, size="full", dtype=dtype)


def _sdxl_models(dims: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te, te2, time_embed = dims["te"], dims["te2"], dims["time_embed"]
    unet = UNet2DConditionModel(
        sample_size=dims["sample"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=dims["unet"],
        layers_per_block=2,
        transformer_layers_per_block=dims["depth"],
        attention_head_dim=dims["head_dim"],  # heads per level (diffusers' historical name); real: 64 wide
        norm_num_groups=dims["groups"],
        cross_attention_dim=te["hidden_size"] + te2["hidden_size"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=te2["hidden_size"] + 6 * time_embed,
    )
    vd = dims["vae"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=vd["vae"], layers_per_block=vd["vae_layers"], norm_num_groups=vd["vae_groups"],
        latent_channels=4, sample_size=dims["sample"] * 8, scaling_factor=0.13025, force_upcast=True,
    )
    tokenizer = tiny_clip_tokenizer()
    common = dict(vocab_size=dims["vocab"] or len(tokenizer), max_position_embeddings=77,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common, **te, projection_dim=te["hidden_size"],
                                                hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **te2, projection_dim=te2["hidden_size"],
                                                                hidden_act="gelu"))
    return unet, vae, text_encoder, text_encoder_2, tokenizer
