"""`memory.quantize_base`: the frozen denoiser of every family loads quantized (torchao int8
weight-only on the CPU here: int8 Linear weights, fewer bytes, the rest in its dtype), a LoRA trains
on it and its file loads into the plain, unquantized pipeline; what cannot run (bitsandbytes without
a GPU, a missing package, DreamBooth on a quantized base, a single-file base, the old
`model.flux.quantize` key) is one line before any model loads."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import validate
from finetune.recipe.schema import ModelConfig
from finetune.train import train
from finetune.train.preflight import preflight

from .helpers import make_image_folder, tiny_recipe

pytest.importorskip("torchao")

BASES = {"sd1": "builtin:tiny-sd15", "sdxl": "builtin:tiny-sdxl", "flux": "builtin:tiny-flux"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(family_name, base, quantize="none", dtype=torch.bfloat16, **cfg):
    from finetune.families import get_family
    from finetune.families.base import resolve_source

    family = get_family(family_name)
    return family.load(resolve_source(base), ModelConfig(base=base, **cfg), dtype=dtype, device="cpu",
                       quantize=quantize)


def _stored_bytes(module) -> int:
    """Bytes of the tensors that hold the module's weights: a torchao tensor's int8 data and scales,
    not the size of the dense tensor it stands for."""
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        parts = [getattr(t, name) for name in getattr(t, "tensor_data_names", ())] or [t]
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


def _linears(module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _is_int8(weight) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor) and weight.qdata.dtype == torch.int8


# ------------------------------------------------------------------ loading, every family


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_denoiser_loads_int8_and_smaller(family):
    plain = _load(family, BASES[family]).denoiser
    c = _load(family, BASES[family], quantize="torchao-int8")
    q = c.denoiser
    assert q is c.pipeline.components["unet" if family != "flux" else "transformer"]
    assert _linears(q) and all(_is_int8(m.weight) for m in _linears(q))
    # Everything torchao leaves alone (convolutions, norms, biases) keeps the training dtype.
    others = {p.dtype for p in q.parameters() if not _is_int8(p)}
    assert others == {torch.bfloat16}, others
    assert not any(p.requires_grad for p in q.parameters())
    linear_plain = sum(m.weight.numel() * m.weight.element_size() for m in _linears(plain))
    linear_q = sum(_stored_bytes(m) - (m.bias.numel() * 2 if m.bias is not None else 0) for m in _linears(q))
    assert linear_q < 0.6 * linear_plain  # int8 data + one scale per row, from bf16
    assert _stored_bytes(plain) - _stored_bytes(q) >= 0.4 * linear_plain
    # The text encoders and the VAE stay as they were.
    assert all(not _is_int8(m.weight) for te in c.text_encoders.values() for m in _linears(te))


# ------------------------------------------------------------------ training a LoRA on it


def _image(pipe, **kwargs):
    return pipe("a photo of sks ball", num_inference_steps=2, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images[0]


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_lora_trains_on_int8_base_and_loads_into_the_plain_pipeline(family, tmp_path):
    from diffusers import DiffusionPipeline

    from finetune.tiny_models import resolve_builtin

    model = resolve_builtin(BASES[family].removeprefix("builtin:"))
    data = make_image_folder(tmp_path / "data", n=2, sizes=((64, 64),))
    r = tiny_recipe(model, data, tmp_path / "out", training__max_steps=3, training__learning_rate=1e-2)
    r["memory"] = {"quantize_base": "torchao-int8"}
    result = train(validate(r, "test"), log=lambda *_: None, progress=False)

    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    denoiser = result.components.denoiser
    frozen = [m for m in _linears(denoiser) if not m.weight.requires_grad]  # the bases LoRA wraps, and the rest
    assert frozen and all(_is_int8(m.weight) for m in frozen)
    lora = load_file(result.run_dir / "pytorch_lora_weights.safetensors")
    ups = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert ups and all(v.dtype == torch.float32 for v in ups)
    assert max(v.abs().max().item() for v in ups) > 0  # peft starts B at zero: only training moves it

    pipe = DiffusionPipeline.from_pretrained(model, **({"safety_checker": None} if family == "sd1" else {}))
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"guidance_scale": 1.0} if family == "sd1" else {}
    plain = _image(pipe, **kwargs)
    pipe.load_lora_weights(str(result.run_dir))
    assert np.abs(_image(pipe, **kwargs) - plain).max() > 1e-4


# ------------------------------------------------------------------ one line, before any model loads


def _recipe(tmp_path, model, **memory):
    data = make_image_folder(tmp_path / "data", n=1, sizes=((64, 64),))
    r = tiny_recipe(model, data, tmp_path / "out")
    r["memory"] = memory
    return r


def _one_line(excinfo) -> str:
    err = excinfo.value
    lines = err.problems if isinstance(err, RecipeError) else [str(err)]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_bitsandbytes_without_a_gpu(kind, tiny_sd15, tmp_path):
    with pytest.raises(RecipeError) as e:
        preflight(validate(_recipe(tmp_path, tiny_sd15, quantize_base=kind), "test"))
    line = _one_line(e)
    assert line.startswith(f"memory.quantize_base: {kind} needs a CUDA GPU") and "torchao-int8" in line
    with pytest.raises(FinetuneError) as e:  # Family.load called directly says the same
        _load("sd1", str(tiny_sd15), quantize=kind)
    assert _one_line(e) == line


def test_missing_package(monkeypatch, tiny_sd15, tmp_path):
    import finetune.families.quantize as quantize

    monkeypatch.setattr(quantize, "installed", lambda package: package != "torchao")
    with pytest.raises(RecipeError) as e:
        preflight(validate(_recipe(tmp_path, tiny_sd15, quantize_base="torchao-int8"), "test"))
    assert _one_line(e) == ("memory.quantize_base: torchao-int8 needs the torchao package (pip install torchao); "
                            "or set none")


def test_dreambooth_cannot_quantize_the_weights_it_trains(tiny_sd15, tmp_path):
    r = _recipe(tmp_path, tiny_sd15, quantize_base="torchao-int8")
    r["method"] = {"type": "dreambooth"}
    with pytest.raises(RecipeError) as e:
        train(validate(r, "test"), log=lambda *_: None, progress=False)
    line = _one_line(e)
    assert line.startswith("memory.quantize_base: DreamBooth trains the denoiser's own weights")
    assert not (tmp_path / "out" / "run").exists()  # refused before the run folder, let alone the model


def test_old_flux_key_names_the_new_one(tmp_path):
    from finetune.tiny_models import resolve_builtin

    r = _recipe(tmp_path, resolve_builtin("tiny-flux"))
    r["model"]["flux"] = {"quantize": "nf4"}
    with pytest.raises(RecipeError) as e:
        validate(r, "test")
    assert _one_line(e) == ("test: model.flux.quantize: moved to memory.quantize_base (for every family: none, "
                            "int8, nf4 or torchao-int8); write memory.quantize_base=nf4 instead")


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_single_file_is_refused_not_loaded_unquantized(family, tiny_sd15, tmp_path):
    """diffusers' from_single_file would load it unquantized without a word (see quantize.SINGLE_FILE)."""
    from safetensors.torch import save_file

    from finetune.tiny_models import resolve_builtin

    config = str(tiny_sd15 if family == "sd1" else resolve_builtin("tiny-flux"))
    path = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, path)
    r = _recipe(tmp_path, path, quantize_base="torchao-int8")
    r["model"].update(family=family, config=config)
    with pytest.raises(RecipeError) as e:
        preflight(validate(r, "test"))
    line = _one_line(e)
    assert line.startswith("memory.quantize_base: diffusers cannot quantize a single-file checkpoint")
    with pytest.raises(FinetuneError) as e:
        _load(family, str(path), quantize="torchao-int8", config=config)
    assert _one_line(e) == line
