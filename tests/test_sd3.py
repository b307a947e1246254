"""SD3/SD3.5 as one family: LoRA on the tiny SD3.5 Medium lowers its rectified-flow loss on the training
images; the diffusers file loads with StableDiffusion3Pipeline's own loader and changes the output; the
kohya file has real SD3.5 Medium names (original MMDiT modules, fused q/k/v, attn2) and applies as ComfyUI
applies it; CLIP-L and CLIP-G take a text-encoder LoRA and T5 does not; the objective is the reference
trainers' (shift 3.0, sigma^2 preconditioning weight); the recipes validate and the quickstart trains."""

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import FinetuneError, RecipeError
from finetune.families.sd3 import sd3_to_kohya, sd3_version
from finetune.recipe import load_recipe

from .conftest import REPO
from .helpers import (TinyPipeline, assert_kohya_applies_as_trained, fused_qkv_targets, kohya_file,
                      load_diffusers_file, load_family, lora_modules, loss_before_and_after, real_kohya_names,
                      tiny_model_fixture, train_lora, train_quietly, two_image_recipe)

REAL_NAMES = real_kohya_names("sd3")
INNER = 32  # the tiny model's width (heads x head dim)
PIPELINE = TinyPipeline("StableDiffusion3Pipeline")

tiny_sd3 = tiny_model_fixture("sd3.build_tiny_sd3", "tiny-sd3")


@pytest.fixture(scope="module")
def trained(tiny_sd3, tmp_path_factory):
    return train_lora(tiny_sd3, tmp_path_factory.mktemp("sd3"), max_steps=40, learning_rate=5e-3)


def load(model, **flow):
    return load_family("sd3", model, flow=flow)


# ------------------------------------------------------------------ training and the diffusers file


def test_lora_training_lowers_the_loss_on_the_training_images(trained, tiny_sd3):
    result, data = trained
    family, c = load(tiny_sd3)
    before, after = loss_before_and_after(family, c, data, result.run_dir)
    # Measured 0.937x after 40 steps (rank 8, alpha 4, learning rate 5e-3), and no lower with 3x the steps or
    # rate: SD3's VAE scale (1.5305) gives the tiny random VAE latents of std 1.65, so most of the velocity
    # target is the image itself, which a LoRA on a random 2-block model cannot memorise (FLUX's 0.36 leaves
    # mostly the noise part, which it can: 0.80x there).
    assert after < 0.96 * before, (before, after)


@pytest.mark.smoke
def test_diffusers_file_loads_into_every_module_and_changes_the_output(trained, tiny_sd3):
    result, _ = trained
    in_file = load_diffusers_file(PIPELINE, tiny_sd3, result.run_dir)
    # The default targets: both streams' attention, SD3.5 Medium's attn2, both MLPs; no modulation.
    assert {"transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.to_out.0", "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.attn.add_v_proj"} <= in_file
    assert not [m for m in in_file if "norm" in m or m == "proj_out"]


def test_diffusers_sd3_loader_reads_no_kohya_layout(trained, tiny_sd3):
    """Why the diffusers file is the one for diffusers users: StableDiffusion3Pipeline converts no
    kohya names and loads nothing from such a file, silently (diffusers 0.42.1)."""
    result, _ = trained
    pipe = PIPELINE.load(tiny_sd3)
    pipe.load_lora_weights(load_file(result.run_dir / "run.safetensors"), adapter_name="k")
    assert pipe.get_list_adapters() == {}


# ------------------------------------------------------------------ the kohya / ComfyUI file


def test_kohya_names_and_metadata_are_the_real_sd35_medium_ones(trained):
    result, _ = trained
    state, meta = kohya_file(result.run_dir)
    names = {k.split(".")[0] for k in state}
    assert names <= REAL_NAMES, sorted(names - REAL_NAMES)
    assert {f"lora_unet_joint_blocks_0_{m}" for m in
            ("x_block_attn_qkv", "x_block_attn_proj", "x_block_attn2_qkv", "x_block_attn2_proj", "x_block_mlp_fc1",
             "x_block_mlp_fc2", "context_block_attn_qkv", "context_block_attn_proj", "context_block_mlp_fc1",
             "context_block_mlp_fc2")} <= names
    # The last block's context stream has only its fused qkv (no output projection, no MLP).
    assert [n for n in names if "joint_blocks_1_context" in n] == ["lora_unet_joint_blocks_1_context_block_attn_qkv"]
    assert state["lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight"].shape == (3 * INNER, 3 * 8)
    assert state["lora_unet_joint_blocks_0_x_block_attn2_qkv.alpha"].item() == 3 * 4.0  # three parts of alpha 4
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert "modelspec.prediction_type" not in meta


