"""A tiny Qwen-Image built locally, shape-faithful to the real one (Qwen/Qwen-Image): a
QwenImageTransformer2DModel with its real module names (60 dual-stream `transformer_blocks` there, 2
here), 16-channel latents packed 2x2 into 64 input channels, the video-style AutoencoderKLQwenImage
(a frame axis, 8x spatial compression, per-channel `latents_mean` / `latents_std` — the real values),
a Qwen2_5_VLForConditionalGeneration text encoder with a tiny vision tower (the pipeline runs the
whole class), a Qwen2Tokenizer and the scheduler Qwen-Image ships.

The tokenizer is byte-level BPE like Qwen's, with merges learnt from the pipeline's prompt template
only: the template's system part then tokenizes into the same 34 tokens as with the real vocabulary,
so `prompt_template_encode_start_idx` drops exactly that part here too. Captions fall back to bytes.
"""

from __future__ import annotations

import json
import os

import torch

from ..files import save_pretrained_atomically

HIDDEN = 32  # the text encoder's width = the transformer's joint_attention_dim; real: 3584 (Qwen2.5-VL 7B)
HEADS, HEAD_DIM = 2, 16  # the transformer's; real: 24 heads of 128
ROPE_AXES = (4, 6, 6)  # rotary dims per (frame, height, width), summing to HEAD_DIM; real: (16, 56, 56)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen/Qwen-Image scheduler/scheduler_config.json: the resolution-dependent shift the pipeline samples with
# (mu from 256 to 8192 image tokens, exponential time shift), ending at sigma 0.02.
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
                 invert_sigmas=False, stochastic_sampling=False, use_karras_sigmas=False,
                 use_exponential_sigmas=False, use_beta_sigmas=False)


def tiny_qwen_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE, Qwen's pre-tokenizer and special tokens) whose merges are
    learnt from QwenImagePipeline's prompt template; nothing is downloaded."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    text = _template_text()
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=4096, min_frequency=1, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], model_max_length=131072)
    tok.add_tokens(list(SPECIAL_TOKENS[1:]), special_tokens=True)
    return tok


def _template_text() -> str:
    """QwenImagePipeline's prompt template, read from a pipeline made without components."""
    from diffusers import QwenImagePipeline

    # The template is an attribute __init__ sets, not a class constant.
    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                             transformer=None).prompt_template_encode


def tiny_text_encoder(vocab_size: int, pad_token_id: int, eos_token_id: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = HIDDEN // 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
            # Multimodal rotary sections (time, height, width) over half the head dim, as Qwen2.5-VL's [16, 24, 24].
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
            pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=pad_token_id),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=HIDDEN,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image(folder: str | os.PathLike, seed: int = 0):
    """Build a Qwen-Image-shaped pipeline, save it as a diffusers folder at `folder`, return the path."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16,  # 16 latent channels x a 2x2 patch, as the real model
        num_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        joint_attention_dim=HIDDEN, guidance_embeds=False, axes_dims_rope=ROPE_AXES)
    # Three temporal-capable downsamplings (8x spatially), the real per-channel normalisation (the defaults).
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 attn_scales=[], temperal_downsample=[False, True, True])
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), tokenizer.pad_token_id,
                                     tokenizer.convert_tokens_to_ids("<|im_end|>"))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    return save_pretrained_atomically(pipe, folder)
