"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, epsilon or v-prediction."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import FinetuneError
from . import _ddpm, register_family
from .base import (Components, Family, ModelSource, component_dtypes, dtype_kwargs, load_vae, module_device,
                   place)
from .quantize import load_denoiser

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch


@register_family("sd1")
class SD1Family(Family):
    name = "sd1"
    title = "SD1.x/2.x"
    has_single_file = True
    pipeline_class_names = ("StableDiffusionPipeline",)
    # Attention, projections and feed-forward of every transformer block: what kohya's LoRA trains.
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    text_encoder_lora_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    adapter_variants = frozenset({"loha", "lokr", "dora", "locon"})
    # kohya's LoCon convolutions: every conv of the ResNet blocks and of the down/upsamplers.
    conv_lora_targets = ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]
    kohya_text_encoder_prefixes = {"text_encoder": "lora_te"}
    kohya_base_model_version = "sd_v1"
    text_encoder_names = ("text_encoder",)  # pipeline attributes; tokenizers are named alike

    def base_model_version(self, c: Components) -> str:
        # SD2.x is this family too: its text encoder is OpenCLIP-H (width 1024; CLIP-L's is 768).
        if c.text_encoders["text_encoder"].config.hidden_size != 1024:
            return self.kohya_base_model_version
        return "sd_v2_v" if c.noise_scheduler.config.prediction_type == "v_prediction" else "sd_v2"

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def load(self, source: ModelSource, cfg, dtype=None, device=None, vae_dtype=None,
             quantize: str = "none") -> Components:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        kwargs = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if cfg.vae:  # instead of the base's VAE, which is then never read
            kwargs["vae"] = load_vae(cfg, vae_dtype)
        try:
            if quantize != "none":
                kwargs["unet"] = load_denoiser(UNet2DConditionModel, source, cfg, "unet", quantize, dtype)
            if source.kind == "single_file":
                dtypes = component_dtypes(dtype, vae_dtype)
                if isinstance(dtypes, dict):  # from_single_file takes one dtype: the VAE is read on its own
                    if "vae" not in kwargs:
                        kwargs["vae"] = self._single_file_vae(source, cfg, dtypes["vae"])
                    dtypes = dtypes["default"]
                pipe = self.pipeline_class.from_single_file(source.location, config=cfg.config,
                                                            **dtype_kwargs(dtypes), **kwargs)
            else:
                # Safetensors only, unless the user allows pickled .bin weights (then weights_only loading).
                pipe = self.pipeline_class.from_pretrained(
                    source.location, revision=cfg.revision, variant=cfg.variant,
                    use_safetensors=None if cfg.allow_pickle else True, low_cpu_mem_usage=True,
                    **dtype_kwargs(component_dtypes(dtype, vae_dtype)), **kwargs)
        except (OSError, ValueError, EnvironmentError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = ("; if it only has pickled .bin weights, convert them to .safetensors or set "
                    "model.allow_pickle=true if you trust its source") if not cfg.allow_pickle else ""
            raise FinetuneError(f"model.base: cannot load {source.label}: {first}{hint}") from e
        sched_config = dict(pipe.scheduler.config)
        if cfg.prediction_type:
            sched_config["prediction_type"] = cfg.prediction_type
            pipe.scheduler = pipe.scheduler.__class__.from_config(sched_config)
        noise_scheduler = DDPMScheduler.from_config(sched_config)
        return place(Components(
            pipeline=pipe, denoiser=pipe.unet, vae=pipe.vae,
            text_encoders={n: getattr(pipe, n) for n in self.text_encoder_names},
            tokenizers={n: getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in self.text_encoder_names},
            noise_scheduler=noise_scheduler, source=source,
        ), device)

    @staticmethod
    def _single_file_vae(source: ModelSource, cfg, vae_dtype):
        """The VAE of a single-file checkpoint read in `vae_dtype`, as `from_single_file` reads it for
        the pipeline (the same config, the same conversion)."""
        from diffusers import AutoencoderKL

        where = dict(config=cfg.config, subfolder="vae") if cfg.config else {}
        return AutoencoderKL.from_single_file(source.location, **where, **dtype_kwargs(vae_dtype))

    def encode_images(self, c: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = c.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
        return latents * vae.config.scaling_factor

    def _ids(self, c: Components, captions: list[str], name: str = "text_encoder") -> torch.Tensor:
        tok = c.tokenizers[name]
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def encode_prompts(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        te = c.text_encoders["text_encoder"]
        hidden = te(self._ids(c, captions).to(module_device(te)))[0]
        return {"encoder_hidden_states": hidden}

    def count_truncated(self, c: Components, captions: list[str]) -> int:
        tok = c.tokenizers[self.text_encoder_names[0]]
        return sum(len(tok(cap).input_ids) > tok.model_max_length for cap in captions)

    def prompt_embeddings(self, c: Components, prompt, negative_prompt, guidance) -> dict:
        device = module_device(c.text_encoders["text_encoder"])
        embeds, negative = c.pipeline.encode_prompt(prompt, device, 1, guidance > 1, negative_prompt)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    def plan_denoiser_inputs(self, config, batch, latent, dtype, text_grad, empty) -> dict:
        import torch

        (h, w), tokens = latent, self.text_tokens
        kwargs = dict(sample=empty(batch, config.in_channels, h, w, dtype=dtype),
                      timestep=torch.zeros(batch, dtype=torch.long, device="meta"),
                      encoder_hidden_states=empty(batch, tokens, config.cross_attention_dim, dtype=dtype, grad=text_grad))
        if config.addition_embed_type == "text_time":  # SDXL: pooled text + six size/crop numbers
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": empty(batch, pooled, dtype=dtype, grad=text_grad),
                                           "time_ids": empty(batch, 6, dtype=dtype)}
        return kwargs

    def sample_noisy(self, c: Components, latents: torch.Tensor, noise_offset: float = 0.0):
        return _ddpm.sample_noisy(c.noise_scheduler, latents, noise_offset)

    def predict(self, c: Components, noisy, timesteps, cond) -> torch.Tensor:
        hidden = cond["encoder_hidden_states"].to(noisy.dtype)
        return c.denoiser(noisy, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]

    def loss_weights(self, c: Components, timesteps, min_snr_gamma):
        if not min_snr_gamma:
            return None
        return _ddpm.min_snr_weights(c.noise_scheduler, timesteps, min_snr_gamma)

    def save_single_file(self, c: Components, path, dtype: torch.dtype):
        from ..export.single_file import save_sd1_single_file

        return save_sd1_single_file(path, c.denoiser, c.vae, c.text_encoders["text_encoder"], dtype=dtype)
