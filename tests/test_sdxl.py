"""SDXL as one family: LoRA on the UNet and both text encoders trains the tiny SDXL (its loss on
the training images falls), the diffusers file loads with StableDiffusionXLPipeline's own loader
and changes the output, and the kohya file uses the original UNet names real SDXL LoRAs use and
loads in diffusers to the very same model."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from .helpers import (TinyPipeline, load_family, loss_before_and_after, tiny_model_fixture, train_lora, train_quietly,
                      two_image_recipe)

# Module names from real SDXL LoRAs made by kohya's sdxl_train_network.py (input_blocks 4/5 and
# 7/8, middle_block 1, output_blocks 0-5 hold the transformers; te1/te2 are CLIP-L and bigG).
REAL_SDXL_NAMES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_input_blocks_8_1_transformer_blocks_1_ff_net_2",
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0",
    "lora_unet_output_blocks_5_1_proj_out",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te2_text_model_encoder_layers_1_self_attn_out_proj",
}
PIPELINE = TinyPipeline("StableDiffusionXLPipeline")

tiny_sdxl = tiny_model_fixture("sdxl.build_tiny_sdxl", "tiny-sdxl")


@pytest.fixture(scope="module")
def trained(tiny_sdxl, tmp_path_factory):
    return train_lora(tiny_sdxl, tmp_path_factory.mktemp("sdxl"), max_steps=50, learning_rate=5e-3, alpha=8,
                      train_text_encoder=True)


def test_lora_training_lowers_the_loss_on_the_training_images(trained, tiny_sdxl):
    result, data = trained
    family, c = load_family("sdxl", tiny_sdxl)
    before, after = loss_before_and_after(family, c, data, result.run_dir)
    # Measured 0.91x: the tiny SDXL has attention only at its 4x4 and 2x2 latent levels (as the real
    # one has none at its first level), so a LoRA there moves the loss less than on the tiny SD1.5.
    assert after < 0.95 * before, (before, after)


@pytest.mark.smoke
def test_both_files_load_with_diffusers_and_agree(trained, tiny_sdxl):
    result, _ = trained
    run = result.run_dir
    pipe = PIPELINE.load(tiny_sdxl)
    plain = PIPELINE.image(pipe)
    pipe.load_lora_weights(str(run), weight_name="pytorch_lora_weights.safetensors", adapter_name="d")
    with_diffusers = PIPELINE.image(pipe)
    assert np.abs(with_diffusers - plain).max() > 1e-3, "the LoRA did not change the output"
    # Every UNet and text-encoder module got its LoRA (none silently dropped by the loader).
    adapters = pipe.get_list_adapters()
    assert all("d" in adapters.get(k, []) for k in ("unet", "text_encoder", "text_encoder_2")), adapters

    pipe = PIPELINE.load(tiny_sdxl)
    pipe.load_lora_weights(str(run), weight_name="run.safetensors", adapter_name="k")
    with_kohya = PIPELINE.image(pipe)
    # diffusers maps the original UNet names back on its own: the same model, within fp32 rounding.
    assert np.abs(with_kohya - with_diffusers).max() < 1e-4


def test_kohya_names_are_the_real_sdxl_ones(trained):
    result, _ = trained
    with safe_open(str(result.run_dir / "run.safetensors"), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
        meta = f.metadata()
    assert REAL_SDXL_NAMES <= names, sorted(REAL_SDXL_NAMES - names)
    assert not [n for n in names if "down_blocks" in n or "up_blocks" in n or "mid_block" in n]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-xl")


def test_size_and_crop_conditioning_reaches_the_unet(tiny_sdxl):
    """A small image upscaled into its bucket and one that fills it train with different
    conditioning: the time ids carry each image's original size and crop."""
    family, c = load_family("sdxl", tiny_sdxl)
    batch = {"original_size": [(40, 40), (64, 64)], "crop_top_left": [(0, 0), (3, 5)], "target_size": [(64, 64)] * 2}
    ids = family.image_conditioning(c, batch)["time_ids"]
    assert ids.tolist() == [[40, 40, 0, 0, 64, 64], [64, 64, 3, 5, 64, 64]]
    cond = {**family.encode_prompts(c, ["a", "a"]), "time_ids": ids}
    latents = torch.randn(2, 4, 8, 8)
    out = family.predict(c, latents, torch.tensor([500, 500]), cond)
    same = family.predict(c, latents, torch.tensor([500, 500]), {**cond, "time_ids": ids[[1, 1]]})
    assert not torch.allclose(out[0], same[0])


@pytest.fixture(scope="module")
def ti_run(tiny_sdxl, tmp_path_factory):
    r = two_image_recipe(tiny_sdxl, tmp_path_factory.mktemp("sdxl-ti"), training__max_steps=4)
    r["method"] = {"type": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x",
                   "num_vectors": 2, "caption": "a photo of <sks>"}
    r["training"]["learning_rate"] = 5e-2
    return train_quietly(r)


