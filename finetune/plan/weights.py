"""The weights of a run, component by component, where they are (`Row.phase`) and in what bytes: the
denoiser in the weight dtype, in fp8 (`memory.fp8_base`) or quantized (`memory.quantize_base`), with
`memory.offload_blocks` of its repeated blocks in CPU memory; the text encoders and the VAE on the
GPU, or off it once their outputs are cached (`memory.text_encoders`, `memory.vae`). Counted exactly
from the meta model (`counts.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from .counts import Component
from .settings import Settings

WEIGHT_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}
# memory.quantize_base: (bytes per Linear weight, bytes per output row of it). bitsandbytes int8: a byte
# and an fp32 scale per row; NF4: two weights a byte and an fp32 absmax per block of 64 (bitsandbytes'
# blocksize; diffusers leaves double quantization off); torchao int8 weight-only (torchao 0.18's
# Int8Tensor): a byte, and an fp32 scale and an int8 zero point per row.
QUANT_BYTES = {"int8": (1.0, 4), "nf4": (0.5 + 4 / 64, 0), "torchao-int8": (1.0, 5)}
# The quantized denoiser's other weights (convs, norms, biases): peft's prepare_model_for_kbit_training
# (finetune/families/quantize.py) upcasts them to fp32 for bitsandbytes, leaves torchao's as they are.
# bitsandbytes also puts the denoiser on the GPU as it loads, where it stays.
BNB = ("int8", "nf4")
OFFLOADED = "offloaded to CPU after caching"
VISITING = 2  # parked blocks on the GPU at once: the one that runs, and the next as backward reaches it


@dataclass
class Row:
    label: str
    bytes: float
    # resident: on the GPU all run; offloaded: on it until the caches are made; parked: in CPU memory;
    # visiting: parked blocks on the GPU while they run (resident, as far as the peak is concerned);
    # caching | training | validation | class images: transients of that phase
    phase: str
    component: str = ""  # the pipeline component the weights belong to


def weight_rows(tracer, comps: dict[str, Component], s: Settings) -> list[Row]:
    rows = []
    w = WEIGHT_BYTES[s.precision]
    for c in comps.values():
        frozen = c.own - c.trained_own
        if c.name == "vae":
            label, phase = _where(s.vae_offload)
            rows.append(Row(f"VAE weights (fp32, {n(c.own)}){label}", c.own * 4, phase, c.name))
        elif c.name == tracer.family.denoiser_component:
            rows += denoiser_rows(tracer, c, s) if frozen else []
        elif frozen:
            label, phase = _where(s.text_offload)
            rows.append(Row(f"{c.name} weights ({PRECISION[s.precision]}, {n(frozen)} frozen){label}",
                            frozen * w, phase, c.name))
        if c.embedding:  # textual inversion restores every other row from a copy after each step
            rows.append(Row(f"{c.name}: copy of the embedding rows that must not change", c.embedding * w,
                            "resident", c.name))
        if c.trained:
            rows.append(Row(f"{c.name}: trained parameters (fp32, {n(c.trained)})", c.trained * 4, "resident",
                            c.name))
    return rows


def _where(offloaded: bool) -> tuple[str, str]:
    return (f": {OFFLOADED}", "offloaded") if offloaded else (", on the GPU all run", "resident")


def denoiser_rows(tracer, c: Component, s: Settings) -> list[Row]:
    """The frozen denoiser's weights on the GPU; with `memory.offload_blocks`, the blocks parked in CPU
    memory and the ones visiting the GPU."""
    row = denoiser_row(tracer, c, s)
    if not s.offload_blocks:
        return [row]
    from .meta import DTYPES

    blocks = tracer.block_bytes(s.method, DTYPES[s.precision], s.fp8)[:s.offload_blocks]
    parked, visiting = sum(blocks), VISITING * max(blocks, default=0)
    row.bytes -= parked
    row.label += ", less parked"
    return [row, Row(f"{len(blocks)} of its blocks' frozen weights in CPU memory (memory.offload_blocks)", parked,
                     "parked", c.name),
            Row(f"those blocks visiting the GPU, {VISITING} at a time", visiting, "visiting", c.name)]


def denoiser_row(tracer, c: Component, s: Settings) -> Row:
    """The frozen denoiser's weights: in the weight dtype, quantized (`memory.quantize_base`: its Linear
    weights), or with `memory.fp8_base` the weights training stores in fp8 (`fp8.py`)."""
    from .meta import DTYPES

    frozen, w, dtype = c.own - c.trained_own, WEIGHT_BYTES[s.precision], PRECISION[s.precision]
    if s.quantize in QUANT_BYTES:
        per_weight, per_row = QUANT_BYTES[s.quantize]
        rest, rest_dtype = (4, "fp32") if s.quantize in BNB else (w, dtype)
        return Row(f"{c.name} weights ({s.quantize} Linear layers: {n(c.linear)}; {n(frozen - c.linear)} "
                   f"other in {rest_dtype})",
                   c.linear * per_weight + c.linear_rows * per_row + (frozen - c.linear) * rest, "resident", c.name)
    if s.fp8:
        n8 = tracer.fp8_weights(s.method, DTYPES[s.precision])
        return Row(f"{c.name} weights ({n(n8)} of {n(frozen)} frozen in fp8, the rest {dtype})",
                   n8 + (frozen - n8) * w, "resident", c.name)
    return Row(f"{c.name} weights ({dtype}, {n(frozen)} frozen)", frozen * w, "resident", c.name)


def loaded_weights(tracer, comps: dict[str, Component], s: Settings) -> float:
    """Every weight as loaded: a quantized denoiser already quantized, an fp8 one not yet cast."""
    denoiser = tracer.family.denoiser_component
    total = 0.0
    for c in comps.values():
        quantized = c.name == denoiser and s.quantize in QUANT_BYTES
        total += denoiser_row(tracer, c, s).bytes if quantized else c.own * load_bytes(tracer, c, s)
    return total


def caching_weights(tracer, rows: list[Row], s: Settings, latents: bool = False) -> float:
    """On the GPU while the caches are made: the text encoders and the VAE (and what trains in them). The
    denoiser waits on the CPU (finetune/train/setup.py load_components) unless bitsandbytes put it there.
    `latents`: while the VAE encodes, after the captions, when text encoders that go have gone."""
    denoiser = tracer.family.denoiser_component
    on = [r for r in rows if r.phase == "resident" or (r.phase == "offloaded" and not (
        latents and r.component not in (denoiser, "vae")))]
    return sum(r.bytes for r in on if r.component != denoiser or s.quantize in BNB)


def load_bytes(tracer, c: Component, s: Settings) -> float:
    # Each component is read in the dtype it runs in: the VAE in fp32, a quantized base in bf16 first.
    if c.name == "vae":
        return 4
    quantized = s.quantize in QUANT_BYTES and c.name == tracer.family.denoiser_component
    return 2 if quantized else WEIGHT_BYTES[s.precision]


def n(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"
