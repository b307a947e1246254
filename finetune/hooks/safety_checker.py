"""An image classifier hook on diffusers' `StableDiffusionSafetyChecker`.

Fail closed: if the configured checker cannot be loaded, nothing is generated (a clear error);
turning it off means removing the hook from the recipe or passing `--no-hooks`, an explicit and
logged choice. What happens to a flagged image is the recipe's `action`: `block` (no file is
written; the manifest says why), `blur`, or `replace` (a flat grey image). Unlike the stock
pipeline, a flagged image is never silently turned black. Images made together are judged together
(`screen_batch`, one forward pass), on the generating device when `finetune generate` places the
checker there (`place`); it stays fp32, so its verdicts are those it gives on the CPU.
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
        self._batch: dict[int, tuple[Image.Image, bool]] = {}  # verdicts of the batch screened last
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

    def place(self, device) -> None:
        """Run the checker on `device` (the generating pipeline's); it stays fp32 there, so its verdicts
        are those it gives on the CPU."""
        self.checker.to(device)

    def flags(self, images: list[Image.Image]) -> list[bool]:
        """Whether each image is flagged, all in one forward pass on the checker's device."""
        import torch

        if not images:
            return []
        param = next(self.checker.parameters())
        clip_input = self.processor(images=list(images), return_tensors="pt").pixel_values.to(param.device, param.dtype)
        # The checker blacks out flagged entries of `images` (the stock pipeline's behaviour); it is handed
        # placeholders, so nothing here is ever blacked out and no copy of the pixels is made.
        with torch.no_grad():
            _, has_nsfw = self.checker(clip_input=clip_input, images=[np.zeros(1, np.float32) for _ in images])
        return [bool(f) for f in has_nsfw]

    def screen_batch(self, images: list[Image.Image]) -> None:
        """Judge a batch at once; `process` then uses these verdicts for these very image objects (an image
        an earlier hook replaced, or any other, is judged on its own as before)."""
        self._batch = {id(image): (image, flag) for image, flag in zip(images, self.flags(images))}

    def flagged(self, image: Image.Image) -> bool:
        known = self._batch.pop(id(image), None)
        if known is not None and known[0] is image:
            return known[1]
        return self.flags([image])[0]

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
