"""LoRA training on the tiny SD1.5, end to end: loss falls, files load with diffusers' own
loaders and change the output, 8-bit optimizer states are really 8-bit, checkpointing is on."""


import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe import validate
from finetune.train import train

from .helpers import loss_before_and_after, make_image_folder, tiny_recipe, step_rows


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
    rows = step_rows(d)
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
    """The optimizer is bitsandbytes' Lion8bit, it holds 8-bit state for every parameter of at least
    min_8bit_size elements (32-bit below), and the LoRA moved by Lion's sign steps of exactly lr."""
    import bitsandbytes as bnb

    lr = 1e-4
    result = run(tmp_path, tiny_sd15, optimizer__type="lion8bit", optimizer__min_8bit_size=64, training__max_steps=2,
                 training__learning_rate=lr)
    optimizer = getattr(result.optimizer, "optimizer", result.optimizer)  # under accelerate's AcceleratedOptimizer
    assert isinstance(optimizer, bnb.optim.Lion8bit)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert any(p.numel() >= 64 for p in params)
    for p in params:
        state = optimizer.state[p]
        assert state and state["step"] == 2
        if p.numel() >= 64:
            assert state["state1"].dtype == torch.uint8 and state["state1"].shape == p.shape
            assert state["absmax1"].dtype == torch.float32 and state["qmap1"].numel() == 256
        else:
            assert state["state1"].dtype == torch.float32
    # lora_B starts at zero; two Lion steps move each element by lr * sign(...) twice: 0, lr or 2 lr.
    moved = torch.cat([p.detach().flatten() for n, p in result.components.denoiser.named_parameters() if "lora_B" in n])
    steps_taken = moved.abs() / lr
    assert (steps_taken - steps_taken.round()).abs().max() < 1e-3 and steps_taken.max() <= 2 + 1e-3
    assert (steps_taken > 0.5).float().mean() > 0.5


def test_gradient_checkpointing_recomputes_forward(tiny_sd15):
    """With checkpointing on, each transformer block runs its forward again during backward."""
    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.methods import get_method
    from finetune.recipe.schema import ModelConfig, TrainingConfig
    from finetune.methods.lora import LoraConfig
    from finetune.train.memory import enable_checkpointing

    def forward_calls(checkpointing: bool) -> int:
        family = get_family("sd1")
        c = family.load(resolve_source(str(tiny_sd15)), ModelConfig(base=str(tiny_sd15)))
        training = TrainingConfig(gradient_checkpointing=checkpointing)
        method = get_method(LoraConfig(rank=2), family, training)
        method.setup(c)
        if checkpointing:
            enable_checkpointing(c, method)
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


