"""What a model family must provide. The training loop and the methods talk only to this; adding a
family (SDXL, FLUX, ...) is one module in `finetune/families/` registered with `@register_family`,
a tiny shape-faithful builder for tests (`finetune/tiny_models/<family>.py`, listed in
`finetune.tiny_models.BUILTIN_MODELS`) and recipes — no change to the loop or to a method.

Recognising and loading
- `name`; `pipeline_class` (sampling, and diffusers' LoRA / textual-inversion loaders) and
  `pipeline_class_names` so `matches(model_index)` recognises a diffusers folder (`model.family: auto`).
- `load(source, cfg, dtype=None, device=None, vae_dtype=None, quantize="none") -> Components`: the
  pipeline and its parts — `denoiser` (UNet or transformer), `vae`, `text_encoders` / `tokenizers`
  (dicts keyed by the pipeline's attribute names: "text_encoder", "text_encoder_2"), a training
  `noise_scheduler`. Each component is read from disk straight into the dtype it will run in —
  `dtype` for the denoiser and the text encoders, `vae_dtype` for the VAE (None: float32; the
  training loop keeps it there, SD VAEs overflow in fp16) — by the loaders' `dtype`/`torch_dtype`
  (`dtype_kwargs`, `component_dtypes`), never as a float32 copy cast afterwards: the memory
  allocated while loading stays at the weights' bytes in that dtype
  (`benchmarks/results/load_memory.md`). `quantize` (`memory.quantize_base`: none, int8, nf4,
  torchao-int8): the denoiser read quantized and frozen (`quantize.load_denoiser`, given the
  family's denoiser class; diffusers folders and hub ids, not single files); it keeps the dtype its quantization gives it. Modules a library keeps in
  fp32 on purpose (T5's `wo` under fp16) stay so. `device`: the components moved there one after the
  other once loaded (`place`); None leaves them on the CPU. `dtype=None` and `vae_dtype=None`: the
  loaders' defaults, as `load(source, cfg)` always gave (diffusers models in float32; transformers 5
  text encoders in their files' dtype). Honour `cfg.allow_pickle` (safetensors only unless set) and
  `cfg.vae` (loaded instead of the base's VAE, which is then never read); raise FinetuneError with
  one line on failure.

The training objective (the loop computes MSE(prediction, target) x `loss_weights`)
- `encode_images(c, pixels) -> latents` (pixels in [-1, 1]; the VAE is kept fp32 by the loop).
- `encode_prompts(c, captions) -> dict` of per-sample tensors (stacked on dim 0, so the loop can
  cache them per caption when the text encoders are frozen).
- `image_conditioning(c, batch) -> dict`: conditioning from the images — a batch carries
  `original_size`, `crop_top_left`, `target_size` per image (SDXL's micro-conditioning); default none.
- `sample_noisy(c, latents, noise_offset) -> (model input, timesteps, target)`: the objective
  (DDPM epsilon / v-prediction for SD, rectified flow for FLUX), drawing from the global RNG.
- `predict(c, noisy, timesteps, cond) -> prediction` shaped like the target.
- `loss_weights(c, timesteps, min_snr_gamma)` (None: uniform); `count_truncated(c, captions)`.
- `latent_mask(c, masks)`: `data.masks` pooled to the latent grid (default: area interpolation by
  `latent_scale(c)`, the pipeline's `vae_scale_factor`; FLUX.2's patchified latents: twice that).

What methods and exports need
- `lora_targets` (module-name suffixes, or one regular expression peft matches against whole
  names), `text_encoder_lora_targets`: peft target modules by default; `trainable_text_encoders`:
  the text encoders a text-encoder LoRA adapts (None: all; FLUX: CLIP-L only, T5 stays frozen).
- `denoiser_component`: the denoiser's name in diffusers LoRA files ("unet", "transformer").
- `kohya_lora(...)`: peft state dicts -> the key layout webui/ComfyUI load for this family, with
  `kohya_text_encoder_prefixes` and `kohya_base_model_version` (kohya metadata).
- `embedding_keys`: text encoder -> tensor name in a webui embedding file ("emb_params";
  SDXL "clip_l"/"clip_g").
- `save_single_file(c, path, dtype)`: a full fine-tune as one original-layout checkpoint.
- `default_resolution`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import FinetuneError

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


@dataclass
class ModelSource:
    """Where a base model comes from: a built-in tiny model, a diffusers folder, one file, or the hub."""

    kind: str  # "folder" | "single_file" | "hub"
    location: str
    label: str  # what the user wrote, for model cards and messages

    def model_index(self) -> dict | None:
        if self.kind == "folder":
            return json.loads((Path(self.location) / "model_index.json").read_text())
        return None


def base_problem(base: str, allow_pickle: bool = False, offline_cache: bool = True) -> str | None:
    """What is wrong with `model.base`, found without loading (or building) anything; None if nothing.
    `offline_cache`: with HF_HUB_OFFLINE set, a hub id must be in the local cache (checked when
    training; `finetune validate` may be checking a recipe meant for another machine)."""
    from ..tiny_models import BUILTIN_FAMILIES, BUILTIN_PREFIX

    if base.startswith(BUILTIN_PREFIX):  # a diffusion model: the metric models are built-ins too, not bases
        name = base[len(BUILTIN_PREFIX):]
        return None if name in BUILTIN_FAMILIES else \
            f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_FAMILIES)}"
    p = Path(base).expanduser()
    if p.is_dir():
        return None if (p / "model_index.json").is_file() else \
            f"{base} is a folder but not a diffusers model (no model_index.json)"
    if p.suffix in (".safetensors", *PICKLE_SUFFIXES):
        if not p.is_file():
            return f"file {base} does not exist"
        if p.suffix != ".safetensors" and not allow_pickle:
            return (f"{base} is a pickled checkpoint, which can run code when loaded; convert it to "
                    f".safetensors, or set model.allow_pickle=true if you trust its source")
        return None
    if base.startswith((".", "/", "~")) or base.count("/") != 1:
        return f"{base} is neither an existing folder/file nor a hub id (owner/name)"
    if not offline_cache:
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(base, "model_index.json"), str):
        return (f"{base} is not in the local hub cache and HF_HUB_OFFLINE is set, so it cannot be downloaded; "
                "use a local folder or .safetensors file, or go online once")
    return None


def resolve_source(base: str, allow_pickle: bool = False) -> ModelSource:
    from ..tiny_models import BUILTIN_PREFIX, resolve_builtin

    problem = base_problem(base, allow_pickle)
    if problem:
        raise FinetuneError(f"model.base: {problem}")
    if base.startswith(BUILTIN_PREFIX):
        return ModelSource("folder", str(resolve_builtin(base[len(BUILTIN_PREFIX):])), base)
    p = Path(base).expanduser()
    if p.is_dir():
        return ModelSource("folder", str(p), base)
    if p.suffix in (".safetensors", *PICKLE_SUFFIXES):
        return ModelSource("single_file", str(p), base)
    return ModelSource("hub", base, base)


@dataclass
class Components:
    pipeline: Any
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]
    tokenizers: dict[str, Any]
    noise_scheduler: Any
    source: ModelSource
    extras: dict[str, Any] = field(default_factory=dict)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.denoiser, self.vae, *self.text_encoders.values()]


class Family:
    name: ClassVar[str]
    title: ClassVar[str] = ""  # what users call it, in messages ("FLUX.1", "SD3/SD3.5")
    pipeline_class: ClassVar[Any]
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[list[str] | str]
    text_encoder_lora_targets: ClassVar[list[str]]
    # The pipeline's text encoders, by attribute name: known before anything loads.
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # The text encoders a text-encoder LoRA adapts (None: all; (): none); FLUX's T5 stays frozen.
    trainable_text_encoders: ClassVar[tuple[str, ...] | None] = None
    # Methods this family does not train -> what to use instead (finetune validate says it in one line).
    refused_methods: ClassVar[dict[str, str]] = {}
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]]
    kohya_base_model_version: ClassVar[str]
    # SAI ModelSpec (architecture, resolution, prediction type or None) for kohya-layout files, as kohya,
    # musubi-tuner and ComfyUI write it; None: looked up from kohya_base_model_version (export/lora.py).
    # May be a property reading the loaded model (SD3: its release).
    modelspec: ClassVar[tuple[str, str, str | None] | None] = None
    default_resolution: ClassVar[int] = 512
    # The denoiser's name in the diffusers pipeline and its LoRA files ("unet", "transformer").
    denoiser_component: ClassVar[str] = "unet"
    # The apps that load this family's kohya-layout files (named in model cards).
    kohya_apps: ClassVar[str] = "ComfyUI, AUTOMATIC1111 and Forge"
    # The pipeline's keyword for the sampling guidance (`validation.guidance_scale`, generate's --guidance);
    # Qwen-Image's is true_cfg_scale: real classifier-free guidance against a negative prompt.
    guidance_keyword: ClassVar[str] = "guidance_scale"
    # Tokens of one caption's cached embeddings (what `finetune plan` counts per cached caption).
    text_tokens: ClassVar[int] = 77
    # Guidance-distilled (FLUX.1): sampling runs one denoiser pass per step, never a CFG pair.
    guidance_distilled: ClassVar[bool] = False
    # Whether diffusers' `load_lora_weights` reads this family's kohya-layout file (SD3's it does not).
    diffusers_reads_kohya: ClassVar[bool] = True
    # Whether `save_single_file` writes a checkpoint an app loads (DreamBooth writes one where there is).
    has_single_file: ClassVar[bool] = False
    # What a model card says of that file (DreamBooth's describe_file).
    single_file_description: ClassVar[str] = (
        "single-file checkpoint for AUTOMATIC1111, Forge and ComfyUI (copy into `models/checkpoints`); diffusers "
        "reads it with `from_single_file`")
    # What a LoRA-style method may add beyond a plain LoRA here (finetune/methods/adapters.py): loha, lokr,
    # dora, locon. Each needs an exporter to the layout this family's apps load; the fused-attention layouts
    # of the transformer families have one for plain LoRA only.
    adapter_variants: ClassVar[frozenset[str]] = frozenset()
    # The denoiser modules (diffusers names, matched whole) a LoHa, LoKr or DoRA file can name where this
    # family's apps map names onto fused weights; None: every module the method reaches. Checked against
    # method.target_modules before loading (finetune/train/preflight.py), and again when the file is written.
    variant_modules: ClassVar[Any] = None
    # The denoiser's convolutions a LoCon adapts (conv_rank), by peft target name.
    conv_lora_targets: ClassVar[list[str]] = []
    # Text encoder -> tensor name in a webui/ComfyUI embedding file (textual inversion).
    embedding_keys: ClassVar[dict[str, str]] = {"text_encoder": "emb_params"}

    @classmethod
    def matches(cls, model_index: dict) -> bool:
        return model_index.get("_class_name") in cls.pipeline_class_names

    @classmethod
    def adaptable_text_encoders(cls) -> tuple[str, ...]:
        return cls.text_encoder_names if cls.trainable_text_encoders is None else cls.trainable_text_encoders

    def method_problem(self, method) -> str | None:
        """Why a recipe's `method` section cannot train this family, as one `key.path: reason` line
        naming what can; None when it can. Checked by `finetune validate`, before any model loads."""
        title = self.title or self.name
        if method.type in self.refused_methods:
            return f"method.type: {method.type} is not available for {title}; {self.refused_methods[method.type]}"
        if why := self._variant_problem(method, title):
            return why
        trainable = self.adaptable_text_encoders()
        if getattr(method, "train_text_encoder", False) and not trainable:
            return (f"method.train_text_encoder: {title}'s reference trainers train no text-encoder LoRA, nor do we; "
                    "set it to false (the transformer's LoRA learns the trigger word)")
        if getattr(method, "single_file", None) and not self.has_single_file:
            return (f"method.single_file: {title} has no single-file checkpoint format we write; unset it (the "
                    "diffusers folder model/ is saved)")
        if getattr(method, "text_encoder_2_lr", None) and "text_encoder_2" not in trainable:
            only = " and ".join(trainable) or "no text encoder"
            return (f"method.text_encoder_2_lr: {title} trains {only} with a text-encoder LoRA, no text_encoder_2; "
                    "unset it (method.text_encoder_lr is the text encoder's rate)")
        return None

    def lycoris_file(self, denoiser_state) -> dict:
        """LoHa, LoKr and DoRA of a transformer whose kohya layout fuses q/k/v (they cannot be fused): the
        `lycoris_<diffusers module>` names SimpleTuner's LyCORIS files use, which ComfyUI maps onto the rows
        of the fused weights; a module outside `variant_modules` is refused."""
        from ..export.lycoris import variant_to_kohya

        state = {k.removeprefix(f"{self.denoiser_component}."): v for k, v in (denoiser_state or {}).items()}
        return variant_to_kohya(state, "lycoris", known=self.variant_modules and self.variant_modules.fullmatch)

    def _variant_problem(self, method, title: str) -> str | None:
        if not hasattr(method, "variant"):
            return None
        from ..methods.adapters import features

        for feature, key in features(method):
            if feature not in self.adapter_variants:
                can = ", ".join(sorted(self.adapter_variants)) or "a plain LoRA only"
                return (f"{key}: {title} takes {can} here ({feature} has no exporter to the layout its apps load "
                        "yet); remove it")
        return None

    def load(self, source: ModelSource, cfg, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None, vae_dtype: torch.dtype | None = None,
             quantize: str = "none") -> Components:
        raise NotImplementedError

    def encode_images(self, c: Components, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_prompts(self, c: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sample_noisy(self, c: Components, latents: torch.Tensor, noise_offset: float = 0.0):
        raise NotImplementedError

    def predict(self, c: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def loss_weights(self, c: Components, timesteps: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor | None:
        return None

    def latent_scale(self, c: Components) -> int:
        """Pixels per side of one cell of the latents `encode_images` returns."""
        return c.pipeline.vae_scale_factor

    def latent_mask(self, c: Components, masks: torch.Tensor) -> torch.Tensor:
        """Pixel masks (B, 1, H, W; 0-255) -> loss weights in [0, 1] on the grid of `encode_images`' latents
        (B, 1, h, w): each cell the mean of the pixels it covers (area interpolation), rows and columns the
        encoder drops for whole patches dropped here too. The loop crops it like `sample_noisy` crops the
        latents (the bottom/right rows and columns) and broadcasts it over the channels."""
        import torch.nn.functional as F

        s = self.latent_scale(c)
        h, w = masks.shape[-2] // s, masks.shape[-1] // s
        return F.interpolate(masks[..., :h * s, :w * s].float() / 255.0, size=(h, w), mode="area")

    def image_conditioning(self, c: Components, batch: dict) -> dict[str, torch.Tensor]:
        """Conditioning taken from the images rather than the captions (merged into `cond`); a batch
        carries `original_size`, `crop_top_left` and `target_size` per image, as (height, width)."""
        return {}

    def count_truncated(self, c: Components, captions: list[str]) -> int:
        return 0

    def prompt_embeddings(self, c: Components, prompt: str, negative_prompt: str | None, guidance: float) -> dict:
        """The pipeline's keyword arguments for `prompt` as embeddings (`prompt_embeds=`, ...), made now by
        the pipeline's own `encode_prompt` where the text encoders are: samples made later need no text
        encoder on the GPU."""
        raise NotImplementedError

    def denoiser_built(self, model) -> None:
        """Called on the denoiser once built, loaded or on the meta device (`finetune plan`): what the
        family adds to diffusers' class (SD3: the names of its repeated blocks)."""

    def plan_denoiser_inputs(self, config, batch: int, latent: tuple[int, int], dtype, text_grad: bool, empty) -> dict:
        """The denoiser's keyword arguments for one training call, as meta tensors made by
        `empty(*shape, dtype=..., grad=...)` (`finetune plan` traces the call with them); `latent` is
        the latent (height, width), `text_grad` whether the text embeddings carry gradients."""
        raise FinetuneError(f"plan cannot trace the {self.title or self.name} family's denoiser yet")

    def base_model_version(self, c: Components) -> str:
        """kohya's `ss_base_model_version` for the loaded model (a family may span versions: SD1.x/2.x)."""
        return self.kohya_base_model_version

    def vae_latents(self, pipe, latents: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
        """What the pipeline returns with `output_type="latent"` -> what its VAE decodes, as the pipeline
        itself does before decoding: packed 2x2 patches (FLUX.1, Qwen-Image) unpacked, then the VAE's
        scaling and shift, or its per-channel mean and std (SDXL-style; Qwen-Image's has no scaling factor)."""
        import torch

        cfg = pipe.vae.config
        if latents.ndim == 3:  # packed: (batch, tokens, channels x 4) -> (batch, channels[, 1], h, w)
            scale = pipe.vae_scale_factor
            default = pipe.default_sample_size * scale
            latents = pipe._unpack_latents(latents, height or default, width or default, scale)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, latents.shape[1]) + (1,) * (latents.ndim - 2)
            mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            return latents * std / getattr(cfg, "scaling_factor", 1.0) + mean
        latents = latents / cfg.scaling_factor
        return latents + cfg.shift_factor if getattr(cfg, "shift_factor", None) is not None else latents

    def kohya_lora(self, denoiser_state, text_encoder_states, denoiser_alpha: float,
                   text_encoder_alphas: dict[str, float]) -> dict[str, torch.Tensor]:
        """peft LoRA state dicts -> the key layout webui/ComfyUI load for this family (kohya's)."""
        from ..export.lora import peft_to_kohya

        return peft_to_kohya(denoiser_state, text_encoder_states, denoiser_alpha, text_encoder_alphas,
                             self.kohya_text_encoder_prefixes)

    def save_single_file(self, c: Components, path: Path, dtype: torch.dtype) -> Path:
        """The whole model as one checkpoint in the original layout webui and ComfyUI load."""
        raise NotImplementedError(f"single-file export is not available for the {self.name} family")


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are; also for a module wrapped by DDP, which has no `.device`."""
    return next(module.parameters()).device


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """The keyword argument that makes diffusers' `from_pretrained` / `from_single_file` read the
    weights straight into `dtype` (each tensor converted as it is read: no float32 copy of the model
    exists); {} for None, the loaders' default (float32). `dtype` may be a dict per component for a
    pipeline's `from_pretrained` ({"default": ..., "vae": ...}). Releases that know `_resolve_dtype`
    name it `dtype` and warn on `torch_dtype` (diffusers PR 14205); older ones know `torch_dtype` only."""
    if dtype is None:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def component_dtypes(dtype: torch.dtype | None, vae_dtype: torch.dtype | None) -> torch.dtype | dict | None:
    """What a pipeline's `from_pretrained` takes to load the VAE in `vae_dtype` and every other
    component in `dtype` (either None: float32); None when both are None (the loaders' default)."""
    import torch

    if dtype is None and vae_dtype is None:
        return None
    dtype, vae_dtype = dtype or torch.float32, vae_dtype or torch.float32
    return dtype if vae_dtype == dtype else {"default": dtype, "vae": vae_dtype}


def place(c: Components, device: torch.device | str | None) -> Components:
    """Each of the components' modules moved to `device`, one after the other, in its own dtype
    (a quantized one too: bitsandbytes and torchao weights move, they do not cast); nothing for None."""
    if device is None:
        return c
    for module in (c.denoiser, *c.text_encoders.values(), c.vae):
        module.to(device)
    return c


def vae_problem(vae: str, offline_cache: bool = True) -> str | None:
    """What is wrong with `model.vae` (a diffusers VAE folder or hub id), found without loading it;
    worded as the families' loaders word a VAE that fails to load ("cannot load ...")."""
    p = Path(vae).expanduser()
    expected = "expected a diffusers VAE folder (with config.json) or a hub id (owner/name)"
    if p.is_dir():
        return None if (p / "config.json").is_file() or (p / "vae" / "config.json").is_file() else \
            f"cannot load {vae}: a folder without config.json (nor vae/config.json), so not a diffusers VAE"
    if p.exists():
        return f"cannot load {vae}: it is a file; {expected}"
    if vae.startswith((".", "/", "~")) or vae.count("/") != 1:
        return f"cannot load {vae}: it does not exist; {expected}"
    if not offline_cache:
        return None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not any(_cached(vae, f, None) for f in ("config.json", "vae/config.json")):
        return f"cannot load {vae}: not in the local hub cache, and HF_HUB_OFFLINE is set, so not downloaded"
    return None


def load_vae(cfg, dtype: torch.dtype | None = None, vae_class: str = "AutoencoderKL", channels: int | None = None,
             title: str = ""):
    """The VAE `cfg.vae` names (a diffusers VAE folder, a model folder with vae/, or a hub id) as the
    diffusers class `vae_class`, safetensors only unless `cfg.allow_pickle`, read in `dtype` (None:
    float32); one FinetuneError line when it does not load, or when `title`'s model needs `channels`
    latent channels and it has others."""
    import diffusers

    try:
        sub = "vae" if (Path(cfg.vae).expanduser() / "vae").is_dir() else None
        vae = getattr(diffusers, vae_class).from_pretrained(
            cfg.vae, subfolder=sub, use_safetensors=None if cfg.allow_pickle else True, **dtype_kwargs(dtype))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FinetuneError(f"model.vae: cannot load {cfg.vae}: {first}") from e
    has = vae.config.get("latent_channels", vae.config.get("z_dim"))
    if channels is not None and has != channels:
        raise FinetuneError(f"model.vae: {cfg.vae} has {has} latent channels; {title} needs a {channels}-channel "
                            f"{vae_class} (its own, or one trained for it)")
    return vae


def _cached(repo: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def model_file(source: ModelSource, filename: str, revision: str | None = None) -> Path | None:
    """One file of a diffusers model (model_index.json, unet/config.json) if it is at hand: in a
    local folder or already in the hub cache. Never downloads; None for a single-file checkpoint."""
    if source.kind == "folder":
        path = Path(source.location) / filename
        return path if path.is_file() else None
    return _cached(source.location, filename, revision) if source.kind == "hub" else None


def read_json(path: Path | None) -> dict | None:
    """A JSON object from `path`, or None if there is no such file or it holds something else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# Only these libraries' classes are built from a model_index.json: it names a module to import.
_COMPONENT_LIBRARIES = ("diffusers", "transformers")


def meta_component(source: ModelSource, index: dict, name: str, revision: str | None = None):
    """The pipeline component `name` (unet, transformer, text_encoder) built from its config on the
    meta device: its module names and types, no weights, no memory. None when its config is not at hand."""
    import importlib

    from accelerate import init_empty_weights

    library, class_name = (index.get(name) or [None, None])[:2]
    config = model_file(source, f"{name}/config.json", revision)
    if library not in _COMPONENT_LIBRARIES or not class_name or config is None:
        return None
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        return None
    # Buffers too: SD3's patch embedding computes a 384x384 position table in __init__, 4 s on a CPU.
    with init_empty_weights(include_buffers=True):
        if library == "diffusers":
            return cls.from_config(cls.load_config(config.parent))
        return cls._from_config(cls.config_class.from_pretrained(config.parent))
