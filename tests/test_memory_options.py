"""The recipe's `memory:` options do what they claim: float8 storage really stores float8 and still
trains, precision `auto` picks by the device, offloading moves what is cached and brings it back for
sampling, and options a machine or a method cannot use are one line before anything loads."""

import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.devices import Availability, training_precision
from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import validate
from finetune.train import train
from finetune.train.memory import (FP8, Offloaded, fp8_skip_patterns, memory_problems, module_bytes,
                                   offload_choice, offload_part, onloaded, set_attention, store_fp8)

from .helpers import make_image_folder, tiny_recipe

FP8_RUN = dict(training__mixed_precision="bf16", training__gradient_checkpointing=True, memory={"fp8_base": True})


def recipe_for(tmp_path, model, **overrides):
    memory = overrides.pop("memory", None)
    r = tiny_recipe(model, make_image_folder(tmp_path / "data"), tmp_path / "outputs", **overrides)
    if memory is not None:
        r["memory"] = dict(memory)  # FP8_RUN is shared by the tests: never edit it in place
    return r


def lora_unet(model_dir, dtype=torch.bfloat16):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=dtype)
    unet.requires_grad_(False)
    torch.manual_seed(0)  # the same adapter initialisation in every copy
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


def lora_grads(unet, seed=0):
    unet.enable_gradient_checkpointing()
    unet.train()
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    h = torch.randn(1, 8, cfg.cross_attention_dim, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, torch.tensor([10]), h).sample
    out.float().pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in unet.parameters() if p.requires_grad])


def test_fp8_stores_frozen_layers_in_float8_and_keeps_the_rest(tiny_sd15):
    unet = lora_unet(tiny_sd15)
    before = module_bytes(unet)
    layers, saved = store_fp8(unet)
    patterns = [re.compile(p) for p in fp8_skip_patterns(unet)]
    stored = {n for n, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.dtype == FP8}
    assert len(stored) == layers > 0
    assert not any(p.search(n) for n in stored for p in patterns)  # norms, adapters: untouched
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    assert all("norm" not in n or p.dtype == torch.bfloat16 for n, p in unet.named_parameters())
    # bf16 -> float8 halves each stored weight: the saving is what the model lost.
    assert module_bytes(unet) == before - saved
    assert saved == sum(m.weight.numel() for n, m in unet.named_modules() if n in stored)


