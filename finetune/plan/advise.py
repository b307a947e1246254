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
BLOCKS = -1  # memory.offload_blocks: as few as make the run fit (`_blocks`)


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
    out = _offloading(s)
    if s.ema == "accelerator":  # the same average, its updates slower by a copy each way
        out.append(Change("EMA kept in CPU memory", ["training.ema.device=cpu"], {"ema": "cpu"}))
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
    out += _smaller_base(s, family)
    if s.batch > 1:
        steps = s.batch * s.accumulation
        out.append(Change(f"batch 1, {steps} accumulation steps (the same global batch, slower)",
                          ["training.batch_size=1", f"training.gradient_accumulation_steps={steps}"],
                          {"batch": 1, "accumulation": steps}))
    if not s.offload_blocks:  # the count is chosen against the budget (`_blocks`)
        out.append(Change("blocks in CPU memory", [], {"offload_blocks": BLOCKS}))
    if s.quantize in ("none", "int8", "torchao-int8") and s.method.kind != "dreambooth":
        out.append(Change(f"4-bit NF4 base {family.denoiser_component} (QLoRA, bitsandbytes)",
                          ["memory.quantize_base=nf4"], {"quantize": "nf4"}))
    if s.validation_images:  # the samples show progress, the model learns the same without them
        out.append(Change("no validation samples while training",
                          ["validation.prompts=[]"], {"validation_images": 0}))
    for side in (s.resolution * 3 // 4 // 64 * 64, s.resolution // 2 // 64 * 64):
        if MIN_RESOLUTION <= side < s.resolution:
            out.append(_resolution(s, side))
    return out


def _offloading(s: Settings) -> list[Change]:
    """The text encoders and the VAE off the GPU once what they make is cached: the same results."""
    out = []
    if not s.text_offload and not s.method.trains_text and not s.captions_vary:
        keys = ([] if s.cache_text else ["data.cache_text_embeddings=true"]) + ["memory.text_encoders=offload"]
        out.append(Change("text encoders to the CPU once their outputs are cached", keys,
                          {"cache_text": True, "text_offload": True}))
    if not s.vae_offload and s.cache_latents:
        out.append(Change("VAE to the CPU once the latents are cached", ["memory.vae=offload"], {"vae_offload": True}))
    return out


def _fp8_fits(s: Settings) -> bool:
    """fp8 storage applies: a frozen denoiser (not DreamBooth), not quantized, not already fp8."""
    return not s.fp8 and s.quantize == "none" and s.method.kind != "dreambooth"


def _compatible(change: Change, now: Settings) -> Change:
    """`change` with what it replaces in `now` that the recipe refuses beside it: a quantized base
    cannot also be stored in fp8 or have parked blocks."""
    if change.update.get("quantize", "none") == "none":
        return change
    keys, update = list(change.keys), dict(change.update)
    if now.fp8:
        keys, update["fp8"] = keys + ["memory.fp8_base=false"], False
    if now.offload_blocks:
        keys, update["offload_blocks"] = keys + ["memory.offload_blocks=0"], 0
    return Change(change.label, keys, update)


def _smaller_base(s: Settings, family) -> list[Change]:
    """The frozen denoiser stored in fp8 (computed in the mixed precision; needs checkpointing, or every
    layer's upcast copy stays for backward), then 8-bit; NF4 comes after a smaller batch, it changes
    the results more. Each is taken only where it saves: a UNet's convs stay unquantized, in fp32."""
    out = []
    name = family.denoiser_component
    if _fp8_fits(s):
        keys = ["memory.fp8_base=true"] + ([] if s.checkpointing else ["training.gradient_checkpointing=true"])
        keys += ["training.mixed_precision=bf16"] if s.precision == "no" else []
        needs = "" if s.checkpointing else ", with checkpointing (slower)"
        precision = "bf16" if s.precision == "no" else s.precision
        out.append(Change(f"fp8 base {name}{needs}", keys,
                          {"fp8": True, "checkpointing": True, "precision": precision}))
    if s.quantize == "none" and s.method.kind != "dreambooth":
        out.append(Change(f"8-bit base {name} (bitsandbytes)", ["memory.quantize_base=int8"], {"quantize": "int8"}))
    return out


def _resolution(s: Settings, side: int) -> Change:
    """Train at `side` px; validation samples set to a size of their own go down with it, or they would
    keep the peak where it was (unset, they follow the training resolution)."""
    if not s.validation_images or s.validation_size == (None, None):
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
        if change.update.get("offload_blocks") == BLOCKS:
            change = _blocks(tracer, current.settings, budget)
        change = _compatible(change, current.settings)
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


def _blocks(tracer, s: Settings, budget: float) -> Change:
    """`memory.offload_blocks`: the fewest of the denoiser's repeated blocks parked in CPU memory that
    make `s` fit (all of them if none do). Parked weights cannot be quantized ones."""
    from .meta import DTYPES

    total = len(tracer.block_bytes(s.method, DTYPES[s.precision], s.fp8))
    unquantized = {"quantize": "none"} if s.quantize != "none" else {}

    def fits(n: int) -> bool:
        return estimate(tracer, replace(s, offload_blocks=n, **unquantized)).needs <= budget

    low, high = 1, max(total, 1)
    while low < high:  # parking more blocks never needs more
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    keys = [f"memory.offload_blocks={high}"] + (["memory.quantize_base=none"] if unquantized else [])
    return Change(f"{high} of {total} blocks in CPU memory (slower)", keys,
                  {"offload_blocks": high, **unquantized})


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
