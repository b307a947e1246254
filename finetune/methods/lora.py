"""LoRA through peft on the denoiser and, optionally, the text encoder(s)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

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
    variant: Literal["lora", "loha", "lokr"] = Field("lora", description=(
        "lora; loha (LyCORIS LoHa: a Hadamard product of two low-rank pairs, more capacity per parameter, "
        "styles); lokr (LyCORIS LoKr: a Kronecker product, the smallest files, styles and concepts). The "
        "kohya-layout file holds LyCORIS's keys, which ComfyUI, AUTOMATIC1111 and Forge load."))
    dora: bool = Field(False, description=(
        "DoRA (variant lora): each output channel's magnitude learns apart from its direction; learns more at "
        "the same rank (subjects); slower steps (the weight's norm is recomputed each step)."))
    conv_rank: int | None = Field(None, ge=1, le=1024, description=(
        "LoCon: also adapt the UNet's convolutions (ResNet blocks, down/upsamplers) at this rank, for "
        "textures and fine detail; 4-16 is usual. Unset: attention and projection layers only."))
    conv_alpha: float | None = Field(None, gt=0, le=65536, allow_inf_nan=False,
                                     description="LoCon alpha; default = conv_rank.")
    lokr_factor: int = Field(-1, ge=-1, le=1024, description=(
        "LoKr: split each weight's sides by this factor (LyCORIS `factor`); -1 = the most square split. "
        "4-16 gives smaller files."))
    decompose_both: bool = Field(False, description="LoKr: also factor the smaller Kronecker matrix into a low-rank pair.")

    @model_validator(mode="after")
    def _variant_options(self):
        if self.dora and self.variant != "lora":
            raise ValueError(f"dora: DoRA is a variant of LoRA here; set variant: lora, or dora: false for {self.variant}")
        if self.variant != "lokr":
            for key, default in (("lokr_factor", -1), ("decompose_both", False)):
                if getattr(self, key) != default:
                    raise ValueError(f"{key}: a LoKr option; set variant: lokr, or remove it")
        if self.lokr_factor in (0, 1):
            raise ValueError("lokr_factor: -1 (the most square split) or a factor of 2 or more")
        if self.conv_alpha is not None and not self.conv_rank:
            raise ValueError("conv_alpha: set conv_rank too (the rank of the convolution layers)")
        if self.variant != "lora" and self.dropout:
            raise ValueError(f"dropout: LoRA's dropout; {self.variant} has none here, remove it")
        if self.variant != "lora" and self.train_text_encoder:
            raise ValueError(f"train_text_encoder: {self.variant} adapts the denoiser only here; use variant: lora "
                             "for a text-encoder LoRA")
        return self



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

    def _peft_config(self, rank, alpha, targets, conv_targets=()):
        from .adapters import adapter_config

        return adapter_config(self.cfg, rank, alpha, targets, conv_targets, init=self.cfg.init_lora_weights)

    def setup(self, c) -> list[dict]:
        from peft import inject_adapter_in_model

        for module in c.frozen_modules():
            module.requires_grad_(False)
        self.unet_config = self._peft_config(self.cfg.rank, self.cfg.alpha, self.cfg.target_modules or self.family.lora_targets,
                                             self.family.conv_lora_targets)
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
        from ..export.lora import kohya_metadata, save_diffusers_lora, save_kohya_lora

        from .adapters import kohya_network

        folder = Path(folder)
        dtype = save_dtype(output.save_dtype)
        unet_state, te_states = self.state_dicts(c)
        written = []
        if "diffusers" in output.formats and self.diffusers_loads:
            save_diffusers_lora(folder, self.family.pipeline_class, unet_state, te_states, self.unet_config,
                                self.text_encoder_configs, dtype, weight_name=DIFFUSERS_WEIGHT_NAME,
                                denoiser_component=self.family.denoiser_component)
            written.append(folder / DIFFUSERS_WEIGHT_NAME)
        if "kohya" in output.formats:
            state = self._kohya_state(unet_state, te_states)
            meta = kohya_metadata(
                base_model_version=self.family.base_model_version(c), modelspec=self.family.modelspec,
                rank=self.unet_config.r,
                alpha=self.cfg.alpha or self.cfg.rank, output_name=name,
                trains_text_encoder=bool(self.text_encoder_configs),
                base_model_name=_base_model_name(c.source.label),
                training={**self._kohya_training(), **kohya_network(self.cfg)})
            path = folder / f"{name}.safetensors"
            save_kohya_lora(path, state, meta, dtype)
            written.append(path)
        return written

    def _kohya_state(self, unet_state, te_states) -> dict:
        """The kohya-layout state: a plain LoRA with one alpha per component, the variants with each module's
        own (conv_alpha), carried in the state through the family's renaming."""
        from ..export.lora import kohya_alpha
        from ..export.lycoris import PER_MODULE, with_alphas
        from .adapters import is_plain

        configs = self.text_encoder_configs
        if is_plain(self.cfg):
            return self.family.kohya_lora(unet_state, te_states, kohya_alpha(self.unet_config),
                                          {n: kohya_alpha(cfg) for n, cfg in configs.items()})
        return self.family.kohya_lora(with_alphas(unet_state, self.unet_config),
                                      {n: with_alphas(s, configs[n]) for n, s in te_states.items()},
                                      PER_MODULE, {n: PER_MODULE for n in configs})

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

    @property
    def diffusers_loads(self) -> bool:
        """diffusers' `load_lora_weights` reads this adapter: LoRA, DoRA, LoCon and LoKr, not LoHa."""
        return self.cfg.variant != "loha"

    def describe_file(self, path: Path) -> str:
        from .adapters import is_plain, title

        if path.name == DIFFUSERS_WEIGHT_NAME:
            if self.cfg.variant == "lokr":
                return (f"diffusers/peft format (LoKr): `pipe.{self.family.denoiser_component}.load_lora_adapter(...)`"
                        " as below (the pipelines' `load_lora_weights` reads LoRA keys only)")
            what = "" if is_plain(self.cfg) else f" ({title(self.cfg)})"
            return f"diffusers/peft format{what}: `pipe.load_lora_weights(run_folder)`"
        if is_plain(self.cfg):
            return f"kohya format for {self.family.kohya_apps} (copy into `models/loras`)"
        note, apps = "", self.family.kohya_apps
        if self.cfg.dora:  # Forge shares ComfyUI's DoRA code
            comfy = "ComfyUI and Forge normalise" if "Forge" in apps else "ComfyUI normalises"
            note = (f"; {comfy} a DoRA by the base weight, not the adapted one, so there the result is close to, "
                    "not exactly, what trained (ComfyUI PR #15458)")
            if "AUTOMATIC1111" in apps:
                note += "; AUTOMATIC1111 reads only input-axis DoRA files and does not apply this one as trained"
        return (f"{title(self.cfg)} with LyCORIS's keys, in the kohya-style layout, for {apps} "
                f"(copy into `models/loras`){note}")

    def usage(self, pipeline_class, load_base, run_dir, files):
        return [*super().usage(pipeline_class, load_base, run_dir, files), self.load_line(run_dir, files)]

    def load_line(self, run_dir, files) -> str:
        """`load_lora_weights` of the run's diffusers file, or of its kohya file when that is all there is."""
        from .adapters import is_plain

        names = [Path(f).name for f in files]
        if DIFFUSERS_WEIGHT_NAME in names and self.cfg.variant == "lokr":
            component = self.family.denoiser_component
            return (f"pipe.{component}.load_lora_adapter({str(run_dir)!r}, weight_name={DIFFUSERS_WEIGHT_NAME!r}, "
                    f"prefix={component!r})")
        if DIFFUSERS_WEIGHT_NAME in names:
            return f"pipe.load_lora_weights({str(run_dir)!r})"
        kohya = next(n for n in names if "kohya" in self.describe_file(Path(n)))
        if not self.diffusers_loads:
            return f"# {kohya} loads in {self.family.kohya_apps}; diffusers has no LoHa loader"
        if not self.family.diffusers_reads_kohya or not is_plain(self.cfg):
            return (f"# {kohya} loads in {self.family.kohya_apps}, not in diffusers: add diffusers to "
                    "output.formats for a file this pipeline reads")
        return f"pipe.load_lora_weights({str(run_dir)!r}, weight_name={kohya!r})"


def _base_model_name(label: str) -> str:
    """The base model's last path part, as kohya records it: a hub id's name, a file's or folder's
    name, never the folders of this machine above it."""
    return label.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
