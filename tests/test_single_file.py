"""Full-model export as one original-layout (LDM) .safetensors: key names real SD checkpoints use,
and a round trip through diffusers' own reader (`from_single_file`) that reproduces the outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from finetune.export.single_file import (
    SingleFileExportError,
    save_sd1_single_file,
    sd1_single_file_state_dict,
)

FP32 = dict(rtol=1e-4, atol=1e-5)
FP16 = dict(rtol=2e-2, atol=2e-2)


def _load_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)


def _from_single_file(path, config_folder, **kwargs):
    from diffusers import StableDiffusionPipeline

    # `config=<local diffusers folder>` gives every component's config (no download, no guessing of
    # the model type); local_files_only=True keeps it from ever asking the Hub.
    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_folder), safety_checker=None, local_files_only=True, **kwargs)


def _perturb(module, seed, scale=0.05):
    """Stand-in for training: every weight moves, so a file holding the base's weights fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tiny_sd15):
    pipe = _load_pipeline(tiny_sd15)
    _perturb(pipe.unet, 1)
    _perturb(pipe.vae, 2)
    _perturb(pipe.text_encoder, 3)
    return pipe


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    out = save_sd1_single_file(path, trained.unet, trained.vae, trained.text_encoder, dtype=torch.float32,
                               metadata={"finetune.method": "dreambooth"})
    assert out == path
    return path


@pytest.fixture(scope="module")
def reloaded(exported, tiny_sd15):
    return _from_single_file(exported, tiny_sd15)


def _file_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ctx = torch.randn(2, 7, c.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), ctx


