"""Everything between a checked recipe and the first training step: the accelerator, the model
loaded and placed, class images made, the method's adapters attached."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FinetuneError
from .caches import fork_rng
from .distributed import on_main

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_family(model_cfg):
    """The family and the source of the base model described by a recipe's `model` section."""
    from ..families import detect_family, get_family, known_family
    from ..families.base import resolve_source

    source = resolve_source(model_cfg.base, model_cfg.allow_pickle)
    family = known_family(model_cfg)
    if family is not None:
        return family, source
    index = source.model_index()
    if index is None:
        return get_family("sd1"), source  # single files and hub ids: SD1.x/2.x unless told otherwise
    return detect_family(index), source  # a folder no family claims: one line naming the families


def make_accelerator(training, trackers: list[str] = (), run_dir: Path | None = None):
    """`trackers` (output.trackers) log into `run_dir`, the project folder."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    from .distributed import launched_processes, process_state
    from .tracking import accelerator_options

    if launched_processes() == 1:
        # accelerate keeps process-wide state; a second run in one process (notebooks, benchmarks)
        # may ask for another precision. Several processes keep theirs: it holds the process group.
        AcceleratorState._reset_state(reset_partial_state=True)
    state = process_state()
    # sync_with_dataloader: an accumulation window closes at the end of each epoch.
    plugin = GradientAccumulationPlugin(num_steps=training.gradient_accumulation_steps, sync_with_dataloader=True)
    accelerator = Accelerator(mixed_precision=training.mixed_precision, gradient_accumulation_plugin=plugin,
                              cpu=state.device.type == "cpu" and state.num_processes > 1,
                              **accelerator_options(trackers, run_dir))
    set_seed(training.seed)
    return accelerator


def load_components(family, source, model_cfg, training, device, memory=None):
    """The model in the dtypes it trains in: the denoiser and the text encoders in the weight dtype of
    `training.mixed_precision` (fp32 for "no"; a quantized denoiser keeps its own), the VAE in fp32
    (SD VAEs overflow in fp16: NaN latents, black images). Each is read from disk in that dtype
    (`Family.load`): no fp32 copy of a half-precision model is ever made, so loading allocates about
    the weights' bytes in that dtype of host RAM. `memory`: the recipe's section (`quantize_base`).

    On a GPU the text encoders and the VAE go to it now and the denoiser stays on the CPU until the
    caches are built (`place_denoiser`), so the GPU never holds all of them at once (bitsandbytes
    puts a quantized denoiser on the GPU itself, where it stays)."""
    quantize = memory.quantize_base if memory is not None else "none"
    device = torch.device(device)
    staged = device.type != "cpu"
    c = family.load(source, model_cfg, dtype=WEIGHT_DTYPES[training.mixed_precision],
                    device=None if staged else device, vae_dtype=torch.float32, quantize=quantize)
    if staged:
        for m in (*c.text_encoders.values(), c.vae):
            m.to(device)
    return c


def class_images(recipe, c, accelerator, output_hooks, log, progress) -> list[Path]:
    """Prior preservation's class images, made once by the main process with the untouched base model,
    before any adapter is attached; the other processes wait for the list."""
    from ..data.prior import ensure_class_images
    from .memory import classifiers_on, denoiser_visiting

    pp = recipe.prior_preservation
    if not pp.enabled:
        return []

    def make() -> list[Path]:
        # Apart from the training RNG: a run that generates its class images and one that finds
        # them (a second run, a resume) then train alike.
        with accelerator.autocast(), fork_rng(), classifiers_on(output_hooks, accelerator.device), \
                denoiser_visiting(c, accelerator.device):
            return ensure_class_images(c.pipeline, pp, recipe.data.resolution, log, progress,
                                       screen=output_hooks.screening())

    files = on_main(accelerator, make)
    if not files:
        raise FinetuneError(f"prior_preservation.class_data_dir: no usable class images in {pp.class_data_dir}")
    log(f"prior preservation: {len(files)} class images, prior loss weight {pp.prior_loss_weight}")
    return files


def attach_method(recipe, family, c, log):
    """The method's adapters attached and its parameter groups, trained in fp32."""
    from diffusers.training_utils import cast_training_params

    from ..methods import get_method
    from ..methods.adapters import is_plain, title
    from .memory import apply_memory_options

    tr = recipe.training
    method = get_method(recipe.method, family, tr)
    groups = method.setup(c)
    if WEIGHT_DTYPES[tr.mixed_precision] != torch.float32:
        cast_training_params(method.trainable_modules(c), dtype=torch.float32)
    apply_memory_options(c, method, recipe, log)
    kind = recipe.method.type
    if hasattr(recipe.method, "variant") and not is_plain(recipe.method):
        kind += f" ({title(recipe.method)})"
    log(f"method {kind}: {method.trainable_parameter_count(groups):,} trainable parameters")
    return method, groups


def decide_caching(recipe, dataset, method, log=None) -> tuple[bool, bool]:
    """(cache latents, cache text embeddings) as the recipe's "auto"/true/false and the data allow;
    `log` hears why "auto" left the text uncached when the captions vary per step."""
    data = recipe.data
    latents = dataset.deterministic if data.cache_latents == "auto" else bool(data.cache_latents)
    if latents and not dataset.deterministic:
        raise FinetuneError("data.cache_latents: cannot cache latents with random crops or flips; "
                            "set data.crop=center and data.random_flip=false, or cache_latents=false")
    text = not method.trains_text_encoder if data.cache_text_embeddings == "auto" else bool(data.cache_text_embeddings)
    if text and method.trains_text_encoder:
        raise FinetuneError("data.cache_text_embeddings: cannot cache while the text encoder trains; set it to false or auto")
    if text and data.captions_vary:
        # The recipe's validator refuses an explicit true; "auto" turns off here, where the method is known.
        if data.cache_text_embeddings is True:
            raise FinetuneError("data.cache_text_embeddings: captions vary per step (data.shuffle_tags, "
                                "data.tag_dropout); set it to auto or false")
        text = False
        if log is not None:
            log("data.cache_text_embeddings: auto -> off: data.shuffle_tags/tag_dropout change the captions every "
                "step, so the text encoder runs on each batch (slower, and it stays in memory)")
    return latents, text
