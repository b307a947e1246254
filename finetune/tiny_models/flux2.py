"""Tiny FLUX.2 pipelines built locally, shape-faithful to the real ones: a Flux2Transformer2DModel with
its real module names (double-stream `transformer_blocks` with SwiGLU `ff.linear_in/linear_out`,
single-stream `single_transformer_blocks` with the fused `attn.to_qkv_mlp_proj`, the shared
modulations), 32-channel latents patchified 2x2 into 128 input channels and batch-normed by the
AutoencoderKLFlux2's running statistics, and the flow-matching Euler scheduler FLUX.2 ships (FLUX.1
[dev]'s config, as diffusers' scripts/convert_flux2_to_diffusers.py builds it).

- `build_tiny_flux2`: FLUX.2 [dev]: guidance embedding, a Mistral3ForConditionalGeneration text encoder
  and a tokenizer with a Mistral-style chat template ([SYSTEM_PROMPT] ... [INST] ... [/INST]); the real
  pipeline's PixtralProcessor needs torchvision to exist, and the pipeline uses only its tokenizer.
- `build_tiny_flux2_klein`: FLUX.2 [klein] base: no guidance embedding (true CFG at sampling), a
  Qwen3ForCausalLM text encoder behind a Qwen2 tokenizer with Qwen3's chat template (thinking off).

The pipelines read text-encoder hidden states 10/20/30 (dev) and 9/18/27 (klein), so the tiny encoders
keep 30 and 27 layers, at width 16: their stacked output is 48 wide (real: 15360 and 7680/12288).
Tokenizers are byte-level BPE without merges (every byte a token), built here; nothing is downloaded.
"""

from __future__ import annotations

import os

import torch

from ..files import save_pretrained_atomically
from . import _bytes_to_unicode
from .flux import SCHEDULERS

TEXT_HIDDEN = 16  # real: 5120 (Mistral Small 3.1), 2560 / 4096 (Qwen3 4B / 8B)
HEADS, HEAD_DIM = 2, 16  # real: 48 (dev), 24 (klein 4B), 32 (klein 9B) heads of 128
ROPE_AXES = (4, 4, 4, 4)  # four id axes (t, h, w, l), summing to HEAD_DIM; real: (32, 32, 32, 32)
MISTRAL_LAYERS, QWEN3_LAYERS = 30, 27  # the deepest hidden state each pipeline reads
VAE_WIDTHS = (16, 16, 32, 32)  # four levels: 8x downsampling as the real (128, 256, 512, 512)

# Mistral's (Tekken) special-token ids, kept so the tiny vocabulary lays out like the real one.
MISTRAL_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[IMG]": 10, "<pad>": 11,
                    "[IMG_BREAK]": 12, "[IMG_END]": 13, "[SYSTEM_PROMPT]": 17, "[/SYSTEM_PROMPT]": 18}
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_vocab(specials) -> dict[str, int]:
    """Byte-level BPE vocabulary: the special tokens at their ids, then one token per byte."""
    vocab = dict(specials) if isinstance(specials, dict) else {t: i for i, t in enumerate(specials)}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, max(vocab.values()) + 1)
    return vocab


def tiny_mistral_tokenizer():
    """The FLUX.2 [dev] pipeline's `tokenizer`, byte-level, with a Mistral-style chat template.

    The real one is a PixtralProcessor, which transformers builds only with torchvision installed; the
    pipeline calls nothing of it but `apply_chat_template` on text, which the processor hands to its
    tokenizer, so the tiny model keeps that tokenizer alone and loads without torchvision."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=_byte_vocab(MISTRAL_SPECIALS), merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=[t for t in MISTRAL_SPECIALS if t.startswith("[")], model_max_length=131072)
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_tokenizer():
    """A Qwen2 tokenizer (the FLUX.2 [klein] pipeline's) with Qwen3's chat template, byte-level."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    tok = Qwen2TokenizerFast(vocab=_byte_vocab(QWEN_SPECIALS), merges=[], unk_token=None,
                             eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=40960)
    # Only eos and pad are registered by the constructor; the chat markers must not split into bytes.
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def _mistral3(vocab_size: int, pad_id: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type="mistral", vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32,
                num_hidden_layers=MISTRAL_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None,
                bos_token_id=1, eos_token_id=2, pad_token_id=pad_id)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, image_size=64, patch_size=16, num_channels=3)
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=MISTRAL_SPECIALS["[IMG]"],
        spatial_merge_size=2, vision_feature_layer=-1))


def _qwen3(vocab_size: int, pad_id: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=QWEN3_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=pad_id))


def _transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels x a 2x2 patch, as in the real model
        num_layers=2,  # real: 8 double-stream blocks (dev, klein 9B), 5 (klein 4B)
        num_single_layers=2,  # real: 48 (dev), 24 (klein 9B), 20 (klein 4B)
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=3 * TEXT_HIDDEN,  # three stacked text-encoder layers
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=ROPE_AXES,
        rope_theta=2000,
        guidance_embeds=guidance_embeds,
    )


def _vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=VAE_WIDTHS, layers_per_block=1, norm_num_groups=8,
                             latent_channels=32, sample_size=64)
    # Running statistics away from (0, 1), so that a missing or misapplied normalisation shows in tests.
    g = torch.Generator().manual_seed(1)
    vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.num_features, generator=g))
    vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(vae.bn.num_features, generator=g))
    return vae


def build_tiny_flux2(folder: str | os.PathLike, seed: int = 0):
    """A FLUX.2 [dev]-shaped Flux2Pipeline saved as a diffusers folder at `folder`; returns the path."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    torch.manual_seed(seed)
    tokenizer = tiny_mistral_tokenizer()
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS["dev"]), vae=_vae(),
                         text_encoder=_mistral3(len(tokenizer), tokenizer.pad_token_id), tokenizer=tokenizer,
                         transformer=_transformer(guidance_embeds=True))
    return save_pretrained_atomically(pipe, folder)


def build_tiny_flux2_klein(folder: str | os.PathLike, seed: int = 0):
    """A FLUX.2 [klein] base-shaped Flux2KleinPipeline (undistilled: CFG sampling, no guidance
    embedding) saved as a diffusers folder at `folder`; returns the path."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_qwen3_tokenizer()
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS["dev"]), vae=_vae(),
                              text_encoder=_qwen3(len(tokenizer), tokenizer.pad_token_id), tokenizer=tokenizer,
                              transformer=_transformer(guidance_embeds=False), is_distilled=False)
    return save_pretrained_atomically(pipe, folder)
