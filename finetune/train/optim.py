"""Optimizers by recipe name; the 8-bit ones come from bitsandbytes, imported only when asked for."""

from __future__ import annotations

import torch

from ..errors import FinetuneError


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # bitsandbytes raises several kinds when its native library is unusable
        raise FinetuneError(
            f"optimizer.type needs bitsandbytes, which failed to import ({type(e).__name__}: {e}); "
            "`pip install bitsandbytes`, or use optimizer.type=adamw") from e
    return bnb


def build_optimizer(groups: list[dict], cfg, lr: float) -> torch.optim.Optimizer:
    kind = cfg.type
    if kind in ("adamw", "adamw8bit"):
        betas = cfg.betas or (0.9, 0.999)
        if kind == "adamw":
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        return _bnb().optim.AdamW8bit(groups, lr=lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                      min_8bit_size=cfg.min_8bit_size)
    if kind in ("lion", "lion8bit"):
        betas = cfg.betas or (0.9, 0.99)
        bnb = _bnb()
        if kind == "lion":
            return bnb.optim.Lion(groups, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
        return bnb.optim.Lion8bit(groups, lr=lr, betas=betas, weight_decay=cfg.weight_decay,
                                  min_8bit_size=cfg.min_8bit_size)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise FinetuneError(f"optimizer.type: unknown optimizer {kind!r}")


def build_scheduler(training, optimizer, max_steps: int, processes: int):
    """The recipe's learning-rate schedule over `max_steps` optimizer steps. accelerate steps a
    prepared scheduler once per process at every optimizer step, so its lengths count that way."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=training.lr_warmup_steps * processes,
                         num_training_steps=max_steps * processes)
