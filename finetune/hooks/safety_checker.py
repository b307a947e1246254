"""An image classifier hook on diffusers' `StableDiffusionSafetyChecker`.

Fail closed: if the configured checker cannot be loaded, nothing is generated (a clear error);
turning it off means removing the hook from the recipe or passing `--no-hooks`, an explicit and
logged choice. What happens to a flagged image is the recipe's `action`: `block` (no file is
written; the manifest says why), `blur`, or `replace` (a flat grey image). Unlike the stock
pipeline, a flagged image is never silently turned black.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter
from pydantic import Field

from ..errors import FinetuneError
from . import register_hook
from .base import Hook, HookConfig, OutputImage, Verdict


class SafetyCheckerConfig(HookConfig):
    type: Literal["safety_checker"] = "safety_checker"
    weights: str = Field("CompVis/stable-diffusion-safety-checker",
                         description="Hub id or local folder of the checker (a pipeline folder with safety_checker/ "
                                     "and feature_extractor/ works too).")
    action: Literal["block", "blur", "replace"] = "block"
    blur_radius: float = Field(32.0, gt=0)


DONE = {"blur": "blurred", "replace": "replaced with grey"}


def _locate(weights: str) -> tuple[str, str, dict]:
    p = Path(weights).expanduser()
    if p.is_dir() and (p / "safety_checker").is_dir():
        return str(p / "safety_checker"), str(p / "feature_extractor"), {}
    if p.is_dir():
        return str(p), str(p), {}
    return weights, weights, {}


@register_hook("safety_checker")
class SafetyCheckerHook(Hook):
    name = "safety_checker"
    Config = SafetyCheckerConfig
    screens_content = True

    def __init__(self, cfg):
        super().__init__(cfg)
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        model_path, processor_path, kw = _locate(cfg.weights)
        try:
            self.checker = StableDiffusionSafetyChecker.from_pretrained(model_path, **kw).eval()
            self.processor = CLIPImageProcessor.from_pretrained(processor_path)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FinetuneError(
                f"output hook safety_checker: cannot load {cfg.weights} ({first}); nothing was generated. Point "
                f"weights at a local copy, or remove the hook to generate without it (logged as turned off)") from e

    def flagged(self, image: Image.Image) -> bool:
        import torch

        clip_input = self.processor(images=[image], return_tensors="pt").pixel_values.to(self.checker.dtype)
        with torch.no_grad():
            _, has_nsfw = self.checker(clip_input=clip_input, images=[np.asarray(image, dtype=np.float32) / 255.0])
        return bool(has_nsfw[0])

    def process(self, item: OutputImage) -> OutputImage:
        if not self.flagged(item.image):
            item.verdicts.append(Verdict(self.name, "pass"))
            return item
        action = self.cfg.action
        if action == "block":
            return item.reject(self.name, "flagged by the safety checker")
        if action == "blur":
            item.image = item.image.filter(ImageFilter.GaussianBlur(self.cfg.blur_radius))
        else:
            item.image = Image.new("RGB", item.image.size, (128, 128, 128))
        item.verdicts.append(Verdict(self.name, "transform", f"flagged by the safety checker; {DONE[action]}"))
        return item