def _comfyui_targets(n_blocks: int, dual: set[int], h: int) -> dict[str, tuple[str, int, int | None]]:
    """diffusers Linear -> (original weight, first row, rows): ComfyUI's comfy/utils.py mmdit_to_diffusers
    (commit 41444b5236c613ee5ff7d09aa620f94b702f30eb) for attn and the MLPs, diffusers'
    convert_sd3_transformer_checkpoint_to_diffusers for attn2 (ComfyUI's diffusers map has none), restated."""
    table = {}
    for i in range(n_blocks):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        table.update(fused_qkv_targets(d, o + "x_block.attn.qkv", o + "context_block.attn.qkv", h))
        if i in dual:
            for j, x in enumerate(("to_q", "to_k", "to_v")):
                table[d + "attn2." + x] = (o + "x_block.attn2.qkv", j * h, h)
        pairs = [("attn.to_out.0", "x_block.attn.proj"), ("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2")]
        if i < n_blocks - 1:
            pairs += [("attn.to_add_out", "context_block.attn.proj"), ("ff_context.net.0.proj", "context_block.mlp.fc1"),
                      ("ff_context.net.2", "context_block.mlp.fc2")]
        if i in dual:
            pairs += [("attn2.to_out.0", "x_block.attn2.proj")]
        table.update({d + ours: (o + original, 0, None) for ours, original in pairs})
    return table


def test_kohya_file_applies_in_comfyui_as_the_trained_lora(trained):
    """ComfyUI adds alpha / rank * up @ down to the original weight each key names; every slice of every
    fused qkv must get exactly the trained module's delta."""
    result, _ = trained
    assert_kohya_applies_as_trained(result.run_dir, _comfyui_targets(2, {0}, INNER))


def test_modulations_and_outer_layers_map_with_their_halves_swapped_where_diffusers_swaps_them():
    h, rank = 4, 2
    g = torch.Generator().manual_seed(0)
    shapes = {"transformer_blocks.0.norm1_context.linear": 6 * h, "transformer_blocks.1.norm1_context.linear": 2 * h,
              "norm_out.linear": 2 * h, "proj_out": 16}
    state = {}
    for m, rows in shapes.items():
        state[f"{m}.lora_A.weight"] = torch.randn(rank, h, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(rows, rank, generator=g)
    out = sd3_to_kohya(state, 2.0)
    assert {k.split(".")[0] for k in out} <= REAL_NAMES
    up = out["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"]
    b = state["transformer_blocks.1.norm1_context.linear.lora_B.weight"]
    assert torch.equal(up, torch.cat([b[h:], b[:h]]))  # AdaLayerNormContinuous: (scale, shift) -> (shift, scale)
    b0 = state["transformer_blocks.0.norm1_context.linear.lora_B.weight"]
    assert torch.equal(out["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight"], b0)
    with pytest.raises(ValueError, match="no counterpart in the original SD3 layout"):
        sd3_to_kohya({"pos_embed.proj.lora_A.weight": torch.zeros(2, 4),
                      "pos_embed.proj.lora_B.weight": torch.zeros(4, 2)}, 2.0)


def test_the_release_is_read_from_the_transformer_config():
    assert sd3_version({"qk_norm": None, "dual_attention_layers": []}) == "medium"
    assert sd3_version({"qk_norm": "rms_norm", "dual_attention_layers": list(range(13))}) == "5-medium"
    assert sd3_version({"qk_norm": "rms_norm", "dual_attention_layers": []}) == "5-large"


# ------------------------------------------------------------------ text encoders


def test_clip_l_and_clip_g_loras_train_and_t5_stays_frozen(tiny_sd3, tmp_path):
    r = two_image_recipe(tiny_sd3, tmp_path, training__max_steps=3)
    r["method"].update(train_text_encoder=True, text_encoder_lr=1e-3)
    result = train_quietly(r)
    c = result.components
    assert lora_modules(c.text_encoders["text_encoder"]) and lora_modules(c.text_encoders["text_encoder_2"])
    assert not lora_modules(c.text_encoders["text_encoder_3"])
    names = {k.split(".")[0] for k in load_file(result.run_dir / "run.safetensors")}
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_1_self_attn_out_proj"} <= names and names <= REAL_NAMES
    pipe = PIPELINE.load(tiny_sd3)
    pipe.load_lora_weights(str(result.run_dir), adapter_name="d")
    assert set(pipe.get_list_adapters()) == {"transformer", "text_encoder", "text_encoder_2"}


# ------------------------------------------------------------------ objective


def test_timesteps_are_shifted_by_three_and_inputs_are_rectified_flow(tiny_sd3):
    family, c = load(tiny_sd3)
    torch.manual_seed(0)
    latents = torch.randn(3, 16, 9, 10)  # an odd latent side: 2x2 patches need even ones
    noisy, timesteps, target = family.sample_noisy(c, latents)
    assert noisy.shape == target.shape == (3, 16, 8, 10)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy - sigma * target, latents[..., :8, :10], rtol=1e-5, atol=1e-5)
    # logit-normal's median 0.5 under SD3's fixed shift 3: 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    _, t, _ = family.sample_noisy(c, torch.zeros(20000, 16, 2, 2))
    assert (t / 1000).median().item() == pytest.approx(0.75, abs=0.01)
    cond = family.encode_prompts(c, ["a", "b", "c"])
    assert cond["prompt_embeds"].shape == (3, 77 + 256, 96) and cond["pooled_prompt_embeds"].shape == (3, 32 + 48)
    with torch.no_grad():
        assert family.predict(c, noisy, timesteps, cond).shape == noisy.shape
    assert family.count_truncated(c, ["short", "x " * 300]) == 1


