"""What every rectified-flow family shares (FLUX.1, SD3/3.5, FLUX.2, Qwen-Image, Z-Image): the recipe
options under `model.flow`, drawing and shifting the noise level sigma, the noisy input and its
velocity target, and the SD3 paper's loss weightings; `FlowFamily`, their base class, puts them together.

The formulas are diffusers' training utilities and its examples'
(`examples/dreambooth/train_dreambooth_lora_{sd3,flux,flux2,qwen_image,z_image}.py`): sigma is drawn by
`compute_density_for_timestep_sampling`, noisy = (1 - sigma) * latents + sigma * noise, the model
predicts noise - latents, and `compute_loss_weighting_for_sd3` weights the loss. The examples draw an
index into the scheduler's (already shifted) discrete sigmas; here the same shift is applied to the
continuous draw (`shift_sigmas`), which is that table without its rounding to 1000 steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Callable, ClassVar, Literal

from pydantic import Field, model_validator

from ..config_base import Section
from ..errors import FinetuneError
from .base import Components, Family

if TYPE_CHECKING:
    import torch


class FlowOptions(Section):
    """Recipe keys of the rectified-flow families, under `model.flow` (`model.flux` is its older name)."""

    guidance_scale: Literal["auto"] | Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)] = Field(
        "auto", description=(
            "Guidance embedding during training, for models that have one (FLUX.1 [dev], FLUX.2 [dev]); auto = "
            "the family's reference value (FLUX.1: 1.0 as kohya and ai-toolkit; FLUX.2 [dev]: 1.0 as diffusers' "
            "example). Sampling still uses validation.guidance_scale."))
    timestep_sampling: Literal["logit_normal", "uniform", "mode"] = Field("logit_normal", description=(
        "How sigma is drawn per image: logit_normal = sigmoid of a normal (SD3/FLUX; kohya's 'sigmoid'), "
        "uniform, or mode (SD3 paper's mode sampling)."))
    logit_mean: float = Field(0.0, ge=-10.0, le=10.0, allow_inf_nan=False,
                              description="logit_normal: mean of the normal.")
    logit_std: float = Field(1.0, gt=0, le=10.0, allow_inf_nan=False,
                             description="logit_normal: its standard deviation (kohya's sigmoid_scale).")
    mode_scale: float = Field(1.29, ge=-1.0, le=1.75, allow_inf_nan=False, description=(
        "mode: the SD3 paper's scale; its range, -1 to 2/(pi-2), keeps sigma monotonic in [0, 1]."))
    timestep_shift: Literal["auto"] | Annotated[float, Field(gt=0, le=100.0, allow_inf_nan=False)] = Field(
        "auto", description=(
            "Shift sigma toward noise: auto = as the model samples (its scheduler's shift: fixed for SD3 and "
            "FLUX.1 [schnell], resolution-dependent for FLUX.1/FLUX.2 [dev], Qwen-Image and Z-Image); a number = "
            "that fixed shift (kohya's discrete_flow_shift, e.g. 3.1582); 1 = none."))
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="Per-sample loss weights from the SD3 paper (diffusers' compute_loss_weighting_for_sd3).")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        # Without this, an old recipe gets pydantic's "extra inputs are not permitted" and no hint.
        if isinstance(data, dict) and "quantize" in data:
            old = data["quantize"]
            now = f"memory.quantize_base={old}" if old in ("none", "int8", "nf4") else "memory.quantize_base"
            raise ValueError(f"quantize: moved to memory.quantize_base (for every family: none, int8, nf4 or "
                             f"torchao-int8); write {now} instead")
        return data


def flow_options(model_cfg) -> FlowOptions:
    """The flow options of a recipe's `model` section (defaults for a bare ModelConfig-like object)."""
    opts = getattr(model_cfg, "flow", None)
    if opts is None:
        return FlowOptions()
    return opts if isinstance(opts, FlowOptions) else FlowOptions.model_validate(opts)


def guidance_value(opts: FlowOptions, default: float) -> float:
    return default if opts.guidance_scale == "auto" else float(opts.guidance_scale)


