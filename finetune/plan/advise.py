"""`plan --vram`: the cheapest recipe changes that make a run fit a GPU, each with the figure after it.

Changes are tried from the one that costs least (in results or speed) to the one that costs most,
each on top of the previous ones, until the run fits; then any earlier change the later ones made
unnecessary is dropped. A change that saves almost nothing (8-bit optimizer states of a LoRA) is
not proposed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .estimate import Estimate, estimate
from .settings import Settings

MIN_SAVING = 0.01  # of the figure: smaller savings are not worth a line
MIN_RESOLUTION = 256


@dataclass
class Change:
    label: str
    keys: list[str]  # recipe overrides that make it
    update: dict  # Settings fields it sets


@dataclass
class Step:
    change: Change
    before: float  # bytes the card needs before and after it
    after: float


@dataclass
class Advice:
    fits: bool
    steps: list[Step]
    final: Estimate


def candidates(s: Settings, family) -> list[Change]:
    """Every change that applies to `s`, cheapest first."""
    out = []
    eight = {"adamw": "adamw8bit", "lion": "lion8bit"}.get(s.optimizer)
    if eight:
        out.append(Change("8-bit optimizer states", [f"optimizer.type={eight}"], {"optimizer": eight}))
    if s.precision == "no":
        out.append(Change("mixed precision bf16 (fp16 on GPUs before Ampere)", ["training.mixed_precision=bf16"],
                          {"precision": "bf16"}))
    if s.validation_images > 1:
        out.append(Change("one validation image at a time", ["validation.images_per_prompt=1"],
                          {"validation_images": 1}))
    if s.prior_batch > 1:
        out.append(Change("one class image at a time", ["prior_preservation.sample_batch_size=1"], {"prior_batch": 1}))
    if not s.checkpointing:
        out.append(Change("gradient checkpointing (about 30% slower)", ["training.gradient_checkpointing=true"],
                          {"checkpointing": True}))
    if family.name == "flux" and s.quantize == "none":
        out.append(Change("8-bit base transformer (bitsandbytes)", ["model.flux.quantize=int8"], {"quantize": "int8"}))
    if s.batch > 1:
        steps = s.batch * s.accumulation
        out.append(Change(f"batch 1, {steps} accumulation steps (the same global batch, slower)",
                          ["training.batch_size=1", f"training.gradient_accumulation_steps={steps}"],
                          {"batch": 1, "accumulation": steps}))
    if family.name == "flux" and s.quantize in ("none", "int8"):
        out.append(Change("4-bit NF4 base transformer (QLoRA)", ["model.flux.quantize=nf4"], {"quantize": "nf4"}))
    for side in (s.resolution * 3 // 4 // 64 * 64, s.resolution // 2 // 64 * 64):
        if MIN_RESOLUTION <= side < s.resolution:
            out.append(_resolution(s, side))
    return out


def _resolution(s: Settings, side: int) -> Change:
    """Train at `side` px; validation samples (at the model's native size unless set) go down with it,
    or they would keep the peak where it was."""
    if not s.validation_images:
        return Change(f"train at {side} px (less detail)", [f"data.resolution={side}"], {"resolution": side})
    return Change(f"train and sample at {side} px (less detail)",
                  [f"data.resolution={side}", f"validation.width={side}", f"validation.height={side}"],
                  {"resolution": side, "validation_size": (side, side)})


def advise(tracer, s: Settings, budget: float) -> Advice:
    """The changes that bring what the card needs (`Estimate.needs`) under `budget` bytes, if any do."""
    current = estimate(tracer, s)
    if current.needs <= budget:
        return Advice(True, [], current)
    taken: list[Change] = []
    for change in candidates(s, tracer.family):
        after = estimate(tracer, replace(current.settings, **change.update))
        if after.needs < current.needs * (1 - MIN_SAVING):
            taken.append(change)
            current = after
            if current.needs <= budget:
                break
    fits = current.needs <= budget
    if fits:
        taken = _prune(tracer, s, taken, budget)
    return Advice(fits, _chain(tracer, s, taken), estimate(tracer, _applied(s, taken)))


def _applied(s: Settings, changes: list[Change]) -> Settings:
    for c in changes:
        s = replace(s, **c.update)
    return s


def _prune(tracer, s: Settings, taken: list[Change], budget: float) -> list[Change]:
    """Drop an earlier change when the others fit without it (checkpointing can make a smaller
    validation batch unnecessary); the last one is what made the run fit."""
    kept = list(taken)
    for change in taken[:-1]:
        without = [c for c in kept if c is not change]
        if estimate(tracer, _applied(s, without)).needs <= budget:
            kept = without
    return kept


def _chain(tracer, s: Settings, changes: list[Change]) -> list[Step]:
    steps, before = [], estimate(tracer, s).needs
    for i, change in enumerate(changes):
        after = estimate(tracer, _applied(s, changes[:i + 1])).needs
        steps.append(Step(change, before, after))
        before = after
    return steps
