"""The `finetune plan` command's work: read the recipe, describe its model, estimate, advise."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneError

# GPUs are sold in GB that are GiB (a "12 GB" card has 12288 MiB), so GB and GiB read the same.
_UNITS = {"": 2**30, "g": 2**30, "gb": 2**30, "gib": 2**30, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str, option: str) -> float:
    """Bytes of "12GB", "12", "12.5 GiB", "800MB" (GB read as GiB)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise FinetuneError(f"{option}: expected a size like 12GB or 24 (GiB), got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def load_plan_recipe(recipe: str, overrides: list[str]):
    """The recipe with its overrides, validated. Unlike `load_recipe` a missing data folder is no
    error: plan needs no images (it counts them when the folder is here, for the host caches)."""
    from ..recipe.loader import apply_overrides, find_recipe, load_raw, validate

    file = find_recipe(recipe)
    return validate(apply_overrides(load_raw(file), overrides), str(file)), Path(file)


@dataclass
class PlanResult:
    recipe_name: str
    spec: object
    estimate: object
    advice: object | None  # with --vram
    vram: float | None
    ram: float | None


def plan(recipe: str, overrides: list[str], vram: str | None = None, ram: str | None = None) -> PlanResult:
    from .advise import advise
    from .estimate import estimate

    budget = parse_size(vram, "--vram") if vram is not None else None
    host = parse_size(ram, "--ram") if ram is not None else None
    r, path = load_plan_recipe(recipe, overrides)
    tracer, settings = _prepare(r)
    est = estimate(tracer, settings)
    advice = advise(tracer, settings, budget) if budget is not None else None
    return PlanResult(path.stem, tracer.spec, est, advice, budget, host)


def predict(recipe, images: int | None = None):
    """The `Estimate` of a validated recipe's run (a training run's own recipe), from the model's
    configs: no weight is read. `images`: the training images, when the caller has counted them (the
    host caches hold one latent and one caption's embeddings each)."""
    from dataclasses import replace

    from .estimate import estimate

    tracer, settings = _prepare(recipe)
    return estimate(tracer, settings if images is None else replace(settings, images=images))


def _prepare(recipe):
    from .activations import Tracer
    from .models import resolve_model
    from .settings import settings_from_recipe

    return Tracer(resolve_model(recipe.model)), settings_from_recipe(recipe)


def exit_code(result: PlanResult) -> int:
    """0: fits (or nothing to fit to); 1: fits only with the proposed changes, or the host RAM is
    short; 2: cannot fit the GPU with any change plan knows."""
    code = 0
    if result.advice is not None and not result.advice.fits:
        code = 2
    elif result.advice is not None and result.advice.steps:
        code = 1
    if result.ram is not None and result.estimate.host_peak > result.ram:
        code = max(code, 1)
    return code
