"""Test helpers: small image sets drawn on the fly and recipes pointing at them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def draw_subject(seed: int, size=(64, 64)) -> Image.Image:
    """A simple, learnable 'subject': a coloured disc on a two-tone background."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(150, 255, 3)))
    d = ImageDraw.Draw(img)
    d.rectangle([0, h * 2 // 3, w, h], fill=tuple(int(v) for v in rng.integers(0, 100, 3)))
    r = min(w, h) // 4
    cx, cy = w // 2 + int(rng.integers(-4, 5)), h // 2 + int(rng.integers(-4, 5))
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 60, 20))
    return img


def make_image_folder(folder: Path, n: int = 4, sizes=((64, 64), (96, 64), (64, 96)), caption="a photo of sks ball") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw_subject(i, sizes[i % len(sizes)]).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{caption}, view {i}")
    return folder


def tiny_recipe(model_dir, data_dir, out_dir, **overrides) -> dict:
    """A recipe dict for a few CPU steps on the tiny model; `overrides` use section__key=value."""
    r = {
        "model": {"base": str(model_dir)},
        "data": {"path": str(data_dir), "resolution": 64},
        "method": {"type": "lora", "rank": 4, "alpha": 4},
        "optimizer": {"type": "adamw"},
        "training": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "seed": 0, "mixed_precision": "no"},
        "validation": {"prompts": [], "num_inference_steps": 2},
        "output": {"dir": str(out_dir), "run_name": "run", "save_dtype": "fp32"},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        r[section][name] = value
    return r


def latents_and_captions(family, c, data_dir):
    from finetune.data import ImageCaptionDataset, discover_examples
    from finetune.recipe.schema import DataConfig

    cfg = DataConfig(path=str(data_dir), resolution=64, bucketing={"enabled": False})
    ds = ImageCaptionDataset(discover_examples(cfg), cfg, seed=0)
    items = [ds[i] for i in range(len(ds))]
    pixels = torch.stack([it["pixel_values"] for it in items])
    with torch.no_grad():
        latents = family.encode_images(c, pixels)
    return latents, [it["caption"] for it in items]


def loss_before_and_after(family, c, data_dir, run_dir) -> tuple[float, float]:
    """Fixed-noise loss on the training images with the base model, then with the run's LoRA loaded."""
    from finetune.train.evaluate import fixed_noise_loss

    latents, captions = latents_and_captions(family, c, data_dir)
    before = fixed_noise_loss(family, c, latents, captions)
    c.pipeline.load_lora_weights(str(run_dir))
    return before, fixed_noise_loss(family, c, latents, captions)


def step_rows(run_dir) -> list[dict]:
    """metrics.jsonl's rows of optimizer steps (the run's last line is its `memory` record)."""
    import json
    from pathlib import Path

    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r]
