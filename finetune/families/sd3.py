"""Stable Diffusion 3 Medium, 3.5 Medium and 3.5 Large: a rectified-flow MMDiT (joint blocks: an image
and a text stream that attend together; 3.5 adds RMS qk-norm, 3.5 Medium a second image-only
attention `attn2` in its first 13 blocks) on 16-channel latents in 2x2 patches, conditioned on
CLIP-L's and CLIP-G's penultimate hidden states (side by side, zero-padded to T5's width) followed by
T5-XXL's, and on both CLIPs' pooled projections.

Objective, as diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py (commit
58eb52c0803ea9af3abec60841c2a093bdf1f951) and kohya's sd3_train_network.py train it: sigma drawn
logit-normal (`_flow.py`, `model.flow`), shifted by the scheduler's fixed shift (3.0 for every SD3/3.5
release), noisy = (1 - sigma) * latents + sigma * noise. Both trainers precondition the output by
default (diffusers' `--precondition_outputs 1`; kohya always): the loss is
MSE(noisy - sigma * prediction, latents), which is sigma^2 * MSE(prediction, noise - latents). We
keep the velocity target the transformer predicts and put that sigma^2 into `loss_weights`, times
`compute_loss_weighting_for_sd3` when `model.flow.loss_weighting` asks for one: the same gradients.

Text-encoder LoRA adapts CLIP-L and CLIP-G (the example's `--train_text_encoder`); T5 stays frozen and
runs without gradients. Captions are encoded at the pipeline's length: 77 CLIP tokens plus 256 T5
tokens (`max_sequence_length`; the example's default is 77, the pipeline samples with 256), so every
caption gives the same 333-token sequence and needs no mask (SD3 attends to the padding too).

LoRA files for ComfyUI use the original (SAI MMDiT) module names with q/k/v fused, as kohya's
networks/lora_sd3.py writes them (sd-scripts commit 48d368fa557731ad0488c07304dfeba8c07910eb):
`lora_unet_joint_blocks_0_x_block_attn_qkv`, `..._x_block_attn2_qkv`, `..._context_block_mlp_fc1`;
`lora_te1_` / `lora_te2_` for CLIP-L / CLIP-G. ComfyUI's comfy/lora.py (model_lora_keys_unet, commit
41444b5236c613ee5ff7d09aa620f94b702f30eb) maps "lora_unet_" + every diffusion_model weight of the
original layout, so every module loads. diffusers' SD3 loader reads no kohya layout: the diffusers file
is the one for it.

LoHa, LoKr and DoRA cannot be fused into a qkv: their files name diffusers' modules as SimpleTuner's
LyCORIS files do, `lycoris_transformer_blocks_0_attn2_to_q.hada_w1_a`. ComfyUI's SD3 branch of
model_lora_keys_unet maps `lycoris_` + every name of comfy/utils.py `mmdit_to_diffusers`, each q, k and v to
its rows of the fused qkv, which comfy/lora.py `calculate_weight` narrows before applying the adapter
(Comfy-Org/ComfyUI 09708eae709a992a5684bed3595ce4d07e705b4e utils.py, 17358c8f73b581a0d22facc3c385822f09b8bfb1
lora.py; unet_config "depth" is the width / 64, so its row offset, depth * 64, is the width). That map has
SD3.5 Medium's attn2 (q, k, v, proj); the older one read above (41444b5) had none, and a ComfyUI that old
logs "lora key not loaded" for those keys instead of applying them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import FinetuneError
from . import register_family
from ._flow import FlowFamily, flow_loss_weights, flow_options
from .base import Components, ModelSource, module_device, place
from ._transformer import load_transformer_pipeline

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch

# StableDiffusion3Pipeline's default `max_sequence_length`: training at the length users sample with
# keeps the padding the transformer sees the same.
T5_MAX_LENGTH = 256

# peft matches a string target as a regular expression on the whole module name: attention (both
# streams, and 3.5 Medium's attn2) and both MLPs of every joint block; not the AdaLN modulations.
LORA_TARGETS = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|attn2\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
)

# The diffusers Linear names ComfyUI maps as `lycoris_<name>` on an SD3 model (comfy/utils.py mmdit_to_diffusers),
# less the context modulations (the last block's swaps its halves, which would not reach a DoRA's magnitudes).
COMFYUI_LYCORIS = re.compile(
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|attn2\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear)"
    r"|context_embedder|proj_out|time_text_embed\.(timestep_embedder|text_embedder)\.linear_[12]")

# diffusers module -> original MMDiT module (diffusers' convert_sd3_transformer_checkpoint_to_diffusers,
# read backwards). Fused weights list q, k, v in row order, each `inner` rows.
_FUSED = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
}
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
}
_TOP = {
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}

# kohya's `ss_base_model_version` (its MMDiT `model_type`) -> the SAI ModelSpec architecture it writes
# (sd-scripts library/sd3_utils.py analyze_state_dict_state, library/sai_model_spec.py).
VERSIONS = {"medium": "SD3 Medium", "5-medium": "SD3.5 Medium", "5-large": "SD3.5 Large"}


def sd3_version(transformer_config) -> str:
    """kohya's name for the SD3 release a transformer config describes: qk-norm is 3.5's, and among
    3.5 models only Medium has dual-attention blocks."""
    if not transformer_config.get("qk_norm"):
        return "medium"
    return "5-medium" if transformer_config.get("dual_attention_layers") else "5-large"


def mmdit_module(name: str, inner: int, rows: int) -> tuple[str, int, int | None, bool] | None:
    """Where a diffusers SD3Transformer2DModel Linear lives in the original checkpoint: (module, first
    row, rows of the fused weight or None when not fused, whether its two output halves swap), or None
    for a module the original layout has no Linear counterpart for. `inner`: the model width (every
    q/k/v projection's in_features); `rows`: the module's out_features."""
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if m:
        i, rest = m.groups()
        if rest in _FUSED:
            original, k = _FUSED[rest]
            return f"joint_blocks.{i}.{original}", k * inner, 3 * inner, False
        if rest not in _BLOCK:
            return None
        # The last block's context stream ends in AdaLayerNormContinuous: (scale, shift) in diffusers,
        # (shift, scale) in the original, as in the final layer.
        return f"joint_blocks.{i}.{_BLOCK[rest]}", 0, None, rest == "norm1_context.linear" and rows == 2 * inner
    if name in _TOP:
        return _TOP[name], 0, None, name == "norm_out.linear"
    return None


def sd3_to_kohya(state, alpha: float) -> dict[str, torch.Tensor]:
    """A peft LoRA of SD3Transformer2DModel -> kohya's SD3 layout (`lora_unet_<original name>`), q, k and
    v of one attention fused into one LoRA on its qkv."""
    from ..export.lora import fused_kohya

    return fused_kohya(state, alpha, lambda name, a, b: mmdit_module(name, inner=a.shape[1], rows=b.shape[0]),
                       "SD3")


@register_family("sd3")
class SD3Family(FlowFamily):
    name = "sd3"
    title = "SD3/SD3.5"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    # Attention and MLPs of every joint block: a superset of diffusers' example (attention only) and
    # kohya's coverage less the AdaLN modulations, which see only the timestep and pooled text, so a
    # LoRA there shifts every token alike (FLUX.1 leaves them out for the same reason).
    lora_targets = LORA_TARGETS
    text_encoder_lora_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the example's, on both CLIPs
    trainable_text_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L, CLIP-G; T5-XXL stays frozen
    # In SimpleTuner's LyCORIS layout, `lycoris_<diffusers module>`: ComfyUI's SD3 branch maps each name (SD3.5
    # Medium's attn2 too) to its rows of the fused qkv and applies LoHa, LoKr and DoRA there.
    adapter_variants = frozenset({"loha", "lokr", "dora"})
    variant_modules = COMFYUI_LYCORIS
    refused_methods = {
        "textual_inversion": ("SD3's reference trainers (diffusers, kohya) learn no embeddings for its three "
                              "text encoders, nor do we; use method.type: lora with a trigger word in the captions"),
        "pivotal": ("diffusers' pivotal-tuning scripts cover SD1.5, SDXL and FLUX.1, not SD3's three text encoders; "
                    "use method.type: lora (method.train_text_encoder adapts CLIP-L and CLIP-G)"),
    }
    # kohya's lora_sd3.py prefixes; ComfyUI maps them to clip_l and clip_g.
    kohya_text_encoder_prefixes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    kohya_apps = "ComfyUI"  # AUTOMATIC1111 does not run SD3
    diffusers_reads_kohya = False  # its kohya converter knows no SD3 names (tests/test_sd3.py pins it)
    kohya_base_model_version = "5-medium"  # until a model is loaded: the recipes' SD3.5 Medium
    default_resolution = 1024
    denoiser_component = "transformer"
    text_tokens = 77 + T5_MAX_LENGTH

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    @property
    def modelspec(self) -> tuple[str, str, None]:
        # What kohya writes for the loaded release ("stable-diffusion-3-5-medium/lora"). kohya adds
        # prediction type "epsilon", wrong for a flow model; none is written here.
        return f"stable-diffusion-3-{self._version}/lora", "1024x1024", None

    _version = kohya_base_model_version

    def base_model_version(self, c: Components) -> str:
        return c.extras["sd3_version"]

    def load(self, source: ModelSource, cfg, dtype=None, device=None, vae_dtype=None,
             quantize: str = "none") -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        opts = flow_options(cfg)
        pipe = load_transformer_pipeline(
            self, self.pipeline_class, SD3Transformer2DModel, source, cfg, dtype=dtype, vae_dtype=vae_dtype,
            quantize=quantize, example="stabilityai/stable-diffusion-3.5-medium")
        if pipe.text_encoder_3 is None:
            raise FinetuneError(f"model.base: {source.label} has no T5 text encoder (text_encoder_3); SD3 trains with "
                                "all three text encoders, as it samples best")
        self._version = sd3_version(pipe.transformer.config)
        self.denoiser_built(pipe.transformer)
        return place(Components(
            pipeline=pipe, denoiser=pipe.transformer, vae=pipe.vae,
            text_encoders={n: getattr(pipe, n) for n in self.text_encoder_names},
            tokenizers={"text_encoder": pipe.tokenizer, "text_encoder_2": pipe.tokenizer_2,
                        "text_encoder_3": pipe.tokenizer_3},
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), source=source,
            # Read here, not from the denoiser later: accelerate may wrap it (DDP has no .config).
            extras={"flow": opts, "sd3_version": self._version},
        ), device)

    def encode_images(self, c: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = c.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def prompt_embeddings(self, c: Components, prompt, negative_prompt, guidance) -> dict:
        device = module_device(c.text_encoders["text_encoder_3"])
        pe, npe, ppe, nppe = c.pipeline.encode_prompt(
            prompt, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance > 1,
            negative_prompt=negative_prompt, max_sequence_length=T5_MAX_LENGTH)
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        if npe is not None:
            out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
        return out

    def encode_prompts(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        import torch
        import torch.nn.functional as F

        hidden, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            te, tok = c.text_encoders[name], c.tokenizers[name]
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = te(ids.to(module_device(te)), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as the pipeline reads it
            pooled.append(out[0])  # the projected pooled output (text_embeds)
        t5, tok3 = c.text_encoders["text_encoder_3"], c.tokenizers["text_encoder_3"]
        ids3 = tok3(captions, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
        with torch.no_grad():  # T5 never trains
            t5_hidden = t5(ids3.to(module_device(t5)))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1])).to(t5_hidden.device, t5_hidden.dtype)
        return {"prompt_embeds": torch.cat([clip, t5_hidden], dim=-2),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def count_truncated(self, c: Components, captions: list[str]) -> int:
        # T5 carries the whole prompt; CLIP's 77-token cut leaves T5's reading of the rest.
        tok = c.tokenizers["text_encoder_3"]
        return sum(len(tok(cap).input_ids) > T5_MAX_LENGTH for cap in captions)

    def predict(self, c: Components, noisy, timesteps, cond) -> torch.Tensor:
        dtype, device = noisy.dtype, noisy.device
        return c.denoiser(
            hidden_states=noisy, timestep=timesteps,
            encoder_hidden_states=cond["prompt_embeds"].to(device, dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(device, dtype),
            return_dict=False,
        )[0]

    def denoiser_built(self, model) -> None:
        if not getattr(model, "_repeated_blocks", None):
            # diffusers 0.42 names no repeated block for SD3; memory.offload_blocks and memory.compile need them.
            model._repeated_blocks = ["JointTransformerBlock"]

    def plan_denoiser_inputs(self, config, batch, latent, dtype, text_grad, empty) -> dict:
        (h, w) = latent  # the CLIPs' 77 tokens (padded to T5's width) followed by T5's
        return dict(hidden_states=empty(batch, config.in_channels, h, w, dtype=dtype), timestep=empty(batch, dtype=dtype),
                    encoder_hidden_states=empty(batch, self.text_tokens, config.joint_attention_dim, dtype=dtype,
                                                grad=text_grad),
                    pooled_projections=empty(batch, config.pooled_projection_dim, dtype=dtype, grad=text_grad))

    def loss_weights(self, c: Components, timesteps, min_snr_gamma):
        # sigma^2: the reference trainers' output preconditioning (module docstring).
        sigmas = timesteps.float() / c.noise_scheduler.config.num_train_timesteps
        paper = flow_loss_weights(c.extras["flow"], c.noise_scheduler, timesteps, min_snr_gamma, "SD3")
        return sigmas ** 2 if paper is None else sigmas ** 2 * paper

    def kohya_lora(self, denoiser_state, text_encoder_states, denoiser_alpha, text_encoder_alphas):
        from ..export.lora import peft_to_kohya
        from ..export.lycoris import PER_MODULE

        if denoiser_alpha == PER_MODULE and denoiser_state:  # LoHa, LoKr, DoRA: cannot be fused into a qkv
            out = self.lycoris_file(denoiser_state)
        else:
            out = sd3_to_kohya(denoiser_state, denoiser_alpha) if denoiser_state else {}
        te_states = {n: s for n, s in (text_encoder_states or {}).items() if s}
        if te_states:
            out.update(peft_to_kohya(None, te_states, None, text_encoder_alphas, self.kohya_text_encoder_prefixes))
        if not out:
            raise ValueError("nothing to export: all LoRA state dicts are empty")
        return out
