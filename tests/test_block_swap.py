"""`memory.offload_blocks`: parked blocks visit the device exactly when their weights are used, in the
forward pass, the forward that checkpointing recomputes and the backward pass, and training gives the
same numbers as with every weight in place.

On this CPU machine "the device" and "the CPU" are one, so the protocol is checked with parked
weights poisoned with NaN: any op that touched a weight while its block was away would put NaN
into the output or the gradients."""

import pytest
import torch

from finetune.errors import RecipeError
from finetune.recipe import validate
from finetune.tiny_models import resolve_builtin
from finetune.train import train
from finetune.train.block_swap import BlockSwap, repeated_blocks

from .helpers import make_image_folder, tiny_recipe


class Poisoned(BlockSwap):
    """Between visits a weight is all NaN."""

    def parked(self, host):
        return torch.full_like(host, float("nan"))


def parked(block) -> bool:
    return all(p.isnan().all() for p in block.parameters() if not p.requires_grad)


def flux_with_lora():
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    model = FluxTransformer2DModel.from_pretrained(resolve_builtin("tiny-flux"), subfolder="transformer")
    model.requires_grad_(False)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "proj_out"]))
    for name, p in model.named_parameters():  # a non-zero B: gradients reach every LoRA weight
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    return model


def flux_grads(model, checkpointing: bool):
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    seq, txt = 16, 8
    out = model(hidden_states=torch.randn(1, seq, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), img_ids=torch.zeros(seq, 3), txt_ids=torch.zeros(txt, 3),
                guidance=torch.tensor([1.0])).sample
    out.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_parked_blocks_are_present_whenever_used_and_gradients_are_unchanged(checkpointing):
    expected = flux_grads(flux_with_lora(), checkpointing)
    model = flux_with_lora()
    blocks = repeated_blocks(model)
    assert len(blocks) == 4  # 2 double-stream + 2 single-stream in the tiny FLUX
    swap = Poisoned(blocks[:3], torch.device("cpu"))
    assert all(parked(b) for b in blocks[:3])
    got = flux_grads(model, checkpointing)
    assert got.keys() == expected.keys()
    # Equal but for float rounding: an onloaded weight is a fresh copy, aligned as the allocator chose.
    assert all(torch.allclose(got[n], expected[n], rtol=1e-5, atol=1e-8) for n in expected)
    swap.offload_all()  # only a block whose inputs needed no gradient may wait for the next forward
    assert all(parked(b) for b in blocks[:3]) and not parked(blocks[3])


def test_sampling_without_gradients_visits_and_returns():
    model = flux_with_lora()
    swap = Poisoned(repeated_blocks(model), torch.device("cpu"))
    with torch.no_grad():
        cfg = model.config
        out = model(hidden_states=torch.randn(1, 16, cfg.in_channels), encoder_hidden_states=torch.randn(1, 8, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
              txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0])).sample
    assert torch.isfinite(out).all() and not swap.onloaded


def flux_run(tmp_path, name, **memory):
    r = tiny_recipe(resolve_builtin("tiny-flux"), make_image_folder(tmp_path / "data"), tmp_path / "outputs",
                    training__max_steps=3, training__gradient_checkpointing=True,
                    validation__prompts=["a photo of sks ball"], validation__guidance_scale=1.0)
    r["model"]["family"] = "flux"
    r["output"]["run_name"] = name
    r["memory"] = memory
    logs = []
    return train(validate(r, "test"), log=logs.append, progress=False), logs


def test_training_with_parked_blocks_gives_the_same_run(tmp_path):
    plain, _ = flux_run(tmp_path, "plain")
    parked, logs = flux_run(tmp_path, "parked", offload_blocks=3)
    assert parked.losses == pytest.approx(plain.losses, rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(plain.run_dir / "pytorch_lora_weights.safetensors")
    b = load_file(parked.run_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)  # Adam magnifies 1e-10 noise in near-zero gradients
    assert parked.samples  # validation sampled through the parked blocks
    line = next(x for x in logs if x.startswith("memory.offload_blocks:"))
    assert "3 blocks' frozen weights kept in CPU memory" in line


def test_offload_blocks_with_a_quantized_base_is_refused(tmp_path):
    r = tiny_recipe(resolve_builtin("tiny-sd15"), make_image_folder(tmp_path / "data"), tmp_path / "outputs")
    r["memory"] = {"offload_blocks": 2, "quantize_base": "torchao-int8"}
    with pytest.raises(RecipeError, match="memory.offload_blocks: cannot move quantized weights"):
        validate(r, "r.yaml")
