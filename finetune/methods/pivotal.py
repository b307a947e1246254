"""Pivotal tuning: new token embeddings (textual inversion) and a LoRA trained together, the
combination the strongest subject and brand results use. Optionally the embeddings freeze after
N steps and the LoRA trains on alone, around the now fixed "pivot".

Saved as both halves in every format: `learned_embeds.safetensors` + `pytorch_lora_weights.safetensors`
for diffusers (`load_textual_inversion` then `load_lora_weights`), and `<run>-emb.safetensors` (a webui
embedding) + `<run>.safetensors` (a kohya LoRA) for AUTOMATIC1111, Forge and ComfyUI.

The token goes into the text encoders the family lists in `embedding_keys`: on FLUX.1 that is CLIP-L
alone (T5 reads the trigger as plain text; see textual_inversion.py), so FLUX.1 pivotal = a CLIP-L
token + a transformer LoRA, and its embedding file holds `clip_l` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from . import register_method
from .base import Method
from .lora import LoraConfig, LoraMethod
from .textual_inversion import TextualInversionConfig, TextualInversionMethod

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch


class PivotalConfig(LoraConfig, TextualInversionConfig):
    type: Literal["pivotal"] = "pivotal"
    freeze_embeddings_after: int | None = Field(
        None, ge=1, le=10_000_000,
        description="Stop training the embeddings after this many steps; the LoRA goes on. "
                    "Unset: both train to the end.")

    @model_validator(mode="after")
    def _plain_lora(self):
        from .adapters import features

        for _, key in features(self):
            raise ValueError(f"{key.split('.', 1)[1]}: pivotal tuning trains a plain LoRA here; remove it, or use "
                             "type: lora for LoHa, LoKr, DoRA or conv layers")
        return self


@register_method("pivotal")
class PivotalMethod(Method):
    Config = PivotalConfig

    def __init__(self, cfg, family, training):
        super().__init__(cfg, family, training)
        self.lora = LoraMethod(cfg, family, training)
        self.ti = TextualInversionMethod(cfg, family, training)
        self.steps = 0

    @property
    def trains_text_encoder(self) -> bool:
        return True

    def setup(self, c) -> list[dict]:
        lora_groups = self.lora.setup(c)
        # Textual inversion freezes every module it finds, the LoRA weights included: re-open them.
        ti_groups = self.ti.setup(c)
        for group in lora_groups:
            for p in group["params"]:
                p.requires_grad_(True)
        return lora_groups + ti_groups

    def trainable_modules(self, c) -> list[torch.nn.Module]:
        # Only encoders that train: a frozen one (FLUX.1's T5) handed to accelerate would be wrapped
        # in DDP, which refuses a module without a trainable parameter.
        modules = self.lora.trainable_modules(c)
        return modules + [m for m in self.ti.trainable_modules(c) if not any(m is k for k in modules)]

    def trainable_parameter_count(self, groups: list[dict]) -> int:
        n_lora = len(groups) - 1  # the embedding group is last
        return self.lora.trainable_parameter_count(groups[:n_lora]) + self.ti.trainable_parameter_count(groups[n_lora:])

    def prepare_caption(self, caption: str) -> str:
        return self.ti.prepare_caption(caption)

    def after_step(self, c) -> None:
        self.ti.after_step(c)
        self.steps += 1
        self._freeze_if_due(c)

    def _freeze_if_due(self, c) -> None:
        if self.cfg.freeze_embeddings_after and self.steps >= self.cfg.freeze_embeddings_after:
            # With no gradient the optimizer skips the embedding from now on (AdamW skips grad=None).
            for rows in self.ti.vectors.values():
                rows.weight.requires_grad_(False)

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict, c) -> None:
        self.steps = int(state.get("steps", 0))
        self._freeze_if_due(c)

    def save(self, c, folder: Path, output, name: str) -> list[Path]:
        return self.lora.save(c, folder, output, name) + self.ti.save(c, folder, output, f"{name}-emb")

    def describe_file(self, path: Path) -> str:
        if self._is_embedding(path):
            return self.ti.describe_file(path)
        return self.lora.describe_file(path)

    def usage(self, pipeline_class, load_base, run_dir, files):
        ti_files = [f for f in files if self._is_embedding(Path(f))]
        lora_files = [f for f in files if not self._is_embedding(Path(f))]
        return [*self.ti.usage(pipeline_class, load_base, run_dir, ti_files), self.lora.load_line(run_dir, lora_files)]

    @staticmethod
    def _is_embedding(path: Path) -> bool:
        return path.name.startswith("learned_embeds") or path.stem.endswith("-emb")
