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

    kwargs = denoiser_inputs(model, batch, (size // 8, size // 8), torch.float16, False)
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
    for row in ("unet weights (fp16", "text_encoder weights", "VAE weights (fp32", "gradients", "optimizer states",
                "activations of a training step"):
        assert row in r.output, row


def test_plan_sdxl_lora_for_12gb():
    r = invoke("plan", "sdxl-lora", "--vram", "12GB")
    assert r.exit_code == 1, r.output  # fits only with the proposed changes
    assert "does not fit as it is" in r.output and "then: finetune train sdxl-lora" in r.output
    last = [float(x) for x in re.findall(r"-> ([0-9.]+) GiB", r.output)][-1]
    assert last <= 12


def test_plan_flux_lora_for_16gb():
    r = invoke("plan", "flux-lora", "--vram", "16GB")
    assert r.exit_code == 2, r.output  # no change plan knows makes it fit
    assert "cannot fit" in r.output and "model.flux.quantize=nf4" in r.output
    assert _gib(r"the card still needs ([0-9.]+) GiB", r.output) > 16
    assert "text encoders stay on the GPU" in r.output


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
