"""LoHa, LoKr, DoRA and LoCon on the tiny SD1.5 and SDXL: each trains (the adapter lowers the fixed-noise loss),
its ComfyUI/webui file holds exactly the keys ComfyUI's loader reads, on module names ComfyUI maps, and applied
the way ComfyUI applies it gives the weights that trained; diffusers loads the variants it supports to the same
model and refuses nothing silently; a variant a family cannot take is refused before anything loads.

What ComfyUI reads, per module `x` (comfy/lora.py `load_lora`, comfy/weight_adapter/lora.py, loha.py, lokr.py,
base.py `weight_decompose`), each with an optional `x.alpha`:
- LoRA/LoCon: `x.lora_up.weight`, `x.lora_down.weight`; delta = alpha / rank * up @ down (rank = down's rows).
- DoRA: the same plus `x.dora_scale`; with dora_scale [out, 1] ComfyUI normalises by the output axis.
- LoHa: `x.hada_w1_a`, `x.hada_w1_b`, `x.hada_w2_a`, `x.hada_w2_b`; delta = (w1a @ w1b) * (w2a @ w2b) * alpha / rank
  (rank = hada_w1_b's rows).
- LoKr: `x.lokr_w1` or `x.lokr_w1_a` + `x.lokr_w1_b`; `x.lokr_w2` or `x.lokr_w2_a` + `x.lokr_w2_b`;
  delta = kron(w1, w2) * alpha / dim where dim is a decomposed factor's inner size, * 1 when both are full.
Module names: SD1.x `lora_unet_<diffusers weight path>` (comfy/lora.py `model_lora_keys_unet`, its
`unet_to_diffusers` map covers every UNet weight), SDXL `lora_unet_<original (SGM) weight path>` (the same
function's first loop, over the checkpoint's own keys), FLUX.1 `lycoris_<diffusers module path>` (its FLUX
branch: SimpleTuner's LyCORIS names, each mapped to its rows of BFL's fused weight, where the adapter applies),
Qwen-Image `lora_unet_<diffusers module path>` (the first loop again: its weights have diffusers' names),
Z-Image `lycoris_<diffusers module path>` (its Lumina2 branch, through z_image_to_diffusers onto the fused rows),
FLUX.2 `lycoris_<diffusers module path>` (the FLUX branch again: model_base.Flux2 is a Flux, and flux_to_diffusers
has FLUX.2's names), SD3 `lycoris_<diffusers module path>` (its SD3 branch, through mmdit_to_diffusers, attn2
included; Comfy-Org/ComfyUI 09708eae709a992a5684bed3595ce4d07e705b4e comfy/utils.py).
"""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import RecipeError
from finetune.recipe import validate

from .helpers import (TinyPipeline, latents_and_captions, make_image_folder, real_kohya_names, tiny_model_fixture,
                      tiny_recipe, train_quietly)
from .test_flux import INNER as FLUX_INNER
from .test_flux import PIPELINE as FLUX_PIPELINE
from .test_flux import _comfyui_targets as flux_comfyui_targets
from .test_flux2 import INNER as FLUX2_INNER
from .test_flux2 import PIPELINE as FLUX2_PIPELINE
from .test_flux2 import _comfyui_targets as flux2_comfyui_targets
from .test_sd3 import INNER as SD3_INNER
from .test_sd3 import PIPELINE as SD3_PIPELINE
from .test_sd3 import _comfyui_targets as sd3_comfyui_targets

