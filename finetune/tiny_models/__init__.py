"""Tiny, shape-faithful models built from configs, for tests and the quickstart: `builtin:<name>` in
a recipe. Each family's builder lives in its own module (`sd15`, `sdxl`, `flux`, ...; the CLIP and
DINOv2 metric models in `metric_models`) and is imported when first used; what they share (the byte-level CLIP tokenizer) is here.

Built models are kept in the finetune cache (`$FINETUNE_CACHE/<name>`) and built again only when
that folder has no model_index.json (config.json for a metric model).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path

from ..cache import cache_dir

BUILTIN_PREFIX = "builtin:"
TINY_SD15 = "tiny-sd15"


def _builder(module: str, name: str):
    def build(folder: str | os.PathLike, seed: int = 0):
        return getattr(importlib.import_module(module, __package__), name)(folder, seed=seed)
    return build


BUILTIN_MODELS = {TINY_SD15: _builder(".sd15", "build_tiny_sd15"),
                  "sd15-full-random": _builder(".sd15", "build_sd15_full_random"),
                  "tiny-sdxl": _builder(".sdxl", "build_tiny_sdxl"),
                  "sdxl-full-random": _builder(".sdxl", "build_sdxl_full_random"),
                  "tiny-flux": _builder(".flux", "build_tiny_flux"),
                  "flux-full-random": _builder(".flux", "build_flux_full_random"),
                  "tiny-sd3": _builder(".sd3", "build_tiny_sd3"),
                  "tiny-flux2": _builder(".flux2", "build_tiny_flux2"),
                  "tiny-flux2-klein": _builder(".flux2", "build_tiny_flux2_klein"),
                  "tiny-qwen-image": _builder(".qwen_image", "build_tiny_qwen_image"),
                  "tiny-z-image": _builder(".z_image", "build_tiny_z_image"),
                  # metric models (finetune eval, validation.metrics): a transformers folder, no model_index.json
                  "tiny-clip": _builder(".metric_models", "build_tiny_clip"),
                  "tiny-clip-tied": _builder(".metric_models", "build_tiny_clip_tied"),
                  "tiny-dinov2": _builder(".metric_models", "build_tiny_dinov2")}

# The family of each built-in model, known without building it (`finetune validate` checks the
# family x method pair before anything is built).
BUILTIN_FAMILIES = {"tiny-sd15": "sd1", "sd15-full-random": "sd1", "tiny-sdxl": "sdxl", "sdxl-full-random": "sdxl",
                    "tiny-flux": "flux", "flux-full-random": "flux", "tiny-sd3": "sd3", "tiny-flux2": "flux2",
                    "tiny-flux2-klein": "flux2", "tiny-qwen-image": "qwen_image", "tiny-z-image": "z_image"}


def resolve_builtin(name: str) -> Path:
    """Path of a built-in tiny model's diffusers folder, building it on first use."""
    if name not in BUILTIN_MODELS:
        from ..errors import FinetuneError
        raise FinetuneError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    folder = cache_dir() / name
    # Either file is written last of a folder that is renamed into place whole: it marks a finished build.
    if not any((folder / marker).exists() for marker in ("model_index.json", "config.json")):
        BUILTIN_MODELS[name](folder)
    return folder


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
    """A CLIP tokenizer's files: byte-level BPE without merges, every byte a token; nothing downloaded."""
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


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)