def test_loss_is_weighted_as_the_reference_trainers_precondition_it(tiny_sd3):
    t = torch.tensor([250.0, 500.0])
    family, c = load(tiny_sd3)
    torch.testing.assert_close(family.loss_weights(c, t, None), torch.tensor([0.0625, 0.25]))
    family, c = load(tiny_sd3, loss_weighting="sigma_sqrt")  # 1 / sigma^2 cancels the preconditioning
    torch.testing.assert_close(family.loss_weights(c, t, None), torch.ones(2))
    with pytest.raises(FinetuneError, match="min_snr_gamma"):
        family.loss_weights(c, t, 5.0)


# ------------------------------------------------------------------ loading, recipes, CLI


def test_model_vae_must_have_sixteen_latent_channels_and_a_single_file_needs_a_config(tiny_sd3, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(tmp_path / "sd-vae")
    with pytest.raises(FinetuneError, match="16-channel"):
        load_family("sd3", tiny_sd3, vae=str(tmp_path / "sd-vae"))
    path = tmp_path / "sd3.5_medium.safetensors"
    save_file({"x_embedder.proj.weight": torch.zeros(1)}, path)
    with pytest.raises(FinetuneError, match="model.config") as e:
        load_family("sd3", path)
    assert "\n" not in str(e.value)


def test_sd3_recipes_validate_and_embeddings_are_refused(tmp_path):
    for name in ("sd3-lora", "sd3-subject", "sd3-style", "sd3-quickstart"):
        recipe, _ = load_recipe(name)
        assert recipe.model.family == "sd3" and recipe.method.type == "lora"
    path = tmp_path / "ti.yaml"
    path.write_text(json.dumps({"data": {"path": str(REPO / "datasets" / "robot")}, "model": {"base": "builtin:tiny-sd3"},
                                "method": {"type": "textual_inversion", "placeholder_token": "<sks>",
                                           "initializer_token": "robot"}}))
    with pytest.raises(RecipeError, match="method.type: textual_inversion is not available for SD3/SD3.5"):
        load_recipe(path)


def test_quickstart_trains_through_the_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from finetune.cli import app

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    out = CliRunner().invoke(app, ["train", "sd3-quickstart", f"output.dir={tmp_path / 'out'}", "training.max_steps=20",
                                   "validation.every_n_steps=20", "output.save_every_n_steps=20"])
    assert out.exit_code == 0, out.output
    run = next((tmp_path / "out").iterdir())
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / f"{run.name}.safetensors").is_file()
