"""FLUX.2 [dev] and [klein] as one family: a LoRA on the tiny FLUX.2 transformer lowers its
rectified-flow loss on the training images; the diffusers file loads with the pipeline's own loader
and changes the output; the kohya file has the real FLUX.2 LoRA names (BFL modules, fused q/k/v),
applies as ComfyUI applies it and reads back in diffusers as the same LoRA; latents, prompt
embeddings and the shift are the pipeline's; [klein] trains and exports as itself."""

import numpy as np
import pytest
import torch

from finetune.errors import FinetuneError
from finetune.families.flux2 import flux2_to_kohya
from finetune.recipe import validate

from .conftest import REPO
from .helpers import (TinyPipeline, assert_frozen, assert_kohya_applies_as_trained,
                      assert_kohya_file_samples_as_diffusers_file, bfl_block_names, bfl_double_block_targets,
                      kohya_file, load_diffusers_file, load_family, lora_modules, loss_before_and_after,
                      real_kohya_names, tiny_model_fixture, tiny_recipe, train_lora, train_quietly, two_image_recipe)

REAL_NAMES = real_kohya_names("flux2")
INNER = 32  # the tiny model's width (heads x head dim)
# Whichever class model_index.json names: Flux2Pipeline for [dev], Flux2KleinPipeline for [klein].
PIPELINE = TinyPipeline("DiffusionPipeline")

tiny_dev = tiny_model_fixture("flux2.build_tiny_flux2", "tiny-flux2")
tiny_klein = tiny_model_fixture("flux2.build_tiny_flux2_klein", "tiny-flux2-klein")


@pytest.fixture(scope="module")
def trained(tiny_dev, tmp_path_factory):
    return train_lora(tiny_dev, tmp_path_factory.mktemp("flux2"), max_steps=40, learning_rate=1e-2)


def load(model, **options):
    return load_family("flux2", model, flow=options)


# ------------------------------------------------------------------ training and the diffusers file


def test_lora_training_lowers_the_loss_on_the_training_images(trained, tiny_dev):
    result, data = trained
    family, c = load(tiny_dev)
    before, after = loss_before_and_after(family, c, data, result.run_dir)
    # Measured 0.87x after 40 steps (rank 8, alpha 4, learning rate 1e-2): most of the velocity target is
    # the noise itself, which no model predicts; FLUX.1's 16-channel tiny model gets 0.80x.
    assert after < 0.92 * before, (before, after)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


@pytest.mark.smoke
def test_diffusers_file_loads_into_every_module_and_changes_the_output(trained, tiny_dev):
    result, _ = trained
    in_file = load_diffusers_file(PIPELINE, tiny_dev, result.run_dir)
    # Every Linear of both block kinds (musubi-tuner's coverage); no modulation, nothing outside the blocks.
    for m in ("transformer_blocks.1.attn.add_v_proj", "transformer_blocks.0.ff_context.linear_out",
              "transformer_blocks.0.ff.linear_in", "single_transformer_blocks.1.attn.to_qkv_mlp_proj",
              "single_transformer_blocks.0.attn.to_out"):
        assert m in in_file, m
    assert not [m for m in in_file if "modulation" in m or not m.split(".")[0].endswith("transformer_blocks")]


