"""LoRA export: kohya/webui file and diffusers file, checked against real key names and by loading
them back with diffusers' own loader into a fresh pipeline."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from finetune.export.lora import (  # noqa: E402
    kohya_alpha,
    kohya_metadata,
    kohya_module_names,
    peft_to_kohya,
    save_diffusers_lora,
    save_kohya_lora,
)

DATA = Path(__file__).parent / "data"
RANK, ALPHA = 4, 8  # alpha != rank: a file that writes alpha = rank has half the effect
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# fp32 files, fp32 models; the loaded adapter runs the same ops as the in-memory one (measured
# difference: exactly 0 on CPU), so any tolerance far below the adapter's effect will do.
ATOL, RTOL = 1e-5, 1e-4
# The adapter must move outputs by far more than the tolerance for the comparison to mean anything.
MIN_EFFECT = 1e-2


def real_names() -> set[str]:
    lines = (DATA / "sd15_kohya_lora_keys.txt").read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _outputs(pipe, inputs):
    with torch.no_grad():
        unet = pipe.unet(inputs.latents, inputs.t, encoder_hidden_states=inputs.context).sample
        te = pipe.text_encoder(inputs.ids)[0]
    return unet, te


def _module_count(model, cls_names) -> int:
    return sum(type(m).__name__ in cls_names for _, m in model.named_modules())


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from finetune.tiny_models.sd15 import build_tiny_sd15

    root = tmp_path_factory.mktemp("export_lora")
    base = build_tiny_sd15(root / "base")
    pipe = _pipe(base)

    g = torch.Generator().manual_seed(0)
    inputs = SimpleNamespace(
        latents=torch.randn(1, 4, 8, 8, generator=g),
        t=torch.tensor([10]),
        context=torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=g),
        ids=pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=16,
                           return_tensors="pt").input_ids,
    )
    base_out = _outputs(pipe, inputs)

    unet_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS, init_lora_weights="gaussian")
    te_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TE_TARGETS, init_lora_weights="gaussian")
    pipe.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(te_cfg, pipe.text_encoder)  # as training does: no transformers version gate
    with torch.no_grad():  # peft starts lora_B at zero: make the adapter do something
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapted_out = _outputs(pipe, inputs)

    unet_state = get_peft_model_state_dict(pipe.unet)
    te_state = get_peft_model_state_dict(pipe.text_encoder)
    te_states = {"text_encoder": te_state}

    kohya = peft_to_kohya(unet_state, te_states, ALPHA, {"text_encoder": ALPHA}, {"text_encoder": "lora_te"})
    meta = kohya_metadata(rank=RANK, alpha=ALPHA, base_model_version="sd_v1", output_name="sks_dog",
                          trains_text_encoder=True)
    kohya_dir = root / "kohya"
    kohya_path = save_kohya_lora(kohya_dir / "sks_dog.safetensors", kohya, meta, torch.float32)
    kohya16 = save_kohya_lora(root / "kohya16" / "sks_dog.safetensors", kohya, meta, torch.float16)

    diff_dir = root / "diffusers"
    from diffusers import StableDiffusionPipeline

    diff_path = save_diffusers_lora(diff_dir, StableDiffusionPipeline, unet_state, te_states, unet_cfg,
                                    {"text_encoder": te_cfg}, torch.float32)
    diff16 = save_diffusers_lora(root / "diffusers16", StableDiffusionPipeline, unet_state, te_states,
                                 unet_cfg, {"text_encoder": te_cfg}, torch.float16)
    return SimpleNamespace(
        base=base, inputs=inputs, base_out=base_out, adapted_out=adapted_out, pipe=pipe,
        unet_state=unet_state, te_state=te_state, kohya=kohya, kohya_path=kohya_path, kohya16=kohya16,
        diff_path=diff_path, diff16=diff16, unet_cfg=unet_cfg, te_cfg=te_cfg,
    )


def _load_file(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_matches_adapted(ex, pipe):
    unet_out, te_out = _outputs(pipe, ex.inputs)
    ref_unet, ref_te = ex.adapted_out
    base_unet, base_te = ex.base_out
    # the adapter changes both models by far more than the tolerance ...
    assert (ref_unet - base_unet).abs().max() > MIN_EFFECT
    assert (ref_te - base_te).abs().max() > MIN_EFFECT
    # ... and the loaded file reproduces the in-memory adapted models
    torch.testing.assert_close(te_out, ref_te, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(unet_out, ref_unet, atol=ATOL, rtol=RTOL)


# (a) names and alpha ----------------------------------------------------------------------------


def test_kohya_names_are_real_sd15_names(ex):
    written = _load_file(ex.kohya_path)
    names = kohya_module_names(written)
    real = real_names()
    assert len(real) == 264
    unknown = [n for n in names if n not in real]
    assert not unknown, f"names no SD1.5 kohya file has: {unknown[:5]}"
    # every adapted module was written: 12 per UNet transformer, 6 per CLIP layer
    n_transformers = _module_count(ex.pipe.unet, {"Transformer2DModel"})
    n_layers = ex.pipe.text_encoder.config.num_hidden_layers
    assert len(names) == 12 * n_transformers + 6 * n_layers
    for must in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_mid_block_attentions_0_proj_in",
                 "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        assert must in names
    assert not any(n.startswith(("lora_te1_", "lora_te_encoder_")) for n in names)
    for n in names:
        assert {f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"} <= written.keys()


def test_kohya_alpha_is_the_real_alpha_and_conv_stays_4d(ex):
    written = _load_file(ex.kohya_path)
    alphas = {k: v for k, v in written.items() if k.endswith(".alpha")}
    assert alphas and all(v.ndim == 0 and v.item() == ALPHA for v in alphas.values())
    down = written["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    up = written["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]
    assert down.ndim == 4 and down.shape[0] == RANK and down.shape[2:] == (1, 1)
    assert up.ndim == 4 and up.shape[1] == RANK
    q = written["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    assert q.shape[0] == RANK and q.ndim == 2
    # values are the adapter's own (lora_A -> lora_down, lora_B -> lora_up)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    torch.testing.assert_close(q, ex.unet_state[f"{key}.lora_A.weight"], atol=0, rtol=0)
    torch.testing.assert_close(
        written["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"],
        ex.te_state["encoder.layers.0.mlp.fc1.lora_B.weight"], atol=0, rtol=0)


def test_old_transformers_text_model_keys_give_the_same_file(ex):
    # transformers 4.x: `text_model.encoder...`; 5.x: `encoder...`. Both must name `lora_te_text_model_...`.
    old = {("text_model." + k): v for k, v in ex.te_state.items()}
    a = peft_to_kohya({}, {"text_encoder": ex.te_state}, None, {"text_encoder": ALPHA})
    b = peft_to_kohya({}, {"text_encoder": old}, None, {"text_encoder": ALPHA})
    assert a.keys() == b.keys()
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in a)


def test_sdxl_prefixes_and_refusals(ex):
    out = peft_to_kohya({}, {"text_encoder": ex.te_state, "text_encoder_2": ex.te_state}, None,
                        {"text_encoder": 8, "text_encoder_2": 16},
                        {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"})
    assert out["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 8
    assert out["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 16
    with pytest.raises(ValueError):  # DoRA magnitudes etc. have no place in a plain kohya LoRA
        peft_to_kohya({"down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.ones(4)}, {}, 8, {})
    with pytest.raises(ValueError):
        peft_to_kohya(ex.unet_state, {}, None, {})  # alpha is required, never guessed


def test_kohya_alpha_for_rslora():
    from peft import LoraConfig

    assert kohya_alpha(LoraConfig(r=4, lora_alpha=8)) == 8
    assert kohya_alpha(LoraConfig(r=16, lora_alpha=8, use_rslora=True)) == pytest.approx(8 * math.sqrt(16))
    with pytest.raises(ValueError):
        kohya_alpha(LoraConfig(r=4, lora_alpha=8, use_dora=True))


# (b) the kohya file, loaded by diffusers, reproduces the adapted model --------------------------


@pytest.mark.smoke
def test_kohya_file_loads_and_matches_adapted_model(ex):
    pipe = _pipe(ex.base)
    pipe.load_lora_weights(str(ex.kohya_path.parent), weight_name=ex.kohya_path.name)
    _assert_matches_adapted(ex, pipe)


# (c) the diffusers file too ------------------------------------------------------------------------


@pytest.mark.smoke
def test_diffusers_file_loads_and_matches_adapted_model(ex):
    pipe = _pipe(ex.base)
    pipe.load_lora_weights(str(ex.diff_path.parent))
    _assert_matches_adapted(ex, pipe)


# (d) safetensors with readable metadata; dtype; atomic write ---------------------------------------


def test_kohya_metadata_readable(ex):
    from safetensors import safe_open

    with safe_open(str(ex.kohya_path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == str(RANK)
    assert float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "sks_dog"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert all(isinstance(v, str) and v != "None" for v in meta.values())
    assert keys
    # sshs_model_hash: sha256 of the tensor data after the header, as kohya/webui compute it
    blob = ex.kohya_path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + n:]).hexdigest()


def test_a_trained_lora_kohya_file_names_its_base_and_settings(tiny_sd15, tmp_path):
    from safetensors import safe_open

    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.methods import get_method
    from finetune.methods.lora import LoraConfig
    from finetune.recipe.schema import ModelConfig, OutputConfig, TrainingConfig

    family = get_family("sd1")
    c = family.load(resolve_source(str(tiny_sd15)), ModelConfig(base=str(tiny_sd15)))
    method = get_method(LoraConfig(rank=2, train_text_encoder=True, text_encoder_lr=5e-5), family,
                        TrainingConfig(learning_rate=2e-4, max_steps=30, seed=7, mixed_precision="no"))
    method.setup(c)
    [path] = method.save(c, tmp_path, OutputConfig(formats=["kohya"]), "run")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_sd_model_name"] == "tiny-sd15"  # the folder's name, not the path to it
    assert (meta["ss_learning_rate"], meta["ss_unet_lr"], meta["ss_text_encoder_lr"]) == ("0.0002", "0.0002", "5e-05")
    assert (meta["ss_max_train_steps"], meta["ss_seed"], meta["ss_mixed_precision"]) == ("30", "7", "no")
    assert "ss_num_epochs" not in meta and all(v != "None" for v in meta.values())


def test_diffusers_metadata_readable_and_carries_alpha(ex):
    from safetensors import safe_open

    with safe_open(str(ex.diff_path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.lora_alpha"] == ALPHA and adapter["unet.r"] == RANK
    assert adapter["text_encoder.lora_alpha"] == ALPHA
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)


def test_save_dtype_and_no_temp_files_left(ex):
    k16 = _load_file(ex.kohya16)
    assert all(v.dtype == torch.float16 for k, v in k16.items() if not k.endswith(".alpha"))
    assert all(v.dtype == torch.float32 and v.item() == ALPHA for k, v in k16.items() if k.endswith(".alpha"))
    d16 = _load_file(ex.diff16)
    assert d16 and all(v.dtype == torch.float16 for v in d16.values())
    for folder in (ex.kohya_path.parent, ex.kohya16.parent, ex.diff_path.parent, ex.diff16.parent):
        assert sorted(p.name for p in folder.iterdir()) == [
            ex.kohya_path.name if "kohya" in folder.name else ex.diff_path.name]


def test_fp16_kohya_file_still_loads_close(ex):
    pipe = _pipe(ex.base)
    pipe.load_lora_weights(str(ex.kohya16.parent), weight_name=ex.kohya16.name)
    unet_out, te_out = _outputs(pipe, ex.inputs)
    # fp16 rounding of the LoRA factors only: measured ~1% of the adapter's effect (UNet 0.016 of
    # 1.9, text encoder 0.002 of 4.0); a wrong alpha or missing module would be ~50-100%.
    for out, ref, base in ((unet_out, ex.adapted_out[0], ex.base_out[0]), (te_out, ex.adapted_out[1], ex.base_out[1])):
        effect = (ref - base).abs().max()
        assert (out - ref).abs().max() <= 0.03 * effect


def test_save_kohya_refuses_non_kohya_keys(tmp_path):
    with pytest.raises(ValueError):
        save_kohya_lora(tmp_path / "x.safetensors", {"unet.foo.lora_A.weight": torch.ones(2, 2)}, {}, torch.float16)
    assert not any(tmp_path.iterdir())
