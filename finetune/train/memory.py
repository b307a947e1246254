"""The recipe's `memory:` options applied to a loaded model, each logged with what it saved.

- `text_encoders`/`vae: offload`: once the feed has computed every output the training step needs
  from them (`Feed.text_precomputed`, `Feed.latents_precomputed`), they move to the CPU and come
  back only while validation samples are made (`onloaded`).
- `fp8_base`: the frozen denoiser's linear and conv weights are stored in float8 (e4m3) and each
  layer computes in the mixed precision, where autocast upcasts the weight for that one op.
  diffusers' layerwise casting (`enable_layerwise_casting`) is not used for training: its hook
  casts the parameter back to float8 in place after each forward, and the backward pass then finds
  the float8 tensor it saved ("expected scalar type BFloat16 but found Float8_e4m3fn"). Autocast's
  upcast is a new tensor, which backward keeps; with gradient checkpointing (required by the
  recipe) only the block being recomputed holds its upcast copies. The modules kept in their dtype
  are the ones diffusers skips: its default patterns, the model's own
  `_skip_layerwise_casting_patterns` and `_keep_in_fp32_modules`, and every adapter layer.
- `tf32`: TF32 matmuls on CUDA GPUs of compute capability 8.0 or newer.
- `attention`: diffusers' attention backends (`set_attention_backend`) for models whose attention
  processors dispatch through them; PyTorch SDPA is diffusers' default either way.
- `compile`: diffusers' regional compilation (`compile_repeated_blocks`) of the denoiser.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import FinetuneError, RecipeError
from ..families.base import module_device

OFFLOAD_DEVICE = torch.device("cpu")
FP8 = torch.float8_e4m3fn
ATTENTION_PACKAGES = {"flash": "flash_attn", "sage": "sageattention"}
BITSANDBYTES = ("int8", "nf4")  # loaded onto the GPU by bitsandbytes itself; never moved


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def memory_problems(recipe, available=None, processes: int = 1) -> list[str]:
    """What the machine, the method or the launch lacks for the recipe's memory options: one
    `memory.key: ...` line each (`training.mixed_precision` already made concrete for this machine)."""
    from importlib.util import find_spec

    from ..devices import probe

    mem, problems = recipe.memory, []
    if mem.offload_blocks and processes > 1:
        problems.append("memory.offload_blocks: works with one process only (DDP keeps every weight on its "
                        "GPU); set 0, or train on one GPU")
    if mem.fp8_base and recipe.training.mixed_precision == "no":
        problems.append("memory.fp8_base: this run computes in fp32 (training.mixed_precision is no, or auto on "
                        "a CPU), where float8 weights cannot be used; set memory.fp8_base=false or "
                        "training.mixed_precision=bf16")
    package = ATTENTION_PACKAGES.get(mem.attention)
    if package:
        a = available if available is not None else probe()
        if not a.cuda:
            problems.append(f"memory.attention: {mem.attention} needs a CUDA GPU; set sdpa on this machine")
        elif find_spec(package) is None:
            problems.append(f"memory.attention: {mem.attention} needs the {package} package "
                            f"(pip install {package.replace('_', '-')}); or set sdpa")
    if mem.cache_dir:
        from .disk_cache import cache_dir_problem

        if why := cache_dir_problem(mem.cache_dir):
            problems.append(f"memory.cache_dir: {why}")
    if mem.fp8_base and recipe.method.type == "dreambooth":
        problems.append("memory.fp8_base: DreamBooth trains the denoiser's own weights, which cannot be "
                        "stored in float8; use it with lora or textual_inversion")
    return problems


def check_memory_options(recipe, processes: int = 1) -> None:
    problems = memory_problems(recipe, processes=processes)
    if problems:
        raise RecipeError(problems)


def apply_memory_options(c, method, recipe, log) -> None:
    """After the method attached its adapters: checkpointing, float8 storage, attention, compile."""
    mem, tr = recipe.memory, recipe.training
    if tr.gradient_checkpointing:
        enable_checkpointing(c, method)
    if mem.fp8_base:
        n, saved = store_fp8(c.denoiser)
        log(f"memory.fp8_base: {n} frozen layers of the denoiser stored in float8, {gib(saved)} saved")
    if mem.attention != "sdpa":
        log(f"memory.attention: {mem.attention} on {set_attention(c.denoiser, mem.attention)} attention modules")
    if mem.compile:
        c.denoiser.compile_repeated_blocks(fullgraph=False)
        log("memory.compile: the denoiser's repeated blocks are compiled on first use (the first steps are slow)")


def place_denoiser(c, mem, device: torch.device, log) -> None:
    """The denoiser to the device once the caches are built: whole, or with `offload_blocks` of its
    blocks parked in CPU memory (`block_swap`)."""
    from .block_swap import park_blocks

    if mem.offload_blocks:
        swap = park_blocks(c.denoiser, mem.offload_blocks, device)
        note = f" (the denoiser has {len(swap.blocks)})" if len(swap.blocks) < mem.offload_blocks else ""
        log(f"memory.offload_blocks: {len(swap.blocks)} blocks' frozen weights kept in CPU memory{note}, "
            f"{gib(swap.bytes())} off the {device.type}; each visits it while it runs")
    elif module_device(c.denoiser) != device and mem.quantize_base not in BITSANDBYTES:
        c.denoiser.to(device)


@contextmanager
def denoiser_visiting(c, device: torch.device):
    """The denoiser on `device` for the duration (class images before training), if it waits on the CPU."""
    away = module_device(c.denoiser)
    if away == device or device.type == "cpu" or away.type != "cpu":
        yield
        return
    c.denoiser.to(device)
    try:
        yield
    finally:
        c.denoiser.to(away)
        torch.cuda.empty_cache()


def enable_checkpointing(c, method) -> None:
    # The denoiser always: gradients flow through it even when only embeddings train.
    c.denoiser.enable_gradient_checkpointing()
    trained = method.trainable_modules(c)
    for te in c.text_encoders.values():
        if any(te is m for m in trained) and hasattr(te, "gradient_checkpointing_enable"):
            te.gradient_checkpointing_enable()


def fp8_skip_patterns(model) -> tuple[str, ...]:
    """The module-name patterns diffusers' `enable_layerwise_casting` leaves in their dtype."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    from peft.tuners.tuners_utils import BaseTunerLayer

    patterns = [*DEFAULT_SKIP_MODULES_PATTERN, *(getattr(model, "_keep_in_fp32_modules", None) or ()),
                *(getattr(model, "_skip_layerwise_casting_patterns", None) or ())]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            patterns += module.adapter_layer_names
    return tuple(dict.fromkeys(patterns))


