"""Z-Image as one family: LoRA on the tiny Z-Image transformer lowers its rectified-flow loss on the
training images; the diffusers file loads with ZImagePipeline's own loader and changes the output; the
kohya file has the names ComfyUI maps for Z-Image (fused attention.qkv), applies as ComfyUI applies it
and reads back in diffusers as the same LoRA; captions are encoded as the pipeline encodes them; the
transformer is called at t = 1 - sigma with its output negated; the quickstart trains through the CLI."""

import pytest
import torch
from safetensors.torch import load_file

from finetune.families._flow import FlowOptions
from finetune.families.z_image import z_image_to_kohya

from .conftest import REPO
from .helpers import (TinyPipeline, assert_kohya_file_samples_as_diffusers_file, kohya_file, load_diffusers_file,
                      load_family, loss_before_and_after, peft_scale, real_kohya_names, tiny_model_fixture, train_lora)

REAL_NAMES = real_kohya_names("z_image")
DIM = 32  # the tiny model's width
PIPELINE = TinyPipeline("ZImagePipeline", guidance_scale=0.0)

tiny_z_image = tiny_model_fixture("z_image.build_tiny_z_image", "tiny-z-image")


@pytest.fixture(scope="module")
def trained(tiny_z_image, tmp_path_factory):
    return train_lora(tiny_z_image, tmp_path_factory.mktemp("z_image"), max_steps=80, learning_rate=1e-2)


def load(model, **options):
    return load_family("z_image", model, flow=FlowOptions(**options))


# ------------------------------------------------------------------ training and the diffusers file


def test_lora_training_lowers_the_loss_on_the_training_images(trained, tiny_z_image):
    result, data = trained
    family, c = load(tiny_z_image)
    before, after = loss_before_and_after(family, c, data, result.run_dir)
    # Measured 0.82x after 80 steps (rank 8, alpha 4, learning rate 1e-2); 0.88x after 40 at 5e-3.
    assert after < 0.9 * before, (before, after)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_diffusers_file_loads_into_every_module_and_changes_the_output(trained, tiny_z_image):
    result, _ = trained
    in_file = load_diffusers_file(PIPELINE, tiny_z_image, result.run_dir)
    # The default targets (musubi-tuner's): attention and MLP of the main blocks; no refiner, no modulation.
    assert {f"layers.{i}.{m}" for i in (0, 1) for m in ("attention.to_q", "attention.to_k", "attention.to_v",
            "attention.to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")} == in_file


# ------------------------------------------------------------------ the kohya / ComfyUI file


def test_kohya_names_and_metadata_are_what_comfyui_and_musubi_use(trained):
    result, _ = trained
    state, meta = kohya_file(result.run_dir)
    names = {k.split(".")[0] for k in state}
    assert names <= REAL_NAMES, sorted(names - REAL_NAMES)
    assert state["lora_unet_layers_0_attention_qkv.lora_up.weight"].shape == (3 * DIM, 3 * 8)
    assert state["lora_unet_layers_0_attention_qkv.alpha"].item() == 3 * 4  # rank tripled, alpha / rank kept
    assert meta["ss_base_model_version"] == "z_image" and meta["modelspec.architecture"] == "Z-Image/lora"


