"""LoRA through peft on the denoiser and, optionally, the text encoder(s)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..config_base import Section
from . import register_method
from .base import Method

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch


class LoraConfig(Section):
    type: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank; 4-32 for styles and subjects.")
    alpha: float | None = Field(None, gt=0, le=65536, allow_inf_nan=False,
                                description="LoRA alpha; default = rank (scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, min_length=1,
        description="UNet module names to adapt; default (unset): the family's attention and projection layers.")
    train_text_encoder: bool = False
    text_encoder_rank: int | None = Field(None, ge=1, le=1024)
    text_encoder_alpha: float | None = Field(None, gt=0, le=65536, allow_inf_nan=False)
    text_encoder_target_modules: list[str] | None = Field(None, min_length=1)
    text_encoder_lr: float | None = Field(None, gt=0, le=10.0, allow_inf_nan=False,
                                          description="Text-encoder learning rate; default = training.learning_rate.")
    text_encoder_2_lr: float | None = Field(
        None, gt=0, le=10.0, allow_inf_nan=False,
        description=("The second text encoder's rate (SDXL's OpenCLIP bigG, SD3's CLIP-G); default = text_encoder_lr. "
                     "Refused for families whose text-encoder LoRA has no second encoder (SD1.x, FLUX.1)."))
    init_lora_weights: Literal["default", "gaussian"] = "default"



DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def save_dtype(name: str) -> torch.dtype:
    """The torch dtype of `output.save_dtype` ("fp32", "fp16", "bf16")."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@register_method("lora")
class LoraMethod(Method):
    Config = LoraConfig

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.train_text_encoder

    def _peft_config(self, rank, alpha, targets):
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(
            r=rank, lora_alpha=alpha or rank, lora_dropout=self.cfg.dropout, target_modules=targets,
            init_lora_weights="gaussian" if self.cfg.init_lora_weights == "gaussian" else True,
        )

    def setup(self, c) -> list[dict]:
        from peft import inject_adapter_in_model

        for module in c.frozen_modules():
            module.requires_grad_(False)
        self.unet_config = self._peft_config(self.cfg.rank, self.cfg.alpha, self.cfg.target_modules or self.family.lora_targets)
        c.denoiser.add_adapter(self.unet_config)
        groups = [{"params": [p for p in c.denoiser.parameters() if p.requires_grad], "lr": self.training.learning_rate}]
        self.text_encoder_configs = {}
        if self.cfg.train_text_encoder:
            te_lr = self.cfg.text_encoder_lr or self.training.learning_rate
            lrs = {"text_encoder_2": self.cfg.text_encoder_2_lr or te_lr}
            for name in self.family.adaptable_text_encoders():
                te = c.text_encoders[name]
                config = self._peft_config(
                    self.cfg.text_encoder_rank or self.cfg.rank,
                    self.cfg.text_encoder_alpha or self.cfg.alpha or self.cfg.text_encoder_rank,
                    self.cfg.text_encoder_target_modules or self.family.text_encoder_lora_targets)
                # peft's own injection, not transformers' `add_adapter`: that one only forwards to peft,
                # behind a minimum-peft-version gate of its own (transformers 5.24 demands a peft that
                # was not yet released), and a gate like that should not stop training.
                inject_adapter_in_model(config, te)
                self.text_encoder_configs[name] = config
                groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": lrs.get(name, te_lr)})
        return groups

    def trainable_modules(self, c) -> list[torch.nn.Module]:
        return [c.denoiser, *(c.text_encoders[n] for n in self.text_encoder_configs)]

    def state_dicts(self, c):
        from peft.utils import get_peft_model_state_dict

        unet = get_peft_model_state_dict(c.denoiser)
        tes = {n: get_peft_model_state_dict(c.text_encoders[n]) for n in self.text_encoder_configs}
        return unet, tes

    def save(self, c, folder: Path, output, name: str) -> list[Path]:
        from ..export.lora import kohya_alpha, kohya_metadata, save_diffusers_lora, save_kohya_lora

        folder = Path(folder)
        dtype = save_dtype(output.save_dtype)
        unet_state, te_states = self.state_dicts(c)
        written = []
        if "diffusers" in output.formats:
            save_diffusers_lora(folder, self.family.pipeline_class, unet_state, te_states, self.unet_config,
                                self.text_encoder_configs, dtype, weight_name=DIFFUSERS_WEIGHT_NAME,
                                denoiser_component=self.family.denoiser_component)
            written.append(folder / DIFFUSERS_WEIGHT_NAME)
        if "kohya" in output.formats:
            state = self.family.kohya_lora(
                unet_state, te_states, kohya_alpha(self.unet_config),
                {n: kohya_alpha(cfg) for n, cfg in self.text_encoder_configs.items()})
            meta = kohya_metadata(
                base_model_version=self.family.base_model_version(c), modelspec=self.family.modelspec,
                rank=self.unet_config.r,
                alpha=kohya_alpha(self.unet_config), output_name=name,
                trains_text_encoder=bool(self.text_encoder_configs),
                base_model_name=_base_model_name(c.source.label), training=self._kohya_training())
            path = folder / f"{name}.safetensors"
            save_kohya_lora(path, state, meta, dtype)
            written.append(path)
        return written

    def _kohya_training(self) -> dict:
        """The run's settings under kohya's `ss_*` names: webui and civitai show them from the file."""
        t = self.training
        te_lr = (self.cfg.text_encoder_lr or t.learning_rate) if self.text_encoder_configs else None
        return {"learning_rate": t.learning_rate, "unet_lr": t.learning_rate, "text_encoder_lr": te_lr,
                "max_train_steps": t.max_steps, "num_epochs": t.epochs, "lr_scheduler": t.lr_scheduler,
                "lr_warmup_steps": t.lr_warmup_steps, "mixed_precision": t.mixed_precision, "seed": t.seed,
                "gradient_accumulation_steps": t.gradient_accumulation_steps,
                "gradient_checkpointing": t.gradient_checkpointing, "noise_offset": t.noise_offset,
                "min_snr_gamma": t.min_snr_gamma, "max_grad_norm": t.max_grad_norm,
                "network_dropout": self.cfg.dropout}

    def describe_file(self, path: Path) -> str:
        if path.name == DIFFUSERS_WEIGHT_NAME:
            return "diffusers/peft format: `pipe.load_lora_weights(run_folder)`"
        return f"kohya format for {self.family.kohya_apps} (copy into `models/loras`)"

    def usage(self, pipeline_class, load_base, run_dir, files):
        return [*super().usage(pipeline_class, load_base, run_dir, files), self.load_line(run_dir, files)]

    def load_line(self, run_dir, files) -> str:
        """`load_lora_weights` of the run's diffusers file, or of its kohya file when that is all there is."""
        names = [Path(f).name for f in files]
        if DIFFUSERS_WEIGHT_NAME in names:
            return f"pipe.load_lora_weights({str(run_dir)!r})"
        kohya = next(n for n in names if "kohya" in self.describe_file(Path(n)))
        if not self.family.diffusers_reads_kohya:
            return (f"# {kohya} loads in {self.family.kohya_apps}, not in diffusers: add diffusers to "
                    "output.formats for a file this pipeline reads")
        return f"pipe.load_lora_weights({str(run_dir)!r}, weight_name={kohya!r})"


def _base_model_name(label: str) -> str:
    """The base model's last path part, as kohya records it: a hub id's name, a file's or folder's
    name, never the folders of this machine above it."""
    return label.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
