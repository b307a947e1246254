"""FLUX.1 as one family: LoRA on the tiny FLUX transformer lowers its rectified-flow loss on the
training images; the diffusers file loads with FluxPipeline's own loader and changes the output;
the kohya file has the real FLUX LoRA names (BFL modules, fused q/k/v), applies as ComfyUI applies
it, and reads back in diffusers as the same LoRA; timestep sampling and shift give the numbers FLUX
samples with; [schnell] (no guidance embedding) trains too."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.families.flux import FluxOptions, flux_to_kohya
from finetune.recipe import validate
from finetune.recipe.schema import ModelConfig
from finetune.train import train

from .helpers import loss_before_and_after, make_image_folder, tiny_recipe

REAL_NAMES = {line.strip() for line in (Path(__file__).parent / "data" / "flux_kohya_lora_keys.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
INNER = 32  # the tiny model's width (heads x head dim)



@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from finetune.tiny_models.flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory):
    from finetune.tiny_models.flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", variant="schnell")


@pytest.fixture(scope="module")
def trained(tiny_flux, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux")
    data = make_image_folder(tmp / "data", n=4, sizes=((64, 64),))
    r = tiny_recipe(tiny_flux, data, tmp / "out", training__max_steps=40, training__batch_size=4,
                    training__learning_rate=5e-3)
    r["method"].update(rank=8, alpha=4)  # alpha != rank: the exported scale must follow alpha / rank
    return train(validate(r, "test"), log=lambda *_: None, progress=False), data


def load(model, **options):
    from finetune.families import get_family
    from finetune.families.base import resolve_source

    family = get_family("flux")
    cfg = ModelConfig(base=str(model), flow=FluxOptions(**options))
    return family, family.load(resolve_source(str(model)), cfg)


def _pipe(model):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    return pipe("a photo of sks ball", num_inference_steps=2, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def _lora_modules(module) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in module.named_modules() if n.endswith(".lora_A")}


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
    pipe = _pipe(tiny_flux)
    plain = _image(pipe)
    pipe.load_lora_weights(str(result.run_dir), adapter_name="d")
    assert np.abs(_image(pipe) - plain).max() > 1e-3, "the LoRA did not change the output"
    with safe_open(str(result.run_dir / "pytorch_lora_weights.safetensors"), "pt") as f:
        in_file = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in f.keys()}
    assert _lora_modules(pipe.transformer) == in_file
    # The default targets: attention and MLPs of both block kinds, no modulation, not the final layer.
    assert "single_transformer_blocks.1.proj_out" in in_file and "single_transformer_blocks.0.proj_mlp" in in_file
    assert "transformer_blocks.1.attn.add_v_proj" in in_file and "transformer_blocks.0.ff_context.net.2" in in_file
    assert not [m for m in in_file if "norm" in m or m == "proj_out"]


def test_frozen_transformer_and_text_encoders_unchanged(trained, tiny_flux):
    result, _ = trained
    c = result.components
    for part, module in [("transformer", c.denoiser), ("text_encoder_2", c.text_encoders["text_encoder_2"])]:
        saved = load_file(tiny_flux / part / ("diffusion_pytorch_model.safetensors" if part == "transformer"
                                              else "model.safetensors"))
        current = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}
        for k, v in saved.items():
            assert torch.equal(current[k], v), (part, k)


# ------------------------------------------------------------------ the kohya / ComfyUI file


def test_kohya_names_and_shapes_are_the_real_flux_ones(trained):
    result, _ = trained
    with safe_open(str(result.run_dir / "run.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    names = {k.split(".")[0] for k in state}
    assert names <= REAL_NAMES, sorted(names - REAL_NAMES)
    # Both block kinds at both indices, with the same modules a real kohya FLUX LoRA has (less modulation).
    for i in (0, 1):
        assert {f"lora_unet_double_blocks_{i}_{m}" for m in
                ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "txt_attn_qkv", "txt_attn_proj",
                 "txt_mlp_0", "txt_mlp_2")} <= names
        assert {f"lora_unet_single_blocks_{i}_linear1", f"lora_unet_single_blocks_{i}_linear2"} <= names
    # Fused weights have the real proportions (3 x width for qkv, 7 x for linear1, 5 x into linear2).
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape[0] == 3 * INNER
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape[0] == 7 * INNER
    assert state["lora_unet_single_blocks_0_linear2.lora_down.weight"].shape[1] == 5 * INNER
    assert meta["ss_base_model_version"] == "flux1"


def _comfyui_targets(n_double: int, n_single: int, h: int) -> dict[str, tuple[str, int, int]]:
    """diffusers Linear -> (BFL weight, first row, rows): ComfyUI's comfy/utils.py flux_to_diffusers
    (commit 41444b5236c613ee5ff7d09aa620f94b702f30eb), Linear weights only, restated here."""
    table = {}
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for j, (img, txt) in enumerate([("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj")]):
            table[d + "attn." + img] = (b + "img_attn.qkv", j * h, h)
            table[d + "attn." + txt] = (b + "txt_attn.qkv", j * h, h)
        for ours, bfl in [("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                          ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                          ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")]:
            table[d + ours] = (b + bfl, 0, None)
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
    kohya = load_file(result.run_dir / "run.safetensors")
    peft = load_file(result.run_dir / "pytorch_lora_weights.safetensors")
    with safe_open(str(result.run_dir / "pytorch_lora_weights.safetensors"), "pt") as f:
        import json

        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
    table = _comfyui_targets(2, 2, INNER)
    key_of = {"lora_unet_" + bfl.replace(".", "_"): bfl for bfl, _, _ in table.values()}
    deltas = {}
    for name in {k.split(".")[0] for k in kohya}:
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        deltas[key_of[name]] = kohya[f"{name}.alpha"].item() / down.shape[0] * (up @ down)
    checked = 0
    for module, (bfl, row, rows) in table.items():
        a, b = peft.get(f"transformer.{module}.lora_A.weight"), peft.get(f"transformer.{module}.lora_B.weight")
        if bfl not in deltas:
            assert a is None, f"{module} trained but {bfl} is missing from the kohya file"
            continue
        got = deltas[bfl][row:row + (rows or deltas[bfl].shape[0])]
        want = scale * (b @ a) if a is not None else torch.zeros_like(got)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        checked += a is not None
    assert checked == len({k.rsplit(".lora_", 1)[0] for k in peft})


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
    pipe = _pipe(tiny_flux)
    plain = _image(pipe)
    pipe.load_lora_weights(str(result.run_dir), weight_name="peft_part.safetensors", adapter_name="d")
    with_diffusers = _image(pipe)
    pipe = _pipe(tiny_flux)
    pipe.load_lora_weights(kohya, adapter_name="k")
    with_kohya = _image(pipe)
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
        c.extras["flux"] = FluxOptions(guidance_scale=4.0)
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
    data = make_image_folder(tmp_path / "data", n=2, sizes=((64, 64),))
    r = tiny_recipe(tiny_schnell, data, tmp_path / "out", training__max_steps=2)
    result = train(validate(r, "test"), log=lambda *_: None, progress=False)
    pipe = _pipe(tiny_schnell)
    plain = _image(pipe)
    pipe.load_lora_weights(str(result.run_dir), adapter_name="d")
    assert np.abs(_image(pipe) - plain).max() > 1e-4
    names = {k.split(".")[0] for k in load_file(result.run_dir / "run.safetensors")}
    assert "lora_unet_single_blocks_1_linear1" in names and names <= REAL_NAMES


def test_clip_lora_trains_and_t5_stays_frozen(tiny_flux, tmp_path):
    """train_text_encoder adapts CLIP-L only (Family.trainable_text_encoders): T5 gets no adapter."""
    data = make_image_folder(tmp_path / "data", n=2, sizes=((64, 64),))
    r = tiny_recipe(tiny_flux, data, tmp_path / "out", training__max_steps=3)
    r["method"].update(train_text_encoder=True, text_encoder_lr=1e-3)
    result = train(validate(r, "test"), log=lambda *_: None, progress=False)
    c = result.components
    assert _lora_modules(c.text_encoders["text_encoder"]) and not _lora_modules(c.text_encoders["text_encoder_2"])
    names = {k.split(".")[0] for k in load_file(result.run_dir / "run.safetensors")}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names and names <= REAL_NAMES
    pipe = _pipe(tiny_flux)
    plain = _image(pipe)
    pipe.load_lora_weights({k: v for k, v in load_file(result.run_dir / "run.safetensors").items()
                            if k.startswith("lora_te1_")}, adapter_name="te")
    assert pipe.get_list_adapters() == {"text_encoder": ["te"]}
    assert np.abs(_image(pipe) - plain).max() > 1e-4


def test_model_vae_must_have_flux_latent_channels(tiny_flux, tmp_path):
    from diffusers import AutoencoderKL

    from finetune.families import get_family
    from finetune.families.base import resolve_source

    family = get_family("flux")
    c = family.load(resolve_source(str(tiny_flux)), ModelConfig(base=str(tiny_flux), vae=str(tiny_flux)))
    assert c.vae.config.latent_channels == 16
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(tmp_path / "sd-vae")
    with pytest.raises(FinetuneError, match="16-channel"):
        family.load(resolve_source(str(tiny_flux)), ModelConfig(base=str(tiny_flux), vae=str(tmp_path / "sd-vae")))


def test_single_file_needs_a_config_for_the_rest(tmp_path):
    from safetensors.torch import save_file

    from finetune.families import get_family
    from finetune.families.base import resolve_source

    path = tmp_path / "flux1-dev.safetensors"
    save_file({"img_in.weight": torch.zeros(1)}, path)
    with pytest.raises(FinetuneError, match="model.config") as e:
        get_family("flux").load(resolve_source(str(path)), ModelConfig(base=str(path)))
    assert "\n" not in str(e.value)


def test_flux_recipes_validate():
    from finetune.recipe import load_recipe

    for name in ("flux-lora", "flux-subject", "flux-style", "flux-quickstart"):
        recipe, _ = load_recipe(name)
        assert recipe.model.family == "flux" and recipe.method.type == "lora"
        assert recipe.training.min_snr_gamma is None
