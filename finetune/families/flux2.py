"""FLUX.2 [dev] and [klein]: a rectified-flow transformer (double-stream blocks with SwiGLU MLPs, then
parallel single-stream blocks, modulations shared across blocks) on 32-channel latents patchified
2x2 into 128 channels and normalised by the VAE's batch-norm running statistics. [dev] (32B,
guidance-distilled) reads Mistral Small 3.1 and embeds a guidance scale; [klein] (4B/9B) reads Qwen3
and has no guidance embedding (its base models sample with true CFG). Either text encoder's output is
the pipeline's own `encode_prompt`: three hidden layers stacked, 512 tokens, padded.

Objective, after diffusers' examples/dreambooth/train_dreambooth_lora_flux2.py and
train_dreambooth_lora_flux2_klein.py (huggingface/diffusers 58eb52c0803ea9af3abec60841c2a093bdf1f951):
latents = (patchify(VAE mode) - bn mean) / bn std, noisy = (1 - sigma) * latents + sigma * noise,
target = noise - latents, sigma drawn by `compute_density_for_timestep_sampling` (logit-normal by
default), [dev] trained with guidance 1.0 (the example's README runs use --guidance_scale=1; musubi-tuner
also trains [dev] at 1.0), [klein] with none, loss weights by `compute_loss_weighting_for_sd3`.
Shift: the example draws from its dynamic-shifting scheduler's unshifted table; we shift as the
model samples (`timestep_shift: auto`, as the FLUX.1 family does), with the pipeline's own
`compute_empirical_mu` at 200 steps, where its step dependence ends: the line from mu 0.5 at 256
tokens to 1.15 at 4096 (1024 px), which is musubi-tuner's `--timestep_sampling flux2_shift`.
`model.flow.timestep_shift: 1` trains unshifted as diffusers' example does.

LoRA files for ComfyUI use the original (BFL) module names, as musubi-tuner's networks/lora_flux_2.py
writes them (kohya-ss/musubi-tuner 30c658c4f4b0bf05038b3346eff9670259b10fc7): `lora_unet_` + the
module path with "_": `lora_unet_double_blocks_0_img_attn_qkv` (q, k, v fused), `..._img_mlp_0`
(SwiGLU gate and up, as diffusers' ff.linear_in), `lora_unet_single_blocks_0_linear1` (diffusers'
to_qkv_mlp_proj, already fused). ComfyUI's comfy/lora.py model_lora_keys_unet maps "lora_unet_" + every
diffusion_model weight of the BFL checkpoint it loads; diffusers' `_convert_kohya_flux2_lora_to_diffusers`
reads the same names back (0.42.1).

LoHa, LoKr and DoRA cannot be fused into a double block's qkv: their files name diffusers' modules as
SimpleTuner's LyCORIS files do, `lycoris_transformer_blocks_0_attn_to_q.lokr_w1`. ComfyUI's FLUX branch of
model_lora_keys_unet (model_base.Flux2 is a Flux) maps `lycoris_` + every name comfy/utils.py
`flux_to_diffusers` knows, FLUX.2's included (ff.linear_in/out, attn.to_qkv_mlp_proj, attn.to_out), each to
its rows of the BFL weight, where comfy/lora.py `calculate_weight` narrows the weight before applying the
adapter (Comfy-Org/ComfyUI 09708eae709a992a5684bed3595ce4d07e705b4e utils.py, 17358c8f73b581a0d22facc3c385822f09b8bfb1
lora.py). diffusers' Flux2LoraLoaderMixin reads that LoKr file too (`_convert_lycoris_flux2_lokr_to_diffusers`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import FinetuneError
from . import register_family
from ._flow import FlowFamily, flow_options, guidance_value
from .base import Components, ModelSource, module_device, place
from ._transformer import load_transformer_pipeline

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch

MAX_LENGTH = 512  # both pipelines' max_sequence_length default: train on the padding they sample with
TRAIN_GUIDANCE = 1.0  # [dev]'s guidance embedding while training (diffusers' README runs, musubi-tuner)
# compute_empirical_mu interpolates in the step count between its 10- and 200-step lines; training
# has no step count, and the 200-step line is the resolution shift itself (0.5 at 256 tokens, 1.15 at 4096).
SHIFT_STEPS = 200
LATENT_CHANNELS = 32

# Every Linear of both block kinds, in diffusers' names: the coverage of musubi-tuner (all Linear of
# DoubleStreamBlock and SingleStreamBlock; FLUX.2 blocks have no modulation of their own) and of the fal
# trainer diffusers' README lists; diffusers' example default is the attention-only subset (to_q/k/v,
# to_out.0, to_qkv_mlp_proj, single to_out). A regex: "to_out" alone would not say "of single blocks".
LORA_TARGETS = (
    r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.(linear_in|linear_out)|ff_context\.(linear_in|linear_out))"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))"
)

# The diffusers Linear names ComfyUI maps as `lycoris_<name>` on a FLUX.2 model (comfy/utils.py flux_to_diffusers,
# its FLUX.2 entries and the shared ones, less norm_out.linear: its row swap would not reach a DoRA's magnitudes).
# The modulations and time/guidance embedders have FLUX.1's names there, not FLUX.2's.
COMFYUI_LYCORIS = re.compile(
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.(linear_in|linear_out)|ff_context\.(linear_in|linear_out))"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)|x_embedder|context_embedder|proj_out")

# diffusers module -> BFL module (diffusers' scripts/convert_flux2_to_diffusers.py, read backwards).
_DOUBLE_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}

# Variant -> (kohya/musubi `ss_base_model_version`, modelspec architecture), as musubi-tuner writes them
# (dataset/architectures.py *_FULL names; utils/sai_model_spec.py ARCH_FLUX_2_* + "/lora").
VARIANTS = {"dev": ("flux_2_dev", "Flux.2-dev/lora"), "klein-4b": ("flux_2_klein_4b", "Flux.2-klein-4b/lora"),
            "klein-9b": ("flux_2_klein_9b", "Flux.2-klein-9b/lora")}


def bfl_module(name: str, inner: int) -> tuple[str, int, int | None, bool] | None:
    """Where a diffusers Flux2Transformer2DModel Linear lives in the original checkpoint: (BFL module,
    first row, rows of the fused weight or None when not fused, whether the output halves swap), or
    None for a module the original has no counterpart for. `inner`: the model width."""
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if m:
        i, rest = m.groups()
        if rest in _DOUBLE_FUSED:
            bfl, k = _DOUBLE_FUSED[rest]
            return f"double_blocks.{i}.{bfl}", k * inner, 3 * inner, False
        return (f"double_blocks.{i}.{_DOUBLE[rest]}", 0, None, False) if rest in _DOUBLE else None
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", name)
    if m:
        i, rest = m.groups()
        return (f"single_blocks.{i}.{_SINGLE[rest]}", 0, None, False) if rest in _SINGLE else None
    if name in _TOP:
        # diffusers' AdaLayerNormContinuous emits (scale, shift); BFL's final layer (shift, scale).
        return _TOP[name], 0, None, name == "norm_out.linear"
    return None


def flux2_to_kohya(state, alpha: float) -> dict[str, torch.Tensor]:
    """A peft LoRA of Flux2Transformer2DModel -> the kohya/musubi FLUX.2 layout (`lora_unet_<BFL name>`),
    q, k and v of a double block fused into one LoRA on its qkv."""
    from ..export.lora import fused_kohya

    return fused_kohya(state, alpha, lambda name, a, b: bfl_module(name, inner=a.shape[1]), "FLUX.2")


def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std of AutoencoderKLFlux2's batch norm over patchified latents, shaped to `like`."""
    import torch

    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def variant_of(transformer_config) -> str:
    """"dev" (guidance embedding) or the [klein] size, from the transformer's config; tiny models
    count as the 4B (nearest in width)."""
    if transformer_config.get("guidance_embeds", True):
        return "dev"
    width = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    return "klein-9b" if width > 3072 else "klein-4b"


