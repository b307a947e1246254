"""A tiny Stable Diffusion 3.5 Medium built locally, shape-faithful to the real one: an
SD3Transformer2DModel (MMDiT) whose first block has SD3.5 Medium's dual attention (`attn2`, a second
self-attention on the image stream) and whose last block is the context-pre-only one every SD3 has
(no `to_add_out`, no `ff_context`), with RMS qk-norm as in SD3.5; two CLIPTextModelWithProjection
encoders (CLIP-L and CLIP-G, of different widths as the real 768 and 1280) whose penultimate hidden
states are concatenated and zero-padded to the T5 width, their pooled projections concatenated as the
transformer's pooled input; a T5 v1.1-style encoder; a VAE with SD3's 16 latent channels, scaling and
shift factors; and the flow-matching Euler scheduler SD3/3.5 ship (fixed shift 3.0). Widths are tiny,
so every module name we export is one a real SD3.5 Medium has, at block indices 0 and 1.
"""

from __future__ import annotations

import os

import torch

from ..files import save_pretrained_atomically
from . import tiny_clip_tokenizer
from .flux import tiny_t5_tokenizer
from .sd15 import SIZES

CLIP_L_HIDDEN, CLIP_G_HIDDEN = 32, 48  # real: 768, 1280 (the pooled input is their sum: 2048)
T5_HIDDEN = 96  # real: 4096; must hold CLIP-L + CLIP-G side by side (the pipeline pads them to it)
HEADS, HEAD_DIM = 2, 16  # real SD3.5 Medium: 24 heads of 64
# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json (SD3 Medium and 3.5 Large: the same).
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# stabilityai/stable-diffusion-3.5-medium vae/config.json: no quant convs, latents (z - shift) * scale.
VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_sd3(folder: str | os.PathLike, seed: int = 0):
    """Build an SD3.5 Medium-shaped pipeline, save it as a diffusers folder at `folder`, return the path."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,  # 64 px; the real one: 128 (1024 px)
        patch_size=2,
        in_channels=16, out_channels=16,
        num_layers=2,  # real: 24; block 1 is the last, whose context stream stops after attention
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        joint_attention_dim=T5_HIDDEN,
        caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=CLIP_L_HIDDEN + CLIP_G_HIDDEN,
        pos_embed_max_size=32,  # up to 512 px at patch 2; real: 384
        dual_attention_layers=(0,),  # real SD3.5 Medium: 0-12
        qk_norm="rms_norm",
    )
    dims = SIZES["tiny"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=dims["vae"], layers_per_block=dims["vae_layers"], norm_num_groups=dims["vae_groups"],
        latent_channels=16, sample_size=64, **VAE_FACTORS,
    )
    tokenizer = tiny_clip_tokenizer()
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77, intermediate_size=64, num_attention_heads=4,
                  num_hidden_layers=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=CLIP_L_HIDDEN, projection_dim=CLIP_L_HIDDEN, hidden_act="quick_gelu", **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=CLIP_G_HIDDEN, projection_dim=CLIP_G_HIDDEN, hidden_act="gelu", **common))
    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=T5_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id,
        decoder_start_token_id=tokenizer_3.pad_token_id,
    ))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    return save_pretrained_atomically(pipe, folder)
