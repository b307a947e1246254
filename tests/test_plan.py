"""`finetune plan`: the shipped configs are the published models (parameter counts computed from them,
checked against the figures the world knows), the shortcuts the planner takes are exact, its
estimates reproduce the GPU measurements it was calibrated on and move the right way, and the
bundled recipes plan offline, with proposals that really bring the figure under the budget."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import FinetuneError
from finetune.plan import calibration as cal
from finetune.plan import meta
from finetune.plan.activations import Tracer, denoiser_inputs
from finetune.plan.advise import advise
from finetune.plan.estimate import GIB, estimate
from finetune.plan.method import MethodPlan, apply
from finetune.plan.models import resolve_model
from finetune.plan.run import load_plan_recipe, parse_size
from finetune.plan.settings import settings_from_recipe

REPO = Path(__file__).resolve().parents[1]
SD15, SD21 = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1"
SDXL, DEV, SCHNELL = "stabilityai/stable-diffusion-xl-base-1.0", "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"
FAMILY = {SD15: "sd1", SD21: "sd1", SDXL: "sdxl", DEV: "flux", SCHNELL: "flux"}

# Parameter counts as published (model cards, papers, the safetensors headers of the released weights).
PUBLISHED = [
    (SD15, "unet", 859.5e6), (SD15, "text_encoder", 123.1e6), (SD15, "vae", 83.7e6),
    (SD21, "unet", 865.9e6), (SD21, "text_encoder", 340.4e6), (SD21, "vae", 83.7e6),
    (SDXL, "unet", 2.567e9), (SDXL, "text_encoder", 123.1e6), (SDXL, "text_encoder_2", 694.7e6), (SDXL, "vae", 83.7e6),
    (DEV, "transformer", 11.9e9), (DEV, "text_encoder", 123.1e6), (DEV, "text_encoder_2", 4.76e9),
    (SCHNELL, "transformer", 11.9e9), (SCHNELL, "text_encoder_2", 4.76e9),
]


@functools.lru_cache(maxsize=None)
def spec(base: str):
    from finetune.recipe.schema import ModelConfig

    return resolve_model(ModelConfig(base=base, family=FAMILY.get(base, "auto")))


@functools.lru_cache(maxsize=None)
def tracer(base: str) -> Tracer:
    return Tracer(spec(base))  # shared: each trace is made once for the whole module


def full_build(base: str, name: str):
    """The whole component on the meta device, straight from its config (accelerate's
    init_empty_weights + from_config), nothing cut."""
    from finetune.families.base import meta_component

    s = spec(base)
    return meta_component(s.source, s.index, name)


def published_count(model) -> int:
    """Parameters as a model card counts them: weights the model ties (T5's token embedding, used by
    `shared` and the encoder) once, even where a transformers release builds them untied."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model, "_tied_weights_keys", None) or {}
    twins = [t for t, s in tied.items() if t in params and s in params and params[t] is not params[s]
             and params[t].shape == params[s].shape]
    return sum(p.numel() for p in model.parameters()) - sum(params[t].numel() for t in twins)


@pytest.mark.parametrize("base,name,figure", PUBLISHED, ids=[f"{b.split('/')[1]}-{n}" for b, n, _ in PUBLISHED])
def test_shipped_configs_have_the_published_parameter_counts(base, name, figure):
    model = full_build(base, name)
    assert all(p.device.type == "meta" for p in model.parameters())  # shapes only, no memory
    n = published_count(model)
    assert abs(n - figure) / figure < 0.005, f"{base} {name}: {n:,} parameters, published {figure:,.0f}"


