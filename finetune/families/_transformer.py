"""Loading a transformer family's pipeline (SD3, FLUX.1, FLUX.2, Qwen-Image, Z-Image) the one way they
all load: the transformer quantized (`memory.quantize_base`) or from a single original-layout file
(then `model.config` names the folder or hub id with the other parts), every other part from the
model's folder or hub id, each read in its own dtype; one FinetuneError line when it does not load."""

from __future__ import annotations

from ..errors import FinetuneError
from .base import ModelSource, component_dtypes, dtype_kwargs
from .quantize import load_denoiser


def load_transformer_pipeline(family, pipeline_class, transformer_class, source: ModelSource, cfg, *, dtype, vae_dtype,
                              quantize: str, example: str):
    """`pipeline_class.from_pretrained` of `source` for `family` (a FlowFamily; `example`: the hub id
    named when a single file lacks model.config), with `model.vae` instead of the model's VAE if set."""
    title = family.title
    if source.kind == "single_file" and not cfg.config:
        raise FinetuneError(f"model.config: {source.label} holds only {title}'s transformer; set model.config to a "
                            f"{title} diffusers folder or hub id ({example}) for the rest")
    components = {"vae": family._load_vae(cfg, vae_dtype)} if getattr(cfg, "vae", None) else {}
    try:
        if quantize != "none":
            components["transformer"] = load_denoiser(transformer_class, source, cfg, "transformer", quantize, dtype)
        elif source.kind == "single_file":
            components["transformer"] = transformer_class.from_single_file(
                source.location, config=cfg.config, subfolder="transformer", **dtype_kwargs(dtype))
        where = (dict(pretrained_model_name_or_path=cfg.config) if source.kind == "single_file" else
                 dict(pretrained_model_name_or_path=source.location, variant=cfg.variant,
                      use_safetensors=None if cfg.allow_pickle else True))
        return pipeline_class.from_pretrained(**where, revision=cfg.revision, low_cpu_mem_usage=True,
                                              **dtype_kwargs(component_dtypes(dtype, vae_dtype)), **components)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "torchvision" in first.lower():  # e.g. FLUX.2 [dev]'s tokenizer, a PixtralProcessor
            first = "a part of it needs torchvision: pip install the torchvision release that matches your torch"
        raise FinetuneError(f"model.base: cannot load {source.label} as {title}: {first}") from e
