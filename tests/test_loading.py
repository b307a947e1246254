"""Loading: every component in the dtype it trains in and on the device asked for, read from disk in
that dtype (no float32 copy of a half-precision model is ever made). Peak RAM is measured on
real-size models by `benchmarks/load_memory.py`; tiny models only allow checking the dtypes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from finetune.families.base import dtype_kwargs, resolve_source
from finetune.recipe.schema import ModelConfig
from finetune.train.setup import WEIGHT_DTYPES, load_components, resolve_family

BASES = ["builtin:tiny-sd15", "builtin:tiny-sdxl", "builtin:tiny-flux"]


def _params(module) -> list[tuple[str, torch.nn.Parameter]]:
    return list(module.named_parameters())


def _kept_in_fp32(module, name: str, dtype: torch.dtype) -> bool:
    """Whether the library keeps this parameter in fp32 on purpose when loading in `dtype`
    (transformers' T5 keeps its `wo` projections fp32 under fp16, where they would overflow)."""
    keep = list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep += list(getattr(module, "_keep_in_fp32_modules", None) or [])
    return any(f".{k}." in f".{name}" for k in keep)


def _check(c, dtype: torch.dtype, device: torch.device) -> None:
    trained = {"denoiser": c.denoiser, **c.text_encoders}
    for what, module in trained.items():
        for name, p in _params(module):
            want = torch.float32 if _kept_in_fp32(module, name, dtype) else dtype
            assert p.dtype == want, f"{what}.{name} is {p.dtype}, not {want}"
            assert p.device == device, f"{what}.{name} is on {p.device}"
    for name, p in _params(c.vae):
        assert p.dtype == torch.float32, f"vae.{name} is {p.dtype}: SD VAEs overflow in half precision"
        assert p.device == device
    # The pipeline holds the very modules the loop trains (sampling and LoRA saving go through it).
    assert c.pipeline.vae is c.vae and all(getattr(c.pipeline, n) is m for n, m in c.text_encoders.items())


@pytest.fixture
def casts(monkeypatch):
    """Every `Module.to` that turns real (not meta) float32 weights into half precision: a float32
    copy of those weights existed in RAM before they reached the dtype they train in."""
    seen = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if dtype in (torch.float16, torch.bfloat16) and any(
                p.dtype == torch.float32 and p.device.type != "meta" for p in self.parameters()):
            seen.append(type(self).__name__)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return seen


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_components_load_in_training_dtypes(base, precision, casts):
    cfg = ModelConfig(base=base)
    family, source = resolve_family(cfg)
    cpu = torch.device("cpu")
    c = load_components(family, source, cfg, SimpleNamespace(mixed_precision=precision), cpu)
    _check(c, WEIGHT_DTYPES[precision], cpu)
    assert not casts, f"float32 weights were cast to half precision after loading: {casts}"


def test_bf16_is_read_as_bf16_not_cast_from_fp32(monkeypatch):
    """The loaders are asked for bf16 (the VAE: fp32), so each tensor is converted as it is read."""
    from diffusers import StableDiffusionPipeline

    asked = []
    real = StableDiffusionPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("dtype", kwargs.get("torch_dtype")))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(spy))
    cfg = ModelConfig(base="builtin:tiny-sd15")
    family, source = resolve_family(cfg)
    c = family.load(source, cfg, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert asked == [{"default": torch.bfloat16, "vae": torch.float32}]
    assert c.denoiser.dtype == torch.bfloat16 and c.vae.dtype == torch.float32


def test_default_load_is_unchanged():
    """`load(source, cfg)` (finetune generate until it picks a dtype) loads as before: float32."""
    cfg = ModelConfig(base="builtin:tiny-sd15")
    family, source = resolve_family(cfg)
    c = family.load(source, cfg)
    assert {p.dtype for m in c.frozen_modules() for p in m.parameters()} == {torch.float32}
    assert dtype_kwargs(None) == {}


def test_single_file_vae_stays_fp32_and_exact(tmp_path, casts):
    """A single-file checkpoint: from_single_file takes one dtype for every component, so the VAE is
    read on its own in fp32 — the checkpoint's values, not values rounded through bf16."""
    from finetune.export.single_file import save_sd1_single_file

    folder = resolve_source("builtin:tiny-sd15").location
    family = resolve_family(ModelConfig(base=folder))[0]
    ref = family.load(resolve_source(folder), ModelConfig(base=folder))
    path = save_sd1_single_file(tmp_path / "model.safetensors", ref.denoiser, ref.vae,
                                ref.text_encoders["text_encoder"], dtype=torch.float32)
    cfg = ModelConfig(base=str(path), config=folder)
    cpu = torch.device("cpu")
    c = load_components(family, resolve_source(str(path)), cfg, SimpleNamespace(mixed_precision="bf16"), cpu)
    _check(c, torch.bfloat16, cpu)
    assert not casts
    for (name, p), q in zip(c.vae.named_parameters(), ref.vae.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(c.denoiser.parameters(), ref.denoiser.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16))


def test_model_vae_is_loaded_in_fp32_instead_of_the_bases(monkeypatch):
    """`model.vae` replaces the base's VAE before loading: the base's is never read."""
    from diffusers import AutoencoderKL

    folder = resolve_source("builtin:tiny-sd15").location
    loads = []
    real = AutoencoderKL.from_pretrained.__func__
    monkeypatch.setattr(AutoencoderKL, "from_pretrained",
                        classmethod(lambda cls, *a, **k: (loads.append(a[0]), real(cls, *a, **k))[1]))
    cfg = ModelConfig(base="builtin:tiny-sd15", vae=folder)
    family, source = resolve_family(cfg)
    cpu = torch.device("cpu")
    c = load_components(family, source, cfg, SimpleNamespace(mixed_precision="bf16"), cpu)
    _check(c, torch.bfloat16, cpu)
    assert loads == [folder]