def test_shipped_configs_match_the_full_size_builders():
    """builtin:sd15-full-random / sdxl-full-random (finetune/tiny_models) are the public bases' shapes."""
    from finetune.tiny_models.sd15 import SIZES
    from finetune.tiny_models.sdxl import SDXL_SIZES

    unet = full_build(SD15, "unet").config
    assert tuple(unet.block_out_channels) == SIZES["full"]["unet"] and unet.cross_attention_dim == SIZES["full"]["cross"]
    xl = full_build(SDXL, "unet").config
    assert tuple(xl.transformer_layers_per_block) == SDXL_SIZES["full"]["depth"]
    assert xl.projection_class_embeddings_input_dim == 1280 + 6 * SDXL_SIZES["full"]["time_embed"]
    te2 = full_build(SDXL, "text_encoder_2").config
    assert {k: getattr(te2, k) for k in SDXL_SIZES["full"]["te2"]} == SDXL_SIZES["full"]["te2"]


@pytest.mark.parametrize("base,name", [(SDXL, "unet"), (SDXL, "text_encoder_2"), (DEV, "transformer")])
def test_cut_down_models_count_like_full_ones(base, name):
    model = meta.build(spec(base), name)
    repeats = meta.cut_repeats(model)
    assert repeats and all(r.full > r.kept for r in repeats)
    full = full_build(base, name)
    assert meta.count(model, repeats) == sum(p.numel() for p in full.parameters())


def test_lora_counted_on_a_cut_down_model_is_exact():
    family = spec(DEV).family
    mp = MethodPlan("lora", rank=4)
    cut = meta.build(spec(DEV), "transformer")
    repeats = meta.cut_repeats(cut)
    apply(mp, family, "transformer", cut, [])
    full = meta.build(spec(DEV), "transformer")
    apply(mp, family, "transformer", full, [])
    trained = sum(p.numel() for p in full.parameters() if p.requires_grad)
    assert trained == meta.count(cut, repeats, lambda n, p: p.requires_grad)


