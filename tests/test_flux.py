"""FLUX.1 as one family: LoRA on the tiny FLUX transformer lowers its rectified-flow loss on the
training images; the diffusers file loads with FluxPipeline's own loader and changes the output;
the kohya file has the real FLUX LoRA names (BFL modules, fused q/k/v), applies as ComfyUI applies
it, and reads back in diffusers as the same LoRA; timestep sampling and shift give the numbers FLUX
samples with; [schnell] (no guidance embedding) trains too."""

import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.families.flux import FluxOptions, flux_to_kohya

from .helpers import (TinyPipeline, assert_frozen, assert_kohya_applies_as_trained, bfl_block_names,
                      bfl_double_block_targets, kohya_file, load_diffusers_file, load_family, lora_modules,
                      loss_before_and_after, real_kohya_names, tiny_model_fixture, train_lora, train_quietly,
                      two_image_recipe)

REAL_NAMES = real_kohya_names("flux")
INNER = 32  # the tiny model's width (heads x head dim)
PIPELINE = TinyPipeline("FluxPipeline")

tiny_flux = tiny_model_fixture("flux.build_tiny_flux", "tiny-flux")
tiny_schnell = tiny_model_fixture("flux.build_tiny_flux", "tiny-flux-schnell", variant="schnell")


@pytest.fixture(scope="module")
def trained(tiny_flux, tmp_path_factory):
    return train_lora(tiny_flux, tmp_path_factory.mktemp("flux"), max_steps=40, learning_rate=5e-3)


def load(model, **options):
    return load_family("flux", model, flow=FluxOptions(**options))


# ------------------------------------------------------------------ training and the diffusers file


def test_lora_training_lowers_the_loss_on_the_training_images(trained, tiny_flux):
    result, data = trained
    family, c = load(tiny_flux)
    before, after = loss_before_and_after(family, c, data, result.run_dir)
    # Measured 0.80x after 40 steps (rank 8, alpha 4, learning rate 5e-3).
    assert after < 0.9 * before, (before, after)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


@pytest.mark.smoke
def test_diffusers_file_loads_into_every_module_and_changes_the_output(trained, tiny_flux):
    result, _ = trained
    in_file = load_diffusers_file(PIPELINE, tiny_flux, result.run_dir)
    # The default targets: attention and MLPs of both block kinds, no modulation, not the final layer.
    assert "single_transformer_blocks.1.proj_out" in in_file and "single_transformer_blocks.0.proj_mlp" in in_file
    assert "transformer_blocks.1.attn.add_v_proj" in in_file and "transformer_blocks.0.ff_context.net.2" in in_file
    assert not [m for m in in_file if "norm" in m or m == "proj_out"]


def test_frozen_transformer_and_text_encoders_unchanged(trained, tiny_flux):
    result, _ = trained
    c = result.components
    for part, module in [("transformer", c.denoiser), ("text_encoder_2", c.text_encoders["text_encoder_2"])]:
        assert_frozen(module, tiny_flux / part / ("diffusion_pytorch_model.safetensors" if part == "transformer"
                                                  else "model.safetensors"), part)


# ------------------------------------------------------------------ the kohya / ComfyUI file


def test_kohya_names_and_shapes_are_the_real_flux_ones(trained):
    result, _ = trained
    state, meta = kohya_file(result.run_dir)
    names = {k.split(".")[0] for k in state}
    assert names <= REAL_NAMES, sorted(names - REAL_NAMES)
    # Both block kinds at both indices, with the same modules a real kohya FLUX LoRA has (less modulation).
    for i in (0, 1):
        assert bfl_block_names(i) <= names, sorted(bfl_block_names(i) - names)
    # Fused weights have the real proportions (3 x width for qkv, 7 x for linear1, 5 x into linear2).
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape[0] == 3 * INNER
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape[0] == 7 * INNER
    assert state["lora_unet_single_blocks_0_linear2.lora_down.weight"].shape[1] == 5 * INNER
    assert meta["ss_base_model_version"] == "flux1"


