"""Tiny, shape-faithful Stable Diffusion 1.5 built from configs, for tests and the quickstart.

Module names and block layout follow the real SD1.5 (four UNet levels, two layers per block,
cross-attention transformers, a four-level VAE, a CLIP text encoder), only narrower and with
fewer text-encoder layers, so every adapter key written for it is one a real checkpoint has.
The tokenizer is byte-level BPE without merges: every byte is a token, nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .cache import cache_dir

TINY_SD15 = "tiny-sd15"
BUILTIN_PREFIX = "builtin:"


def _bytes_to_unicode() -> dict[int, str]:
    # The byte->printable-character table CLIP's BPE uses (GPT-2's scheme).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_clip_tokenizer(folder: Path) -> None:
    chars = list(_bytes_to_unicode().values())
    vocab = {}
    for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), encoding="utf-8")


# Widths: "tiny" for tests and the quickstart; "full" is the real SD1.5's, random weights, for
# memory and speed benchmarks on a GPU where no checkpoint can be downloaded.
SIZES = {
    "tiny": dict(unet=(32, 32, 64, 64), groups=8, cross=32, vae=(16, 16, 32, 32), vae_layers=1, vae_groups=8,
                 te=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2), sample=8),
    "full": dict(unet=(320, 640, 1280, 1280), groups=32, cross=768, vae=(128, 256, 512, 512), vae_layers=2,
                 vae_groups=32, te=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12), sample=64),
}


def build_tiny_sd15(folder: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon", size: str = "tiny"):
    """Build an SD1.5-shaped pipeline, save it as a diffusers folder at `folder`, return the path."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    dims = SIZES[size]
    torch.manual_seed(seed)
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
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **dims["te"], vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=dims["cross"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu",
    ))
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return save_pipeline_atomically(pipe, folder)


def save_pipeline_atomically(pipe, folder: Path) -> Path:
    """save_pretrained beside the target, then rename: an interrupted build never leaves half a model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp_dir, safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        tmp_dir.rename(folder)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return folder


def build_sd15_full_random(folder: str | os.PathLike, seed: int = 0):
    return build_tiny_sd15(folder, seed=seed, size="full")


def _builder(module: str, name: str):
    """A builder imported when first used (each family's tiny model lives in its own module)."""
    def build(folder: str | os.PathLike, seed: int = 0):
        import importlib

        return getattr(importlib.import_module(module, __package__), name)(folder, seed=seed)
    return build


BUILTIN_MODELS = {TINY_SD15: build_tiny_sd15, "sd15-full-random": build_sd15_full_random,
                  "tiny-sdxl": _builder(".tiny_sdxl", "build_tiny_sdxl"),
                  "tiny-flux": _builder(".tiny_flux", "build_tiny_flux")}


def resolve_builtin(name: str) -> Path:
    """Path of a built-in tiny model's diffusers folder, building it on first use."""
    if name not in BUILTIN_MODELS:
        from .errors import FinetuneError
        raise FinetuneError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    folder = cache_dir() / name
    if not (folder / "model_index.json").exists():
        BUILTIN_MODELS[name](folder)
    return folder