def _step_peak(model, repeats, size, batch=1, checkpointing=True):
    from finetune.plan.activations import _flat, _step

    kwargs = denoiser_inputs(spec(DEV).family, model, batch, (size // 8, size // 8), torch.float16, False)
    return _step(model, repeats, checkpointing, lambda: model(**kwargs, return_dict=False)[0], _flat(kwargs))


def test_traced_activations_of_a_cut_down_model_equal_the_full_model():
    """FLUX.1 traced with 3 + 3 blocks and the missing 51 added back = FLUX.1 traced whole (with
    checkpointing, where the peak is a recomputed block on top of every block's kept input)."""
    mp = MethodPlan("lora", rank=4)
    peaks = []
    for cut in (True, False):
        model = meta.build(spec(DEV), "transformer", torch.float16)
        repeats = meta.cut_repeats(model) if cut else []
        apply(mp, spec(DEV).family, "transformer", model, [])
        peaks.append(_step_peak(model, repeats, 256, checkpointing=True))
    assert peaks[0] == pytest.approx(peaks[1], rel=0.002)


def test_traced_text_encoder_of_a_cut_down_model_equals_the_full_model():
    """OpenCLIP bigG (32 layers) with a LoRA, no checkpointing: every layer's saved tensors add up."""
    from finetune.plan.activations import _step

    mp = MethodPlan("lora", text_lora=True, text_rank=8)
    peaks = []
    for cut in (True, False):
        model = meta.build(spec(SDXL), "text_encoder_2", torch.float16)
        repeats = meta.cut_repeats(model) if cut else []
        apply(mp, spec(SDXL).family, "text_encoder_2", model, ["text_encoder_2"])
        ids = torch.zeros(2, 77, dtype=torch.long, device="meta")
        peaks.append(_step(model, repeats, False, lambda: model(input_ids=ids, output_hidden_states=True)[0], [ids]))
    assert peaks[0] == pytest.approx(peaks[1], rel=0.002)


def test_activations_grow_in_proportion_to_the_batch():
    model, repeats = tracer(DEV).model("transformer", MethodPlan("lora", rank=16), torch.float16)
    one, two = _step_peak(model, repeats, 512, batch=1), _step_peak(model, repeats, 512, batch=2)
    assert two == pytest.approx(2 * one, rel=0.02)


# ---------------------------------------------------------------------------------------------
# Calibration: the H100 measurements the factors were fitted on


def _results_table() -> dict[tuple[str, int], float]:
    rows = {}
    for batch in (1, 4):
        text = (REPO / "benchmarks" / "results" / f"lora_memory_h100_batch{batch}.md").read_text()
        for label, peak in re.findall(r"^\| ([^|]+?) \| ([0-9.]+) \|", text, flags=re.M):
            rows[(label, batch)] = float(peak)
    return rows


def test_calibration_table_is_the_recorded_measurements():
    assert {(label, batch): gib for label, _, batch, gib in cal.H100_SD15} == _results_table()


def _settings(recipe: str, overrides: list[str]):
    r, _ = load_plan_recipe(recipe, overrides)
    return settings_from_recipe(r)


def test_h100_measurements_reproduced():
    t = tracer(SD15)  # builtin:sd15-full-random is SD1.5's shapes: the same configs
    errors = []
    for label, overrides, batch, gib in cal.H100_SD15:
        s = _settings("sd15-lora", cal.H100_SD15_RECIPE + overrides + [f"training.batch_size={batch}"])
        predicted = estimate(t, s).peak / GIB  # max_memory_allocated: the CUDA context is not in it
        errors.append((label, batch, gib, round(predicted, 2), (predicted - gib) / gib))
    worst = max(abs(e[-1]) for e in errors)
    assert worst < cal.TOLERANCE, errors


# ---------------------------------------------------------------------------------------------
# The estimate moves the right way


@pytest.fixture(scope="module")
def sd15_batch4():
    return _settings("sd15-lora", cal.H100_SD15_RECIPE + ["training.batch_size=4", "training.gradient_checkpointing=false",
                                                          "training.mixed_precision=fp16"])


def test_checkpointing_lowers_the_peak(sd15_batch4):
    t = tracer(SD15)
    without, with_ = estimate(t, sd15_batch4), estimate(t, replace(sd15_batch4, checkpointing=True))
    assert with_.phases["training"] < without.phases["training"] and with_.peak < without.peak


def test_rank_resolution_and_batch_raise_the_peak(sd15_batch4):
    t = tracer(SD15)
    base = estimate(t, sd15_batch4)
    rank = estimate(t, replace(sd15_batch4, method=replace(sd15_batch4.method, rank=64)))
    assert rank.trained > base.trained and rank.peak > base.peak
    assert estimate(t, replace(sd15_batch4, resolution=640)).peak > base.peak
    assert estimate(t, replace(sd15_batch4, batch=1)).peak < base.peak


def test_half_precision_lowers_the_peak(sd15_batch4):
    t = tracer(SD15)
    assert estimate(t, replace(sd15_batch4, precision="bf16")).peak < estimate(t, replace(sd15_batch4, precision="no")).peak


def test_eight_bit_states_are_smaller_for_a_full_fine_tune():
    s = _settings("sd15-dreambooth", ["training.gradient_checkpointing=true"])
    t = tracer(SD15)
    rows = {o: next(r.bytes for r in estimate(t, replace(s, optimizer=o)).rows if r.label.startswith("optimizer states"))
            for o in ("adamw", "adamw8bit", "lion", "lion8bit")}
    assert rows["adamw"] == pytest.approx(8 * 859_520_964) and rows["lion"] == pytest.approx(4 * 859_520_964)
    assert rows["adamw8bit"] < rows["adamw"] / 3 and rows["lion8bit"] < rows["lion"] / 3


# ---------------------------------------------------------------------------------------------
# memory: options, each worth what the meta model's own layers say


def test_auto_precision_plans_as_bf16():
    """The plan is for a GPU run, where `auto` is bf16 (fp16 before Ampere: the same bytes)."""
    auto = _settings("sd15-lora", ["training.mixed_precision=auto"])
    assert auto.precision == "bf16"
    for explicit in ("bf16", "fp16"):
        same = _settings("sd15-lora", [f"training.mixed_precision={explicit}"])
        assert estimate(tracer(SD15), auto).peak == estimate(tracer(SD15), same).peak


def _params(base: str, name: str) -> int:
    return sum(p.numel() for p in full_build(base, name).parameters())


def test_offloaded_encoders_leave_the_training_peak():
    """SD1.5 in fp16 with latents and captions cached: `auto` moves the text encoder (2 bytes a weight)
    and the VAE (fp32) to host RAM for the training steps. While the caches are made they are the GPU's
    only weights (the UNet waits in host RAM), the text encoder leaving before the VAE works; for validation samples the VAE comes back, the text
    encoder does not (the prompts were encoded before it left)."""
    t = tracer(SD15)
    keep = estimate(t, _settings("sd15-lora", ["memory.text_encoders=keep", "memory.vae=keep"]))
    auto = estimate(t, _settings("sd15-lora", []))
    text, vae = 2 * _params(SD15, "text_encoder"), 4 * _params(SD15, "vae")
    assert keep.phases["training"] - auto.phases["training"] == pytest.approx(text + vae)
    assert keep.phases["validation"] - auto.phases["validation"] == pytest.approx(text)
    encode = next(r.bytes for r in auto.rows if r.label.startswith("VAE encoding"))
    # Captions are encoded first: an encoder that goes has left before the VAE encodes the images.
    assert keep.phases["caching"] == pytest.approx(text + vae + encode)
    assert auto.phases["caching"] == pytest.approx(max(text + vae, vae + encode))
    assert auto.host["training"] - keep.host["training"] == pytest.approx(text + vae)
    assert auto.host["caching"] >= 2 * _params(SD15, "unet")
    # Only what is cached can leave: a text encoder that trains stays, the VAE still goes.
    lora_te = estimate(t, _settings("sd15-lora", ["method.train_text_encoder=true"]))
    assert lora_te.offloaded == pytest.approx(4 * _params(SD15, "vae"))


def test_offloaded_blocks_are_the_ones_training_parks():
    """`memory.offload_blocks: 20` on FLUX.1: the frozen weights of the first 20 repeated blocks, as
    finetune/train/block_swap.py picks them on the whole model, leave the GPU for host RAM; two of them
    at a time visit it."""
    from finetune.train.block_swap import repeated_blocks

    blocks = [2 * sum(p.numel() for p in b.parameters()) for b in repeated_blocks(full_build(DEV, "transformer"))]
    s = _settings("flux-lora", ["memory.fp8_base=false"])  # the bf16 transformer
    plain, parked = estimate(tracer(DEV), s), estimate(tracer(DEV), replace(s, offload_blocks=20))
    assert parked.parked == sum(blocks[:20])
    assert plain.phases["training"] - parked.phases["training"] == pytest.approx(sum(blocks[:20]) - 2 * max(blocks[:20]))
    assert parked.host["training"] - plain.host["training"] == pytest.approx(sum(blocks[:20]))


def test_cache_dir_takes_the_caches_out_of_host_ram():
    """Eight 512 px images: each caches a 4x64x64 latent and 77 CLIP tokens of the UNet's context width."""
    data = f"data.path={REPO / 'datasets' / 'robot'}"
    t = tracer(SD15)
    memory = estimate(t, _settings("sd15-lora", [data]))
    disk = estimate(t, _settings("sd15-lora", [data, "memory.cache_dir=/tmp/cache"]))
    unet = full_build(SD15, "unet").config
    per_image = 2 * (unet.in_channels * (512 // 8) ** 2 + 77 * unet.cross_attention_dim)  # fp16
    assert memory.host["training"] - disk.host["training"] == pytest.approx(8 * per_image)
    assert disk.host["training"] == pytest.approx(disk.offloaded) and disk.peak == memory.peak
    assert memory.host["caching"] - disk.host["caching"] == pytest.approx(8 * per_image)


@functools.lru_cache(maxsize=None)
def _linear_layers(base: str, name: str) -> tuple[int, int, int, int]:
    """(weights, output rows, layers) of the component's nn.Linear layers, and its other parameters."""
    model = full_build(base, name)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in linear)
    return weights, sum(m.out_features for m in linear), len(linear), _params(base, name) - weights


@functools.lru_cache(maxsize=None)
def _storage_law(kind: str) -> tuple[float, float, float]:
    """(bytes per weight, per output row, per layer) the library stores for a Linear quantized as
    diffusers asks for `kind`: solved from three small layers quantized for real on the CPU (storage
    is affine in those three; the real layers are too large to quantize in a test)."""
    shapes = [(64, 128), (128, 128), (128, 256)]
    a = [[o * i, o, 1] for o, i in shapes]
    b = [_stored_bytes(kind, o, i) for o, i in shapes]
    return tuple(float(x) for x in torch.linalg.solve(torch.tensor(a, dtype=torch.float64),
                                                      torch.tensor(b, dtype=torch.float64)))


def _stored_bytes(kind: str, out_f: int, in_f: int) -> int:
    """Bytes the library keeps for one bias-free Linear quantized as `kind`: the weight and its scales."""
    dense = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
    if kind == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(dense, Int8WeightOnlyConfig())
        names, _ = dense.weight.__tensor_flatten__()
        return sum(getattr(dense.weight, n).nbytes for n in names)
    import bitsandbytes as bnb

    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
    else:  # diffusers' BitsAndBytesConfig: no double quantization unless asked
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=False,
                                  quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    w = layer.to("cpu").weight
    if kind == "int8":
        return w.nbytes + w.SCB.nbytes
    return w.nbytes + w.quant_state.absmax.nbytes + w.quant_state.code.nbytes


@pytest.mark.parametrize("kind", ["int8", "nf4", "torchao-int8"])
@pytest.mark.parametrize("base", [SD15, DEV], ids=["sd15", "flux"])
def test_a_quantized_base_stores_its_linear_layers_as_the_library_does(base, kind):
    """The denoiser's row is what bitsandbytes / torchao store for each of its Linear layers (convs and
    the rest unquantized: in fp32 after peft's kbit preparation for bitsandbytes, in bf16 for torchao),
    and the training figure drops by exactly what the weights lose."""
    name = spec(base).family.denoiser_component
    weights, rows, layers, other = _linear_layers(base, name)
    per_weight, per_row, per_layer = _storage_law(kind)
    expected = per_weight * weights + per_row * rows + per_layer * layers + other * (2 if kind == "torchao-int8" else 4)
    s = _settings("sd15-lora" if base == SD15 else "flux-lora", ["training.mixed_precision=bf16", "memory.fp8_base=false"])
    plain, quantized = estimate(tracer(base), s), estimate(tracer(base), replace(s, quantize=kind))
    row = next(r.bytes for r in quantized.rows if r.label.startswith(f"{name} weights"))
    assert row == pytest.approx(expected, rel=1e-4)  # nf4's 16-entry code table per layer is left out
    weights = 2 * (_params(base, name))
    assert plain.phases["training"] - quantized.phases["training"] == pytest.approx(weights - row)


def test_fp8_base_stores_what_training_stores_and_keeps_about_a_block_of_upcast_copies():
    """FLUX.1 with a LoRA: the weights finetune/train/memory.py `store_fp8` puts in fp8 on the whole
    model are the ones the plan counts on its cut-down copy, at one byte instead of two; with gradient
    checkpointing the step keeps the upcast copies of about one block, no more."""
    from finetune.plan.fp8 import FP8
    from finetune.train.memory import store_fp8

    family = spec(DEV).family
    full = meta.build(spec(DEV), "transformer", torch.bfloat16)
    apply(MethodPlan("lora", rank=16), family, "transformer", full, [])
    store_fp8(full)
    fp8 = {n: p.numel() for n, p in full.named_parameters() if p.dtype == FP8}
    s = _settings("flux-lora", ["memory.fp8_base=false"])  # the bf16 transformer
    plain, stored = estimate(tracer(DEV), s), estimate(tracer(DEV), replace(s, fp8=True))
    rows = [next(r.bytes for r in e.rows if r.label.startswith("transformer weights")) for e in (plain, stored)]
    assert rows[0] - rows[1] == sum(fp8.values())
    acts = [next(r.bytes for r in e.rows if r.label.startswith("activations")) for e in (plain, stored)]
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    block = max(sum(v for n, v in fp8.items() if n.startswith(f"{b}{i}.")) for b in blocks for i in range(3))
    outside = sum(v for n, v in fp8.items() if not n.startswith(blocks))
    assert 0 < acts[1] - acts[0] <= cal.ACTIVATION_FACTOR["bf16"] * 2 * (block + outside)
    assert stored.needs < plain.needs


def test_a_quantized_base_pays_where_linear_layers_dominate():
    """FLUX.1's transformer is all Linear layers: int8, then NF4, lower the figure. SD1.5's UNet is 31%
    Linear: its convs and norms, upcast to fp32 by peft's kbit preparation, outweigh what its Linear
    layers save, and `plan --vram` does not propose it there."""
    s = _settings("flux-lora", ["memory.fp8_base=false"])  # the bf16 transformer
    flux = [estimate(tracer(DEV), replace(s, quantize=q)).needs for q in ("none", "int8", "nf4")]
    assert flux[0] > flux[1] > flux[2]
    s = _settings("sd15-lora", [])
    sd15 = [estimate(tracer(SD15), replace(s, quantize=q)).needs for q in ("none", "int8", "nf4")]
    assert sd15[0] < sd15[2] < sd15[1]


def test_memory_options_lower_the_figure_and_size_raises_it(sd15_batch4):
    """From an fp16 SD1.5 run at batch 4 with everything on the GPU, each option alone lowers what the
    card needs (fp8 storage with checkpointing below checkpointing alone); more rank or pixels raise it."""
    t = tracer(SD15)
    base = replace(sd15_batch4, text_offload=False, vae_offload=False)
    needs = estimate(t, base).needs
    lower = {"checkpointing": {"checkpointing": True}, "text offload": {"text_offload": True},
             "VAE offload": {"vae_offload": True}}
    figures = {k: estimate(t, replace(base, **v)).needs for k, v in lower.items()}
    assert all(f < needs for f in figures.values()), (needs, figures)
    checkpointed = estimate(t, replace(base, checkpointing=True)).needs
    assert estimate(t, replace(base, checkpointing=True, fp8=True)).needs < checkpointed
    assert estimate(t, replace(base, resolution=768)).needs > needs
    assert estimate(t, replace(base, method=replace(base.method, rank=128))).needs > needs


def test_an_ema_is_an_fp32_value_per_trained_parameter_where_it_is_kept():
    """training.ema on an SD1.5 DreamBooth (the whole UNet trains, 8-bit states): on the GPU the average
    raises training and validation by 4 bytes a parameter, and its foreach update needs as much again once
    the gradients are gone; in CPU memory it leaves both for host RAM and visits whole for each update,
    updated a tensor at a time; either way the trained weights are copied to host RAM while it is swapped in."""
    t, unet = tracer(SD15), 4.0 * _params(SD15, "unet")
    base = ["training.gradient_checkpointing=true", "optimizer.type=adamw8bit"]
    off, gpu, cpu = (estimate(t, _settings("sd15-dreambooth", base + extra))
                     for extra in ([], ["training.ema={}"], ["training.ema.device=cpu"]))
    assert "EMA update" not in off.phases
    for phase in ("training", "validation"):
        assert gpu.phases[phase] - off.phases[phase] == pytest.approx(unet)
        assert cpu.phases[phase] == pytest.approx(off.phases[phase])
    states = next(r.bytes for r in off.rows if r.label.startswith("optimizer states"))
    held = sum(r.bytes for r in off.rows if r.phase == "resident") + states
    largest = max(p.numel() for p in full_build(SD15, "unet").parameters())
    assert gpu.phases["EMA update"] == pytest.approx(held + 2 * unet)
    assert cpu.phases["EMA update"] == pytest.approx(held + unet + 8 * largest)
    assert gpu.host["training"] - off.host["training"] == pytest.approx(unet)  # the trained weights' copy
    assert cpu.host["training"] - off.host["training"] == pytest.approx(2 * unet)
    # On a CPU the device's memory is host memory: where the average is kept changes nothing.
    assert cpu.host_peak_on("cpu") == pytest.approx(gpu.host_peak_on("cpu"))
    # plan --vram: keeping the average in CPU memory comes before anything that changes results.
    adv = advise(t, replace(gpu.settings, validation_images=0), gpu.phases["training"] - unet / 2 + cal.CUDA_CONTEXT_GIB * GIB)
    assert adv.fits and [step.change.keys for step in adv.steps] == [["training.ema.device=cpu"]]


# ---------------------------------------------------------------------------------------------
# --vram: proposals that fit, and runs that cannot


def test_proposals_fit_and_name_the_recipe_keys_that_make_them():
    """An fp32 SD1.5 run at batch 4 for a 6 GB card: the changes bring it under, and the recipe with
    the proposed keys plans to the figure the last change claims."""
    budget = 6 * GIB
    base = ["training.mixed_precision=no", "optimizer.type=adamw", "training.gradient_checkpointing=false",
            "training.batch_size=4"]
    s = _settings("sd15-lora", base)
    adv = advise(tracer(SD15), s, budget)
    assert adv.fits and adv.steps and adv.final.needs <= budget
    assert all(step.after < step.before for step in adv.steps) and adv.steps[-1].after == adv.final.needs
    keys = [k for step in adv.steps for k in step.change.keys]
    replayed = estimate(tracer(SD15), _settings("sd15-lora", base + keys))
    assert replayed.needs == pytest.approx(adv.final.needs)


def test_a_run_that_cannot_fit_gets_its_smallest_figure():
    s = _settings("sd15-lora", [])
    adv = advise(tracer(SD15), s, 1 * GIB)
    assert not adv.fits and adv.final.needs > GIB
    assert adv.final.needs == min(step.after for step in adv.steps)
    # Each step saves: a quantized SD1.5 UNet would not (test_a_quantized_base_pays_where_linear_layers_dominate).
    assert any("memory.fp8_base=true" in step.change.keys for step in adv.steps)
    assert not any(k.startswith("memory.quantize_base") for step in adv.steps for k in step.change.keys)


# ---------------------------------------------------------------------------------------------
# The command


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _gib(pattern: str, text: str) -> float:
    return float(re.search(pattern, text).group(1))


def test_plan_sd15_lora_offline():
    r = invoke("plan", "sd15-lora")
    assert r.exit_code == 0, r.output
    assert "configs shipped with finetune" in r.output and "estimated" in r.output
    assert "benchmarks/results/lora_memory_h100" in r.output and "peak host RAM" in r.output
    for row in ("unet weights (bf16", "text_encoder weights", "VAE weights (fp32", "gradients", "optimizer states",
                "activations of a training step"):
        assert row in r.output, row


def test_plan_sdxl_lora_for_12gb_and_8gb():
    r = invoke("plan", "sdxl-lora", "--vram", "12GB")
    assert r.exit_code == 0, r.output  # as written: encoders offloaded, samples decoded one at a time
    r = invoke("plan", "sdxl-lora", "--vram", "8GB")
    assert r.exit_code == 1, r.output  # fits only with the proposed changes
    assert "does not fit as it is" in r.output and "then: finetune train sdxl-lora" in r.output
    last = [float(x) for x in re.findall(r"-> ([0-9.]+) GiB", r.output)][-1]
    assert last <= 8


def test_plan_flux_lora_for_16gb():
    """FLUX.1 in bf16 needs ~27 GiB: a memory option is proposed, and either the changes fit 16 GiB or
    the smallest figure any of them reaches is named (T5-XXL, 9 GiB, is on the GPU while the caches are
    made)."""
    r = invoke("plan", "flux-lora", "--vram", "16GB")
    assert r.exit_code in (1, 2), r.output
    assert "text_encoder_2 weights (bf16, 4.76B frozen): offloaded to CPU after caching" in r.output
    proposals = r.output[r.output.index("--vram 16.00 GiB"):]
    assert re.search(r"GiB   memory\.(fp8_base|quantize_base|offload_blocks)=", proposals), proposals
    figures = [float(x) for x in re.findall(r"-> ([0-9.]+) GiB", r.output)]
    if r.exit_code == 1:
        assert "then: finetune train flux-lora" in r.output and figures[-1] <= 16
        keys = re.search(r"then: finetune train flux-lora (.*)$", r.output, re.M).group(1).split()
        assert estimate(tracer(DEV), _settings("flux-lora", keys)).needs <= 16 * GIB
        blocks = next((k for k in keys if k.startswith("memory.offload_blocks=")), None)
        if blocks:  # the fewest parked blocks that fit
            fewer = [k for k in keys if k != blocks] + [f"memory.offload_blocks={int(blocks.split('=')[1]) - 1}"]
            assert estimate(tracer(DEV), _settings("flux-lora", fewer)).needs > 16 * GIB
    else:
        assert "cannot fit" in r.output
        assert _gib(r"the card still needs ([0-9.]+) GiB", r.output) == min(figures) > 16


def test_plan_sd3_from_its_shipped_configs():
    """SD3.5 Medium's transformer is 2.24B parameters (2.47B with its position-embedding buffer, the
    published "2.5B"), Large's 8.06B ("8.1B"); plan traces SD3 through the family's own inputs."""
    r = invoke("plan", "sd3-lora")
    assert r.exit_code == 0, r.output
    assert "family sd3" in r.output and "transformer weights (bf16, 2.24B frozen)" in r.output
    assert "activations of a training step" in r.output
    large = full_build("stabilityai/stable-diffusion-3.5-large", "transformer")
    assert published_count(large) == pytest.approx(8.06e9, rel=0.005)


def test_a_card_no_change_fits_is_told_it_cannot_fit():
    """With no proposal that helps (SD3 at 8 GB: T5-XXL alone is on the GPU while captions are encoded)
    the answer is "cannot fit" with the figure and exit 2, never "fits"."""
    from finetune.plan.advise import Advice
    from finetune.plan.report import advice_lines
    from finetune.plan.run import PlanResult, exit_code

    needs = 11.45 * GIB
    final = type("E", (), {"needs": needs, "host_peak": 0})()
    result = PlanResult("sd3-lora", None, final, Advice(False, [], final), 8 * GIB, None)
    assert advice_lines(result) == ["--vram 8.00 GiB: cannot fit; with every change plan knows the card still needs "
                                    "11.45 GiB:"]
    assert exit_code(result) == 2


def test_plan_local_folder_and_overrides(tiny_sd15):
    r = invoke("plan", "sd15-lora", f"model.base={tiny_sd15}", "data.resolution=64", "--ram", "64GB")
    assert r.exit_code == 0, r.output
    assert "(local folder)" in r.output and "64 px" in r.output and "host RAM fits" in r.output


def test_plan_errors_are_one_line():
    r = invoke("plan", "sd15-lora", "--vram", "twelve")
    assert r.exit_code == 1 and r.output.strip() == "error: --vram: expected a size like 12GB or 24 (GiB), got 'twelve'"
    r = invoke("plan", "sd15-lora", "model.base=someone/not-shipped")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "finetune ships no configs for someone/not-shipped" in r.output


def test_sizes():
    assert parse_size("12GB", "--vram") == parse_size("12", "--vram") == parse_size("12 GiB", "--vram") == 12 * GIB
    assert parse_size("800MB", "--vram") == 800 * 2**20 and parse_size("1.5TB", "--ram") == 1.5 * 2**40
    with pytest.raises(FinetuneError):
        parse_size("0GB", "--vram")


def test_importing_the_planner_imports_no_torch():
    code = ("import sys, finetune.plan, finetune.plan.run, finetune.plan.models; "
            "from finetune.plan.run import load_plan_recipe; load_plan_recipe('sd15-lora', []); "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
