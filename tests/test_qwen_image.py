"""Qwen-Image as one family: LoRA on the tiny Qwen-Image transformer lowers its rectified-flow loss on
the training images; the diffusers file loads with QwenImagePipeline's own loader and changes the
output; the kohya file has the names ComfyUI maps for Qwen-Image (musubi-tuner's layout) and reads back
in diffusers as the same LoRA; prompts are encoded as the pipeline encodes them, padded with a mask that
changes nothing; timestep sampling and shift give the numbers Qwen-Image samples with."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.errors import FinetuneError
from finetune.families._flow import FlowOptions
from finetune.recipe import validate
from finetune.recipe.loader import method_problems

from .conftest import REPO
from .helpers import (TinyPipeline, assert_frozen, assert_kohya_file_samples_as_diffusers_file, kohya_file,
                      load_diffusers_file, load_family, lora_modules, loss_before_and_after, make_image_folder,
                      real_kohya_names, tiny_model_fixture, tiny_recipe, train_lora)

REAL_NAMES = real_kohya_names("qwen_image")
RECIPES = ("qwen-image-lora", "qwen-image-subject", "qwen-image-style", "qwen-image-quickstart")
PIPELINE = TinyPipeline("QwenImagePipeline", true_cfg_scale=1.0)

tiny_qwen = tiny_model_fixture("qwen_image.build_tiny_qwen_image", "tiny-qwen-image")


@pytest.fixture(scope="module")
def trained(tiny_qwen, tmp_path_factory):
    return train_lora(tiny_qwen, tmp_path_factory.mktemp("qwen"), max_steps=40, learning_rate=5e-3)


def load(model, **options):
    return load_family("qwen_image", model, flow=FlowOptions(**options))


# ------------------------------------------------------------------ training and the diffusers file


def test_lora_training_lowers_the_loss_on_the_training_images(trained, tiny_qwen):
    result, data = trained
    family, c = load(tiny_qwen)
    before, after = loss_before_and_after(family, c, data, result.run_dir)
    # Measured 0.80x after 40 steps (rank 8, alpha 4, learning rate 5e-3).
    assert after < 0.9 * before, (before, after)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_diffusers_file_loads_into_every_module_and_changes_the_output(trained, tiny_qwen):
    result, _ = trained
    in_file = load_diffusers_file(PIPELINE, tiny_qwen, result.run_dir)
    # The default targets: both streams' attention and MLPs in every block; no modulation, nothing outside.
    for i in (0, 1):
        assert {f"transformer_blocks.{i}.{m}" for m in
                ("attn.to_q", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
                 "txt_mlp.net.2")} <= in_file
    assert len(in_file) == 2 * 12 and not [m for m in in_file if "_mod" in m or not m.startswith("transformer_blocks.")]


def test_frozen_transformer_and_text_encoder_unchanged(trained, tiny_qwen):
    result, _ = trained
    c = result.components
    assert not lora_modules(c.text_encoders["text_encoder"])
    assert_frozen(c.denoiser, tiny_qwen / "transformer" / "diffusion_pytorch_model.safetensors")


# ------------------------------------------------------------------ the kohya / ComfyUI file


def test_kohya_names_are_the_ones_comfyui_maps(trained):
    result, _ = trained
    state, meta = kohya_file(result.run_dir)
    names = {k.split(".")[0] for k in state}
    assert names <= REAL_NAMES, sorted(names - REAL_NAMES)
    assert {"lora_unet_transformer_blocks_1_attn_add_q_proj", "lora_unet_transformer_blocks_0_img_mlp_net_0_proj",
            "lora_unet_transformer_blocks_0_attn_to_out_0"} <= names
    assert meta["ss_base_model_version"] == "qwen_image"
    assert meta["modelspec.architecture"] == "Qwen-Image/lora"
    # ComfyUI adds alpha / rank * up @ down to the weight each name maps to: the trained delta, module by module.
    peft = load_file(result.run_dir / "pytorch_lora_weights.safetensors")
    modules = {k.rsplit(".lora_", 1)[0] for k in peft}
    module_of = {"lora_unet_" + m.removeprefix("transformer.").replace(".", "_"): m for m in modules}
    assert set(module_of) == names
    for name, module in module_of.items():
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        got = state[f"{name}.alpha"].item() / down.shape[0] * (up @ down)
        want = 4 / 8 * (peft[f"{module}.lora_B.weight"] @ peft[f"{module}.lora_A.weight"])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_kohya_file_loads_in_diffusers_to_the_same_model(trained, tiny_qwen):
    result, _ = trained
    assert_kohya_file_samples_as_diffusers_file(PIPELINE, tiny_qwen, result.run_dir)


def test_no_text_encoder_lora_nor_embeddings(tiny_qwen, tmp_path):
    data = make_image_folder(tmp_path / "data", n=1, sizes=((64, 64),))
    for method, match in [({"type": "lora", "train_text_encoder": True}, "train_text_encoder"),
                          ({"type": "textual_inversion", "placeholder_token": "<x>", "initializer_token": "x"},
                           "textual_inversion is not available for Qwen-Image")]:
        r = tiny_recipe(tiny_qwen, data, tmp_path / "out")
        r["method"] = method
        (why,) = method_problems(validate(r, "test"))  # found from the folder's model_index.json, nothing loaded
        assert match in why, why


# ------------------------------------------------------------------ prompts and objective


def test_prompts_are_the_pipelines_padded_with_a_mask_that_changes_nothing(tiny_qwen):
    family, c = load(tiny_qwen)
    captions = ["a photo of sks robot on a beach", "x"]
    cond = family.encode_prompts(c, captions)
    assert cond["prompt_embeds"].shape == (2, 512, 32) and cond["prompt_embeds_mask"].shape == (2, 512)
    # The tiny tokenizer splits the template's system part into the real vocabulary's 34 tokens, which
    # the pipeline drops (prompt_template_encode_start_idx).
    pipe = c.pipeline
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("x")).input_ids
    assert pipe.tokenizer.decode(ids[:34]).endswith("background:<|im_end|>\n<|im_start|>user\n")
    assert pipe.tokenizer.decode(ids[34:35]) == "x" and pipe.prompt_template_encode_start_idx == 34
    embeds, mask = pipe.encode_prompt(captions, device="cpu")
    n = embeds.shape[1]
    torch.testing.assert_close(cond["prompt_embeds"][:, :n], embeds)
    assert torch.equal(cond["prompt_embeds_mask"][:, :n], mask) and not cond["prompt_embeds_mask"][:, n:].any()
    torch.manual_seed(0)
    noisy, t, _ = family.sample_noisy(c, torch.randn(2, 16, 8, 8))
    with torch.no_grad():
        together = family.predict(c, noisy, t, cond)
        alone = family.predict(c, noisy[1:], t[1:], {k: v[1:] for k, v in cond.items()})
    torch.testing.assert_close(together[1:], alone, rtol=1e-5, atol=1e-5)
    assert family.count_truncated(c, ["short", "word " * 600]) == 1


def test_validation_embeddings_sample_with_true_cfg(tiny_qwen):
    """What the loop keeps for validation when the text encoder leaves the GPU: tensors only; a guidance
    above 1 adds the negative prompt's embeddings (true CFG), and the pipeline samples from them."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from finetune.train.memory import validation_embeddings

    family, c = load(tiny_qwen)
    assert set(family.prompt_embeddings(c, "a photo", None, 1.0)) <= {"prompt_embeds", "prompt_embeds_mask"}
    v = SimpleNamespace(prompts=["a photo of sks robot"], negative_prompt=None, guidance_scale=4.0)
    kw = validation_embeddings(family, c, v, nullcontext)("a photo of sks robot", None)
    assert {"prompt_embeds", "negative_prompt_embeds"} <= set(kw)
    c.pipeline.set_progress_bar_config(disable=True)
    images = c.pipeline(**kw, num_inference_steps=2, width=64, height=64, output_type="np",
                        num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()


def test_latents_are_normalised_per_channel_and_predictions_unpacked(tiny_qwen):
    family, c = load(tiny_qwen)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.manual_seed(0)
    with torch.no_grad():
        latents = family.encode_images(c, pixels)
        torch.manual_seed(0)
        raw = c.vae.encode(pixels.unsqueeze(2)).latent_dist.sample()[:, :, 0]
    mean, std = (torch.tensor(c.vae.config.latents_mean).view(1, 16, 1, 1),
                 torch.tensor(c.vae.config.latents_std).view(1, 16, 1, 1))
    torch.testing.assert_close(latents * std + mean, raw, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 16, 9, 10)  # an odd latent side: packing needs even ones
    noisy, timesteps, target = family.sample_noisy(c, x)
    assert noisy.shape == target.shape == (3, 16, 8, 10)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    # noisy = (1 - sigma) * x + sigma * noise and target = noise - x, so x = noisy - sigma * target.
    torch.testing.assert_close(noisy - sigma * target, x[..., :8, :10], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert family.predict(c, noisy, timesteps, family.encode_prompts(c, ["a", "b", "c"])).shape == noisy.shape


def test_timestep_sampling_and_shift_match_what_qwen_image_samples_with(tiny_qwen):
    torch.manual_seed(0)
    n = 40000
    family, c = load(tiny_qwen)  # logit-normal, shifted as the pipeline does: mu from 256 to 8192 tokens
    # 1024 px = 64x64 latents = 4096 packed tokens: mu = 0.5 + 0.4 * 3840 / 7936, shift e^mu = 2.0.
    assert family.sample_sigmas(c, n, image_seq_len=4096).median().item() == pytest.approx(0.667, abs=0.01)
    assert family.sample_sigmas(c, n, image_seq_len=256).median().item() == pytest.approx(0.6225, abs=0.01)
    family, c = load(tiny_qwen, timestep_sampling="uniform", timestep_shift=1.0)  # diffusers' example in effect
    s = family.sample_sigmas(c, n, image_seq_len=4096)
    assert s.min() >= 0 and s.max() < 1 and s.mean().item() == pytest.approx(0.5, abs=0.01)
    family, c = load(tiny_qwen, timestep_shift=2.2)  # musubi-tuner's documented fixed shift
    assert family.sample_sigmas(c, n, image_seq_len=256).median().item() == pytest.approx(2.2 / 3.2, abs=0.01)
    family, c = load(tiny_qwen, loss_weighting="sigma_sqrt")
    torch.testing.assert_close(family.loss_weights(c, torch.tensor([250.0, 500.0]), None), torch.tensor([16.0, 4.0]))
    with pytest.raises(FinetuneError, match="min_snr_gamma"):
        family.loss_weights(c, torch.tensor([250.0]), 5.0)


def test_single_file_needs_a_config_for_the_rest(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "qwen_image_bf16.safetensors"
    save_file({"img_in.weight": torch.zeros(1)}, path)
    with pytest.raises(FinetuneError, match="model.config") as e:
        load_family("qwen_image", path)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ recipes


def test_quickstart_trains_through_the_cli(tiny_qwen, tmp_path, monkeypatch):
    from finetune.cli import app

    monkeypatch.chdir(REPO)  # the recipe points at datasets/robot, relative to the repository
    result = CliRunner().invoke(app, ["train", "qwen-image-quickstart", f"model.base={tiny_qwen}",
                                      "training.max_steps=10", "validation.num_inference_steps=2",
                                      "output.save_every_n_steps=null", f"output.dir={tmp_path}",
                                      "output.run_name=r", "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / "r"
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "r.safetensors").is_file()
    assert len(list((run / "samples").rglob("*.png"))) >= 2


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_validate(name):
    from finetune.recipe import load_recipe

    recipe, _ = load_recipe(name)
    assert recipe.model.family == "qwen_image" and recipe.method.type == "lora"
    assert not recipe.method.train_text_encoder and recipe.training.min_snr_gamma is None