def store_fp8(model) -> tuple[int, int]:
    """Frozen linear/conv weights of `model` to float8 in place: (layers, bytes saved)."""
    from diffusers.hooks.layerwise_casting import _GO_LC_SUPPORTED_PYTORCH_LAYERS as LAYERS

    patterns = [re.compile(p) for p in fp8_skip_patterns(model)]
    layers = saved = 0
    for name, module in model.named_modules():
        if not isinstance(module, LAYERS) or any(p.search(name) for p in patterns):
            continue
        w = module.weight
        if w.requires_grad or not w.is_floating_point() or w.element_size() <= 1:
            continue
        saved += w.numel() * (w.element_size() - 1)
        w.data = w.data.to(FP8)
        layers += 1
    return layers, saved


def set_attention(model, backend: str) -> int:
    """diffusers' attention backend on every processor that dispatches through it; a model with none
    (the UNets' processors call SDPA directly) is an error, not a silent no-op."""
    dispatching = [m for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    if not dispatching:
        raise FinetuneError(f"memory.attention: {backend} is not available for {type(model).__name__} "
                            "(its attention calls PyTorch SDPA directly); set sdpa")
    model.set_attention_backend(backend)
    return len(dispatching)


def use_tf32(mem, device: torch.device, log) -> None:
    if not (mem.tf32 and device.type == "cuda"):
        return
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        log(f"memory.tf32: TF32 for fp32 matmuls and convolutions on {torch.cuda.get_device_name(device)}")


@dataclass
class Offloaded:
    """The components moved to the CPU after caching, and the device they come back to."""

    device: torch.device
    modules: dict = field(default_factory=dict)  # name -> module

    def __bool__(self) -> bool:
        return bool(self.modules)


def offload_choice(setting: str, precomputed: bool, device: torch.device) -> bool:
    """Whether a component moves off `device`: "offload" or "auto" once its outputs are all cached,
    on a GPU ("keep" never; on the CPU there is nowhere to move it)."""
    return setting != "keep" and precomputed and device.type != "cpu"


WHY_KEPT = {"text_encoders": "the text encoder trains or captions are not cached",
            "vae": "latents are not cached"}


def offload_part(out: Offloaded, key: str, modules: dict, setting: str, precomputed: bool, log) -> None:
    """Move `modules` (the text encoders, or the VAE: recipe key `memory.<key>`) to the CPU when the
    training step no longer needs them, adding them to `out`."""
    if not offload_choice(setting, precomputed, out.device):
        if setting == "offload":
            log(f"memory.{key}: kept on {out.device.type}: the training step still needs it ({WHY_KEPT[key]})")
        return
    moved = sum(module_bytes(m) for m in modules.values())
    for m in modules.values():
        m.to(OFFLOAD_DEVICE)
    out.modules.update(modules)
    if out.device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"memory: {', '.join(modules)} moved to the CPU once cached, {gib(moved)} of GPU memory freed")