LORA_KEYS = {"lora_down.weight", "lora_up.weight", "alpha"}
EXPECTED = {  # per variant: the key sets a module may have, from ComfyUI's loaders above
    "loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}],
    "lokr": [{"lokr_w1", "lokr_w2"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
             {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"}],
    "dora": [LORA_KEYS | {"dora_scale"}],
    "locon": [LORA_KEYS],
}
# rank 4 on 32-wide layers leaves LoKr's factors full (alpha folded in); rank 2 with decompose_both splits them.
SECTIONS = {
    "loha": {"variant": "loha", "rank": 4, "alpha": 2},
    "lokr": {"variant": "lokr", "rank": 4, "alpha": 2},
    "lokr-decomposed": {"variant": "lokr", "rank": 2, "alpha": 1, "decompose_both": True},
    "dora": {"dora": True, "rank": 4, "alpha": 2},
    "locon": {"conv_rank": 4, "conv_alpha": 2, "rank": 4, "alpha": 8},
}
STEPS, RATES = 12, {"loha": 3e-2, "lokr": 3e-2, "lokr-decomposed": 3e-2}
# The tiny FLUX.2 and SD3 move less in 12 steps (test_flux2.py and test_sd3.py say why): measured 0.88-0.95x at these.
RATES.update({(f, v): r for f in ("flux2", "sd3") for v, r in (("loha", 1e-1), ("lokr", 1e-1), ("dora", 2e-2))})
CASES = ([("sd1", v) for v in ("loha", "lokr", "dora", "locon")]
         + [("sdxl", v) for v in ("loha", "lokr-decomposed", "dora", "locon")]
         + [(f, v) for f in ("flux", "qwen_image", "z_image", "flux2", "sd3") for v in ("loha", "lokr", "dora")])
PIPELINES = {"sd1": TinyPipeline("StableDiffusionPipeline"), "sdxl": TinyPipeline("StableDiffusionXLPipeline"),
             "flux": FLUX_PIPELINE, "qwen_image": TinyPipeline("QwenImagePipeline", true_cfg_scale=1.0),
             "z_image": TinyPipeline("ZImagePipeline", guidance_scale=0.0), "flux2": FLUX2_PIPELINE, "sd3": SD3_PIPELINE}

tiny_sdxl = tiny_model_fixture("sdxl.build_tiny_sdxl", "tiny-sdxl")
tiny_flux = tiny_model_fixture("flux.build_tiny_flux", "tiny-flux")
tiny_qwen = tiny_model_fixture("qwen_image.build_tiny_qwen_image", "tiny-qwen-image")
tiny_z_image = tiny_model_fixture("z_image.build_tiny_z_image", "tiny-z-image")
tiny_flux2 = tiny_model_fixture("flux2.build_tiny_flux2", "tiny-flux2")
tiny_sd3 = tiny_model_fixture("sd3.build_tiny_sd3", "tiny-sd3")


@pytest.fixture(scope="module")
def models(tiny_sd15, tiny_sdxl, tiny_flux, tiny_qwen, tiny_z_image, tiny_flux2, tiny_sd3):
    return {"sd1": tiny_sd15, "sdxl": tiny_sdxl, "flux": tiny_flux, "qwen_image": tiny_qwen, "z_image": tiny_z_image,
            "flux2": tiny_flux2, "sd3": tiny_sd3}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory, one_torch_thread):
    """Each case trained once: a few steps at a high rate on four 64 px images."""
    done = {}

    def get(family, variant):
        if (family, variant) not in done:
            tmp = tmp_path_factory.mktemp(f"{family}-{variant}")
            data = make_image_folder(tmp / "data", n=4, sizes=((64, 64),))
            r = tiny_recipe(models[family], data, tmp / "out", training__max_steps=STEPS, training__batch_size=4,
                            training__learning_rate=RATES.get((family, variant), RATES.get(variant, 5e-3)))
            r["method"].update(SECTIONS[variant])
            done[family, variant] = (train_quietly(r), data)
        return done[family, variant]

    return get


def _adapted(denoiser):
    """name -> peft layer of every adapted module of the trained denoiser."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in denoiser.named_modules() if isinstance(m, BaseTunerLayer)}


def _kohya_names(family, denoiser, modules):
    """diffusers module path -> its name in the kohya file (SDXL: the original layout's; FLUX: SimpleTuner's
    LyCORIS names, `lycoris_<diffusers module>`)."""
    if family in ("flux", "z_image", "flux2", "sd3"):
        return {m: "lycoris_" + m.replace(".", "_") for m in modules}
    if family == "qwen_image":
        return {m: "lora_unet_" + m.replace(".", "_") for m in modules}
    if family == "sd1":
        return {m: "lora_unet_" + m.replace(".", "_") for m in modules}
    from finetune.export.single_file import rename_modules, unet_module_map

    renamed = rename_modules({m + ".w": 0 for m in modules}, unet_module_map(denoiser), "test")
    return {m: "lora_unet_" + k[:-2].replace(".", "_") for m, k in zip(modules, renamed)}


def _comfyui_names(family, denoiser):
    """Every name ComfyUI maps to a weight of this denoiser (the rules in the module docstring)."""
    if family == "flux":  # the FLUX branch: `lycoris_<diffusers module>` for every module flux_to_diffusers maps
        return {"lycoris_" + m.replace(".", "_") for m in flux_comfyui_targets(2, 2, FLUX_INNER)}
    if family == "flux2":  # the same branch: flux_to_diffusers' FLUX.2 names (ff.linear_in, attn.to_qkv_mlp_proj, ...)
        return {"lycoris_" + m.replace(".", "_") for m in flux2_comfyui_targets(2, 2, FLUX2_INNER)}
    if family == "sd3":  # the SD3 branch: mmdit_to_diffusers' names, attn2 in the tiny SD3.5 Medium's first block
        return {"lycoris_" + m.replace(".", "_") for m in sd3_comfyui_targets(2, {0}, SD3_INNER)}
    if family == "qwen_image":  # `lora_unet_<weight>`: its weights have diffusers' names (musubi-tuner's list)
        return real_kohya_names("qwen_image")
    if family == "z_image":  # the Lumina2 branch: `lycoris_<diffusers module>` for what z_image_to_diffusers maps
        from finetune.families.z_image import _BLOCK, _QKV

        blocks = [f"{b}.{i}" for b in ("layers", "noise_refiner", "context_refiner") for i in range(4)]
        return {"lycoris_" + f"{b}.{m}".replace(".", "_") for b in blocks for m in [*_QKV, *_BLOCK]}
    weights = [k[:-len(".weight")] for k in denoiser.state_dict() if k.endswith(".weight") and "lora_" not in k
               and "hada_" not in k and "lokr_" not in k and ".base_layer" not in k]
    weights += [k[:-len(".base_layer.weight")] for k in denoiser.state_dict() if k.endswith(".base_layer.weight")]
    if family == "sdxl":
        from finetune.export.single_file import rename_modules, unet_module_map

        weights = [k[:-2] for k in rename_modules({w + ".w": 0 for w in weights}, unet_module_map(denoiser), "t")]
    return {"lora_unet_" + w.replace(".", "_") for w in weights}


def _comfyui_delta(keys: dict, weight: torch.Tensor) -> torch.Tensor:
    """What ComfyUI adds to `weight` for one module's keys (LoRA, LoHa, LoKr), by the formulas above."""
    alpha = keys["alpha"].item() if "alpha" in keys else None
    if "lora_up.weight" in keys:
        up, down = keys["lora_up.weight"], keys["lora_down.weight"]
        return (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    if "hada_w1_a" in keys:
        m1, m2 = keys["hada_w1_a"] @ keys["hada_w1_b"], keys["hada_w2_a"] @ keys["hada_w2_b"]
        return ((m1 * m2) * (alpha / keys["hada_w1_b"].shape[0])).reshape(weight.shape)
    dim = None
    w1 = keys.get("lokr_w1")
    if w1 is None:
        dim, w1 = keys["lokr_w1_b"].shape[0], keys["lokr_w1_a"] @ keys["lokr_w1_b"]
    w2 = keys.get("lokr_w2")
    if w2 is None:
        dim, w2 = keys["lokr_w2_b"].shape[0], keys["lokr_w2_a"] @ keys["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(weight.shape)


def _dora(weight, merged, scale, output_norm_of):
    """DoRA on the output axis: merged * dora_scale / ||output_norm_of|| per output row."""
    norm = output_norm_of.reshape(output_norm_of.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
    return merged * scale / norm


@pytest.mark.parametrize("family,variant", CASES)
def test_variant_trains_and_its_comfyui_file_applies_as_trained(runs, family, variant):
    result, data = runs(family, variant)
    c = result.components
    from finetune.families import get_family
    from finetune.train.evaluate import fixed_noise_loss

    fam = get_family(family)
    latents, captions = latents_and_captions(fam, c, data)
    after = fixed_noise_loss(fam, c, latents, captions)
    c.denoiser.disable_adapters()
    before = fixed_noise_loss(fam, c, latents, captions)
    c.denoiser.enable_adapters()
    # 12 steps: the tiny SDXL (attention only at its two smallest levels) and Qwen-Image move less in them.
    assert after < (0.99 if family in ("sdxl", "qwen_image") else 0.97) * before, (before, after)

    kohya = load_file(result.run_dir / "run.safetensors")
    layers = _adapted(c.denoiser)
    names = _kohya_names(family, c.denoiser, list(layers))
    by_module = {}
    for key, value in kohya.items():
        name, suffix = key.split(".", 1)
        by_module.setdefault(name, {})[suffix] = value
    assert set(by_module) == set(names.values())  # every adapted module, nothing else
    assert set(by_module) <= _comfyui_names(family, c.denoiser)
    kind = variant.split("-")[0]
    assert all(set(keys) in EXPECTED[kind] for keys in by_module.values()), {frozenset(k) for k in by_module.values()}
    if kind == "locon":
        convs = [k for k in by_module.values() if k["lora_down.weight"].ndim == 4 and k["lora_down.weight"].shape[-1] == 3]
        assert convs and all(k["alpha"].item() == 2 for k in convs)  # conv_alpha, not alpha
    worst = 0.0
    for module, layer in layers.items():
        keys, weight = by_module[names[module]], layer.get_base_layer().weight.detach()
        merged = copy.deepcopy(layer)
        merged.merge(adapter_names=["default"])
        trained = merged.get_base_layer().weight.detach()
        if kind == "dora":
            adapted = weight + _comfyui_delta({k: v for k, v in keys.items() if k != "dora_scale"}, weight)
            torch.testing.assert_close(_dora(weight, adapted, keys["dora_scale"], adapted), trained, rtol=1e-5, atol=1e-6)
            comfy_today = _dora(weight, adapted, keys["dora_scale"], weight)  # its output-axis branch: ||W||
            worst = max(worst, float((comfy_today - trained).abs().max() / trained.abs().max()))
        else:
            torch.testing.assert_close(weight + _comfyui_delta(keys, weight), trained, rtol=1e-5, atol=1e-6)
    if kind == "dora":
        print(f"{family} DoRA as ComfyUI applies it today: max relative weight difference {worst:.2e}")


@pytest.mark.parametrize("family,variant", CASES)
def test_diffusers_loads_the_variants_it_supports_as_trained(runs, models, family, variant):
    result, _ = runs(family, variant)
    run = result.run_dir
    card = (run / "README.md").read_text()
    if variant == "loha":
        assert not (run / "pytorch_lora_weights.safetensors").exists()
        assert "diffusers has no LoHa loader" in card
        return
    pipeline = PIPELINES[family]
    pipe = pipeline.load(models[family])
    plain = pipeline.image(pipe)
    if variant.startswith("lokr"):  # diffusers' pipelines read LoRA keys only; its models read LoKr too
        component = "unet" if family in ("sd1", "sdxl") else "transformer"
        assert f"pipe.{component}.load_lora_adapter({str(run)!r}" in card
        getattr(pipe, component).load_lora_adapter(str(run), weight_name="pytorch_lora_weights.safetensors",
                                                   prefix=component)
    else:
        pipe.load_lora_weights(str(run))
    loaded = pipeline.image(pipe)
    assert np.abs(loaded - plain).max() > 1e-3, "the adapter did not change the output"
    c = result.components
    trained = pipeline.image(c.pipeline)
    assert np.abs(loaded - trained).max() < 1e-4  # the file is the model that trained
    assert "load_lora_weights" in card or "load_lora_adapter" in card
    if variant == "dora":  # the caveat names only the apps that run this family
        assert "ComfyUI PR #15458" in card
        assert ("AUTOMATIC1111 reads only input-axis" in card) == (family in ("sd1", "sdxl"))
        assert ("Forge normalise" in card) == (family in ("sd1", "sdxl", "flux"))


@pytest.mark.parametrize("section,key", [
    ({"variant": "loha", "dora": True}, "method.dora"),
    ({"variant": "lokr", "train_text_encoder": True}, "method.train_text_encoder"),
    ({"variant": "lora", "decompose_both": True}, "method.decompose_both"),
    ({"conv_alpha": 4}, "method.conv_alpha"),
])
def test_variant_options_that_do_not_go_together_are_refused(tmp_path, section, key):
    r = tiny_recipe("builtin:tiny-sd15", tmp_path, tmp_path / "out")
    r["method"].update(section)
    with pytest.raises(RecipeError) as e:
        validate(r, "recipe.yaml")
    assert key in str(e.value)


@pytest.mark.parametrize("family,section,key", [("sd3", {"conv_rank": 4}, "method.conv_rank"),
                                                ("flux2", {"variant": "loha", "conv_rank": 4}, "method.conv_rank"),
                                                ("flux", {"conv_rank": 4}, "method.conv_rank")])
def test_a_family_without_the_exporter_refuses_the_variant_before_loading(tmp_path, family, section, key):
    from finetune.families import get_family

    r = tiny_recipe("builtin:tiny-sd15", tmp_path, tmp_path / "out")
    r["method"].update(section)
    fam = get_family(family)
    why = fam.method_problem(validate(r, "recipe.yaml").method)
    assert why.split(":")[0] == key and fam.title in why


@pytest.mark.parametrize("family,module", [("flux2", "double_stream_modulation_img.linear"),
                                           ("flux2", "time_guidance_embed.timestep_embedder.linear_1"),
                                           ("sd3", "pos_embed.proj")])
def test_a_variant_on_a_module_comfyui_does_not_map_is_refused_not_written(family, module):
    """ComfyUI's diffusers-name maps know FLUX.2's modulations and embedders by FLUX.1's names only, and SD3's
    patch embedding not at all: a `lycoris_` key there would be skipped, so the export names the module."""
    from finetune.export.lycoris import PER_MODULE
    from finetune.families import get_family

    state = {f"transformer.{m}.{k}": torch.ones(2, 2) for m in ("transformer_blocks.0.attn.to_q", module)
             for k in ("lokr_w1", "lokr_w2")}
    with pytest.raises(ValueError, match=module.replace(".", r"\.") + ": ComfyUI maps no `lycoris_` name"):
        get_family(family).kohya_lora(state, {}, PER_MODULE, {})
    kept = {k: v for k, v in state.items() if module not in k}
    assert set(get_family(family).kohya_lora(kept, {}, PER_MODULE, {})) == {
        "lycoris_transformer_blocks_0_attn_to_q.lokr_w1", "lycoris_transformer_blocks_0_attn_to_q.lokr_w2"}


@pytest.mark.parametrize("family,target", [("flux2", "double_stream_modulation_img.linear"), ("sd3", "pos_embed.proj")])
def test_such_a_module_in_target_modules_is_refused_before_loading(models, tmp_path, family, target):
    """The same modules named in method.target_modules: one line from the preflight, before any weight loads;
    the default targets and a plain LoRA there pass."""
    from finetune.train.preflight import preflight

    r = tiny_recipe(models[family], tmp_path, tmp_path / "out")
    r["method"].update(variant="lokr", target_modules=["to_q", target])
    with pytest.raises(RecipeError) as e:
        preflight(validate(r, "recipe.yaml"))
    (line,) = [x for x in str(e.value).splitlines() if target in x]
    assert line.startswith(f"method.target_modules: '{target}' reaches") and "ComfyUI" in line
    assert "'to_q'" not in str(e.value)
    del r["method"]["target_modules"]
    preflight(validate(r, "recipe.yaml"))
    r["method"].update(variant="lora", target_modules=["to_q", target])
    if family == "sd3":  # a plain LoRA goes into the original layout, where the patch embedding has a name
        preflight(validate(r, "recipe.yaml"))


def test_diffusers_reads_the_flux2_comfyui_lokr_file_as_trained(runs, models):
    """diffusers' Flux2LoraLoaderMixin converts SimpleTuner's LyCORIS LoKr names itself
    (`_convert_lycoris_flux2_lokr_to_diffusers`): the ComfyUI file samples as the model that trained."""
    result, _ = runs("flux2", "lokr")
    pipe = FLUX2_PIPELINE.load(models["flux2"])
    plain = FLUX2_PIPELINE.image(pipe)
    pipe.load_lora_weights(str(result.run_dir), weight_name="run.safetensors")
    loaded = FLUX2_PIPELINE.image(pipe)
    assert np.abs(loaded - plain).max() > 1e-3
    assert np.abs(loaded - FLUX2_PIPELINE.image(result.components.pipeline)).max() < 1e-4


def test_loha_with_only_the_diffusers_format_is_refused(tmp_path):
    r = tiny_recipe("builtin:tiny-sd15", tmp_path, tmp_path / "out", output__formats=["diffusers"])
    r["method"]["variant"] = "loha"
    with pytest.raises(RecipeError, match="output.formats"):
        validate(r, "recipe.yaml")


def test_generate_loads_a_lokr_run_through_the_model_level_loader(runs, models):
    """`finetune generate --lora RUN` with a LoKr run: the pipeline's loader refuses LoKr keys, the UNet's reads them."""
    from finetune.generate import _load_lora

    result, _ = runs("sd1", "lokr")
    pipeline = PIPELINES["sd1"]
    pipe = pipeline.load(models["sd1"])
    plain = pipeline.image(pipe)
    _load_lora(pipe, result.run_dir, "lokr", "tiny-sd15")
    assert "lokr" in pipe.get_list_adapters()["unet"]
    assert np.abs(pipeline.image(pipe) - pipeline.image(result.components.pipeline)).max() < 1e-4
    assert np.abs(pipeline.image(pipe) - plain).max() > 1e-3


def test_variants_on_a_quantized_or_float8_base_are_refused(tmp_path):
    r = tiny_recipe("builtin:tiny-sd15", tmp_path, tmp_path / "out")
    r["method"]["variant"], r["memory"] = "lokr", {"quantize_base": "torchao-int8"}
    with pytest.raises(RecipeError, match="method.variant: not with a float8 or quantized base"):
        validate(r, "recipe.yaml")


def test_eval_says_why_it_cannot_sample_a_loha_run(runs):
    from finetune.errors import FinetuneError
    from finetune.eval.inputs import run_adapter, run_recipe

    result, _ = runs("sd1", "loha")
    recipe, _ = run_recipe(result.run_dir)
    with pytest.raises(FinetuneError, match="diffusers has no LoHa loader"):
        run_adapter(recipe, result.run_dir)


@pytest.mark.parametrize("variant", ["loha", "lokr", "dora", "locon"])
def test_plan_counts_the_trained_parameters_of_the_variant_exactly(runs, models, variant):
    """`finetune plan` injects the same adapter on its model: LoCon's convolutions, DoRA's magnitudes and
    LoKr's factors are counted as they train."""
    from diffusers import UNet2DConditionModel

    from finetune.eval.inputs import run_recipe
    from finetune.families import get_family
    from finetune.plan.method import apply, method_plan

    result, _ = runs("sd1", variant)
    trained = sum(p.numel() for p in result.components.denoiser.parameters() if p.requires_grad)
    unet = UNet2DConditionModel.from_pretrained(models["sd1"], subfolder="unet").requires_grad_(False)
    recipe, _ = run_recipe(result.run_dir)
    apply(method_plan(recipe.method), get_family("sd1"), "unet", unet, [])
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == trained