def test_frozen_parts_unchanged(trained, tiny_dev):
    result, _ = trained
    c = result.components
    assert_frozen(c.denoiser, tiny_dev / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not lora_modules(c.text_encoders["text_encoder"])


# ------------------------------------------------------------------ the kohya / ComfyUI file


def test_kohya_names_shapes_and_metadata_are_the_real_flux2_ones(trained):
    result, _ = trained
    state, meta = kohya_file(result.run_dir)
    names = {k.split(".")[0] for k in state}
    assert names <= REAL_NAMES, sorted(names - REAL_NAMES)
    for i in (0, 1):
        assert bfl_block_names(i) <= names, sorted(bfl_block_names(i) - names)
    # Fused weights have the real proportions: qkv 3 x width; SwiGLU in 2 x 3 x width; linear1 3 + 6, linear2 in 1 + 3.
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape[0] == 3 * INNER
    assert state["lora_unet_double_blocks_0_img_mlp_0.lora_up.weight"].shape[0] == 6 * INNER
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape[0] == 9 * INNER
    assert state["lora_unet_single_blocks_0_linear2.lora_down.weight"].shape[1] == 4 * INNER
    assert meta["ss_base_model_version"] == "flux_2_dev"
    assert meta["modelspec.architecture"] == "Flux.2-dev/lora"


def _comfyui_targets(n_double: int, n_single: int, h: int) -> dict[str, tuple[str, int, int | None]]:
    """diffusers Linear -> (BFL weight, first row, rows): the inverse of diffusers'
    scripts/convert_flux2_to_diffusers.py (58eb52c0803ea9af3abec60841c2a093bdf1f951), restated here."""
    table = bfl_double_block_targets(n_double, h, "linear_in", "linear_out")
    for i in range(n_single):
        s, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        table[s + "attn.to_qkv_mlp_proj"] = (b + "linear1", 0, None)
        table[s + "attn.to_out"] = (b + "linear2", 0, None)
    return table


def test_kohya_file_applies_in_comfyui_as_the_trained_lora(trained):
    """ComfyUI adds alpha / rank * up @ down to the BFL weight each key names; every slice of every fused
    weight must get exactly the trained module's delta."""
    result, _ = trained
    assert_kohya_applies_as_trained(result.run_dir, _comfyui_targets(2, 2, INNER))


@pytest.mark.smoke
def test_kohya_file_loads_in_diffusers_to_the_same_model(trained, tiny_dev):
    """diffusers' Flux2LoraLoaderMixin converts the kohya layout itself; the result must equal the diffusers file."""
    result, _ = trained
    assert_kohya_file_samples_as_diffusers_file(PIPELINE, tiny_dev, result.run_dir)


def test_outer_layers_map_and_unknown_modules_are_refused():
    rank, g = 2, torch.Generator().manual_seed(0)
    shapes = {"norm_out.linear": (INNER, 2 * INNER), "double_stream_modulation_img.linear": (INNER, 12 * INNER),
              "time_guidance_embed.guidance_embedder.linear_1": (256, INNER)}
    state = {}
    for m, (i, o) in shapes.items():
        state[f"{m}.lora_A.weight"] = torch.randn(rank, i, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(o, rank, generator=g)
    kohya = flux2_to_kohya(state, 2.0)
    assert {k.split(".")[0] for k in kohya} <= REAL_NAMES
    # BFL's final layer emits (shift, scale), diffusers' (scale, shift): the halves swap.
    up = kohya["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    torch.testing.assert_close(up, torch.cat(state["norm_out.linear.lora_B.weight"].chunk(2)[::-1]))
    bad = {"transformer_blocks.0.attn.norm_q.lora_A.weight": torch.zeros(2, 4),
           "transformer_blocks.0.attn.norm_q.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="no counterpart"):
        flux2_to_kohya(bad, 2.0)


# ------------------------------------------------------------------ latents, prompts, objective


def test_latents_and_prompt_embeddings_are_the_pipelines_own(tiny_dev):
    family, c = load(tiny_dev)
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        ours = family.encode_images(c, pixels)
        theirs = c.pipeline._encode_vae_image(pixels, generator=None)  # mode, patchify, batch norm
    assert ours.shape == (2, 128, 4, 3)
    torch.testing.assert_close(ours, theirs)
    cond = family.encode_prompts(c, ["a photo", "sks robot on a beach"])
    embeds, _ = c.pipeline.encode_prompt(["a photo", "sks robot on a beach"], device="cpu")
    assert cond["prompt_embeds"].shape == (2, 512, 48)
    torch.testing.assert_close(cond["prompt_embeds"], embeds)
    assert family.count_truncated(c, ["short", "x" * 600]) == 1  # byte tokens: 600 + the chat template > 512


def test_noisy_input_target_and_prediction_layout(tiny_dev):
    from diffusers import Flux2Pipeline

    family, c = load(tiny_dev)
    latents = torch.randn(3, 128, 4, 6)
    noisy, timesteps, target = family.sample_noisy(c, latents)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy - sigma * target, latents, rtol=1e-5, atol=1e-5)
    cond = family.encode_prompts(c, ["a", "b", "c"])
    with torch.no_grad():
        pred = family.predict(c, noisy, timesteps, cond)
        packed = c.denoiser(hidden_states=Flux2Pipeline._pack_latents(noisy), timestep=timesteps / 1000,
                            guidance=torch.full((3,), 1.0), encoder_hidden_states=cond["prompt_embeds"],
                            txt_ids=Flux2Pipeline._prepare_text_ids(cond["prompt_embeds"]),
                            img_ids=Flux2Pipeline._prepare_latent_ids(noisy), return_dict=False)[0]
    # Unpacked as the pipeline unpacks (by the position ids), at an odd aspect ratio.
    torch.testing.assert_close(pred, Flux2Pipeline._unpack_latents_with_ids(packed, Flux2Pipeline._prepare_latent_ids(noisy)))


def test_shift_follows_the_pipelines_resolution_rule(tiny_dev):
    torch.manual_seed(0)
    n = 40000
    family, c = load(tiny_dev)
    # compute_empirical_mu at 200 steps: mu 0.5 at 256 tokens (512 px), 1.15 at 4096 (1024 px); median e^mu/(e^mu+1).
    assert family.sample_sigmas(c, n, image_seq_len=256).median().item() == pytest.approx(0.6225, abs=0.01)
    assert family.sample_sigmas(c, n, image_seq_len=4096).median().item() == pytest.approx(0.7595, abs=0.01)
    family, c = load(tiny_dev, timestep_shift=1.0)  # diffusers' example: the unshifted draw
    s = family.sample_sigmas(c, n, image_seq_len=4096)
    assert torch.log(s / (1 - s)).mean().item() == pytest.approx(0.0, abs=0.03)


def test_guidance_embedding_loss_weighting_and_min_snr(tiny_dev):
    family, c = load(tiny_dev, guidance_scale=1.0, loss_weighting="sigma_sqrt")
    torch.manual_seed(0)
    noisy, t, _ = family.sample_noisy(c, torch.randn(1, 128, 2, 2))
    cond = family.encode_prompts(c, ["a photo"])
    with torch.no_grad():
        one = family.predict(c, noisy, t, cond)
        c.extras["flow"] = c.extras["flow"].model_copy(update={"guidance_scale": 4.0})
        assert (family.predict(c, noisy, t, cond) - one).abs().max() > 1e-4
    torch.testing.assert_close(family.loss_weights(c, torch.tensor([250.0, 500.0]), None), torch.tensor([16.0, 4.0]))
    with pytest.raises(FinetuneError, match="min_snr_gamma"):
        family.loss_weights(c, torch.tensor([250.0]), 5.0)


# ------------------------------------------------------------------ [klein], recipes, refusals


def test_klein_trains_loads_and_exports_as_klein(tiny_klein, tmp_path):
    from diffusers import Flux2KleinPipeline

    result = train_quietly(two_image_recipe(tiny_klein, tmp_path, training__max_steps=3, training__learning_rate=5e-3))
    assert result.components.extras["guidance_embeds"] is False
    pipe = PIPELINE.load(tiny_klein)
    assert isinstance(pipe, Flux2KleinPipeline)
    plain = PIPELINE.image(pipe)
    pipe.load_lora_weights(str(result.run_dir), adapter_name="d")
    assert np.abs(PIPELINE.image(pipe) - plain).max() > 1e-4
    state, meta = kohya_file(result.run_dir)
    names = {k.split(".")[0] for k in state}
    assert names <= REAL_NAMES and "lora_unet_single_blocks_1_linear1" in names
    assert meta["ss_base_model_version"] == "flux_2_klein_4b" and meta["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert "Flux2KleinPipeline" in (result.run_dir / "README.md").read_text()


def test_klein_samples_with_a_negative_prompt_only_above_guidance_one(tiny_klein):
    family, c = load(tiny_klein)
    assert set(family.prompt_embeddings(c, "a photo", None, 1.0)) == {"prompt_embeds"}
    kw = family.prompt_embeddings(c, "a photo", "blurry", 4.0)
    torch.testing.assert_close(kw["negative_prompt_embeds"], family.encode_prompts(c, ["blurry"])["prompt_embeds"])
    assert family.count_truncated(c, ["short", "x" * 600]) == 1


def test_text_encoder_lora_and_textual_inversion_are_refused(tiny_dev, tmp_path):
    from finetune.recipe.loader import method_problems

    ti = {"type": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"}
    for method in ({"type": "lora", "rank": 4, "alpha": 4, "train_text_encoder": True}, ti):
        r = tiny_recipe(tiny_dev, tmp_path, tmp_path / "out")
        r["method"] = method
        (why,) = method_problems(validate(r, "test"))
        assert "FLUX.2" in why and ("LoRA" in why or "lora" in why), why


def test_quickstart_trains_through_the_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from finetune.cli import app

    monkeypatch.chdir(REPO)  # the recipe points at datasets/robot
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    args = ["train", "flux2-quickstart", f"output.dir={tmp_path}", "output.run_name=r", "training.max_steps=20",
            "validation.every_n_steps=20", "validation.num_inference_steps=2", "--no-progress"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "r" / "r.safetensors").is_file()
    assert list((tmp_path / "r" / "samples").rglob("*.png"))


def test_flux2_recipes_validate():
    from finetune.recipe import load_recipe

    for name in ("flux2-lora", "flux2-subject", "flux2-style", "flux2-klein-lora", "flux2-quickstart"):
        recipe, _ = load_recipe(name)
        assert recipe.model.family == "flux2" and recipe.method.type == "lora", name
        assert not recipe.method.train_text_encoder and recipe.training.min_snr_gamma is None