@contextmanager
def onloaded(offloaded: Offloaded | None, names=None):
    """The offloaded components (those of `names`, default all) back on their device for the duration
    (the VAE while validation samples are decoded)."""
    modules = [m for n, m in (offloaded.modules.items() if offloaded else ()) if names is None or n in names]
    if not modules:
        yield
        return
    for m in modules:
        m.to(offloaded.device)
    try:
        yield
    finally:
        for m in modules:
            m.to(OFFLOAD_DEVICE)
        if offloaded.device.type == "cuda":
            torch.cuda.empty_cache()


@contextmanager
def classifiers_on(output_hooks, device: torch.device):
    """Output hooks that run a model (the safety checker) on `device` while images are made there, and
    back on the CPU between times, where they hold no GPU memory through the training steps."""
    movable = [h for h in getattr(output_hooks, "hooks", []) if callable(getattr(h, "place", None))]
    if device.type == "cpu" or not movable:
        yield
        return
    for hook in movable:
        hook.place(device)
    try:
        yield
    finally:
        for hook in movable:
            hook.place(OFFLOAD_DEVICE)


def _moved(value, device):
    # Some pipelines take one tensor per prompt (Z-Image: captions keep their own lengths).
    return [t.to(device) for t in value] if isinstance(value, (list, tuple)) else value.to(device)


def validation_embeddings(family, c, validation, autocast):
    """The validation prompts encoded now, kept on the CPU: with the text encoders offloaded, samples
    are made from these and the encoders (T5-XXL: 9.5 GB) never come back to the GPU. A callable
    (prompt, negative prompt) -> the pipeline's keywords on the denoiser's device; None without prompts."""
    if not validation.prompts:
        return None
    kept = {}
    with torch.no_grad(), autocast():
        for prompt in dict.fromkeys(validation.prompts):
            kw = family.prompt_embeddings(c, prompt, validation.negative_prompt, validation.guidance_scale)
            kept[prompt] = {k: _moved(v, OFFLOAD_DEVICE) for k, v in kw.items() if v is not None}

    def embed(prompt: str, negative_prompt: str | None) -> dict:
        device = module_device(c.denoiser)  # the pipeline repeats them for num_images_per_prompt
        return {k: _moved(v, device) for k, v in kept[prompt].items()}

    return embed
