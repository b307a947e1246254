"""LoRA training on the tiny SD1.5, end to end: loss falls, files load with diffusers' own
loaders and change the output, 8-bit optimizer states are really 8-bit, checkpointing is on."""

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe import validate
from finetune.train import train

from .helpers import loss_before_and_after, make_image_folder, tiny_recipe


def run(tmp_path, model, name="run", **overrides):
    data = make_image_folder(tmp_path / "data")
    r = tiny_recipe(model, data, tmp_path / "outputs", **overrides)
    r["output"]["run_name"] = name
    return train(validate(r, "test"), log=lambda *_: None, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_sd15, tmp_path_factory):
    """One real training run shared by the checks below: 60 steps, LoRA on UNet and text encoder."""
    tmp = tmp_path_factory.mktemp("trained")
    result = run(tmp, tiny_sd15, name="lora", training__max_steps=60, training__learning_rate=2e-3,
                 method__train_text_encoder=True, method__text_encoder_lr=5e-4,
                 validation__prompts=["a photo of sks ball"], validation__every_n_steps=30,
                 output__save_every_n_steps=30)
    return result, tmp / "data"


def test_loss_on_training_images_falls(trained, tiny_sd15):
    """The saved adapter, loaded fresh, lowers the fixed-noise loss on the training images by >= 20%."""
    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.recipe.schema import ModelConfig

    result, data_dir = trained
    family = get_family("sd1")
    c = family.load(resolve_source(str(tiny_sd15)), ModelConfig(base=str(tiny_sd15)))
    before, after = loss_before_and_after(family, c, data_dir, result.run_dir)
    assert after < 0.8 * before, (before, after)
    # The training loss the loop logged falls too (mean of the last 10 steps vs the first 10).
    assert sum(result.losses[-10:]) < sum(result.losses[:10])


def test_run_folder_holds_everything(trained):
    result, _ = trained
    d = result.run_dir
    assert (d / "recipe.yaml").is_file()
    assert (d / "pytorch_lora_weights.safetensors").is_file()
    assert (d / "lora.safetensors").is_file()
    assert {p.name for p in (d / "checkpoints").iterdir()} == {"step-000030"}
    assert (d / "checkpoints" / "step-000030" / "lora.safetensors").is_file()
    samples = sorted((d / "samples").rglob("*.png"))
    assert {p.parent.name for p in samples} == {"step-000030", "step-000060"}
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert all({"loss", "lr", "images_per_second"} <= r.keys() for r in rows)
    card = (d / "README.md").read_text()
    assert "base_model:" in card and "lora.safetensors" in card and "samples/step-000060/" in card
    assert "finetune train" in card


def _image(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64, generator=g, output_type="np")
    return out.images[0]


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_saved_lora_changes_a_fresh_pipeline(trained, tiny_sd15, fmt):
    from diffusers import StableDiffusionPipeline

    result, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = _image(pipe)
    if fmt == "diffusers":
        pipe.load_lora_weights(str(result.run_dir))
    else:
        pipe.load_lora_weights(str(result.run_dir), weight_name="lora.safetensors")
    adapted = _image(pipe)
    assert abs(adapted - base).mean() > 1e-3
    # Both files carry the text-encoder LoRA too.
    keys = load_file(result.run_dir / "lora.safetensors").keys()
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_unet_") for k in keys)


def test_frozen_base_weights_unchanged(trained, tiny_sd15):
    from safetensors.torch import load_file as lf

    result, _ = trained
    unet = result.components.denoiser
    original = lf(tiny_sd15 / "unet" / "diffusion_pytorch_model.safetensors")
    current = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    for k, v in original.items():
        assert torch.equal(current[k], v), k


def test_8bit_optimizer_states_are_uint8(tiny_sd15, tmp_path):
    result = run(tmp_path, tiny_sd15, optimizer__type="adamw8bit", optimizer__min_8bit_size=64, training__max_steps=2)
    states = [s for s in result.optimizer.state.values() if s]
    assert states
    assert all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)