def test_v_prediction_min_snr_noise_offset_accumulation(tmp_path, monkeypatch):
    """v-prediction with Min-SNR-5 weights, noise offset 0.1 and 2-batch accumulation, each shown to act:
    the family's weights, noise and v target are the published formulas; a run with Min-SNR off (or the
    offset off) differs, Min-SNR scaling the first step's loss by the weights of its timesteps; batch 1 x
    accumulation 2 ends with the weights of batch 2 x accumulation 1 (which ignoring accumulation breaks)."""
    import zlib

    from finetune.families.sd1 import SD1Family
    from finetune.tiny_models.sd15 import build_tiny_sd15

    model = build_tiny_sd15(tmp_path / "vpred", prediction_type="v_prediction")
    data = make_image_folder(tmp_path / "data", n=2, sizes=((64, 64),))  # one bucket: batch 2 holds both

    # Noise and timestep drawn per image from a seed that is the image's latent, apart from the training RNG:
    # one batch of 2 and two batches of 1 then see the same noise, so they must train alike.
    real_sample_noisy = SD1Family.sample_noisy
    timesteps_seen = set()

    def per_image_noise(self, c, latents, noise_offset=0.0):
        parts = []
        for latent in latents:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(latent.detach().float().cpu().numpy().tobytes()))
                parts.append(real_sample_noisy(self, c, latent[None], noise_offset))
            timesteps_seen.add(int(parts[-1][1]))
        return tuple(torch.cat(p) for p in zip(*parts))

    monkeypatch.setattr(SD1Family, "sample_noisy", per_image_noise)

    def run_v(name, **overrides):
        settings = dict(training__max_steps=3, training__batch_size=1, training__gradient_accumulation_steps=2,
                        training__min_snr_gamma=5.0, training__noise_offset=0.1, training__lr_scheduler="cosine",
                        training__lr_warmup_steps=1)
        r = tiny_recipe(model, data, tmp_path / "outputs", **{**settings, **overrides})
        r["output"]["run_name"] = name
        result = train(validate(r, "test"), log=lambda *_: None, progress=False)
        return result, load_file(result.run_dir / "pytorch_lora_weights.safetensors")

    accumulated, w_acc = run_v("accumulated")
    assert accumulated.steps == 3 and len(accumulated.losses) == 3
    assert len(step_rows(accumulated.run_dir)) == 3
    assert all(torch.isfinite(torch.tensor(accumulated.losses)))
    c = accumulated.components
    assert c.noise_scheduler.config.prediction_type == "v_prediction"

    # Accumulation: 2 batches of 1 per step train exactly as 1 batch of 2 (same images, noise, timesteps).
    batched, w_batch = run_v("batched", training__batch_size=2, training__gradient_accumulation_steps=1)
    assert w_acc.keys() == w_batch.keys()
    # Summation order differs, and Adam magnifies that where gradients are tiny: ~1e-6 of the weights' norm
    # apart; with accumulation ignored (a step per batch of 1) they end ~1e-2 apart.
    difference = torch.cat([(w_acc[k] - w_batch[k]).flatten() for k in w_acc]).norm()
    assert difference < 1e-4 * torch.cat([w.flatten() for w in w_acc.values()]).norm()
    assert max(w.abs().max().item() for k, w in w_acc.items() if "lora_B" in k) > 1e-4  # the LoRA did train

    # Min-SNR: on the first step (same weights, noise and timesteps in both runs) the weighted loss is the
    # plain per-image losses scaled by min(SNR, 5) / (SNR + 1) of the images' timesteps, all < 1 here.
    plain, _ = run_v("no-min-snr", training__min_snr_gamma=None, training__max_steps=1)
    family = SD1Family()
    t = torch.tensor(sorted(timesteps_seen))
    assert len(t) == 2  # one timestep per image: the noise is a function of the image
    weights = family.loss_weights(c, t, 5.0)
    assert weights is not None and weights.max() < 1
    assert weights.min() * plain.losses[0] * (1 - 1e-4) <= accumulated.losses[0]
    assert accumulated.losses[0] <= weights.max() * plain.losses[0] * (1 + 1e-4)

    # Noise offset: a run without it differs from the first step on (with it ignored, they are identical).
    no_offset, _ = run_v("no-offset", training__noise_offset=0.0, training__max_steps=1)
    assert no_offset.losses[0] != accumulated.losses[0]

    # The family's formulas, on their own (the unpatched sample_noisy).
    alphas = c.noise_scheduler.alphas_cumprod
    ts = torch.tensor([0, 50, 250, 600, 999])
    snr = alphas[ts] / (1 - alphas[ts])
    assert torch.allclose(family.loss_weights(c, ts, 5.0), torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-5)
    off = family.loss_weights(c, ts, None)
    assert off is None or torch.equal(off, torch.ones_like(off))

    def spread_of_channel_means(noise_offset):
        # Clean latents of zero: the model input is sqrt(1 - a) * noise, the v target sqrt(a) * noise.
        torch.manual_seed(0)
        noisy, timesteps, target = real_sample_noisy(family, c, torch.zeros(16, 4, 64, 64), noise_offset)
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noise = noisy / (1 - a).sqrt()
        assert torch.allclose(target, a.sqrt() * noise, rtol=1e-4, atol=1e-5)
        return noise.mean(dim=(2, 3)).std().item()

    # Per image and channel the offset adds one constant ~ N(0, 0.1^2): the channel means spread ~0.1,
    # against 1/64 for plain 64x64 noise.
    assert spread_of_channel_means(0.0) < 0.03
    assert 0.07 < spread_of_channel_means(0.1) < 0.14