def draw_sigmas(opts: FlowOptions, n: int, device=None) -> torch.Tensor:
    """n unshifted noise levels in (0, 1) (float32), drawn as `timestep_sampling` says."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = "none" if opts.timestep_sampling == "uniform" else opts.timestep_sampling
    return compute_density_for_timestep_sampling(scheme, n, logit_mean=opts.logit_mean, logit_std=opts.logit_std,
                                                 mode_scale=opts.mode_scale).to(device, torch.float32)


def shift_sigmas(opts: FlowOptions, scheduler, sigmas: torch.Tensor, mu: Callable[[], float] | None = None):
    """`sigmas` shifted as the model samples (`timestep_shift: auto`) or by the recipe's fixed shift.
    `mu`: the family's resolution-dependent shift exponent, asked only when the scheduler uses dynamic
    shifting (FlowMatchEulerDiscreteScheduler.time_shift then applies it as the pipeline does)."""
    cfg = scheduler.config
    if opts.timestep_shift == "auto" and cfg.get("use_dynamic_shifting"):
        if mu is None:
            raise FinetuneError("this model's scheduler shifts by resolution, but its family gives no shift exponent")
        return scheduler.time_shift(mu(), 1.0, sigmas)
    shift = cfg.get("shift", 1.0) if opts.timestep_shift == "auto" else opts.timestep_shift
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def noisy_and_target(latents: torch.Tensor, sigmas: torch.Tensor, noise_offset: float = 0.0):
    """(noisy latents, velocity target) for per-sample `sigmas`; noise from the global RNG."""
    import torch

    noise = torch.randn_like(latents)
    if noise_offset:
        shape = (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2)
        noise = noise + noise_offset * torch.randn(shape, device=latents.device, dtype=latents.dtype)
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - s) * latents + s * noise, noise - latents


def flow_loss_weights(opts: FlowOptions, scheduler, timesteps: torch.Tensor, min_snr_gamma, label: str):
    """The SD3 paper's weighting of `timesteps` (sigma x num_train_timesteps), None for uniform; Min-SNR
    (an epsilon/v-prediction weighting) is refused."""
    if min_snr_gamma:
        raise FinetuneError(f"training.min_snr_gamma: Min-SNR weighting is for epsilon/v-prediction models; {label} "
                            "trains with flow matching (unset it; model.flow.loss_weighting has its weightings)")
    if opts.loss_weighting == "none":
        return None
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(opts.loss_weighting, timesteps.float() / scheduler.config.num_train_timesteps)


class FlowFamily(Family):
    """A rectified-flow family: what it draws, what it predicts and how the loss is weighted come from
    `model.flow` (the components carry it as `extras["flow"]`). A family gives `shift_mu` when its
    scheduler shifts by resolution, and `patch`, the latent side its transformer's patches take."""

    patch: ClassVar[int] = 2  # 2x2 latent patches (FLUX.1, SD3, Qwen-Image, Z-Image); FLUX.2 packs in its VAE step
    vae_class: ClassVar[str] = "AutoencoderKL"  # the diffusers class a `model.vae` is read as
    latent_channels: ClassVar[int] = 16

    def _load_vae(self, cfg, dtype=None):
        """`model.vae`, loaded instead of the base's (which is then never read)."""
        from .base import load_vae

        return load_vae(cfg, dtype, self.vae_class, self.latent_channels, self.title)

    def shift_mu(self, c: Components, image_seq_len: int) -> float:
        """The resolution-dependent shift exponent the pipeline samples with (dynamic shifting only)."""
        raise FinetuneError(f"{self.title}'s scheduler shifts by resolution, but the family gives no shift exponent")

    def sample_noisy(self, c: Components, latents: torch.Tensor, noise_offset: float = 0.0):
        # Patches need sides divisible by `patch`; small buckets (8-pixel steps) can give odd ones, and
        # dropping one latent row/column (8 pixels) costs less than refusing the image.
        p = self.patch
        h, w = latents.shape[-2] // p * p, latents.shape[-1] // p * p
        if h == 0 or w == 0:
            raise FinetuneError(f"{self.title} needs images of at least {8 * p}x{8 * p} pixels; got latents of "
                                f"{tuple(latents.shape[-2:])}")
        latents = latents[..., :h, :w]
        sigmas = self.sample_sigmas(c, latents.shape[0], image_seq_len=(h // p) * (w // p), device=latents.device)
        noisy, target = noisy_and_target(latents, sigmas, noise_offset)
        return noisy, sigmas * c.noise_scheduler.config.num_train_timesteps, target

    def sample_sigmas(self, c: Components, n: int, image_seq_len: int, device=None) -> torch.Tensor:
        """n noise levels in (0, 1), drawn and shifted as the options say (float32)."""
        opts = c.extras["flow"]
        return shift_sigmas(opts, c.noise_scheduler, draw_sigmas(opts, n, device), lambda: self.shift_mu(c, image_seq_len))

    def loss_weights(self, c: Components, timesteps, min_snr_gamma):
        return flow_loss_weights(c.extras["flow"], c.noise_scheduler, timesteps, min_snr_gamma, self.title)
