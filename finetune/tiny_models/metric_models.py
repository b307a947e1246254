"""Tiny CLIP and DINOv2 metric models built from configs, for tests and the quickstart (`finetune eval`
needs a CLIP and a DINOv2 that exist offline on a fresh clone).

They are the real transformers classes (CLIPModel + CLIPProcessor, Dinov2Model + its BitImageProcessor),
only narrow, with few layers and small images, so the code that loads and calls the hub's metric models
(openai/clip-vit-large-patch14, facebook/dinov2-*) is the code these exercise. Weights are random
but seeded: the same seed builds the same folder.

The image processors are the PIL ones (`...ImageProcessorPil`): the default "fast" processors of
transformers 5 need torchvision, which finetune does not depend on.

`build_tiny_clip(..., tied=True)` builds a CLIP whose text and image towers compute the same
function of a bag of tokens (see `_tie_towers`): an image drawn by `tied_clip_image(prompt)` embeds
exactly like the prompt, so prompt-matched pairs score higher than swapped ones without any training.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..files import write_atomically
from . import write_tiny_clip_tokenizer

# The tiny byte-level tokenizer: 2 x 256 byte tokens, then <|startoftext|>, <|endoftext|>.
CLIP_VOCAB, CLIP_BOS, CLIP_EOS = 514, 512, 513
CLIP_IMAGE_SIZE, CLIP_PATCH = 64, 16  # 16 patches of 16x16x3 = 768 pixels: one per token id (514)
CLIP_WIDTH = 32
DINO_IMAGE_SIZE, DINO_PATCH = 32, 8


def build_tiny_clip(folder: str | os.PathLike, seed: int = 0, tied: bool = False) -> Path:
    """Build a tiny CLIPModel + CLIPProcessor, save both into `folder` (replaced whole), return its path."""
    import torch

    torch.manual_seed(seed)
    model = _tiny_clip_model()
    if tied:
        _tie_towers(model)
    return write_atomically(folder, lambda tmp: _save_clip(model, Path(tmp)), folder=True)


def build_tiny_clip_tied(folder: str | os.PathLike, seed: int = 0) -> Path:
    """The tied-tower tiny CLIP (for the CLIP-score tests): `build_tiny_clip(tied=True)`."""
    return build_tiny_clip(folder, seed=seed, tied=True)


def build_tiny_dinov2(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny Dinov2Model + its image processor, save both into `folder`, return its path."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                          image_size=DINO_IMAGE_SIZE, patch_size=DINO_PATCH)
    model = Dinov2Model(config).eval()
    # DINOv2's own preprocessing (resize, center crop, ImageNet mean/std), at the tiny model's size.
    processor = BitImageProcessorPil(
        do_resize=True, size={"shortest_edge": DINO_IMAGE_SIZE}, do_center_crop=True,
        crop_size={"height": DINO_IMAGE_SIZE, "width": DINO_IMAGE_SIZE}, do_normalize=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True)

    def save(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return write_atomically(folder, save, folder=True)


def _tiny_clip_model():
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=CLIP_VOCAB, hidden_size=CLIP_WIDTH, intermediate_size=64, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=77, bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS,
                pad_token_id=CLIP_EOS)
    vision = dict(hidden_size=CLIP_WIDTH, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  image_size=CLIP_IMAGE_SIZE, patch_size=CLIP_PATCH)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return CLIPModel(config).eval()


def _save_clip(model, folder: Path) -> None:
    from transformers import CLIPImageProcessorPil, CLIPProcessor, CLIPTokenizer

    write_tiny_clip_tokenizer(folder / "_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tokenizer")
    # mean 0 / std 1: pixel values stay in [0, 1], which `tied_clip_image` relies on; a real CLIP
    # keeps its own statistics in its own preprocessor_config.json.
    images = CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": CLIP_IMAGE_SIZE}, do_center_crop=True,
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}, do_normalize=True,
        image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], do_convert_rgb=True)
    model.save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    for path in (folder / "_tokenizer").iterdir():
        path.unlink()
    (folder / "_tokenizer").rmdir()


def _tie_towers(model) -> None:
    """Make both towers embed a bag of tokens the same way.

    Layer 0 attends uniformly (query weights 0) and averages the values of all tokens; BOS/EOS/CLS and
    empty patches embed to 0, so they add nothing but a count, which the final LayerNorm divides out
    (up to its eps). Layers 1.. are identities, and every MLP is off: in the text tower later layers
    would see causal prefixes where the image tower sees every patch. A patch that lights pixel t
    (flat index in C x H x W) embeds like token t, position embeddings are 0, and both towers share
    layer 0 and their projection, so `tied_clip_image(prompt)` and `prompt` get the same embedding.
    """
    import torch

    text, vision = model.text_model, model.vision_model
    with torch.no_grad():
        _uniform_mean_layers(text.encoder.layers)
        vision.encoder.layers.load_state_dict(text.encoder.layers.state_dict())
        tokens = text.embeddings.token_embedding.weight
        tokens[[CLIP_BOS, CLIP_EOS]] = 0
        text.embeddings.position_embedding.weight.zero_()
        vision.embeddings.position_embedding.weight.zero_()
        vision.embeddings.class_embedding.zero_()
        conv = torch.zeros(CLIP_WIDTH, 3 * CLIP_PATCH * CLIP_PATCH)
        conv[:, :CLIP_VOCAB] = tokens.T
        vision.embeddings.patch_embedding.weight.copy_(conv.view(CLIP_WIDTH, 3, CLIP_PATCH, CLIP_PATCH))
        model.visual_projection.weight.copy_(model.text_projection.weight)


def _uniform_mean_layers(layers) -> None:
    for i, layer in enumerate(layers):
        attention = layer.self_attn
        attention.q_proj.weight.zero_()  # equal scores: a plain mean over the attended tokens
        attention.v_proj.bias.zero_()  # an embedding of 0 gives a value of 0
        attention.out_proj.bias.zero_()
        if i > 0:
            attention.out_proj.weight.zero_()
        layer.mlp.fc2.weight.zero_()
        layer.mlp.fc2.bias.zero_()


def tied_clip_image(prompt: str, tokenizer):
    """The image a tied tiny CLIP reads as `prompt`: one patch per token, lighting the pixel whose
    flat index (C x H x W within the patch) is the token id. Prompts of up to 16 tokens."""
    import numpy as np
    from PIL import Image

    ids = [i for i in tokenizer(prompt)["input_ids"] if i not in (CLIP_BOS, CLIP_EOS)]
    per_row = CLIP_IMAGE_SIZE // CLIP_PATCH
    if len(ids) > per_row * per_row:
        raise ValueError(f"prompt {prompt!r} has {len(ids)} tokens; a tied tiny CLIP image holds {per_row ** 2}")
    pixels = np.zeros((3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE), dtype=np.uint8)
    for k, token in enumerate(ids):
        c, rest = divmod(token, CLIP_PATCH * CLIP_PATCH)
        y, x = divmod(rest, CLIP_PATCH)
        pixels[c, (k // per_row) * CLIP_PATCH + y, (k % per_row) * CLIP_PATCH + x] = 255
    return Image.fromarray(pixels.transpose(1, 2, 0), mode="RGB")
