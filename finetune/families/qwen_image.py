"""Qwen-Image: a 20B rectified-flow MMDiT (60 dual-stream blocks) on 16-channel latents of a
video-style VAE (AutoencoderKLQwenImage, one frame per image), packed into 2x2 patches and conditioned
on the last hidden states of Qwen2.5-VL 7B read through the pipeline's chat template.

Objective, as diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py (commit
58eb52c0803ea9af3abec60841c2a093bdf1f951) computes it: latents = (z - latents_mean) / latents_std per
channel, noisy = (1 - sigma) * latents + sigma * noise, target = noise - latents, the transformer
called on the packed noisy latents with `timestep = sigma`, `img_shapes` (1, h/2, w/2) per image and the
prompt embeddings with their mask (`encoder_hidden_states_mask`; this diffusers release derives the
text length from it, `txt_seq_lens` is gone), the prediction unpacked; the loss weighted by
`compute_loss_weighting_for_sd3` (`model.flow.loss_weighting`, default none as there).

Timesteps. The example draws sigma from its scheduler's table, loaded with `shift=3.0`; Qwen-Image's
scheduler shifts by resolution (`use_dynamic_shifting`), and such a table is built unshifted, so the
example trains without a shift (here: `model.flow.timestep_shift=1`). musubi-tuner's documented recipe
uses a fixed shift of 2.2 and offers `qwen_shift`, the shift the pipeline samples with (e^mu, mu from
the image's token count: 2.0 at 1024 px, 2.3 at 1328 px). `timestep_shift: auto` is that last one
(`_flow.py`, as for FLUX.1 [dev]): logit-normal sigmas shifted as the model samples.

The text encoder is never trained (neither the example, musubi-tuner nor ai-toolkit train it): its
outputs, variable in length, are padded to MAX_SEQUENCE_LENGTH with a mask so the loop caches them per
caption; `predict` cuts the padding no caption of the batch uses (masked tokens change nothing).

LoRA files for ComfyUI: ComfyUI's Qwen-Image model has diffusers' module names, and comfy/lora.py
`model_lora_keys_unet` maps "lora_unet_" + every diffusion-model weight name with "." -> "_" for every
model, plus, for QwenImage, "transformer.<name>", "<name>" and "lycoris_<name>" (comfyanonymous/ComfyUI,
the version with the QwenImage branch; the generic rule as at 41444b5236c613ee5ff7d09aa620f94b702f30eb).
musubi-tuner (kohya-ss/musubi-tuner 30c658c4f4b0bf05038b3346eff9670259b10fc7, networks/lora_qwen_image.py)
writes exactly that kohya layout (`lora_unet_transformer_blocks_0_attn_to_q`, lora_down/lora_up/alpha),
`ss_base_model_version` "qwen_image" and `modelspec.architecture` "Qwen-Image/lora". diffusers'
QwenImagePipeline.load_lora_weights reads it back (`_convert_non_diffusers_qwen_lora_to_diffusers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register_family
from ._flow import FlowFamily, flow_options
from .base import Components, ModelSource, module_device, place
from ._transformer import load_transformer_pipeline

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch

# QwenImagePipeline samples with prompts cut to 512 tokens after the template (its __call__ default);
# the diffusers example trains with the same (--max_sequence_length).
MAX_SEQUENCE_LENGTH = 512

# Every Linear of the attention (image and text streams: q, k, v, outputs) and of both MLPs, in every
# block: musubi-tuner's coverage (all of QwenImageTransformerBlock but the img_mod/txt_mod modulations,
# which see only the timestep) and a superset of diffusers' example (to_q, to_k, to_v, to_out.0).
LORA_TARGETS = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|(img_mlp|txt_mlp)\.net\.(0\.proj|2))"
)


@register_family("qwen_image")
class QwenImageFamily(FlowFamily):
    name = "qwen_image"
    title = "Qwen-Image"
    pipeline_class_names = ("QwenImagePipeline",)
    guidance_keyword = "true_cfg_scale"
    vae_class = "AutoencoderKLQwenImage"
    text_encoder_names = ("text_encoder",)
    trainable_text_encoders = ()  # Qwen2.5-VL 7B stays frozen, as in every reference trainer
    refused_methods = {
        "textual_inversion": "use method.type=lora with a trigger word in the captions (Qwen-Image's reference "
                             "trainers learn concepts with a transformer LoRA; Qwen2.5-VL takes no embedding file)",
        "pivotal": "use method.type=lora with a trigger word in the captions (pivotal tuning trains text-encoder "
                   "embeddings, and Qwen-Image's text encoder stays frozen)",
    }
    lora_targets = LORA_TARGETS
    # ComfyUI names Qwen-Image's weights as diffusers does and maps `lora_unet_<weight>` for every one of
    # them, whatever the adapter under it (comfy/lora.py `model_lora_keys_unet`, its first loop).
    adapter_variants = frozenset({"loha", "lokr", "dora"})
    text_encoder_lora_targets: list[str] = []
    kohya_text_encoder_prefixes: dict[str, str] = {}
    kohya_base_model_version = "qwen_image"  # musubi-tuner's ss_base_model_version (ARCHITECTURE_QWEN_IMAGE_FULL)
    # musubi-tuner's utils/sai_model_spec.py: "Qwen-Image" + "/lora", 1328x1328 when no resolution is given,
    # no prediction type.
    modelspec = ("Qwen-Image/lora", "1328x1328", None)
    kohya_apps = "ComfyUI"
    default_resolution = 1024  # what the reference trainers train at (native: 1328)
    denoiser_component = "transformer"
    embedding_keys: dict[str, str] = {}

    @property
    def pipeline_class(self):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    def load(self, source: ModelSource, cfg, dtype=None, device=None, vae_dtype=None,
             quantize: str = "none") -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

        opts = flow_options(cfg)
        # A single file (ComfyUI's qwen_image_bf16.safetensors) holds the transformer only.
        pipe = load_transformer_pipeline(
            self, self.pipeline_class, QwenImageTransformer2DModel, source, cfg, dtype=dtype, vae_dtype=vae_dtype,
            quantize=quantize, example="Qwen/Qwen-Image")
        return place(Components(
            pipeline=pipe, denoiser=pipe.transformer, vae=pipe.vae,
            text_encoders={"text_encoder": pipe.text_encoder}, tokenizers={"text_encoder": pipe.tokenizer},
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), source=source,
            # Read here, not from the modules later: accelerate may wrap the denoiser (DDP has no .config).
            extras={"flow": opts, "vae_scale_factor": pipe.vae_scale_factor,
                    "template": pipe.prompt_template_encode, "template_drop": pipe.prompt_template_encode_start_idx,
                    "tokenizer_max_length": pipe.tokenizer_max_length},
        ), device)

    def encode_images(self, c: Components, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, H/8, W/8): the VAE's single frame axis is dropped here and restored
        in `predict`, so the loop sees images' latents like every other family's."""
        import torch

        vae = c.vae
        z = vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist.sample()[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        return (z - mean) / std

    def _tokens(self, c: Components, captions: list[str]):
        """The captions in the pipeline's template, tokenized as its `_get_qwen_prompt_embeds` does."""
        x = c.extras
        return c.tokenizers["text_encoder"](
            [x["template"].format(cap) for cap in captions], max_length=x["tokenizer_max_length"] + x["template_drop"],
            padding=True, truncation=True, return_tensors="pt")

    def encode_prompts(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """QwenImagePipeline's prompt embeddings (the template's system part dropped, cut to
        MAX_SEQUENCE_LENGTH), each padded with zeros to that length; the mask marks real tokens."""
        import torch

        te = c.text_encoders["text_encoder"]
        tokens = self._tokens(c, captions).to(module_device(te))
        with torch.no_grad():  # never trained
            hidden = te(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                        output_hidden_states=True).hidden_states[-1]
        drop = c.extras["template_drop"]
        embeds = hidden.new_zeros(len(captions), MAX_SEQUENCE_LENGTH, hidden.shape[-1])
        mask = torch.zeros(len(captions), MAX_SEQUENCE_LENGTH, dtype=torch.long, device=hidden.device)
        for i, (h, m) in enumerate(zip(hidden, tokens.attention_mask.bool())):
            kept = h[m][drop:drop + MAX_SEQUENCE_LENGTH]
            embeds[i, :len(kept)], mask[i, :len(kept)] = kept, 1
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def count_truncated(self, c: Components, captions: list[str]) -> int:
        drop = c.extras["template_drop"]
        lengths = self._tokens(c, captions).attention_mask.sum(dim=1) - drop
        # The tokenizer's own cut (1024 tokens) is past MAX_SEQUENCE_LENGTH, so this sees every cut caption.
        return int((lengths > MAX_SEQUENCE_LENGTH).sum())

    def prompt_embeddings(self, c: Components, prompt, negative_prompt, guidance) -> dict:
        # Qwen-Image is not guidance-distilled: its guidance is true CFG (`guidance_keyword`) against a
        # negative prompt (" " when none is given, as its model card); guidance <= 1 turns CFG off.
        device = module_device(c.text_encoders["text_encoder"])
        embeds, mask = c.pipeline.encode_prompt(prompt, device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
        out = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if guidance > 1:
            neg, neg_mask = c.pipeline.encode_prompt(negative_prompt or " ", device=device,
                                                     max_sequence_length=MAX_SEQUENCE_LENGTH)
            out.update(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
        return out

    def shift_mu(self, c: Components, image_seq_len: int) -> float:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        cfg = c.noise_scheduler.config
        return calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)

    def predict(self, c: Components, noisy, timesteps, cond) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        b, ch, h, w = noisy.shape
        dtype, device = noisy.dtype, noisy.device
        mask = cond["prompt_embeds_mask"].to(device)
        used = max(int(mask.sum(dim=1).max()), 1)
        mask = mask[:, :used]
        out = c.denoiser(
            hidden_states=QwenImagePipeline._pack_latents(noisy, b, ch, h, w),
            encoder_hidden_states=cond["prompt_embeds"][:, :used].to(device, dtype),
            # No mask when nothing is padded (batch 1, or captions of one length), as the pipeline passes it:
            # attention without a mask may use the flash kernel.
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            timestep=(timesteps / c.noise_scheduler.config.num_train_timesteps).to(dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        vae_scale = c.extras["vae_scale_factor"]
        return QwenImagePipeline._unpack_latents(out, h * vae_scale, w * vae_scale, vae_scale)[:, :, 0]

    def kohya_lora(self, denoiser_state, text_encoder_states, denoiser_alpha, text_encoder_alphas):
        """musubi-tuner's layout: `lora_unet_` + diffusers' module name with "." -> "_" (ComfyUI's names
        are diffusers'); no text-encoder part exists. Nothing is fused, so LoHa, LoKr and DoRA take the
        same names (`export/lycoris.py`)."""
        from ..export.lora import peft_to_kohya

        if any(s for s in (text_encoder_states or {}).values()):
            raise ValueError("Qwen-Image LoRA files hold no text-encoder part; its text encoder is never trained")
        state = {k.removeprefix("transformer."): v for k, v in (denoiser_state or {}).items()}
        if not state:
            raise ValueError("nothing to export: all LoRA state dicts are empty")
        return peft_to_kohya(state, None, denoiser_alpha, None, {})