def test_kohya_file_applies_in_comfyui_as_the_trained_lora(trained):
    """ComfyUI adds alpha / rank * up @ down to the weight each key names; q, k and v each occupy `dim`
    rows of attention.qkv (comfy/utils.py z_image_to_diffusers), which must get exactly the trained delta."""
    result, _ = trained
    kohya = load_file(result.run_dir / "run.safetensors")
    peft = load_file(result.run_dir / "pytorch_lora_weights.safetensors")
    scale = peft_scale(result.run_dir)
    for i in (0, 1):
        for name, parts in [("attention_qkv", ["to_q", "to_k", "to_v"]), ("attention_out", ["to_out.0"])]:
            key = f"lora_unet_layers_{i}_{name}"
            down, up = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"]
            delta = kohya[f"{key}.alpha"].item() / down.shape[0] * (up @ down)
            for j, part in enumerate(parts):
                a, b = (peft[f"transformer.layers.{i}.attention.{part}.lora_{x}.weight"] for x in "AB")
                torch.testing.assert_close(delta[j * DIM:(j + 1) * DIM], scale * (b @ a), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
def test_kohya_file_loads_in_diffusers_to_the_same_model(trained, tiny_z_image):
    result, _ = trained
    assert_kohya_file_samples_as_diffusers_file(PIPELINE, tiny_z_image, result.run_dir)


def test_refiner_and_modulation_map_and_outer_layers_are_refused():
    g = torch.Generator().manual_seed(0)
    state = {}
    for m, (i, o) in {"noise_refiner.1.adaLN_modulation.0": (DIM, 4 * DIM),
                      "context_refiner.0.attention.to_k": (DIM, DIM)}.items():
        state[f"{m}.lora_A.weight"] = torch.randn(2, i, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(o, 2, generator=g)
    kohya = z_image_to_kohya(state, 2.0)
    assert {k.split(".")[0] for k in kohya} == {"lora_unet_noise_refiner_1_adaLN_modulation_0",
                                                 "lora_unet_context_refiner_0_attention_qkv"}
    # Only k is adapted: the fused weight's q and v rows get no update.
    up = kohya["lora_unet_context_refiner_0_attention_qkv.lora_up.weight"]
    assert not up[:DIM].any() and not up[2 * DIM:].any() and up[DIM:2 * DIM].any()
    with pytest.raises(ValueError, match="outside"):
        z_image_to_kohya({"t_embedder.mlp.0.lora_A.weight": torch.zeros(2, 4),
                          "t_embedder.mlp.0.lora_B.weight": torch.zeros(4, 2)}, 2.0)


# ------------------------------------------------------------------ objective


def test_captions_are_encoded_as_the_pipeline_encodes_them(tiny_z_image):
    family, c = load(tiny_z_image)
    captions = ["a photo of sks robot", ""]
    with torch.no_grad():
        enc = family.encode_prompts(c, captions)
        want, _ = c.pipeline.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert enc["prompt_embeds"].shape[:2] == enc["prompt_mask"].shape == (2, 512)
    for e, m, w in zip(enc["prompt_embeds"], enc["prompt_mask"], want):
        torch.testing.assert_close(e[m], w)
    assert family.count_truncated(c, ["word " * 600, "short"]) == 1


def test_transformer_sees_one_minus_sigma_and_its_output_is_negated(tiny_z_image, monkeypatch):
    family, c = load(tiny_z_image)
    seen = {}

    def fake(x, t, caps, return_dict=False):
        seen.update(t=t, lens=[len(cap) for cap in caps])
        return ([xi * 2.0 for xi in x],)

    monkeypatch.setattr(c, "denoiser", fake)
    with torch.no_grad():
        cond = family.encode_prompts(c, ["a", "a longer caption"])
    torch.manual_seed(0)
    noisy, timesteps, target = family.sample_noisy(c, torch.randn(2, 16, 8, 8))
    pred = family.predict(c, noisy, timesteps, cond)
    torch.testing.assert_close(seen["t"], 1 - timesteps / 1000)
    torch.testing.assert_close(pred, -2.0 * noisy)
    assert seen["lens"] == cond["prompt_mask"].sum(1).tolist() and seen["lens"][0] < seen["lens"][1]


def test_timestep_shift_follows_the_scheduler_or_the_recipe(tiny_z_image):
    torch.manual_seed(0)
    # logit-normal: median sigma 0.5 before the shift; Turbo's scheduler shift 3 makes it 3 * 0.5 / (1 + 2 * 0.5).
    family, c = load(tiny_z_image)
    assert family.sample_sigmas(c, 40000, image_seq_len=4096).median().item() == pytest.approx(0.75, abs=0.01)
    family, c = load(tiny_z_image, timestep_shift=2.0)  # the recipes' (musubi-tuner's) shift
    assert family.sample_sigmas(c, 40000, image_seq_len=4096).median().item() == pytest.approx(2 / 3, abs=0.01)


# ------------------------------------------------------------------ recipes


def test_quickstart_trains_through_the_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from finetune.cli import app

    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["train", "z-image-quickstart", f"output.dir={tmp_path}", "output.run_name=q",
                                      "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "q" / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "q" / "q.safetensors").is_file()


def test_z_image_recipes_validate():
    from finetune.recipe import load_recipe

    for name in ("z-image-lora", "z-image-subject", "z-image-style", "z-image-quickstart"):
        recipe, _ = load_recipe(name)
        assert recipe.model.family == "z_image" and recipe.method.type == "lora"
        assert not recipe.method.train_text_encoder and recipe.training.min_snr_gamma is None