def test_lion8bit_trains(tiny_sd15, tmp_path):
    result = run(tmp_path, tiny_sd15, optimizer__type="lion8bit", optimizer__min_8bit_size=64, training__max_steps=2,
                 training__learning_rate=1e-4)
    assert all(s["state1"].dtype == torch.uint8 for s in result.optimizer.state.values() if s)


def test_gradient_checkpointing_recomputes_forward(tiny_sd15):
    """With checkpointing on, each transformer block runs its forward again during backward."""
    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.methods import get_method
    from finetune.recipe.schema import ModelConfig, TrainingConfig
    from finetune.methods.lora import LoraConfig
    from finetune.train.loop import apply_memory_options

    def forward_calls(checkpointing: bool) -> int:
        family = get_family("sd1")
        c = family.load(resolve_source(str(tiny_sd15)), ModelConfig(base=str(tiny_sd15)))
        training = TrainingConfig(gradient_checkpointing=checkpointing)
        method = get_method(LoraConfig(rank=2), family, training)
        method.setup(c)
        apply_memory_options(c, method, training)
        c.denoiser.train()
        block = c.denoiser.down_blocks[0].attentions[0].transformer_blocks[0]
        calls = []
        # A pre-hook: non-reentrant checkpointing stops a recomputed forward early, before post-hooks.
        block.register_forward_pre_hook(lambda *a: calls.append(1))
        latents = torch.randn(1, 4, 8, 8)
        cond = family.encode_prompts(c, ["x"])
        out = family.predict(c, latents, torch.tensor([10]), cond)
        out.mean().backward()
        return len(calls)

    assert forward_calls(False) == 1
    assert forward_calls(True) == 2


def test_same_seed_same_weights(tiny_sd15, tmp_path):
    a = run(tmp_path / "a", tiny_sd15, training__max_steps=3)
    b = run(tmp_path / "b", tiny_sd15, training__max_steps=3)
    wa = load_file(a.run_dir / "pytorch_lora_weights.safetensors")
    wb = load_file(b.run_dir / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = run(tmp_path / "c", tiny_sd15, training__max_steps=3, training__seed=1)
    wc = load_file(c.run_dir / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_v_prediction_min_snr_noise_offset_accumulation(tmp_path):
    from finetune.testing import build_tiny_sd15

    model = build_tiny_sd15(tmp_path / "vpred", prediction_type="v_prediction")
    result = run(tmp_path, model, training__max_steps=3, training__min_snr_gamma=5.0, training__noise_offset=0.1,
                 training__gradient_accumulation_steps=2, training__lr_scheduler="cosine", training__lr_warmup_steps=1)
    assert result.steps == 3 and len(result.losses) == 3
    assert result.components.noise_scheduler.config.prediction_type == "v_prediction"
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_epochs_instead_of_steps(tiny_sd15, tmp_path):
    # 4 images, batch 2 -> buckets (64x64: 2 images? others) decide batches; 2 epochs = 2 x batches per epoch
    result = run(tmp_path, tiny_sd15, training__max_steps=None, training__epochs=2)
    per_epoch = result.steps // 2
    assert result.steps == 2 * per_epoch and per_epoch >= 2


def test_bf16_mixed_precision_on_cpu(tiny_sd15, tmp_path):
    """bf16 autocast runs on CPU too: base weights in bf16, LoRA weights kept in fp32."""
    result = run(tmp_path, tiny_sd15, training__max_steps=2, training__mixed_precision="bf16")
    unet = result.components.denoiser
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    base = [p for n, p in unet.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in base)
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_keep_last_checkpoints(tiny_sd15, tmp_path):
    result = run(tmp_path, tiny_sd15, training__max_steps=7, output__save_every_n_steps=2, output__keep_last_checkpoints=2)
    kept = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000006"]
    assert all((result.run_dir / "checkpoints" / k / "pytorch_lora_weights.safetensors").is_file() for k in kept)
