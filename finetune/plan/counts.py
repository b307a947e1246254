"""Parameters of each component, and which of them train, counted on meta builds with the method
applied (LoRA layers injected by peft, as training injects them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import meta
from .method import MethodPlan, is_lora, trained_encoders

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class Component:
    name: str  # the pipeline's attribute: unet, transformer, text_encoder, text_encoder_2, vae
    kind: str  # its class
    own: int  # its own parameters (LoRA layers excluded)
    trained_own: int = 0  # of those, the ones that train (then kept in fp32)
    linear: int = 0  # weights of its Linear layers (what a quantized base stores in 8 or 4 bits)
    linear_rows: int = 0  # their output rows (8-bit quantization keeps a scale per row)
    trained_sizes: list[int] = field(default_factory=list)  # every trained tensor, LoRA layers included
    embedding: int = 0  # size of the token embedding matrix (textual inversion keeps a copy of it)
    embedding_dim: int = 0

    @property
    def trained(self) -> int:
        return sum(self.trained_sizes)


def text_encoder_names(spec) -> list[str]:
    return [n for n in TEXT_ENCODERS if (spec.index.get(n) or [None])[0]]


def count_components(tracer, mp: MethodPlan, dtype) -> dict[str, Component]:
    """Every component the training loop puts on the GPU: denoiser, text encoders, VAE."""
    spec = tracer.spec
    trained_text = trained_encoders(mp, spec.family, text_encoder_names(spec))
    out = {}
    for name in [spec.family.denoiser_component, *text_encoder_names(spec), "vae"]:
        model, repeats = tracer.model(name, mp, dtype)
        out[name] = _count(name, model, repeats, name in trained_text and mp.vectors)
    return out


def _count(name: str, model, repeats, embedding: bool) -> Component:
    shape = model.get_input_embeddings().weight.shape if embedding else (0, 0)
    # What diffusers' bitsandbytes and torchao quantizers convert: every nn.Linear but the modules the
    # model keeps in fp32 (matched as diffusers matches them; UNets and FLUX name none), never a conv.
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    linear = {id(m.weight) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not is_lora(n)
              and not any(k + "." in n or k == n for k in keep)}
    return Component(
        name=name, kind=type(model).__name__, embedding=shape[0] * shape[1], embedding_dim=shape[1],
        own=meta.count(model, repeats, lambda n, p: not is_lora(n)),
        linear=meta.count(model, repeats, lambda n, p: id(p) in linear),
        linear_rows=_rows(model, repeats, linear),
        trained_own=meta.count(model, repeats, lambda n, p: p.requires_grad and not is_lora(n)),
        trained_sizes=meta.numels(model, repeats, lambda n, p: p.requires_grad))


def _rows(model, repeats, linear: set[int]) -> int:
    """Output rows of the weights in `linear`, the blocks cut from the model included."""
    def rows(module) -> int:
        return sum(p.shape[0] for p in module.parameters() if id(p) in linear)
    return rows(model) + sum((r.full - r.kept) * rows(r.sample) for r in repeats)
