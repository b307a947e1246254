"""A tiny FLUX.1 built locally, shape-faithful to the real one: a FluxTransformer2DModel with its
real module names (double-stream `transformer_blocks`, single-stream `single_transformer_blocks`,
the guidance embedder of FLUX.1 [dev], or none for [schnell]), 16-channel latents packed 2x2 into
64 input channels, a four-level VAE with FLUX's scaling and shift factors, CLIP-L (pooled) and a
T5 v1.1-style encoder (gated-GELU) with its own Unigram tokenizer, and the flow-matching Euler
scheduler configured as each variant ships. Widths and depths are tiny, so every key we export is
one a real FLUX.1 checkpoint has, at block indices 0 and 1.

`build_flux_full_random` (`builtin:flux-full-random`) is the other end: the published FLUX.1 [dev]
configs (11.9B-parameter transformer, T5-XXL encoder, CLIP-L, the 16-channel VAE) with random weights,
for memory and speed measurements on a GPU where no checkpoint can be downloaded.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import string
from pathlib import Path

import torch

from ..files import save_pretrained_atomically, write_atomically
from . import tiny_clip_tokenizer
from .sd15 import SIZES, default_dtype

TE_HIDDEN = 32  # CLIP-L's width (its pooled output feeds the transformer); real: 768
T5_HIDDEN = 32  # real: 4096 (T5 v1.1 XXL)
HEADS, HEAD_DIM = 2, 16  # real: 24 heads of 128
ROPE_AXES = (4, 6, 6)  # rotary dims per id axis, summing to HEAD_DIM; real: (16, 56, 56)

# The schedulers FLUX.1 [dev] and [schnell] ship with: dev samples with a resolution-dependent
# shift, schnell (timestep-distilled, 1-4 steps) with none.
SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
}


def tiny_t5_tokenizer():
    """A T5 tokenizer (Unigram, T5's special ids: <pad>=0, </s>=1, <unk>=2) whose pieces are single
    characters, with and without the word-start marker; nothing is downloaded."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + ch, -3.0) for ch in chars] + [(ch, -4.0) for ch in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_flux(folder: str | os.PathLike, seed: int = 0, variant: str = "dev"):
    """Build a FLUX.1-shaped pipeline ("dev": with the guidance embedding; "schnell": without),
    save it as a diffusers folder at `folder`, return the path."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if variant not in SCHEDULERS:
        raise ValueError(f"variant must be one of {sorted(SCHEDULERS)}, got {variant!r}")
    dims = SIZES["tiny"]
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch, as in the real model
        num_layers=2,  # real: 19 double-stream blocks
        num_single_layers=2,  # real: 38 single-stream blocks
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=TE_HIDDEN,
        guidance_embeds=variant == "dev",
        axes_dims_rope=ROPE_AXES,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=dims["vae"], layers_per_block=dims["vae_layers"], norm_num_groups=dims["vae_groups"],
        latent_channels=16, sample_size=64,
        # FLUX's VAE: latents are (z - shift_factor) * scaling_factor; no quant convs.
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=TE_HIDDEN, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=TE_HIDDEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu",
    ))
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=T5_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant])
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    return save_pretrained_atomically(pipe, folder)


# The published configs, shipped for `finetune plan`; [schnell]'s are beside them.
FLUX_DEV_CONFIGS = Path(__file__).resolve().parents[1] / "plan" / "configs" / "black-forest-labs__FLUX.1-dev"
# Largest first: the process's peak memory is set by the first, and the others fit in what it freed.
WEIGHTED = ("transformer", "text_encoder_2", "text_encoder", "vae")
SHARD = "5GB"  # the hub's FLUX.1 uses 10 GB shards; smaller ones halve safetensors' per-shard CPU copy


def random_component(name: str, configs: str | os.PathLike = FLUX_DEV_CONFIGS, dtype=torch.bfloat16):
    """Component `name` (one of WEIGHTED) of the FLUX.1 whose configs are in `configs`, with random
    weights created in `dtype` where torch creates them (`with torch.device("meta")`: shapes only).

    The constructors' own initialisation runs straight in `dtype`, so no float32 copy ever exists (12B
    parameters in fp32 would be 48 GB). Building on meta and materialising with `to_empty` would leave
    uninitialised memory (NaN, inf) to re-initialise by hand for every module type the libraries define."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = Path(configs) / name
    with default_dtype(dtype):
        if name == "transformer":
            return FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder))
        if name == "vae":
            return AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
        if name == "text_encoder":
            return CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
        if name == "text_encoder_2":
            return T5EncoderModel(T5Config.from_pretrained(folder))
    raise ValueError(f"no FLUX.1 component {name!r}; components with weights: {', '.join(WEIGHTED)}")


def build_flux_full_random(folder: str | os.PathLike, seed: int = 0, dtype=torch.bfloat16,
                           configs: str | os.PathLike = FLUX_DEV_CONFIGS, max_shard_size: str = SHARD):
    """The real FLUX.1 [dev]'s shapes (or those of the pipeline in `configs`) with random weights,
    written as sharded `dtype` safetensors (bf16: 33 GB, as the hub's) into the diffusers folder
    `folder`; returns its path.

    One component is created, written and freed at a time, so the peak memory is the transformer's
    (24 GB in bf16). Parameters are made where torch creates them: under accelerate's
    `init_on_device(torch.device("cuda"))` the random initialisation of 17B parameters takes seconds
    instead of minutes on a CPU (benchmarks/gpu_smoke.py builds it so).
    Tokenizers are the tiny ones (their ids are a subset of the real vocabularies, which set only the
    embedding shapes); the scheduler is the one FLUX.1 ships."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    configs = Path(configs)
    torch.manual_seed(seed)

    def write(tmp: Path) -> None:
        for name in WEIGHTED:
            model = random_component(name, configs, dtype)
            model.save_pretrained(tmp / name, safe_serialization=True, max_shard_size=max_shard_size)
            del model
            gc.collect()  # the next component is created only once this one's memory is back
        transformer = json.loads((configs / "transformer" / "config.json").read_text(encoding="utf-8"))
        variant = "dev" if transformer.get("guidance_embeds") else "schnell"
        FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]).save_pretrained(tmp / "scheduler")
        tiny_clip_tokenizer().save_pretrained(tmp / "tokenizer")
        tiny_t5_tokenizer().save_pretrained(tmp / "tokenizer_2")
        shutil.copyfile(configs / "model_index.json", tmp / "model_index.json")

    return write_atomically(folder, write, folder=True)
