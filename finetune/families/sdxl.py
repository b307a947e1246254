"""Stable Diffusion XL (and its fine-tunes: Pony, Illustrious, ...): two CLIP text encoders whose
penultimate hidden states are concatenated, the second one's pooled projection plus six numbers
(original size, crop offset, target size) as added conditioning, epsilon or v-prediction.

The size/crop numbers come from each image as it was bucketed and cropped, as SDXL was trained:
a small photo upscaled into its bucket says so, and the model learns not to copy its blur.
LoRA files in the kohya layout use the original (SGM) UNet names, `lora_unet_input_blocks_4_1_...`,
which is what kohya's SDXL trainer writes and webui, Forge and ComfyUI expect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register_family
from .base import Components, module_device
from .sd1 import SD1Family

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch


@register_family("sdxl")
class SDXLFamily(SD1Family):
    name = "sdxl"
    title = "SDXL"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    kohya_text_encoder_prefixes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    kohya_base_model_version = "sdxl_base_v1-0"
    embedding_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}

    def base_model_version(self, c: Components) -> str:
        return self.kohya_base_model_version
    default_resolution = 1024

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def load(self, source, cfg, dtype=None, device=None, vae_dtype=None, quantize: str = "none") -> Components:
        c = super().load(source, cfg, dtype=dtype, device=device, vae_dtype=vae_dtype, quantize=quantize)
        # The original-layout names of the UNet's modules, for kohya LoRA keys.
        from ..export.single_file import unet_module_map

        self._sgm_names = unet_module_map(c.denoiser)
        return c

    def encode_prompts(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        import torch

        hidden, pooled = [], None
        for name in self.text_encoder_names:
            te = c.text_encoders[name]
            out = te(self._ids(c, captions, name).to(module_device(te)), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both encoders
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds  # the second encoder's projection
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def prompt_embeddings(self, c: Components, prompt, negative_prompt, guidance) -> dict:
        device = module_device(c.text_encoders["text_encoder"])
        pe, npe, ppe, nppe = c.pipeline.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=guidance > 1,
                                                      negative_prompt=negative_prompt)
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
                "negative_pooled_prompt_embeds": nppe}

    def image_conditioning(self, c: Components, batch: dict) -> dict[str, torch.Tensor]:
        import torch

        rows = [[*o, *crop, *t] for o, crop, t in zip(batch["original_size"], batch["crop_top_left"], batch["target_size"])]
        return {"time_ids": torch.tensor(rows, dtype=torch.float32)}

    def predict(self, c: Components, noisy, timesteps, cond) -> torch.Tensor:
        dtype, device = noisy.dtype, noisy.device
        added = {"text_embeds": cond["text_embeds"].to(device, dtype), "time_ids": cond["time_ids"].to(device, dtype)}
        return c.denoiser(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                          added_cond_kwargs=added, return_dict=False)[0]

    def kohya_lora(self, denoiser_state, text_encoder_states, denoiser_alpha, text_encoder_alphas):
        from ..export.lora import peft_to_kohya
        from ..export.single_file import rename_modules

        unet = rename_modules(denoiser_state, self._sgm_names, "UNet LoRA") if denoiser_state else denoiser_state
        return peft_to_kohya(unet, text_encoder_states, denoiser_alpha, text_encoder_alphas,
                             self.kohya_text_encoder_prefixes)

    def save_single_file(self, c: Components, path, dtype: torch.dtype):
        from ..export.single_file import save_sdxl_single_file

        return save_sdxl_single_file(path, c.denoiser, c.vae, c.text_encoders["text_encoder"],
                                     c.text_encoders["text_encoder_2"], dtype=dtype)
