"""The recipe's method applied to meta components, as `finetune/methods/` applies it to real ones:
the same peft LoRA config on the same target modules (so the LoRA parameter count is exact), the
whole denoiser for DreamBooth, the token embedding matrix for textual inversion (the optimizer holds
all of it: only the new rows learn, a gradient hook zeroes the rest)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KNOWN = ("lora", "dreambooth", "textual_inversion", "pivotal")


@dataclass(frozen=True)
class MethodPlan:
    """What trains, read from a recipe's `method` section (hashable: traces are cached by it)."""

    kind: str
    rank: int = 0  # denoiser LoRA rank; 0: no denoiser LoRA
    targets: tuple[str, ...] | str | None = None  # None: the family's
    text_lora: bool = False
    text_rank: int = 0
    text_targets: tuple[str, ...] | None = None
    vectors: int = 0  # textual inversion: new vectors per text encoder
    full_text: bool = False  # DreamBooth with train_text_encoder
    # The adapter variant (finetune/methods/adapters.py), so LoHa, LoKr, DoRA and LoCon count as they train.
    variant: str = "lora"
    dora: bool = False
    conv_rank: int = 0
    conv_alpha: float = 0.0
    lokr_factor: int = -1
    decompose_both: bool = False

    @property
    def trains_text(self) -> bool:
        """Prompts are encoded with gradients (finetune/methods `trains_text_encoder`): no text cache."""
        return self.text_lora or bool(self.vectors) or self.full_text


def method_plan(cfg) -> MethodPlan:
    from ..errors import FinetuneError

    kind = cfg.type
    if kind not in KNOWN:
        raise FinetuneError(f"method.type: plan does not know the method {kind!r} yet (it knows {', '.join(KNOWN)})")
    if kind == "dreambooth":
        return MethodPlan(kind, full_text=cfg.train_text_encoder)
    lora = kind in ("lora", "pivotal")
    variant = {k: getattr(cfg, k) or d for k, d in (("variant", "lora"), ("dora", False), ("conv_rank", 0),
                                                   ("conv_alpha", 0.0), ("lokr_factor", -1),
                                                   ("decompose_both", False))} if lora else {}
    return MethodPlan(
        kind, **variant, rank=cfg.rank if lora else 0,
        targets=_tuple(cfg.target_modules) if lora else None,
        text_lora=lora and cfg.train_text_encoder,
        text_rank=(cfg.text_encoder_rank or cfg.rank) if lora else 0,
        text_targets=_tuple(cfg.text_encoder_target_modules) if lora else None,
        vectors=cfg.num_vectors if kind in ("textual_inversion", "pivotal") else 0)


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


def trained_encoders(mp: MethodPlan, family, names: list[str]) -> list[str]:
    """The text encoders that run with gradients at every step (their outputs cannot be cached)."""
    if mp.vectors or mp.full_text:
        return list(names)  # embeddings of every encoder; DreamBooth trains them all
    if mp.text_lora:
        return [n for n in names if family.trainable_text_encoders is None or n in family.trainable_text_encoders]
    return []


def apply(mp: MethodPlan, family, name: str, model: torch.nn.Module, trained_text: list[str]) -> None:
    """Mark what trains in component `name` (a meta module), adding LoRA layers where the method does."""
    if name in ("unet", "transformer"):
        if mp.kind == "dreambooth":
            model.requires_grad_(True)
        elif mp.rank:
            _lora(model, mp, mp.rank, mp.targets or family.lora_targets, family.conv_lora_targets)
        return
    if name not in trained_text:
        return
    if mp.full_text:
        model.requires_grad_(True)
        return
    if mp.text_lora and (family.trainable_text_encoders is None or name in family.trainable_text_encoders):
        _lora(model, mp, mp.text_rank, mp.text_targets or family.text_encoder_lora_targets)
    if mp.vectors:
        model.get_input_embeddings().weight.requires_grad_(True)


def _lora(model: torch.nn.Module, mp: MethodPlan, rank: int, targets, conv_targets=()) -> None:
    """The adapter training injects (methods/adapters.py), with the same config."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from peft import inject_adapter_in_model

    from ..methods.adapters import adapter_config

    cfg = SimpleNamespace(variant=mp.variant, dora=mp.dora, conv_rank=mp.conv_rank or None,
                          conv_alpha=mp.conv_alpha or None, lokr_factor=mp.lokr_factor,
                          decompose_both=mp.decompose_both, dropout=0.0)
    dtype = next(model.parameters()).dtype
    with init_empty_weights():  # the adapter layers on the meta device too
        inject_adapter_in_model(adapter_config(cfg, rank, rank, _list(targets), conv_targets), model)
    # Traced in the model's dtype, as autocast runs them; stored in fp32 (counted as such).
    torch.nn.Module.to(model, dtype=dtype)


def _list(targets):
    return list(targets) if isinstance(targets, tuple) else targets


def is_lora(name: str) -> bool:
    """An adapter's parameter or module: LoRA/DoRA (lora_), LoHa (hada_), LoKr (lokr_)."""
    return any(part in name for part in ("lora_", "hada_", "lokr_"))
