"""Z-Image and Z-Image-Turbo (Tongyi-MAI): a single-stream rectified-flow DiT (S3-DiT) on 16-channel
latents in 2x2 patches; the caption is Qwen3's second-to-last hidden state over the chat-templated
prompt, its padding dropped, so each caption keeps its own length.

Objective, as diffusers' examples/dreambooth/train_dreambooth_lora_z_image.py (huggingface/diffusers
commit 58eb52c0803ea9af3abec60841c2a093bdf1f951) trains it: noisy = (1 - sigma) * latents + sigma * noise,
target = noise - latents; the transformer is called at t = 1 - sigma (`(1000 - timesteps) / 1000`) and
its output is negated before the loss (it predicts latents - noise, as musubi-tuner's zimage_train_network
says with target = latents - noise). Sigma is drawn as `model.flow.timestep_sampling` says and shifted
as the model samples ("auto": the scheduler's fixed shift, 3.0 for Turbo and 6.0 for the base model;
the example draws uniformly from that shifted table), loss weighting from `model.flow.loss_weighting`
("none", the example's default). The recipes set musubi-tuner's documented starting point instead
(logit-normal with shift 2.0, docs/zimage.md): see recipes/z-image-lora.yaml.

Caption features are padded to the pipeline's 512 tokens with a mask (`prompt_mask`), so each caption
can be cached on its own; `predict` hands the transformer each caption's unpadded rows, as the pipeline.
The text encoder stays frozen: no reference trainer trains a Qwen3 LoRA.

LoRA files for ComfyUI ("kohya" format): ComfyUI loads Z-Image as its Lumina2/NextDiT model, whose
weights use the original module names: q, k and v fused in `attention.qkv`, `attention.out`,
`feed_forward.w1/w2/w3`, `adaLN_modulation.0`. Its model_lora_keys_unet (Comfy-Org/ComfyUI comfy/lora.py,
commit 17358c8f73b581a0d22facc3c385822f09b8bfb1) maps `lora_unet_` + those names with "." -> "_", and,
for Lumina2 models, diffusers' names through comfy/utils.py z_image_to_diffusers (commit
09708eae709a992a5684bed3595ce4d07e705b4e) with the prefixes `diffusion_model.`, `transformer.` or none
(ai-toolkit's `diffusion_model.layers.0.attention.to_q.lora_A.weight` files load that way). It does not
map kohya names made from diffusers' (`lora_unet_layers_0_attention_to_q`: musubi-tuner's own output,
which its networks/convert_z_image_lora_to_comfy.py fuses into the layout written here). diffusers'
ZImagePipeline.load_lora_weights reads this layout too (its converter splits the fused qkv). LoHa, LoKr and
DoRA cannot be fused: their files keep diffusers' names as `lycoris_<module>`, which the current
model_lora_keys_unet maps for Lumina2 models through the same z_image_to_diffusers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import register_family
from ._flow import FlowFamily, flow_options
from .base import Components, ModelSource, module_device, place
from ._transformer import load_transformer_pipeline

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch

# ZImagePipeline encodes prompts to at most this many tokens (its max_sequence_length default).
MAX_SEQUENCE_LENGTH = 512

# musubi-tuner's networks/lora_zimage.py: every Linear of the main blocks' attention and MLP; the
# refiners and the AdaLN modulations are excluded (diffusers' example adapts q/k/v/out of every block).
LORA_TARGETS = r"layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))"

# diffusers module (within a block) -> ComfyUI/original module, and the fused q/k/v row block.
_QKV = {"attention.to_q": 0, "attention.to_k": 1, "attention.to_v": 2}
_BLOCK = {"attention.to_out.0": "attention.out", "feed_forward.w1": "feed_forward.w1",
          "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3",
          "adaLN_modulation.0": "adaLN_modulation.0"}
_BLOCKS = r"((?:layers|noise_refiner|context_refiner)\.\d+)"


def comfy_module(name: str) -> tuple[str, int | None]:
    """Where a diffusers ZImageTransformer2DModel Linear lives in ComfyUI's Z-Image weights: (module,
    index of its row block in the fused attention.qkv or None). ValueError for one outside the blocks."""
    m = re.fullmatch(_BLOCKS + r"\.(.+)", name)
    if m and m.group(2) in _QKV:
        return f"{m.group(1)}.attention.qkv", _QKV[m.group(2)]
    if m and m.group(2) in _BLOCK:
        return f"{m.group(1)}.{_BLOCK[m.group(2)]}", None
    raise ValueError(f"transformer LoRA: {name} is outside the attention, MLP and modulation layers of Z-Image's "
                     f"blocks, which are all this export maps for ComfyUI; leave it out of method.target_modules")


def z_image_to_kohya(state, alpha: float) -> dict[str, torch.Tensor]:
    """A peft LoRA of ZImageTransformer2DModel -> `lora_unet_<ComfyUI module>` kohya keys, q, k and v fused
    into one LoRA on attention.qkv (alpha x 3, as musubi-tuner's converter writes it)."""
    from ..export.lora import fused_kohya

    def locate(name, a, b):
        target, part = comfy_module(name)
        return (target, part * b.shape[0], 3 * b.shape[0], False) if part is not None else (target, 0, None, False)

    return fused_kohya(state, alpha, locate, "Z-Image")


@register_family("z_image")
class ZImageFamily(FlowFamily):
    name = "z_image"
    title = "Z-Image"
    pipeline_class_names = ("ZImagePipeline",)
    text_encoder_names = ("text_encoder",)
    trainable_text_encoders = ()  # Qwen3 stays frozen; its outputs are cached per caption
    refused_methods = {
        "textual_inversion": "its reference trainers (diffusers, musubi-tuner, ai-toolkit) learn no Qwen3 embedding, "
                             "nor do we; train a lora with a trigger word in the captions instead",
        "pivotal": "its reference trainers (diffusers, musubi-tuner, ai-toolkit) learn no Qwen3 embedding, nor do "
                   "we; train a lora with a trigger word in the captions instead",
    }
    lora_targets = LORA_TARGETS
    # LoHa, LoKr and DoRA name diffusers' modules, `lycoris_layers_0_attention_to_q`: ComfyUI's Lumina2 branch
    # maps them through z_image_to_diffusers onto the fused weights' rows.
    adapter_variants = frozenset({"loha", "lokr", "dora"})
    text_encoder_lora_targets: list[str] = []
    kohya_text_encoder_prefixes: dict[str, str] = {}
    kohya_base_model_version = "z_image"  # musubi-tuner's ss_base_model_version (architecture_full_name)
    modelspec = ("Z-Image/lora", "1024x1024", None)  # musubi-tuner utils/sai_model_spec.py: ARCH_Z_IMAGE + "/lora"
    kohya_apps = "ComfyUI"
    default_resolution = 1024
    denoiser_component = "transformer"

    @property
    def pipeline_class(self):
        from diffusers import ZImagePipeline

        return ZImagePipeline

    def load(self, source: ModelSource, cfg, dtype=None, device=None, vae_dtype=None,
             quantize: str = "none") -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

        pipe = load_transformer_pipeline(
            self, self.pipeline_class, ZImageTransformer2DModel, source, cfg, dtype=dtype, vae_dtype=vae_dtype,
            quantize=quantize, example="Tongyi-MAI/Z-Image")
        return place(Components(
            pipeline=pipe, denoiser=pipe.transformer, vae=pipe.vae,
            text_encoders={"text_encoder": pipe.text_encoder}, tokenizers={"text_encoder": pipe.tokenizer},
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), source=source,
            # Read here, not from the denoiser later: accelerate may wrap it (DDP has no .config).
            extras={"flow": flow_options(cfg)},
        ), device)

    def encode_images(self, c: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = c.vae
        # The distribution's mode, as diffusers' example encodes (and caches) its latents.
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def _templated(self, c: Components, captions: list[str]) -> list[str]:
        # ZImagePipeline._encode_prompt's template, so training sees the tokens sampling feeds.
        tok = c.tokenizers["text_encoder"]
        return [tok.apply_chat_template([{"role": "user", "content": cap}], tokenize=False,
                                        add_generation_prompt=True, enable_thinking=True) for cap in captions]

    def encode_prompts(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        import torch

        te, tok = c.text_encoders["text_encoder"], c.tokenizers["text_encoder"]
        enc = tok(self._templated(c, captions), padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                  truncation=True, return_tensors="pt")
        device = module_device(te)
        mask = enc.attention_mask.to(device).bool()
        with torch.no_grad():  # Qwen3 never trains
            out = te(input_ids=enc.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-2]  # the second-to-last layer, as ZImagePipeline reads it
        return {"prompt_embeds": hidden, "prompt_mask": mask}

    def count_truncated(self, c: Components, captions: list[str]) -> int:
        tok = c.tokenizers["text_encoder"]
        return sum(len(ids) > MAX_SEQUENCE_LENGTH for ids in tok(self._templated(c, captions)).input_ids)

    def prompt_embeddings(self, c: Components, prompt, negative_prompt, guidance) -> dict:
        # ZImagePipeline runs classifier-free guidance whenever guidance_scale > 0 (Turbo samples at 0),
        # and then needs the negative prompt's features too.
        cfg = guidance > 0
        embeds, negative = c.pipeline.encode_prompt(prompt, device=module_device(c.text_encoders["text_encoder"]),
                                                    do_classifier_free_guidance=cfg, negative_prompt=negative_prompt)
        kw = {"prompt_embeds": embeds}  # one tensor per prompt
        if cfg:
            kw["negative_prompt_embeds"] = negative
        return kw

    def shift_mu(self, c: Components, image_seq_len: int) -> float:
        # Only asked by a scheduler with dynamic shifting; the published Z-Image ones have none.
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        cfg = c.noise_scheduler.config
        return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))

    def predict(self, c: Components, noisy, timesteps, cond) -> torch.Tensor:
        import torch

        dtype, device = noisy.dtype, noisy.device
        # Each caption without its padding rows, as the pipeline hands them over.
        captions = [e[m.to(e.device).bool()].to(device, dtype)
                    for e, m in zip(cond["prompt_embeds"], cond["prompt_mask"])]
        # The transformer counts time the other way: t = 1 - sigma (1 = clean), kept in float32
        # because its timestep embedder is precision-sensitive (diffusers skips it in layerwise casting).
        t = 1.0 - timesteps.float() / c.noise_scheduler.config.num_train_timesteps
        out = c.denoiser(list(noisy.unsqueeze(2).unbind(0)), t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # it predicts latents - noise; the target is noise - latents

    def kohya_lora(self, denoiser_state, text_encoder_states, denoiser_alpha, text_encoder_alphas):
        if any(text_encoder_states.values() if text_encoder_states else ()):
            raise ValueError("Z-Image has no text-encoder LoRA to export")
        if not denoiser_state:
            raise ValueError("nothing to export: all LoRA state dicts are empty")
        from ..export.lycoris import PER_MODULE

        if denoiser_alpha == PER_MODULE:  # LoHa, LoKr, DoRA: cannot be fused into attention.qkv
            return self.lycoris_file(denoiser_state)
        return z_image_to_kohya(denoiser_state, denoiser_alpha)
