"""DreamBooth as a full fine-tune: the denoiser's weights (and optionally the text encoder's) train.

The result is a whole model: a diffusers folder (`model/`) and one original-layout `.safetensors`
checkpoint that AUTOMATIC1111, Forge and ComfyUI load as a checkpoint. Prior preservation is the
recipe's `prior_preservation` section, shared with every method.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..config_base import Section
from . import register_method
from .base import Method
from .lora import save_dtype

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch

MODEL_DIR = "model"


class DreamBoothConfig(Section):
    type: Literal["dreambooth"] = "dreambooth"
    train_text_encoder: bool = Field(False, description="Also fine-tune the text encoder (helps identity, costs memory).")
    text_encoder_lr: float | None = Field(None, gt=0, le=10.0, allow_inf_nan=False,
                                          description="Text-encoder learning rate; default = training.learning_rate.")
    single_file: bool | None = Field(None, description=(
        "Also write one original-layout .safetensors checkpoint; unset: where the family has that format "
        "(SD1.x/2.x, SDXL, FLUX.1)."))


@register_method("dreambooth")
class DreamBoothMethod(Method):
    Config = DreamBoothConfig

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.train_text_encoder

    def setup(self, c) -> list[dict]:
        for module in c.frozen_modules():
            module.requires_grad_(False)
        c.denoiser.requires_grad_(True)
        groups = [{"params": list(c.denoiser.parameters()), "lr": self.training.learning_rate}]
        if self.cfg.train_text_encoder:
            for te in self._text_encoders(c):
                te.requires_grad_(True)
                groups.append({"params": list(te.parameters()),
                               "lr": self.cfg.text_encoder_lr or self.training.learning_rate})
        return groups

    def _text_encoders(self, c) -> list[torch.nn.Module]:
        # The family's adaptable encoders only: FLUX.1's T5 stays frozen here as under LoRA.
        return [c.text_encoders[n] for n in self.family.adaptable_text_encoders() if n in c.text_encoders]

    def trainable_modules(self, c) -> list[torch.nn.Module]:
        return [c.denoiser, *(self._text_encoders(c) if self.cfg.train_text_encoder else [])]

    def save(self, c, folder: Path, output, name: str) -> list[Path]:
        from ..files import save_pretrained_atomically

        folder = Path(folder)
        written = []
        if "diffusers" in output.formats:
            # The trained weights as they are (fp32 master weights).
            written.append(save_pretrained_atomically(c.pipeline, folder / MODEL_DIR))
        if self.cfg.single_file is not False and self.family.has_single_file:
            written.append(self.family.save_single_file(c, folder / f"{name}.safetensors", save_dtype(output.save_dtype)))
        return written

    def describe_file(self, path: Path) -> str:
        if path.name == MODEL_DIR:
            return "the fine-tuned model as a diffusers folder: `from_pretrained(run_folder + '/model')`"
        return self.family.single_file_description

    def usage(self, pipeline_class, load_base, run_dir, files):
        if MODEL_DIR in {Path(f).name for f in files}:
            load = f"pipe = {pipeline_class}.from_pretrained({str(Path(run_dir) / MODEL_DIR)!r})"
        else:  # only the single file was asked for
            single = next(Path(f) for f in files if Path(f).suffix == ".safetensors")
            load = f"pipe = {pipeline_class}.from_single_file({str(single)!r})"
        return [f"from diffusers import {pipeline_class}", load]
