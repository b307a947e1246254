"""Optimizers by recipe name. The ones from other packages (bitsandbytes' 8-bit ones, Prodigy,
schedule-free AdamW) are imported only when asked for; `averaged` switches a schedule-free optimizer
to the weights it means (its average) around sampling and saving."""

from __future__ import annotations

import contextlib
import io

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


def _package(kind: str, module: str, pip: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise FinetuneError(f"optimizer.type={kind} needs the {pip} package ({e}); `pip install {pip}`") from e


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
    if kind == "prodigy":
        prodigy = _package(kind, "prodigyopt", "prodigyopt")
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
            return prodigy.Prodigy(groups, lr=lr, betas=cfg.betas or (0.9, 0.999), eps=cfg.eps,
                                   weight_decay=cfg.weight_decay, d_coef=cfg.d_coef,
                                   use_bias_correction=cfg.use_bias_correction, safeguard_warmup=cfg.safeguard_warmup)
    if kind == "adamw_schedulefree":
        return _schedule_free(groups, cfg, lr)
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        # With relative_step Adafactor computes its own rate and refuses one given to it.
        return Adafactor(groups, lr=None if cfg.relative_step else lr, weight_decay=cfg.weight_decay,
                         relative_step=cfg.relative_step, scale_parameter=cfg.scale_parameter,
                         warmup_init=cfg.warmup_init)
    raise FinetuneError(f"optimizer.type: unknown optimizer {kind!r}")


def step_size(optimizer) -> dict[str, float]:
    """What the logged rate leaves out: Prodigy moves by its own estimate d times the scheduled rate
    (1.0 as the README asks), so `lr` alone says nothing of how fast it learns. Its first group's d (the
    estimate is one for all groups) and d x lr; nothing for other optimizers."""
    group = optimizer.param_groups[0]
    if "d" not in group or "d0" not in group:
        return {}
    return {"prodigy_d": float(group["d"]), "effective_lr": float(group["d"] * group["lr"])}


def _schedule_free(groups: list[dict], cfg, lr: float) -> torch.optim.Optimizer:
    sf = _package(cfg.type, "schedulefree", "schedulefree")
    optimizer = sf.AdamWScheduleFree(groups, lr=lr, betas=cfg.betas or (0.9, 0.999), eps=cfg.eps,
                                     weight_decay=cfg.weight_decay, r=cfg.r)  # warm-up: build_scheduler
    optimizer.train()  # it starts in eval mode, in which it refuses to step
    return optimizer


def build_scheduler(training, optimizer, max_steps: int, processes: int):
    """The recipe's learning-rate schedule over `max_steps` optimizer steps. accelerate steps a
    prepared scheduler once per process at every optimizer step, so its lengths count that way."""
    from diffusers.optimization import get_scheduler

    if _is_schedule_free(optimizer):
        # Its warm-up is its own (the recipe's scheduler is constant, a recipe check): training.lr_warmup_steps,
        # counted in optimizer steps whatever the number of processes.
        for group in optimizer.param_groups:
            group["warmup_steps"] = training.lr_warmup_steps
    if optimizer.defaults.get("relative_step"):
        # Adafactor's own schedule; this proxy only reports the rate it uses (the recipe's is constant).
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    return get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=training.lr_warmup_steps * processes,
                         num_training_steps=max_steps * processes)


def _is_schedule_free(optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
    return "train_mode" in inner.defaults and callable(getattr(inner, "eval", None))


@contextlib.contextmanager
def averaged(optimizer):
    """Inside: a schedule-free optimizer's averaged weights (eval mode), the ones it means for use, for
    sampling and for the files a run writes. After: train mode, with the very weights it trained from,
    bit for bit (switching back recomputes them from the average, which is off in the last bits, and
    a resumed run, which loads the saved train-mode weights, would then part from one never stopped).
    Other optimizers, or one in eval mode already: nothing changes."""
    if not _is_schedule_free(optimizer) or not optimizer.param_groups[0]["train_mode"]:
        yield
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    kept = [p.detach().to("cpu", copy=True) for p in params]  # in host memory: GPU memory is the scarce one
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)


def final_weights(optimizer) -> None:
    """At the end of a run: a schedule-free optimizer's averaged weights, for good, so that the final
    files, the last samples and the in-memory model the run returns are the same weights."""
    if _is_schedule_free(optimizer):
        optimizer.eval()