@pytest.mark.smoke
def test_textual_inversion_learns_a_token_in_both_encoders_and_loads_in_diffusers(ti_run, tiny_sdxl):
    from safetensors.torch import load_file

    run = ti_run.run_dir
    l, g = load_file(run / "learned_embeds.safetensors"), load_file(run / "learned_embeds_2.safetensors")
    webui = load_file(run / "run.safetensors")
    assert set(webui) == {"clip_l", "clip_g"} and webui["clip_l"].shape == (2, 32) and webui["clip_g"].shape == (2, 48)
    assert torch.equal(webui["clip_l"], l["<sks>"]) and torch.equal(webui["clip_g"], g["<sks>"])
    # The two encoders learned different vectors from the same starting word.
    assert not torch.equal(l["<sks>"], g["<sks>"])

    pipe = PIPELINE.load(tiny_sdxl)

    def image(pipe):
        return PIPELINE.image(pipe, "a photo of <sks>")

    pipe.load_textual_inversion(l["<sks>"], token="<sks>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(g["<sks>"], token="<sks>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    first = image(pipe)
    # The webui file, split the way webui/ComfyUI read it, gives the same model.
    pipe2 = PIPELINE.load(tiny_sdxl)
    pipe2.load_textual_inversion(webui["clip_l"], token="<sks>", text_encoder=pipe2.text_encoder, tokenizer=pipe2.tokenizer)
    pipe2.load_textual_inversion(webui["clip_g"], token="<sks>", text_encoder=pipe2.text_encoder_2, tokenizer=pipe2.tokenizer_2)
    assert np.abs(image(pipe2) - first).max() < 1e-5
    assert np.abs(first - image(PIPELINE.load(tiny_sdxl))).max() > 1e-3, "the embeddings did not change the output"
    # Every other weight of both encoders is untouched.
    base = PIPELINE.load(tiny_sdxl)
    for name in ("text_encoder", "text_encoder_2"):
        trained = ti_run.components.text_encoders[name].get_input_embeddings().weight
        ref = getattr(base, name).get_input_embeddings().weight
        assert torch.equal(trained[: ref.shape[0]], ref)


def test_pivotal_tuning_on_sdxl_saves_both_halves(tiny_sdxl, tmp_path):
    r = two_image_recipe(tiny_sdxl, tmp_path, training__max_steps=2)
    r["method"] = {"type": "pivotal", "placeholder_token": "<sks>", "initializer_token": "x",
                   "caption": "a photo of <sks>", "rank": 4}
    result = train_quietly(r)
    names = {p.name for p in result.run_dir.glob("*.safetensors")}
    assert {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "learned_embeds_2.safetensors",
            "run.safetensors", "run-emb.safetensors"} <= names


@pytest.mark.smoke
def test_dreambooth_on_sdxl_writes_a_single_file_diffusers_reads_back(tiny_sdxl, tmp_path):
    """Full fine-tune: the original-layout single file (SGM keys, bigG in OpenCLIP layout) loads
    with StableDiffusionXLPipeline.from_single_file and holds the trained UNet and encoders."""
    from diffusers import StableDiffusionXLPipeline

    r = two_image_recipe(tiny_sdxl, tmp_path, training__max_steps=2)
    r["method"] = {"type": "dreambooth", "train_text_encoder": True}
    r["output"]["save_dtype"] = "fp32"
    result = train_quietly(r)
    single = result.run_dir / "run.safetensors"
    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    pipe = StableDiffusionXLPipeline.from_single_file(str(single), config=str(tiny_sdxl))
    trained = StableDiffusionXLPipeline.from_pretrained(result.run_dir / "model")
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(trained, name).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b if k in a), name
        assert len([k for k in b if k not in a and "position_ids" not in k]) == 0, name
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl).unet.state_dict()
    assert any(not torch.equal(base[k], trained.unet.state_dict()[k]) for k in base), "the UNet did not train"


def test_a_user_chosen_vae_replaces_the_models_own(tiny_sdxl, tmp_path):
    """model.vae (e.g. an fp16-fix VAE) is the one that encodes the training images."""
    from diffusers import AutoencoderKL

    from finetune.errors import FinetuneError

    other = tmp_path / "other-vae"
    AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae").save_pretrained(other)
    with torch.no_grad():
        vae = AutoencoderKL.from_pretrained(other)
        vae.encoder.conv_in.weight.mul_(0.5)
        vae.save_pretrained(other)
    r = two_image_recipe(tiny_sdxl, tmp_path, training__max_steps=1)
    r["model"]["vae"] = str(other)
    result = train_quietly(r)
    assert torch.equal(result.components.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    r["model"]["vae"] = str(tmp_path / "missing")
    r["output"]["run_name"] = "r2"
    with pytest.raises(FinetuneError, match="model.vae: cannot load"):
        train_quietly(r)


def test_unet_and_each_text_encoder_have_their_own_learning_rate(tiny_sdxl, tmp_path):
    r = two_image_recipe(tiny_sdxl, tmp_path, training__max_steps=1)
    r["method"].update(train_text_encoder=True, text_encoder_lr=3e-5, text_encoder_2_lr=1e-5)
    result = train_quietly(r)
    assert [g["lr"] for g in result.optimizer.param_groups] == [1e-3, 3e-5, 1e-5]
