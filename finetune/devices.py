"""Where images are made and in what precision, and how latents become pixels without overflowing.

The rule (`choose`): the best device present — CUDA, then Apple MPS, then the CPU — in half
precision where that device runs it well: fp16 on a GPU (bf16 for families whose models overflow
in fp16, FLUX: its T5 and transformer; fp32 where the device has no bf16), fp32 on the CPU (fp16 on
the CPU is slow and some operations lack it; `--dtype bf16` is accepted there). `--device` and
`--dtype` override it; a device that is not there is one line before anything loads.

The VAE decodes in fp32 whenever the model runs in fp16, unless its config says it is safe in fp16
(`force_upcast: false`, as the fp16-fix SDXL VAE declares): the SD/SDXL VAEs overflow in fp16 into
NaN, that is black images. Images made under autocast (validation samples, class images) are made
as latents under it and decoded outside it (`run_pipeline`), so autocast cannot put the decoder
back into fp16. An image that still comes out black is found by `is_black` and reported by name.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .errors import FinetuneError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "half": "fp16",
               "bf16": "bf16", "bfloat16": "bf16"}
# Families whose models overflow in fp16 (FLUX.1: T5-XXL and the transformer's activations); a
# family can also say so itself with a `half_precision = "bf16"` attribute.
BF16_FAMILIES = {"flux"}
# Every pixel below this (of 255) in grey: a black image, an overflow or a filter's replacement.
BLACK_LEVEL = 8


@dataclass(frozen=True)
class Availability:
    """What this machine offers; `probe()` reads torch, tests build one by hand."""

    cuda: bool = False
    cuda_count: int = 0
    cuda_bf16: bool = False  # native bf16 (Ampere or newer), not torch's emulation
    mps: bool = False
    mps_bf16: bool = False  # macOS 14 or newer
    cuda_name: str = ""
    cuda_built: bool = True  # False: a CPU-only torch, which sees no GPU even where there is one


def probe() -> Availability:
    import torch

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    cuda_bf16 = False
    if cuda:
        try:
            cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch without the argument
            cuda_bf16 = torch.cuda.is_bf16_supported()
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend and mps_backend.is_available())
    mps_bf16 = False
    if mps:
        try:
            mps_bf16 = bool(mps_backend.is_macos_or_newer(14, 0))
        except (AttributeError, TypeError):
            mps_bf16 = False
    return Availability(cuda=cuda, cuda_count=count, cuda_bf16=cuda_bf16, mps=mps, mps_bf16=mps_bf16,
                        cuda_name=torch.cuda.get_device_name(0) if cuda else "",
                        cuda_built=torch.backends.cuda.is_built())


@dataclass(frozen=True)
class Placement:
    """A device and a compute dtype, by name ("cuda:0", "fp16"); `torch_device`/`torch_dtype` for torch."""

    device: str
    dtype: str

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def parse_dtype(value: str | None) -> str | None:
    """--dtype: auto (None), fp16, bf16 or fp32 (float16, half, bfloat16, float32 read too)."""
    if value is None or value.strip().lower() == "auto":
        return None
    name = DTYPE_NAMES.get(value.strip().lower())
    if name is None:
        raise FinetuneError(f"--dtype {value}: expected auto, fp16, bf16 or fp32")
    return name


def parse_device(value: str | None) -> str | None:
    """--device: auto (None), cuda, cuda:N, mps or cpu."""
    if value is None or value.strip().lower() == "auto":
        return None
    v = value.strip().lower()
    kind, sep, index = v.partition(":")
    if kind in ("cuda", "mps", "cpu") and (not sep or (kind == "cuda" and index.isdigit())):
        return v
    raise FinetuneError(f"--device {value}: expected auto, cuda, cuda:N, mps or cpu")


def half_precision(family) -> str:
    """The half-precision dtype a family runs in on a GPU ("fp16" unless it overflows there)."""
    if family is None:
        return "fp16"
    name = family if isinstance(family, str) else getattr(family, "name", "")
    return getattr(family, "half_precision", None) or ("bf16" if name in BF16_FAMILIES else "fp16")


def training_precision(requested: str, available: Availability | None = None, family=None) -> str:
    """`training.mixed_precision` made concrete: "auto" is bf16 on a GPU with native bf16 (CUDA Ampere
    or newer, MPS on macOS 14+), fp16 on an older CUDA GPU (with accelerate's loss scaling) unless the
    family overflows in fp16 (FLUX: then no, fp32), and no on the CPU, where half precision is
    emulated and slower; anything else is kept."""
    if requested != "auto":
        return requested
    a = available if available is not None else probe()
    if (a.cuda and a.cuda_bf16) or (a.mps and a.mps_bf16):
        return "bf16"
    if a.cuda and half_precision(family) == "fp16":
        return "fp16"
    return "no"


def choose(device: str | None = None, dtype: str | None = None, family=None,
           available: Availability | None = None) -> Placement:
    """The device and dtype to generate on: the rule in this module's docstring, with `device` and
    `dtype` (command-line spellings; None or "auto": choose) overriding it. `available` stands for the
    machine (default: what torch reports). Raises one FinetuneError line for what cannot run here."""
    requested_device, requested_dtype = parse_device(device), parse_dtype(dtype)
    av = available if available is not None else probe()
    if requested_device is None:
        dev = "cuda" if av.cuda else "mps" if av.mps else "cpu"
    else:
        dev = requested_device
        kind, _, index = dev.partition(":")
        if kind == "cuda" and not av.cuda:
            why = "torch sees none" if av.cuda_built else "this torch is a CPU-only build; a CUDA build is on pytorch.org"
            raise FinetuneError(f"--device {device}: this machine has no CUDA device ({why}); use --device "
                                f"cpu{', or --device mps' if av.mps else ''}, or leave --device out to use the best "
                                "device present")
        if kind == "cuda" and index and int(index) >= av.cuda_count:
            raise FinetuneError(f"--device {device}: this machine has {av.cuda_count} CUDA device(s), numbered from 0")
        if kind == "mps" and not av.mps:
            raise FinetuneError(f"--device {device}: Apple MPS is not available here (it needs a Mac with Apple silicon "
                                f"and a torch built with MPS); use --device {'cuda' if av.cuda else 'cpu'}")
    kind = dev.partition(":")[0]
    bf16_ok = {"cuda": av.cuda_bf16, "mps": av.mps_bf16, "cpu": True}[kind]
    if requested_dtype is None:
        if kind == "cpu":
            dt = "fp32"
        else:
            dt = half_precision(family)
            if dt == "bf16" and not bf16_ok:
                dt = "fp32"  # a family that overflows in fp16, on a device without bf16: full precision
    else:
        dt = requested_dtype
        if dt == "fp16" and kind == "cpu":
            raise FinetuneError(f"--dtype {dtype}: fp16 on the CPU is slow and some operations lack it; use --dtype "
                                "bf16 or fp32 there (fp32 is the default)")
        if dt == "bf16" and not bf16_ok:
            what = f"this GPU ({av.cuda_name})" if kind == "cuda" and av.cuda_name else \
                "this GPU" if kind == "cuda" else "MPS before macOS 14"
            raise FinetuneError(f"--dtype {dtype}: {what} has no bf16; use --dtype fp16 or fp32")
    return Placement(dev, dt)


def vae_dtype(compute: str, vae) -> str:
    """The VAE's dtype when the model runs in `compute`: fp32 instead of fp16 unless the VAE's config
    (`vae.config`, or the config itself as a dict; None: not known) says it is safe in fp16
    (`force_upcast: false`); bf16 has fp32's range and does not overflow."""
    config = vae if isinstance(vae, dict) else getattr(vae, "config", None)
    force_upcast = config.get("force_upcast", True) if isinstance(config, dict) else \
        getattr(config, "force_upcast", True)  # diffusers' configs are dicts too; None: not known, upcast
    if compute == "fp16" and force_upcast:
        return "fp32"
    return compute


def place_pipeline(pipe, placement: Placement):
    """Every model of `pipe` on the placement's device in its dtype (the VAE as `vae_dtype` says).
    Module by module, so the VAE is never cast to fp16 and back (which would lose its fp32 weights)."""
    import torch

    device, compute = placement.torch_device, placement.dtype
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        dt = torch_dtype(vae_dtype(compute, module) if name == "vae" else compute)
        current = next(module.parameters(), None)
        if current is None or current.dtype == dt:
            module.to(device)  # no dtype: diffusers warns on every cast, even to the dtype a model has
        else:
            module.to(device=device, dtype=dt)
            _keep_fp32_parts(module, dt)
    return pipe


def _keep_fp32_parts(model, dtype) -> None:
    """The parts a model asks to keep in fp32 (T5's `wo` in fp16, as `from_pretrained(torch_dtype=...)`
    keeps them), upcast again after a cast."""
    import torch

    keep = set(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not keep:
        return
    for name, sub in model.named_modules():
        if any(k in name.split(".") for k in keep):
            sub.to(torch.float32)


def describe(placement: Placement, pipe=None) -> str:
    """One line: where and how images are made ("device: cuda:0, fp16; the VAE decodes in fp32 ...")."""
    text = f"device: {placement.device}, {placement.dtype}"
    vae = getattr(pipe, "vae", None) if pipe is not None else None
    if vae is not None:
        vd = vae_dtype(placement.dtype, vae)
        if vd != placement.dtype:
            text += f"; the VAE decodes in {vd} (fp16 can overflow it into black images)"
    return text


def is_black(image) -> bool:
    """Every pixel below BLACK_LEVEL in grey: a decoder overflow (NaN), or a filter's blacked-out image."""
    return int(np.asarray(image.convert("L")).max()) < BLACK_LEVEL


def pipeline_device(pipe) -> torch.device:
    import torch

    if hasattr(pipe, "unet"):
        return pipe.unet.device
    device = getattr(pipe, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def run_pipeline(pipe, autocast: Callable | None = None, **kwargs) -> list:
    """`pipe(**kwargs).images` as PIL images, the denoising under `autocast` (a context factory; None:
    autocast off) and the VAE decode always outside it, in fp32 unless the VAE is fp16-safe.

    Under fp16 autocast the decoder would run in fp16 even with fp32 weights, and the SD/SDXL VAEs
    overflow there into black images; so the pipeline returns latents and `decode_latents` makes the
    pixels. On the CPU without autocast the images are those of a plain pipeline call. A stand-in
    without a VAE (or with `output_type` asked for) is called as it is."""
    from .families import pipeline_family

    family = pipeline_family(pipe)
    if family is not None and "guidance_scale" in kwargs:
        kwargs[family.guidance_keyword] = kwargs.pop("guidance_scale")
    if "negative_prompt" in kwargs and "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
        # FLUX.2's pipelines take none: [dev] is guidance-distilled, [klein] encodes "" itself
        # (a negative prompt reaches [klein] as embeddings, Family.prompt_embeddings).
        kwargs.pop("negative_prompt")
    device = pipeline_device(pipe)
    ctx = autocast() if autocast else no_autocast(device.type)
    if getattr(pipe, "vae", None) is None or not hasattr(pipe, "image_processor") or "output_type" in kwargs:
        with ctx:
            return pipe(**kwargs).images
    with ctx:
        latents = pipe(**kwargs, output_type="latent").images
    with no_autocast(device.type):
        return decode_latents(pipe, latents, kwargs.get("height"), kwargs.get("width"))


def decode_latents(pipe, latents, height: int | None = None, width: int | None = None) -> list:
    """Latents from `pipe(..., output_type="latent")` -> PIL images, as the pipeline itself decodes them
    (the family's `vae_latents`: unpacked, unscaled; SDXL's watermarker if it has one), with the VAE
    in fp32 when it is fp16 and not fp16-safe."""
    import torch

    from .families import pipeline_family
    from .families.base import Family

    vae = pipe.vae
    family = pipeline_family(pipe) or Family()
    # Scaled in fp32 whatever the model ran in (a no-op for an fp32 model).
    latents = family.vae_latents(pipe, latents.float(), height, width)
    frames = latents.ndim == 5  # a video-style VAE (Qwen-Image's): one frame per image
    upcast = vae.dtype == torch.float16 and vae_dtype("fp16", vae) == "fp32"
    if upcast:  # as diffusers' SDXL pipeline does for a VAE that overflows in fp16 (lossless both ways)
        vae.to(dtype=torch.float32)
    # One image at a time (diffusers' VAE slicing): an fp32 decode at 1024 px holds ~3 GiB of
    # activations per image, the peak of a validation or class-image call otherwise.
    slice_now = getattr(vae, "use_slicing", True) is False
    if slice_now:
        vae.enable_slicing()
    try:
        param = next(vae.parameters())
        with torch.no_grad():
            image = vae.decode(latents.to(param.device, param.dtype), return_dict=False)[0]
        if frames:
            image = image[:, :, 0]
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
        if slice_now:
            vae.disable_slicing()
    watermark = getattr(pipe, "watermark", None)
    if watermark is not None:
        image = watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")


def no_autocast(device_type: str):
    """A context with autocast off on `device_type` (a no-op where torch has no autocast for it)."""
    import torch

    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return nullcontext()