def test_fp8_base_backward_matches_bf16_within_float8_error(tiny_sd15):
    """Autocast upcasts each float8 weight for its op; backward works (diffusers' layerwise-casting
    hook fails here) and the LoRA gradients stay near the bf16 model's."""
    ref = lora_grads(lora_unet(tiny_sd15))
    unet = lora_unet(tiny_sd15)
    store_fp8(unet)
    grads = lora_grads(unet)
    assert torch.isfinite(grads).all()
    rel = ((grads - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5, rel  # e4m3 keeps 3 mantissa bits: a few percent per weight, not noise


def test_fp8_base_trains_samples_and_saves_a_plain_lora(tiny_sd15, tmp_path):
    logs = []
    r = recipe_for(tmp_path, tiny_sd15, **FP8_RUN, validation__prompts=["a photo of sks ball"])
    result = train(validate(r, "test"), log=logs.append, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    fp8_layers = [m for m in result.components.denoiser.modules()
                  if getattr(getattr(m, "weight", None), "dtype", None) == FP8]
    assert fp8_layers
    assert any(line.startswith("memory.fp8_base:") and "saved" in line for line in logs), logs
    assert result.samples and all(p.is_file() for p in result.samples)
    weights = load_file(result.run_dir / "pytorch_lora_weights.safetensors")
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    # The card says what the adapter was trained against.
    assert "| memory options | fp8_base=True |" in (result.run_dir / "README.md").read_text()


@pytest.mark.parametrize("change, key", [
    ({"training__gradient_checkpointing": False}, "training.gradient_checkpointing"),
    ({"training__mixed_precision": "no"}, "training.mixed_precision"),
    ({"memory": {"fp8_base": True, "quantize_base": "torchao-int8"}}, "quantize_base"),
])
def test_fp8_base_refuses_what_would_not_save_memory(tiny_sd15, tmp_path, change, key):
    overrides = {**FP8_RUN, **change}
    with pytest.raises(RecipeError) as e:
        validate(recipe_for(tmp_path, tiny_sd15, **overrides), "r.yaml")
    assert "memory.fp8_base" in str(e.value) and key in str(e.value)


def test_machine_and_method_problems_are_one_line_each(tiny_sd15, tmp_path):
    r = recipe_for(tmp_path, tiny_sd15, **FP8_RUN)
    r["method"] = {"type": "dreambooth"}
    r["memory"]["attention"] = "flash"
    problems = memory_problems(validate(r, "r.yaml"), Availability())
    assert problems == ["memory.attention: flash needs a CUDA GPU; set sdpa on this machine",
                        problems[1]] and problems[1].startswith("memory.fp8_base: DreamBooth")
    gpu = Availability(cuda=True, cuda_count=1, cuda_bf16=True)
    missing = memory_problems(validate({**r, "method": {"type": "lora"}}, "r.yaml"), gpu)
    assert missing == ["memory.attention: flash needs the flash_attn package (pip install flash-attn); or set sdpa"]
    # What only the launch and the machine tell: several processes, and fp32 where auto lands on a CPU.
    r = recipe_for(tmp_path, tiny_sd15, **{**FP8_RUN, "training__mixed_precision": "auto"},
                   )
    r["memory"]["offload_blocks"] = 2
    cpu = validate(r, "r.yaml").model_copy(deep=True)
    cpu.training.mixed_precision = "no"
    assert memory_problems(cpu, Availability(), processes=2) == [
        "memory.offload_blocks: works with one process only (DDP keeps every weight on its GPU); set 0, or "
        "train on one GPU",
        "memory.fp8_base: this run computes in fp32 (training.mixed_precision is no, or auto on a CPU), where "
        "float8 weights cannot be used; set memory.fp8_base=false or training.mixed_precision=bf16"]


def test_attention_backend_on_a_unet_is_refused_not_ignored(tiny_sd15):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    with pytest.raises(FinetuneError, match="memory.attention: flash is not available for UNet2DConditionModel"):
        set_attention(unet, "flash")


@pytest.mark.parametrize("available, expected", [
    (Availability(), "no"),
    (Availability(cuda=True, cuda_count=1, cuda_bf16=True), "bf16"),
    (Availability(cuda=True, cuda_count=1, cuda_bf16=False), "fp16"),
    (Availability(mps=True, mps_bf16=True), "bf16"),
    (Availability(mps=True, mps_bf16=False), "no"),
])
def test_auto_precision_follows_the_device(available, expected):
    assert training_precision("auto", available) == expected
    assert training_precision("fp16", available) == "fp16"  # what the recipe says stays
    # FLUX overflows in fp16: a GPU without bf16 trains it in fp32.
    flux = training_precision("auto", available, "flux")
    assert flux == ("no" if expected == "fp16" else expected)


def test_auto_precision_is_written_into_the_run_recipe(tiny_sd15, tmp_path):
    r = recipe_for(tmp_path, tiny_sd15, training__max_steps=1)
    del r["training"]["mixed_precision"]
    recipe = validate(r, "test")
    assert recipe.training.mixed_precision == "auto"
    result = train(recipe, log=lambda *_: None, progress=False)
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert saved["training"]["mixed_precision"] == "no"  # this machine has no GPU


@pytest.mark.parametrize("setting, cached, device, moves", [
    ("auto", True, "cuda", True), ("offload", True, "cuda", True), ("keep", True, "cuda", False),
    ("auto", False, "cuda", False), ("offload", False, "cuda", False), ("auto", True, "cpu", False),
])
def test_offload_rule(setting, cached, device, moves):
    assert offload_choice(setting, cached, torch.device(device)) is moves


def test_offload_moves_what_is_cached_and_onloaded_brings_back_what_is_asked(tiny_sd15):
    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.recipe.schema import ModelConfig

    c = get_family("sd1").load(resolve_source(str(tiny_sd15)), ModelConfig(base=str(tiny_sd15)))
    logs = []
    out = Offloaded(torch.device("cuda"))  # moving to the CPU works here; coming back needs the GPU
    te = c.text_encoders["text_encoder"]
    offload_part(out, "text_encoders", {"text encoder": te}, "auto", True, logs.append)
    offload_part(out, "vae", {"VAE": c.vae}, "offload", False, logs.append)  # latents not cached: stays
    assert list(out.modules) == ["text encoder"]
    assert logs == [f"memory: text encoder moved to the CPU once cached, {module_bytes(te) / 2**20:.0f} MiB "
                    "of GPU memory freed",
                    "memory.vae: kept on cuda: the training step still needs it (latents are not cached)"]
    # Around sampling only the named ones come back (on this machine: there and back on the CPU).
    moves = []
    back = Offloaded(torch.device("cpu"), {"text encoder": te, "VAE": c.vae})
    for name, m in back.modules.items():
        m.to = lambda device, name=name, real=m.to: (moves.append((name, str(device))), real(device))[1]
    with onloaded(back, ["VAE"]):
        assert moves == [("VAE", "cpu")]
    assert moves == [("VAE", "cpu"), ("VAE", "cpu")]
    with onloaded(Offloaded(torch.device("cpu"))):  # nothing offloaded: a no-op
        pass


def test_compile_wraps_each_repeated_block_of_the_denoiser(tiny_sd15):
    """Regional compilation: every block of the denoiser's `_repeated_blocks` classes, nothing else.
    (Running it is left to benchmarks/gpu_smoke.py: inductor takes minutes on this CPU.)"""
    from types import SimpleNamespace

    from finetune.recipe.schema import MemoryConfig, TrainingConfig
    from finetune.train.memory import apply_memory_options

    unet = lora_unet(tiny_sd15)
    c = SimpleNamespace(denoiser=unet, text_encoders={})
    recipe = SimpleNamespace(memory=MemoryConfig(compile=True), training=TrainingConfig(mixed_precision="bf16"))
    logs = []
    apply_memory_options(c, None, recipe, logs.append)
    compiled = {type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == set(unet._repeated_blocks)
    assert logs == ["memory.compile: the denoiser's repeated blocks are compiled on first use "
                    "(the first steps are slow)"]


def test_classifier_hooks_visit_the_gpu_only_while_images_are_made():
    from types import SimpleNamespace

    from finetune.train.memory import classifiers_on

    moves = []
    hook = SimpleNamespace(place=lambda device: moves.append(device.type))
    hooks = SimpleNamespace(hooks=[hook, SimpleNamespace()])  # a hook without a model stays as it is
    with classifiers_on(hooks, torch.device("cuda")):
        assert moves == ["cuda"]
    assert moves == ["cuda", "cpu"]
    with classifiers_on(hooks, torch.device("cpu")):  # nowhere else to go
        pass
    assert moves == ["cuda", "cpu"]


@pytest.mark.parametrize("base", ["tiny-sd15", "tiny-sdxl", "tiny-flux"])
def test_samples_from_embeddings_made_earlier_are_the_samples_from_prompts(base, tmp_path):
    """What lets offloaded text encoders stay off the GPU through validation: the pipeline given the
    family's embeddings makes the very images it makes from the prompt."""
    from contextlib import nullcontext

    import numpy as np
    from PIL import Image

    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.hooks import build_pipeline
    from finetune.recipe.schema import ModelConfig, ValidationConfig
    from finetune.train.memory import validation_embeddings
    from finetune.train.sampling import Destination, Sampling, emit_images

    family = get_family({"tiny-sd15": "sd1", "tiny-sdxl": "sdxl", "tiny-flux": "flux"}[base])
    c = family.load(resolve_source(f"builtin:{base}"), ModelConfig(base=f"builtin:{base}"))
    c.pipeline.set_progress_bar_config(disable=True)
    v = ValidationConfig(prompts=["a photo of sks ball", "a red cube"], negative_prompt="blurry", guidance_scale=3.0)
    embed = validation_embeddings(family, c, v, nullcontext)
    made = {}
    for kind, e in (("prompts", None), ("embeds", embed)):
        how = Sampling(seed=1, n=2, steps=2, guidance=3.0, negative_prompt="blurry", width=64, height=64, embed=e)
        out = emit_images(c.pipeline, v.prompts, how, Destination(tmp_path / kind, build_pipeline([])))
        made[kind] = [np.asarray(Image.open(p)) for p in out]
    assert len(made["embeds"]) == 4
    # Equal, or (FLUX) a pixel level apart where float rounding of the same numbers differs.
    diffs = [np.abs(a.astype(int) - b.astype(int)) for a, b in zip(made["prompts"], made["embeds"])]
    assert all(d.max() <= 1 and d.mean() < 0.01 for d in diffs), [(d.max(), d.mean()) for d in diffs]


def test_a_cache_dir_that_cannot_be_made_is_one_line_before_loading(tiny_sd15, tmp_path):
    (tmp_path / "plain-file").write_text("x")
    r = recipe_for(tmp_path, tiny_sd15, memory={"cache_dir": str(tmp_path / "plain-file" / "cache")})
    problems = memory_problems(validate(r, "r.yaml"), Availability())
    assert problems == [f"memory.cache_dir: {tmp_path / 'plain-file'} is a file, not a folder"]