def _comfyui_targets(n_double: int, n_single: int, h: int) -> dict[str, tuple[str, int, int]]:
    """diffusers Linear -> (BFL weight, first row, rows): ComfyUI's comfy/utils.py flux_to_diffusers
    (commit 41444b5236c613ee5ff7d09aa620f94b702f30eb), Linear weights only, restated here."""
    table = bfl_double_block_targets(n_double, h, "net.0.proj", "net.2")
    for i in range(n_single):
        s, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for j, m in enumerate(["attn.to_q", "attn.to_k", "attn.to_v"]):
            table[s + m] = (b + "linear1", j * h, h)
        table[s + "proj_mlp"] = (b + "linear1", 3 * h, 4 * h)
        table[s + "proj_out"] = (b + "linear2", 0, None)
    return table


def test_kohya_file_applies_in_comfyui_as_the_trained_lora(trained):
    """ComfyUI adds alpha / rank * up @ down to the BFL weight named by each key; every slice of every
    fused weight must get exactly the trained module's delta (zero where no module was adapted)."""
    result, _ = trained
    # The default targets leave some of the table's modules out (e.g. the final layer).
    assert_kohya_applies_as_trained(result.run_dir, _comfyui_targets(2, 2, INNER), complete=False)


# The partial file's adapter config still names the modules left out; peft says so.
@pytest.mark.smoke
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
def test_kohya_file_loads_in_diffusers_to_the_same_model(trained, tiny_flux):
    """diffusers converts kohya FLUX files itself; the result must equal the diffusers file. Its
    converter splits single-block linear1 with FLUX.1's full widths written in (3072, 12288), so
    at tiny width that one module is compared in the ComfyUI test and at full width below."""
    result, _ = trained
    kohya = {k: v for k, v in load_file(result.run_dir / "run.safetensors").items() if "_linear1." not in k}
    peft = {k: v for k, v in load_file(result.run_dir / "pytorch_lora_weights.safetensors").items()
            if not re.search(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)\.", k)}
    from safetensors.torch import save_file

    with safe_open(str(result.run_dir / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(peft, result.run_dir / "peft_part.safetensors", metadata=meta)
    pipe = PIPELINE.load(tiny_flux)
    plain = PIPELINE.image(pipe)
    pipe.load_lora_weights(str(result.run_dir), weight_name="peft_part.safetensors", adapter_name="d")
    with_diffusers = PIPELINE.image(pipe)
    pipe = PIPELINE.load(tiny_flux)
    pipe.load_lora_weights(kohya, adapter_name="k")
    with_kohya = PIPELINE.image(pipe)
    assert np.abs(with_diffusers - plain).max() > 1e-3
    assert np.abs(with_kohya - with_diffusers).max() < 1e-5


@pytest.mark.parametrize("targets", ["default", "partial", "outer"])
def test_kohya_layout_reads_back_in_diffusers_at_full_flux_width(targets):
    """At FLUX.1's real widths diffusers' own kohya reader must turn our file back into the same
    per-module LoRA, fused linear1 and partly covered fused weights included."""
    from diffusers import FluxPipeline

    h, mlp, rank, alpha = 3072, 12288, 2, 3.0
    shapes = {
        **{f"transformer_blocks.0.attn.{m}": (h, h) for m in
           ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")},
        "transformer_blocks.0.ff.net.0.proj": (h, mlp), "transformer_blocks.0.ff.net.2": (mlp, h),
        "transformer_blocks.0.ff_context.net.0.proj": (h, mlp), "transformer_blocks.0.ff_context.net.2": (mlp, h),
        **{f"single_transformer_blocks.0.attn.{m}": (h, h) for m in ("to_q", "to_k", "to_v")},
        "single_transformer_blocks.0.proj_mlp": (h, mlp), "single_transformer_blocks.0.proj_out": (h + mlp, h),
    }
    if targets == "partial":  # only some parts of the fused weights
        shapes = {k: v for k, v in shapes.items() if not k.endswith(("to_k", "add_q_proj", "proj_mlp"))}
    if targets == "outer":  # modulations and the layers outside the blocks (the final one's halves swap)
        shapes = {"transformer_blocks.0.norm1.linear": (h, 6 * h), "single_transformer_blocks.0.norm.linear": (h, 3 * h),
                  "x_embedder": (64, h), "context_embedder": (4096, h),
                  "time_text_embed.timestep_embedder.linear_1": (256, h),
                  "time_text_embed.guidance_embedder.linear_2": (h, h),
                  "time_text_embed.text_embedder.linear_1": (768, h), "proj_out": (h, 64), "norm_out.linear": (h, 2 * h)}
    g = torch.Generator().manual_seed(0)
    state = {}
    for m, (i, o) in shapes.items():
        state[f"{m}.lora_A.weight"] = torch.randn(rank, i, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(o, rank, generator=g)
    kohya = flux_to_kohya(state, alpha)
    assert {k.split(".")[0] for k in kohya} <= REAL_NAMES
    back = {k.removeprefix("transformer."): v for k, v in FluxPipeline.lora_state_dict(dict(kohya)).items()}

    def applied(sd, m, x):  # the LoRA's update applied to probe inputs (cheaper than full-width B @ A)
        return sd[f"{m}.lora_B.weight"] @ (sd[f"{m}.lora_A.weight"] @ x)

    for m, (i, _) in shapes.items():
        x = torch.randn(i, 4, generator=g)
        want = alpha / rank * applied(state, m, x)
        # Sums over 12288 inputs reach ~1e3: float32 rounding is relative to that scale, not to each element.
        torch.testing.assert_close(applied(back, m, x), want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=m)
    # Fused parts no module covered come back as LoRAs whose update is zero.
    for m in {k.rsplit(".lora_", 1)[0] for k in back} - set(shapes):
        assert not torch.any(back[f"{m}.lora_B.weight"] @ back[f"{m}.lora_A.weight"][:, :8]), m


def test_modules_without_an_original_counterpart_are_refused():
    state = {"transformer_blocks.0.attn.norm_q.lora_A.weight": torch.zeros(2, 4),
             "transformer_blocks.0.attn.norm_q.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="no counterpart"):
        flux_to_kohya(state, 2.0)


# ------------------------------------------------------------------ objective


def _median(x: torch.Tensor) -> float:
    return x.median().item()


def test_timestep_sampling_and_shift_match_what_flux_samples_with(tiny_flux, tiny_schnell):
    torch.manual_seed(0)
    n = 40000
    family, c = load(tiny_flux)  # logit-normal, shift as the model samples
    # 512 px = 32x32 latents = 256 packed tokens: mu = 0.5, so the median sigma is e^0.5 / (e^0.5 + 1).
    assert _median(family.sample_sigmas(c, n, image_seq_len=256)) == pytest.approx(0.6225, abs=0.01)
    # 1024 px = 4096 tokens: mu = 1.15.
    assert _median(family.sample_sigmas(c, n, image_seq_len=4096)) == pytest.approx(0.7595, abs=0.01)
    family, c = load(tiny_schnell)  # schnell samples without a shift
    s = family.sample_sigmas(c, n, image_seq_len=4096)
    logit = torch.log(s / (1 - s))
    assert logit.mean().item() == pytest.approx(0.0, abs=0.03) and logit.std().item() == pytest.approx(1.0, abs=0.03)
    family, c = load(tiny_flux, timestep_shift=3.0)  # kohya's "shift" with discrete_flow_shift 3
    assert _median(family.sample_sigmas(c, n, image_seq_len=256)) == pytest.approx(0.75, abs=0.01)
    family, c = load(tiny_flux, timestep_sampling="uniform", timestep_shift=1.0)
    s = family.sample_sigmas(c, n, image_seq_len=256)
    assert s.min() >= 0 and s.max() < 1 and s.mean().item() == pytest.approx(0.5, abs=0.01)
    family, c = load(tiny_flux, timestep_sampling="logit_normal", logit_mean=1.0, logit_std=0.5, timestep_shift=1.0)
    s = family.sample_sigmas(c, n, image_seq_len=256)
    assert torch.log(s / (1 - s)).mean().item() == pytest.approx(1.0, abs=0.02)


def test_rectified_flow_inputs_and_targets(tiny_flux):
    family, c = load(tiny_flux)
    latents = torch.randn(3, 16, 9, 10)  # an odd latent side: packing needs even ones
    noisy, timesteps, target = family.sample_noisy(c, latents)
    assert noisy.shape == target.shape == (3, 16, 8, 10)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    # noisy = (1 - sigma) * x + sigma * noise and target = noise - x, so x = noisy - sigma * target.
    torch.testing.assert_close(noisy - sigma * target, latents[..., :8, :10], rtol=1e-5, atol=1e-5)
    cond = family.encode_prompts(c, ["a", "b", "c"])
    assert cond["prompt_embeds"].shape == (3, 512, 32) and cond["pooled_prompt_embeds"].shape == (3, 32)
    assert family.predict(c, noisy, timesteps, cond).shape == noisy.shape


def test_guidance_embedding_only_for_dev(tiny_flux, tiny_schnell):
    family, c = load(tiny_flux, guidance_scale=1.0)
    latents = torch.randn(1, 16, 4, 4)
    torch.manual_seed(0)
    noisy, t, _ = family.sample_noisy(c, latents)
    cond = family.encode_prompts(c, ["a photo"])
    with torch.no_grad():
        one = family.predict(c, noisy, t, cond)
        c.extras["flow"] = FluxOptions(guidance_scale=4.0)
        four = family.predict(c, noisy, t, cond)
    assert (one - four).abs().max() > 1e-4
    family, c = load(tiny_schnell)
    assert c.extras["guidance_embeds"] is False
    with torch.no_grad():
        assert family.predict(c, noisy, t, cond).shape == noisy.shape


def test_loss_weighting_and_min_snr_refusal(tiny_flux):
    family, c = load(tiny_flux, loss_weighting="sigma_sqrt")
    t = torch.tensor([250.0, 500.0])
    torch.testing.assert_close(family.loss_weights(c, t, None), torch.tensor([16.0, 4.0]))
    with pytest.raises(FinetuneError, match="min_snr_gamma"):
        family.loss_weights(c, t, 5.0)
    family, c = load(tiny_flux)
    assert family.loss_weights(c, t, None) is None


def test_long_captions_are_counted_against_t5(tiny_flux):
    family, c = load(tiny_flux)
    assert family.count_truncated(c, ["short", "x " * 600]) == 1


# ------------------------------------------------------------------ schnell, CLIP-L LoRA (quantized bases: test_quantize.py)


def test_schnell_trains_and_its_lora_loads(tiny_schnell, tmp_path):
    result = train_quietly(two_image_recipe(tiny_schnell, tmp_path, training__max_steps=2))
    pipe = PIPELINE.load(tiny_schnell)
    plain = PIPELINE.image(pipe)
    pipe.load_lora_weights(str(result.run_dir), adapter_name="d")
    assert np.abs(PIPELINE.image(pipe) - plain).max() > 1e-4
    names = {k.split(".")[0] for k in load_file(result.run_dir / "run.safetensors")}
    assert "lora_unet_single_blocks_1_linear1" in names and names <= REAL_NAMES


def test_clip_lora_trains_and_t5_stays_frozen(tiny_flux, tmp_path):
    """train_text_encoder adapts CLIP-L only (Family.trainable_text_encoders): T5 gets no adapter."""
    r = two_image_recipe(tiny_flux, tmp_path, training__max_steps=3)
    r["method"].update(train_text_encoder=True, text_encoder_lr=1e-3)
    result = train_quietly(r)
    c = result.components
    assert lora_modules(c.text_encoders["text_encoder"]) and not lora_modules(c.text_encoders["text_encoder_2"])
    names = {k.split(".")[0] for k in load_file(result.run_dir / "run.safetensors")}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names and names <= REAL_NAMES
    pipe = PIPELINE.load(tiny_flux)
    plain = PIPELINE.image(pipe)
    pipe.load_lora_weights({k: v for k, v in load_file(result.run_dir / "run.safetensors").items()
                            if k.startswith("lora_te1_")}, adapter_name="te")
    assert pipe.get_list_adapters() == {"text_encoder": ["te"]}
    assert np.abs(PIPELINE.image(pipe) - plain).max() > 1e-4


def test_model_vae_must_have_flux_latent_channels(tiny_flux, tmp_path):
    from diffusers import AutoencoderKL

    _, c = load_family("flux", tiny_flux, vae=str(tiny_flux))
    assert c.vae.config.latent_channels == 16
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(tmp_path / "sd-vae")
    with pytest.raises(FinetuneError, match="16-channel"):
        load_family("flux", tiny_flux, vae=str(tmp_path / "sd-vae"))


def test_single_file_needs_a_config_for_the_rest(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "flux1-dev.safetensors"
    save_file({"img_in.weight": torch.zeros(1)}, path)
    with pytest.raises(FinetuneError, match="model.config") as e:
        load_family("flux", path)
    assert "\n" not in str(e.value)


def test_flux_recipes_validate():
    from finetune.recipe import load_recipe

    for name in ("flux-lora", "flux-subject", "flux-style", "flux-quickstart"):
        recipe, _ = load_recipe(name)
        assert recipe.model.family == "flux" and recipe.method.type == "lora"
        assert recipe.training.min_snr_gamma is None