@pytest.mark.parametrize("batch, accumulation, epochs, steps", [
    (2, 1, 3, 6),  # 3 images at batch 2: 2 batches (2 + 1), so 2 steps an epoch
    (1, 2, 2, 4),  # 3 batches of 1 in windows of 2: 2 steps an epoch, the second of one batch
], ids=["batch2-no-accumulation", "accumulation-window-closes-at-epoch-end"])
def test_epochs_instead_of_steps(tiny_sd15, tmp_path, batch, accumulation, epochs, steps):
    """`training.epochs` with no max_steps: an epoch is ceil(batches / accumulation) optimizer steps (an
    accumulation window closes at the epoch's end), and the run is exactly `epochs` of them."""
    data = make_image_folder(tmp_path / "data", n=3, sizes=((64, 64),))  # one bucket
    r = tiny_recipe(tiny_sd15, data, tmp_path / "outputs", training__max_steps=None, training__epochs=epochs,
                    training__batch_size=batch, training__gradient_accumulation_steps=accumulation)
    result = train(validate(r, "test"), log=lambda *_: None, progress=False)
    assert result.steps == steps and len(result.losses) == steps
    rows = step_rows(result.run_dir)
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    # Epoch after epoch, each of the same number of steps.
    epoch_of_step = [row["epoch"] for row in rows]
    assert epoch_of_step == sorted(epoch_of_step)
    assert [epoch_of_step.count(e) for e in dict.fromkeys(epoch_of_step)] == [steps // epochs] * epochs


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


@pytest.mark.parametrize("scale", [False, True])
def test_scale_lr_multiplies_every_rate_by_the_global_batch_only_when_asked(tiny_sd15, tmp_path, scale):
    raw = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "data", n=4, sizes=((64, 64),)), tmp_path / "out",
                      training__max_steps=1, training__batch_size=2, training__gradient_accumulation_steps=2,
                      training__scale_lr=scale)
    raw["method"].update(train_text_encoder=True, text_encoder_lr=1e-4)
    logs = []
    result = train(validate(raw, "t"), log=logs.append, progress=False)
    factor = 4 if scale else 1  # batch 2 x 1 process x accumulation 2
    assert [g["lr"] for g in result.optimizer.param_groups] == pytest.approx([1e-3 * factor, 1e-4 * factor])
    assert any("global batch 4 = 2 per process x 1 process(es) x 2 accumulation" in line for line in logs)
    assert any("training.scale_lr" in line for line in logs) == scale


def test_data_worker_processes_train_the_same_run(tiny_sd15, tmp_path, monkeypatch):
    """data.num_workers decodes, crops, flips and drops captions in worker processes: each item's
    choices come from (seed, item, epoch), so the run is the one the main process alone trains."""
    import os

    from finetune.data.dataset import ImageCaptionDataset

    real = ImageCaptionDataset.item
    seen = tmp_path / "pids"
    seen.mkdir()

    def item(self, index, epoch):  # a file per process that decoded an image (visible from workers too)
        (seen / str(os.getpid())).touch()
        return real(self, index, epoch)

    monkeypatch.setattr(ImageCaptionDataset, "item", item)
    kw = dict(training__max_steps=4, data__crop="random", data__random_flip=True, data__caption_dropout=0.3)
    alone = run(tmp_path / "alone", tiny_sd15, data__num_workers=0, **kw)
    assert [p.name for p in seen.iterdir()] == [str(os.getpid())]
    (seen / str(os.getpid())).unlink()
    workers = run(tmp_path / "workers", tiny_sd15, data__num_workers=2, **kw)
    assert len(list(seen.iterdir())) == 2 and not (seen / str(os.getpid())).exists()
    a = load_file(alone.run_dir / "pytorch_lora_weights.safetensors")
    b = load_file(workers.run_dir / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert alone.losses == workers.losses
    assert alone.steps == 4