def _unet_out(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample.float()


def _vae_outs(vae, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    latents = torch.randn(1, 4, 4, 4, generator=g)
    dtype = vae.dtype
    with torch.no_grad():
        mean = vae.encode(image.to(dtype)).latent_dist.mean.float()
        decoded = vae.decode(latents.to(dtype)).sample.float()
    return mean, decoded


def _te_out(text_encoder, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text_encoder.config.vocab_size, (2, 77), generator=g)
    with torch.no_grad():
        return text_encoder(ids)[0].float()


# ---------------------------------------------------------------------------------------------
# names and layout


REAL_SD15_KEYS = {
    # (key, rank of the tensor in a real SD1.5 checkpoint)
    "model.diffusion_model.input_blocks.0.0.weight": 4,
    "model.diffusion_model.time_embed.0.weight": 2,
    "model.diffusion_model.time_embed.2.bias": 1,
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": 1,
    "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight": 2,
    "model.diffusion_model.input_blocks.1.0.out_layers.3.weight": 4,
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": 2,
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": 2,
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": 2,
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": 4,
    "model.diffusion_model.input_blocks.3.0.op.weight": 4,
    "model.diffusion_model.input_blocks.6.0.op.weight": 4,
    "model.diffusion_model.input_blocks.9.0.op.weight": 4,
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": 4,
    "model.diffusion_model.middle_block.0.in_layers.0.weight": 1,
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight": 2,
    "model.diffusion_model.middle_block.2.out_layers.3.weight": 4,
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": 4,
    "model.diffusion_model.output_blocks.2.1.conv.weight": 4,
    "model.diffusion_model.output_blocks.5.2.conv.weight": 4,
    "model.diffusion_model.output_blocks.8.2.conv.weight": 4,
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.weight": 2,
    "model.diffusion_model.out.0.weight": 1,
    "model.diffusion_model.out.2.weight": 4,
    "first_stage_model.encoder.conv_in.weight": 4,
    "first_stage_model.encoder.down.0.block.0.norm1.weight": 1,
    "first_stage_model.encoder.down.0.downsample.conv.weight": 4,
    "first_stage_model.encoder.mid.block_1.conv1.weight": 4,
    "first_stage_model.encoder.mid.attn_1.q.weight": 4,
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": 4,
    "first_stage_model.encoder.mid.attn_1.norm.weight": 1,
    "first_stage_model.encoder.norm_out.weight": 1,
    "first_stage_model.quant_conv.weight": 4,
    "first_stage_model.post_quant_conv.weight": 4,
    "first_stage_model.decoder.mid.attn_1.k.weight": 4,
    "first_stage_model.decoder.up.3.block.0.conv1.weight": 4,
    "first_stage_model.decoder.up.1.upsample.conv.weight": 4,
    "first_stage_model.decoder.up.0.block.1.conv2.weight": 4,
    "first_stage_model.decoder.norm_out.weight": 1,
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": 2,
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": 2,
    "cond_stage_model.transformer.text_model.embeddings.position_ids": 2,
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": 2,
    "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias": 1,
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": 1,
}


def test_keys_are_the_original_sd_names(exported, trained):
    tensors, meta = _file_tensors(exported)
    for key, ndim in REAL_SD15_KEYS.items():
        assert key in tensors, key
        assert tensors[key].ndim == ndim, (key, tuple(tensors[key].shape))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in tensors)
    # nothing left in diffusers' naming, no peft leftovers
    for bad in ("down_blocks", "up_blocks", "mid_block", "resnets", "time_embedding", "conv_shortcut",
                "conv_norm_out", "base_layer", "lora_"):
        assert not [k for k in tensors if bad in k], bad
    assert not [k for k in tensors if k.startswith("first_stage_model.") and (".to_" in k or "group_norm" in k)]
    # every parameter placed exactly once (plus the position_ids buffer real SD1.x files carry)
    n_params = sum(len(m.state_dict()) for m in (trained.unet, trained.vae, trained.text_encoder))
    assert len(tensors) == n_params + 1
    assert tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert meta["finetune.method"] == "dreambooth"


def test_tensors_land_at_the_matching_original_positions(exported, trained):
    """Spot checks of the numbering, independent of diffusers' reader."""
    t, _ = _file_tensors(exported)
    unet, vae, te = trained.unet, trained.vae, trained.text_encoder
    u, v = "model.diffusion_model.", "first_stage_model."
    pairs = {
        u + "input_blocks.0.0.weight": unet.conv_in.weight,
        u + "input_blocks.2.0.in_layers.2.weight": unet.down_blocks[0].resnets[1].conv1.weight,
        u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
            unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight,
        u + "input_blocks.6.0.op.weight": unet.down_blocks[1].downsamplers[0].conv.weight,
        u + "input_blocks.10.0.emb_layers.1.weight": unet.down_blocks[3].resnets[0].time_emb_proj.weight,
        u + "middle_block.2.out_layers.0.weight": unet.mid_block.resnets[1].norm2.weight,
        u + "output_blocks.1.0.skip_connection.weight": unet.up_blocks[0].resnets[1].conv_shortcut.weight,
        u + "output_blocks.2.1.conv.weight": unet.up_blocks[0].upsamplers[0].conv.weight,
        u + "output_blocks.4.1.proj_out.weight": unet.up_blocks[1].attentions[1].proj_out.weight,
        u + "output_blocks.8.2.conv.weight": unet.up_blocks[2].upsamplers[0].conv.weight,
        u + "output_blocks.9.0.in_layers.0.weight": unet.up_blocks[3].resnets[0].norm1.weight,
        u + "out.2.weight": unet.conv_out.weight,
        v + "encoder.down.2.block.0.nin_shortcut.weight": vae.encoder.down_blocks[2].resnets[0].conv_shortcut.weight,
        v + "encoder.mid.block_2.norm1.weight": vae.encoder.mid_block.resnets[1].norm1.weight,
        v + "decoder.up.3.block.0.conv1.weight": vae.decoder.up_blocks[0].resnets[0].conv1.weight,
        v + "decoder.up.1.upsample.conv.weight": vae.decoder.up_blocks[2].upsamplers[0].conv.weight,
        v + "decoder.up.0.block.1.norm2.weight": vae.decoder.up_blocks[3].resnets[1].norm2.weight,
        v + "decoder.norm_out.weight": vae.decoder.conv_norm_out.weight,
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight":
            te.state_dict()[[k for k in te.state_dict() if k.endswith("layers.1.self_attn.v_proj.weight")][0]],
    }
    for key, param in pairs.items():
        assert torch.equal(t[key], param.detach()), key
    q = vae.encoder.mid_block.attentions[0].to_q.weight.detach()
    assert torch.equal(t[v + "encoder.mid.attn_1.q.weight"], q[:, :, None, None])
    out = vae.decoder.mid_block.attentions[0].to_out[0].weight.detach()
    assert torch.equal(t[v + "decoder.mid.attn_1.proj_out.weight"], out[:, :, None, None])


# ---------------------------------------------------------------------------------------------
# round trip through diffusers' reader


@pytest.mark.smoke
def test_unet_round_trip_carries_the_trained_weights(trained, reloaded, tiny_sd15):
    inputs = _unet_inputs(trained.unet)
    expected = _unet_out(trained.unet, inputs)
    got = _unet_out(reloaded.unet, inputs)
    torch.testing.assert_close(got, expected, **FP32)
    base = _unet_out(_load_pipeline(tiny_sd15).unet, inputs)
    assert (base - expected).abs().max() > 100 * FP32["atol"]  # the file is not the base model


def test_vae_round_trip_encode_and_decode(trained, reloaded):
    mean, decoded = _vae_outs(trained.vae)
    got_mean, got_decoded = _vae_outs(reloaded.vae)
    torch.testing.assert_close(got_mean, mean, **FP32)
    torch.testing.assert_close(got_decoded, decoded, **FP32)


@pytest.mark.smoke
def test_text_encoder_round_trip(trained, reloaded):
    torch.testing.assert_close(_te_out(reloaded.text_encoder), _te_out(trained.text_encoder), **FP32)


def test_fp16_file_loads_and_is_close(trained, tiny_sd15, tmp_path):
    path = save_sd1_single_file(tmp_path / "model-fp16.safetensors", trained.unet, trained.vae, trained.text_encoder)
    tensors, _ = _file_tensors(path)
    assert {t.dtype for k, t in tensors.items() if not k.endswith("position_ids")} == {torch.float16}
    assert path.stat().st_size < 0.6 * sum(t.numel() * 4 for t in tensors.values())
    pipe = _from_single_file(path, tiny_sd15, torch_dtype=torch.float32)
    inputs = _unet_inputs(trained.unet, seed=1)
    torch.testing.assert_close(_unet_out(pipe.unet, inputs), _unet_out(trained.unet, inputs), **FP16)
    for got, want in zip(_vae_outs(pipe.vae, seed=1), _vae_outs(trained.vae, seed=1)):
        torch.testing.assert_close(got, want, **FP16)
    torch.testing.assert_close(_te_out(pipe.text_encoder, 1), _te_out(trained.text_encoder, 1), **FP16)


# ---------------------------------------------------------------------------------------------
# SD2.x (OpenCLIP text encoder), refusals, atomic writes


def test_sd2_open_clip_text_encoder_round_trip(tiny_sd15, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = _load_pipeline(tiny_sd15)
    te_config = pipe.text_encoder.config.to_dict()
    te_config = {k: v for k, v in te_config.items() if k not in ("architectures", "transformers_version", "model_type")}
    te_config["hidden_act"] = "gelu"  # OpenCLIP ViT-H, as in SD2.x
    torch.manual_seed(5)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "use_linear_projection": True,
                                                  "upcast_attention": True})
    folder = tmp_path / "tiny-sd2"
    pipe.save_pretrained(folder, safe_serialization=True)

    path = save_sd1_single_file(tmp_path / "sd2.safetensors", pipe.unet, pipe.vae, pipe.text_encoder,
                                dtype=torch.float32)
    tensors, _ = _file_tensors(path)
    p = "cond_stage_model.model."
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight",
                "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.1.attn.out_proj.bias",
                "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.1.mlp.c_fc.weight",
                "transformer.resblocks.1.mlp.c_proj.bias"):
        assert p + key in tensors, key
    assert not [k for k in tensors if k.startswith("cond_stage_model.transformer.")]
    h = te_config["hidden_size"]
    assert tensors[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * h, h)
    assert tensors["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # linear proj, as SD2

    reloaded = _from_single_file(path, folder)
    torch.testing.assert_close(_te_out(reloaded.text_encoder), _te_out(pipe.text_encoder), **FP32)
    inputs = _unet_inputs(pipe.unet)
    torch.testing.assert_close(_unet_out(reloaded.unet, inputs), _unet_out(pipe.unet, inputs), **FP32)


def test_sdxl_unet_and_unmerged_adapters_are_refused(tiny_sd15, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    pipe = _load_pipeline(tiny_sd15)
    sdxl_like = UNet2DConditionModel.from_config({
        **pipe.unet.config, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 8 * 6 + 32})
    with pytest.raises(SingleFileExportError, match="SDXL"):
        sd1_single_file_state_dict(sdxl_like, pipe.vae, pipe.text_encoder)

    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    with pytest.raises(SingleFileExportError, match="merge_and_unload"):
        save_sd1_single_file(tmp_path / "lora.safetensors", pipe.unet, pipe.vae, pipe.text_encoder)
    assert not list(tmp_path.iterdir())


def test_write_is_atomic(trained, tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous checkpoint")

    def broken(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_sd1_single_file(path, trained.unet, trained.vae, trained.text_encoder)
    assert path.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]

    monkeypatch.undo()
    save_sd1_single_file(path, trained.unet, trained.vae, trained.text_encoder)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert "model.diffusion_model.out.2.weight" in _file_tensors(path)[0]
