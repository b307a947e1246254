"""FLUX.1 [dev] and [schnell]: a rectified-flow transformer (double-stream MMDiT blocks, then
single-stream blocks) on 16-channel latents packed into 2x2 patches, conditioned on T5 hidden
states, CLIP-L's pooled output and, for [dev] (guidance-distilled), a guidance embedding.

Objective: noisy = (1 - sigma) * latents + sigma * noise, target = noise - latents (the velocity
the transformer predicts), sigma drawn per image as `FluxOptions.timestep_sampling` says, then
shifted the way the model samples: "auto" uses the base model's scheduler, i.e. the
resolution-dependent shift for [dev] and none for [schnell] (`_flow.py`, the recipe's `model.flow`).

Only CLIP-L can take a LoRA besides the transformer; T5 always stays frozen and runs without
gradients (with CLIP-L frozen too, the loop caches both encoders' outputs per caption).

LoRA files for ComfyUI and Forge use the original (BFL) module names with q/k/v fused, as
kohya's FLUX trainer writes them: `lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_single_blocks_0_linear1` (q, k, v and the MLP input in one weight), `lora_te1_...` for
CLIP-L. diffusers' FluxPipeline.load_lora_weights reads that layout too (at FLUX.1's real widths:
its converter has them written in for the single blocks' linear1). LoHa, LoKr and DoRA cannot be fused
that way: their files name diffusers' modules as SimpleTuner's LyCORIS files do,
`lycoris_transformer_blocks_0_attn_to_q.hada_w1_a`, which ComfyUI and Forge map to the rows of the fused
BFL weight each one is (comfy/lora.py, `model_lora_keys_unet`, its FLUX branch).

Textual inversion and pivotal tuning learn the new token in CLIP-L only (`embedding_keys`): T5 reads
the trigger as ordinary text pieces. A full fine-tune's single file is the transformer alone in BFL's
layout (`export/flux_single_file.py`), as flux1-dev.safetensors ships it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import register_family
from ._flow import FlowFamily, FlowOptions, flow_options, guidance_value
from .base import Components, ModelSource, module_device, place
from ._transformer import load_transformer_pipeline

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch

# FluxPipeline encodes prompts to this many T5 tokens unless told otherwise; training at the
# length validation and users' pipelines sample with keeps the padding the model sees the same.
T5_MAX_LENGTH = 512
MLP_RATIO = 4  # FLUX.1 single-block MLP width / model width (linear1 holds q, k, v and the MLP input)


# FLUX.1's options are every flow family's (`model.flow`; `model.flux` is the older name).
FluxOptions = FlowOptions
# FLUX.1 [dev] trains with guidance 1.0, as kohya's sd-scripts and ai-toolkit recommend (diffusers' example: 3.5).
TRAIN_GUIDANCE = 1.0


# peft matches a string target as a regular expression on the whole module name. A list of suffixes
# cannot say "proj_out of the single blocks" without also catching the final layer's proj_out.
LORA_TARGETS = (
    r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))"
)

# diffusers module -> BFL module, for the kohya/ComfyUI names. Fused BFL weights list their parts
# in row order (each part `inner` rows; the single-block MLP part MLP_RATIO * inner).
_DOUBLE_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
}
_SINGLE_FUSED = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


# A multi-vector textual-inversion token as the methods expand it: `<t> <t>_1 <t>_2`.
_EXPANDED = re.compile(r"(\S+)(?: \1_\d+)+")


def unexpanded(caption: str) -> str:
    """The caption T5 reads: FluxPipeline expands a multi-vector token only for the tokenizer that has it
    (CLIP-L's; T5 learns no token), so T5 sees `<t>` where CLIP-L sees `<t> <t>_1 ...`."""
    return _EXPANDED.sub(r"\1", caption)


def bfl_module(name: str, inner: int) -> tuple[str, int, int | None, bool] | None:
    """Where a diffusers FluxTransformer2DModel Linear lives in the original checkpoint:
    (BFL module, first row, rows of the fused BFL weight or None when not fused, whether the two
    output halves swap), or None for a module the original has no counterpart for. `inner` is the
    model width (the in_features of every q/k/v projection)."""
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
        if rest in _SINGLE_FUSED:
            return f"single_blocks.{i}.linear1", _SINGLE_FUSED[rest] * inner, (3 + MLP_RATIO) * inner, False
        return (f"single_blocks.{i}.{_SINGLE[rest]}", 0, None, False) if rest in _SINGLE else None
    if name in _TOP:
        # diffusers' AdaLayerNormContinuous emits (scale, shift); BFL's final layer (shift, scale).
        return _TOP[name], 0, None, name == "norm_out.linear"
    return None


def flux_to_kohya(state, alpha: float) -> dict[str, torch.Tensor]:
    """A peft LoRA of FluxTransformer2DModel -> kohya's FLUX layout (`lora_unet_<BFL name>`), the parts
    of BFL's fused weights (q, k, v; and the MLP input in single blocks) fused into one LoRA each."""
    from ..export.lora import fused_kohya

    # diffusers' kohya reader ignores alpha on the final layer: its scale is folded into the weights.
    return fused_kohya(state, alpha, lambda name, a, b: bfl_module(name, inner=a.shape[1]), "FLUX.1",
                       fold_alpha=lambda module: module.startswith("final_layer."))


@register_family("flux")
class FluxFamily(FlowFamily):
    name = "flux"
    title = "FLUX.1"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    pipeline_class_names = ("FluxPipeline",)
    # Every Linear of the double- and single-stream blocks except the AdaLN modulations: kohya's FLUX
    # coverage (img/txt attention q/k/v and output, both MLPs; single blocks' linear1 and linear2)
    # in diffusers' names, and a superset of diffusers' example (which leaves single blocks' MLP and
    # output projections out). The modulations (norm*.linear) see only the timestep, guidance and
    # pooled-text vector, so a LoRA there shifts every token alike, and they would add 30% more
    # parameters; kohya and ai-toolkit train them, diffusers' example does not.
    lora_targets = LORA_TARGETS
    text_encoder_lora_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP-L attention
    # In the layout SimpleTuner's LyCORIS files use, `lycoris_<diffusers module>`: ComfyUI and Forge map
    # each such name to its rows of BFL's fused weights and apply LoHa, LoKr and DoRA there.
    adapter_variants = frozenset({"loha", "lokr", "dora"})
    trainable_text_encoders = ("text_encoder",)  # CLIP-L; T5-XXL always stays frozen
    kohya_text_encoder_prefixes = {"text_encoder": "lora_te1"}  # kohya's FLUX trainer; ComfyUI maps it to clip_l
    kohya_apps = "ComfyUI and Forge"  # AUTOMATIC1111 does not run FLUX
    kohya_base_model_version = "flux1"  # what kohya's sd-scripts writes for FLUX.1 (dev and schnell)
    default_resolution = 1024
    denoiser_component = "transformer"
    text_tokens = T5_MAX_LENGTH
    guidance_distilled = True
    # CLIP-L only, under the name FLUX pivotal files in the wild give it (diffusers' advanced FLUX
    # trainer writes `clip_l` and, optionally, `t5`); T5 gets no new token.
    embedding_keys = {"text_encoder": "clip_l"}
    has_single_file = True  # the transformer alone, in BFL's layout (flux1-dev.safetensors)
    # What a model card says of that file (DreamBooth's `describe_file`).
    single_file_description = (
        "transformer-only checkpoint in the original FLUX.1 layout, for ComfyUI (copy into "
        "`models/diffusion_models`, load it with Load Diffusion Model beside FLUX's VAE and text encoders) and "
        "Forge (with FLUX's VAE and text encoders picked in its menu); diffusers reads it with "
        "`FluxTransformer2DModel.from_single_file(file, config=<base model>, subfolder='transformer')`")

    @property
    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def load(self, source: ModelSource, cfg, dtype=None, device=None, vae_dtype=None,
             quantize: str = "none") -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        opts = flow_options(cfg)
        # A single file (flux1-dev.safetensors) holds the transformer only.
        pipe = load_transformer_pipeline(
            self, self.pipeline_class, FluxTransformer2DModel, source, cfg, dtype=dtype, vae_dtype=vae_dtype,
            quantize=quantize, example="black-forest-labs/FLUX.1-dev")
        transformer = pipe.transformer
        return place(Components(
            pipeline=pipe, denoiser=transformer, vae=pipe.vae,
            text_encoders={"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2},
            tokenizers={"text_encoder": pipe.tokenizer, "text_encoder_2": pipe.tokenizer_2},
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), source=source,
            # Read here, not from the denoiser later: accelerate may wrap it (DDP has no .config).
            extras={"flow": opts, "guidance_embeds": bool(transformer.config.guidance_embeds),
                    "vae_scale_factor": pipe.vae_scale_factor},
        ), device)

    def encode_images(self, c: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = c.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def prompt_embeddings(self, c: Components, prompt, negative_prompt, guidance) -> dict:
        # [dev] samples with its guidance embedding, not a negative prompt (no true CFG here).
        device = module_device(c.text_encoders["text_encoder_2"])
        embeds, pooled, _ = c.pipeline.encode_prompt(prompt, device=device, num_images_per_prompt=1)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_prompts(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        import torch

        clip, t5 = c.text_encoders["text_encoder"], c.text_encoders["text_encoder_2"]
        tok, tok2 = c.tokenizers["text_encoder"], c.tokenizers["text_encoder_2"]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        pooled = clip(ids.to(module_device(clip)), output_hidden_states=False).pooler_output
        ids2 = tok2([unexpanded(cap) for cap in captions], padding="max_length", max_length=T5_MAX_LENGTH,
                    truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():  # T5 never trains
            hidden = t5(ids2.to(module_device(t5)), output_hidden_states=False)[0]
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}

    def count_truncated(self, c: Components, captions: list[str]) -> int:
        # T5 carries the prompt; CLIP-L gives only a pooled summary, so its 77-token cut matters little.
        tok = c.tokenizers["text_encoder_2"]
        return sum(len(tok(unexpanded(cap)).input_ids) > T5_MAX_LENGTH for cap in captions)

    def plan_denoiser_inputs(self, config, batch, latent, dtype, text_grad, empty) -> dict:
        tokens, (h, w) = T5_MAX_LENGTH, latent
        patches = (h // 2) * (w // 2)  # latents packed in 2x2 patches
        kwargs = dict(hidden_states=empty(batch, patches, config.in_channels, dtype=dtype),
                      encoder_hidden_states=empty(batch, tokens, config.joint_attention_dim, dtype=dtype, grad=text_grad),
                      pooled_projections=empty(batch, config.pooled_projection_dim, dtype=dtype, grad=text_grad),
                      timestep=empty(batch, dtype=dtype), img_ids=empty(patches, 3, dtype=dtype),
                      txt_ids=empty(tokens, 3, dtype=dtype))
        if config.guidance_embeds:
            kwargs["guidance"] = empty(batch, dtype=dtype)
        return kwargs

    def shift_mu(self, c: Components, image_seq_len: int) -> float:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = c.noise_scheduler.config
        return calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)

    def predict(self, c: Components, noisy, timesteps, cond) -> torch.Tensor:
        import torch
        from diffusers import FluxPipeline

        b, ch, h, w = noisy.shape
        dtype, device = noisy.dtype, noisy.device
        prompt_embeds = cond["prompt_embeds"].to(device, dtype)
        guidance = None
        if c.extras["guidance_embeds"]:
            scale = guidance_value(c.extras["flow"], TRAIN_GUIDANCE)
            guidance = torch.full((b,), scale, device=device, dtype=torch.float32)
        out = c.denoiser(
            hidden_states=FluxPipeline._pack_latents(noisy, b, ch, h, w),
            timestep=(timesteps / c.noise_scheduler.config.num_train_timesteps).to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(device, dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
            return_dict=False,
        )[0]
        vae_scale = c.extras["vae_scale_factor"]
        return FluxPipeline._unpack_latents(out, h * vae_scale, w * vae_scale, vae_scale)

    def save_single_file(self, c: Components, path, dtype: torch.dtype):
        # Transformer only, as BFL ship it: the apps load the VAE and text encoders from files of their
        # own (ComfyUI's Load Diffusion Model + DualCLIPLoader, Forge's VAE / text encoder menu). A CLIP-L
        # DreamBooth also trained (method.train_text_encoder) is in the diffusers folder model/ only.
        from ..export.flux_single_file import save_flux_single_file

        return save_flux_single_file(path, c.denoiser, dtype=dtype)

    def kohya_lora(self, denoiser_state, text_encoder_states, denoiser_alpha, text_encoder_alphas):
        from ..export.lora import peft_to_kohya
        from ..export.lycoris import PER_MODULE

        if denoiser_alpha == PER_MODULE:  # LoHa, LoKr, DoRA: cannot be fused into BFL's qkv
            out = self.lycoris_file(denoiser_state)
        else:
            out = flux_to_kohya(denoiser_state, denoiser_alpha) if denoiser_state else {}
        te_states = {n: s for n, s in (text_encoder_states or {}).items() if s}
        if te_states:
            out.update(peft_to_kohya(None, te_states, None, text_encoder_alphas, self.kohya_text_encoder_prefixes))
        if not out:
            raise ValueError("nothing to export: all LoRA state dicts are empty")
        return out


