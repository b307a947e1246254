"""A tiny SDXL built locally, shape-faithful to the real one: the same UNet block types and order
(no attention at the first level, transformer depth growing with depth), `text_time` added
conditioning fed by the second text encoder's pooled projection and six size/crop numbers, two
CLIP text encoders whose penultimate hidden states are concatenated (so cross-attention width is
their sum), the SDXL VAE scaling factor and an Euler scheduler. Widths are tiny; module names and
block layout are the real ones, so every key we export is one a real SDXL checkpoint has."""

from __future__ import annotations

import os

import torch

from ..files import save_pretrained_atomically
from . import tiny_clip_tokenizer
from .sd15 import SIZES

# Text encoder widths; real SDXL: 768 (CLIP ViT-L) and 1280 (OpenCLIP bigG). They must differ, as
# the real ones do: diffusers' single-file reader tells the two encoders apart by width.
TE_HIDDEN, TE2_HIDDEN = 32, 48
TIME_EMBED = 8  # real: 256


def build_tiny_sdxl(folder: str | os.PathLike, seed: int = 0):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dims = SIZES["tiny"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),  # real: (1, 2, 10)
        attention_head_dim=(2, 4, 8),  # real: (5, 10, 20) heads of 64
        norm_num_groups=8,
        cross_attention_dim=TE_HIDDEN + TE2_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TE2_HIDDEN + 6 * TIME_EMBED,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=dims["vae"], layers_per_block=dims["vae_layers"], norm_num_groups=dims["vae_groups"],
        latent_channels=4, sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )
    tokenizer = tiny_clip_tokenizer()
    common = dict(intermediate_size=64, num_attention_heads=4, vocab_size=len(tokenizer), max_position_embeddings=77,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common, hidden_size=TE_HIDDEN, projection_dim=TE_HIDDEN,
                                                num_hidden_layers=2, hidden_act="quick_gelu"))
    # Ten layers, not two: diffusers' single-file reader recognises SDXL by the bigG encoder's tenth
    # block (`conditioner.embedders.1.model.transformer.resblocks.9`); real bigG has 32.
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        **common, hidden_size=TE2_HIDDEN, projection_dim=TE2_HIDDEN, num_hidden_layers=10, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    return save_pretrained_atomically(pipe, folder)