@register_family("flux2")
class Flux2Family(FlowFamily):
    name = "flux2"
    title = "FLUX.2"
    pipeline_class_names = ("Flux2Pipeline", "Flux2KleinPipeline")
    lora_targets = LORA_TARGETS
    text_encoder_lora_targets: list[str] = []
    trainable_text_encoders = ()  # Mistral Small 3.1 (24B) / Qwen3: frozen, outputs cached per caption
    # In SimpleTuner's LyCORIS layout, `lycoris_<diffusers module>`: ComfyUI maps each name to its rows of
    # BFL's fused weights and applies LoHa, LoKr and DoRA there.
    adapter_variants = frozenset({"loha", "lokr", "dora"})
    variant_modules = COMFYUI_LYCORIS
    refused_methods = {
        "textual_inversion": ("FLUX.2's text encoders (Mistral Small 3.1, Qwen3) have no embedding format an app "
                              "loads; train method.type=lora with a trigger word in the captions instead"),
        "pivotal": ("pivotal tuning needs a textual-inversion embedding, which FLUX.2 has no app format for; "
                    "train method.type=lora with a trigger word in the captions instead"),
    }
    kohya_text_encoder_prefixes: dict[str, str] = {}
    kohya_base_model_version = VARIANTS["dev"][0]
    kohya_apps = "ComfyUI"  # AUTOMATIC1111 and Forge run no FLUX.2
    default_resolution = 1024
    denoiser_component = "transformer"
    vae_class = "AutoencoderKLFlux2"
    latent_channels = LATENT_CHANNELS
    patch = 1  # its latents are patchified (and cropped to whole patches) as they are encoded

    def __init__(self):
        # The loaded model's pipeline class and variant: [dev] and [klein] are one family, and the
        # exports (save_lora_weights, the model card, modelspec) ask this instance after `load`.
        self._loaded: tuple[type, str] | None = None

    @property
    def pipeline_class(self):
        if self._loaded:
            return self._loaded[0]
        from diffusers import Flux2Pipeline

        return Flux2Pipeline

    @property
    def modelspec(self):
        return VARIANTS[self._loaded[1] if self._loaded else "dev"][1], "1024x1024", None

    def base_model_version(self, c: Components) -> str:
        return VARIANTS[c.extras["variant"]][0]

    def load(self, source: ModelSource, cfg, dtype=None, device=None, vae_dtype=None,
             quantize: str = "none") -> Components:
        from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

        # DiffusionPipeline: the model_index says which of the two pipelines ([dev] or [klein]) it is.
        pipe = load_transformer_pipeline(
            self, DiffusionPipeline, Flux2Transformer2DModel, source, cfg, dtype=dtype, vae_dtype=vae_dtype,
            quantize=quantize, example="black-forest-labs/FLUX.2-dev")
        if type(pipe).__name__ not in self.pipeline_class_names:
            raise FinetuneError(f"model.base: {source.label} is a {type(pipe).__name__}, not a FLUX.2 pipeline "
                                f"({' or '.join(self.pipeline_class_names)}); set model.family to its family")
        transformer = pipe.transformer
        # FLUX.2's pipelines cast the latents to `transformer.dtype`, which diffusers reads off the first
        # parameter (the timestep embedder's): left out of float8 (memory.fp8_base honours these patterns),
        # sampling runs in the compute dtype. The embedders are under 0.3% of the weights.
        transformer._skip_layerwise_casting_patterns = [*(transformer._skip_layerwise_casting_patterns or ()),
                                                        "time_guidance_embed"]
        variant = variant_of(transformer.config)
        self._loaded = (type(pipe), variant)
        return place(Components(
            pipeline=pipe, denoiser=transformer, vae=pipe.vae,
            text_encoders={"text_encoder": pipe.text_encoder}, tokenizers={"text_encoder": pipe.tokenizer},
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), source=source,
            # Read here, not from the denoiser later: accelerate may wrap it (DDP has no .config).
            extras={"flow": flow_options(cfg), "guidance_embeds": bool(transformer.config.guidance_embeds),
                    "variant": variant, "klein": type(pipe).__name__ == "Flux2KleinPipeline",
                    "distilled": bool(pipe.config.get("is_distilled", False))},
        ), device)

    def latent_scale(self, c: Components) -> int:
        return 2 * c.pipeline.vae_scale_factor  # 2x2 patches of the VAE's latents, one cell each

    def encode_images(self, c: Components, pixels: torch.Tensor) -> torch.Tensor:
        """Patchified, batch-normed latents (batch, 128, h/16, w/16), as the pipeline's `_encode_vae_image`
        and the example make them (the distribution's mode, not a sample)."""
        from diffusers import Flux2Pipeline

        vae = c.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        # 2x2 patches need even latent sides; 8-pixel buckets can give odd ones, and one latent row
        # (8 pixels) costs less than refusing the image.
        h, w = latents.shape[-2] // 2 * 2, latents.shape[-1] // 2 * 2
        if h == 0 or w == 0:
            raise FinetuneError(f"FLUX.2 needs images of at least 16x16 pixels; got {tuple(pixels.shape[-2:])}")
        latents = Flux2Pipeline._patchify_latents(latents[..., :h, :w])
        mean, std = _bn_stats(vae, latents)
        return (latents - mean) / std

    def vae_latents(self, pipe, latents, height, width):
        """[dev]'s pipeline returns packed 2x2 patches normalised by the VAE's batch norm; undone as it
        decodes them. [klein]'s returns the VAE's own latents."""
        if latents.ndim != 3:
            return latents
        patch = pipe.vae_scale_factor * 2
        default = pipe.default_sample_size * pipe.vae_scale_factor
        h, w = (height or default) // patch, (width or default) // patch
        latents = latents.reshape(latents.shape[0], h, w, latents.shape[-1]).permute(0, 3, 1, 2)
        mean, std = _bn_stats(pipe.vae, latents)
        return pipe._unpatchify_latents(latents * std + mean)

    def _embed(self, c: Components, captions: list[str]) -> torch.Tensor:
        import torch

        with torch.no_grad():  # the text encoders never train here
            embeds, _ = c.pipeline.encode_prompt(captions, device=module_device(c.text_encoders["text_encoder"]),
                                                 max_sequence_length=MAX_LENGTH)
        return embeds

    def encode_prompts(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self._embed(c, captions)}

    def prompt_embeddings(self, c: Components, prompt, negative_prompt, guidance) -> dict:
        kw = {"prompt_embeds": self._embed(c, [prompt])}
        # [klein] base samples with true CFG above 1 against a negative prompt ("" unless given); [dev]
        # and the distilled [klein] embed or ignore the scale and take no negative prompt.
        if c.extras["klein"] and not c.extras["distilled"] and guidance > 1:
            kw["negative_prompt_embeds"] = self._embed(c, [negative_prompt or ""])
        return kw

    def count_truncated(self, c: Components, captions: list[str]) -> int:
        tok = c.tokenizers["text_encoder"]
        if c.extras["klein"]:
            texts = [tok.apply_chat_template([{"role": "user", "content": cap}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False) for cap in captions]
            lengths = [len(ids) for ids in tok(texts).input_ids]
        else:
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            chats = format_input(captions, system_message=c.pipeline.system_message)
            lengths = [len(ids) for ids in tok.apply_chat_template(chats, tokenize=True, return_dict=True)["input_ids"]]
        return sum(n > MAX_LENGTH for n in lengths)

    def shift_mu(self, c: Components, image_seq_len: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len, SHIFT_STEPS)

    def predict(self, c: Components, noisy, timesteps, cond) -> torch.Tensor:
        import torch
        from diffusers import Flux2Pipeline

        b, ch, h, w = noisy.shape
        dtype, device = noisy.dtype, noisy.device
        prompt_embeds = cond["prompt_embeds"].to(device, dtype)
        guidance = None
        if c.extras["guidance_embeds"]:
            scale = guidance_value(c.extras["flow"], TRAIN_GUIDANCE)
            guidance = torch.full((b,), scale, device=device, dtype=torch.float32)
        out = c.denoiser(
            hidden_states=Flux2Pipeline._pack_latents(noisy),
            timestep=(timesteps / c.noise_scheduler.config.num_train_timesteps).to(dtype),
            guidance=guidance,
            encoder_hidden_states=prompt_embeds,
            txt_ids=Flux2Pipeline._prepare_text_ids(prompt_embeds).to(device),
            img_ids=Flux2Pipeline._prepare_latent_ids(noisy).to(device),
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, ch, h, w)  # _pack_latents undone: tokens are row-major

    def kohya_lora(self, denoiser_state, text_encoder_states, denoiser_alpha, text_encoder_alphas):
        if any(text_encoder_states.values() if text_encoder_states else ()):
            raise ValueError("FLUX.2 trains no text-encoder LoRA; its kohya file holds the transformer only")
        if not denoiser_state:
            raise ValueError("nothing to export: all LoRA state dicts are empty")
        from ..export.lycoris import PER_MODULE

        if denoiser_alpha == PER_MODULE:  # LoHa, LoKr, DoRA: cannot be fused into BFL's qkv
            return self.lycoris_file(denoiser_state)
        return flux2_to_kohya(denoiser_state, denoiser_alpha)
