"""A tiny Z-Image built locally, shape-faithful to the real one: a ZImageTransformer2DModel with its
real module names (the main `layers`, the image-only `noise_refiner` and text-only `context_refiner`
blocks, 2x2 patches of 16-channel latents), the FLUX-style 16-channel VAE with Z-Image's scaling and
shift factors, a Qwen3Model text encoder (read at its second-to-last hidden layer, as the pipeline
does) with a byte-level BPE Qwen2Tokenizer carrying a ChatML chat template, and the flow-matching
Euler scheduler as each variant ships it. Widths and depths are tiny, so every module name we export
is one the real 6B transformer has, at block indices 0 and 1.

Real configs (Tongyi-MAI/Z-Image and Z-Image-Turbo): transformer dim 3840, 30 layers + 2 refiner
layers of each kind, 30 heads, cap_feat_dim 2560 (Qwen3-4B's width: 36 layers, 32 heads, 8 KV heads);
scheduler shift 3.0 (Turbo) or 6.0 (base), no dynamic shifting.
"""

from __future__ import annotations

import os

import torch

from ..files import save_pretrained_atomically
from . import _bytes_to_unicode
from .sd15 import SIZES

DIM, HEADS = 32, 2  # real: 3840, 30 heads of 128
ROPE_AXES = (4, 6, 6)  # rotary dims per position axis (caption/frame, row, column), summing to DIM / HEADS
# Caption positions run along the first axis up to the 512-token prompt (+ padding to 32); real: (1024, 512, 512).
ROPE_LENS = (1024, 128, 128)
TE_HIDDEN = 32  # the transformer's cap_feat_dim; real: 2560

# The schedulers the two published checkpoints ship (scheduler/scheduler_config.json).
SCHEDULERS = {
    "turbo": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
    "base": dict(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False),
}

# What ZImagePipeline applies before tokenizing: apply_chat_template(..., add_generation_prompt=True,
# enable_thinking=True); Qwen3's template then renders ChatML and opens the assistant turn without a
# <think> block (which it adds only for enable_thinking=False).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_qwen_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE, no merges: every byte is a token) with Qwen's special tokens
    and a ChatML chat template; nothing is downloaded."""
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=131072)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_z_image(folder: str | os.PathLike, seed: int = 0, variant: str = "turbo"):
    """Build a Z-Image-shaped pipeline ("turbo": Z-Image-Turbo's scheduler; "base": Z-Image's), save it
    as a diffusers folder at `folder`, return the path."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    if variant not in SCHEDULERS:
        raise ValueError(f"variant must be one of {sorted(SCHEDULERS)}, got {variant!r}")
    dims = SIZES["tiny"]
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=DIM,
        n_layers=2,  # real: 30
        n_refiner_layers=2,  # real: 2 noise and 2 context refiner blocks
        n_heads=HEADS, n_kv_heads=HEADS, norm_eps=1e-5, qk_norm=True, cap_feat_dim=TE_HIDDEN,
        rope_theta=256.0, t_scale=1000.0, axes_dims=list(ROPE_AXES), axes_lens=list(ROPE_LENS),
    )
    with torch.no_grad():
        # Both pad tokens are created with torch.empty: left so, a saved model would hold whatever
        # memory held (NaN included) and the build would not be deterministic.
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=dims["vae"], layers_per_block=dims["vae_layers"], norm_num_groups=dims["vae_groups"],
        latent_channels=16, sample_size=64,
        # Z-Image's VAE is FLUX's: latents are (z - shift_factor) * scaling_factor; no quant convs.
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TE_HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,  # grouped-query attention, as Qwen3-4B
        max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant])
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    return save_pretrained_atomically(pipe, folder)
