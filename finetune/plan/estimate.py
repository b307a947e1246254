"""The memory of a run, phase by phase, from parameter counts (exact) and activation traces
(estimated, `calibration.py`).

A run's GPU memory peaks in one of its phases, each on top of what stays resident (every weight:
the training loop keeps the denoiser, the text encoders and the VAE on the GPU for the whole run,
finetune/train/setup.py `load_components`; and the trained parameters, in fp32):
- caching: the VAE encodes the images one by one for the latent cache (fp32);
- class images (prior preservation): the base model samples, before any adapter is attached;
- training: gradients, optimizer states and the activations of one step;
- validation: samples made with the adapter, the optimizer states still held.
Host RAM peaks while loading (the weights pass through it) or while training (the caches live there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import calibration as cal
from .counts import Component
from .settings import Settings

GIB = 2**30
WEIGHT_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
# bitsandbytes: int8 weights with one fp32 scale per row; NF4 two weights a byte, an fp32 absmax per 64.
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64}
PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass
class Row:
    label: str
    bytes: float
    phase: str  # resident | training | caching | class images | validation


@dataclass
class Estimate:
    settings: Settings
    rows: list[Row] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # GPU bytes allocated at each phase's peak
    host: dict[str, float] = field(default_factory=dict)  # host bytes at each phase's peak
    trained: int = 0  # parameters the optimizer holds
    learned: int = 0  # parameters that learn (textual inversion: the new rows only)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> float:
        """Peak allocated by PyTorch: what torch.cuda.max_memory_allocated() reports."""
        return self.phases[self.peak_phase]

    @property
    def needs(self) -> float:
        """What the card must have: the peak plus the CUDA context, which the allocator does not see."""
        return self.peak + cal.CUDA_CONTEXT_GIB * GIB

    @property
    def host_peak(self) -> float:
        return max(self.host.values())


def estimate(tracer, s: Settings) -> Estimate:
    """The breakdown and the phases of a run with settings `s` on the model `tracer` describes."""
    from .meta import DTYPES

    comps = tracer.counts(s.method, DTYPES[s.precision])
    est = Estimate(settings=s, trained=sum(c.trained for c in comps.values()))
    est.learned = est.trained - sum(c.embedding - s.method.vectors * c.embedding_dim for c in comps.values())
    est.rows += _weight_rows(tracer, comps, s)
    resident = sum(r.bytes for r in est.rows)
    sizes = [n for c in comps.values() for n in c.trained_sizes]
    states = optimizer_bytes(s, sizes)
    est.rows += _training_rows(tracer, s, sizes, states)
    est.phases["training"] = resident + sum(r.bytes for r in est.rows if r.phase == "training") - _overlap(est.rows)
    _other_phases(tracer, comps, s, est, resident, states)
    est.host = _host(tracer, comps, s)
    return est


def _other_phases(tracer, comps, s: Settings, est: Estimate, resident: float, states: float) -> None:
    """Caching, validation and class images: sampling transients on top of what is resident then."""
    encode = cal.INFERENCE_FACTOR * tracer.vae("encode", _square(s.resolution)) * (1 if s.cache_latents else s.batch)
    when = "for the latent cache" if s.cache_latents else "every step"
    est.rows.append(Row(f"VAE encoding images ({s.resolution} px, fp32, {when})", encode, "caching"))
    # Without a latent cache the images are encoded at every step, the optimizer states held.
    est.phases["caching"] = resident + encode + (0 if s.cache_latents else states)
    if s.validation_images:
        size = tracer.validation_size(s.validation_size)
        val = _sampling(tracer, s, size, s.validation_images, s.validation_cfg)
        est.rows.append(Row(f"validation samples ({s.validation_images} at a time, {size[1]}x{size[0]})",
                            val, "validation"))
        est.phases["validation"] = resident + states + val
    if s.prior_batch:  # before the method attaches anything: every weight in the weight dtype
        frozen = sum(c.own * _load_bytes(c, s) for c in comps.values())
        cls = _sampling(tracer, s, _square(s.resolution), s.prior_batch, True)
        est.rows.append(Row(f"class images (prior preservation, {s.prior_batch} at a time)", cls, "class images"))
        est.phases["class images"] = frozen + cls


def _weight_rows(tracer, comps: dict[str, Component], s: Settings) -> list[Row]:
    rows = []
    w = WEIGHT_BYTES[s.precision]
    for c in comps.values():
        frozen = c.own - c.trained_own
        if c.name == "vae":
            rows.append(Row(f"VAE weights (fp32, {_n(c.own)})", c.own * 4, "resident"))
        elif c.name == tracer.family.denoiser_component and s.quantize in QUANT_BYTES:
            b = c.linear * QUANT_BYTES[s.quantize] + (frozen - c.linear) * 4  # the rest in fp32 (peft kbit prep)
            rows.append(Row(f"{c.name} weights ({s.quantize}, {_n(frozen)} frozen)", b, "resident"))
        elif frozen:
            where = "" if c.name == tracer.family.denoiser_component else ", kept on the GPU all run"
            rows.append(Row(f"{c.name} weights ({PRECISION[s.precision]}, {_n(frozen)} frozen{where})",
                            frozen * w, "resident"))
        if c.embedding:  # textual inversion restores every other row from a copy after each step
            rows.append(Row(f"{c.name}: copy of the embedding rows that must not change", c.embedding * w, "resident"))
    trained = sum(c.trained for c in comps.values())
    rows.append(Row(f"trained parameters (fp32, {_n(trained)})", trained * 4, "resident"))
    return rows


def _training_rows(tracer, s: Settings, sizes: list[int], states: float) -> list[Row]:
    trained = sum(sizes)
    rows = [Row("gradients (fp32)", trained * 4, "training"),
            Row(f"optimizer states ({s.optimizer})", states, "training")]
    if s.precision != "no":  # autocast keeps a half-precision copy of each trained weight per step
        rows.append(Row(f"{PRECISION[s.precision]} copies of the trained weights (autocast)", trained * 2, "training"))
    acts = activations(tracer, s)
    how = f"{s.resolution} px, batch {s.batch}, {'gradient checkpointing' if s.checkpointing else 'no checkpointing'}"
    rows.append(Row(f"activations of a training step ({how})", acts, "training"))
    if s.optimizer == "adamw":  # torch's foreach AdamW: one fp32 temporary per parameter, after backward
        rows.append(Row("optimizer step temporaries (while activations are freed)", trained * 4, "training"))
    return rows


def _overlap(rows: list[Row]) -> float:
    """Optimizer step temporaries live after backward, when activations are gone: only the larger counts."""
    acts = next(r.bytes for r in rows if r.label.startswith("activations"))
    temps = next((r.bytes for r in rows if r.label.startswith("optimizer step")), 0.0)
    return min(acts, temps)


def activations(tracer, s: Settings) -> float:
    from .counts import text_encoder_names
    from .meta import DTYPES
    from .method import trained_encoders

    dtype = DTYPES[s.precision]
    text = tuple(trained_encoders(s.method, tracer.family, text_encoder_names(tracer.spec)))
    per_image = tracer.denoiser_step(s.method, dtype, s.checkpointing, _square(s.resolution), bool(text))
    # A text encoder that trains keeps its activations while the denoiser runs.
    per_image += sum(tracer.text_step(s.method, n, dtype, s.checkpointing) for n in text)
    return cal.ACTIVATION_FACTOR[s.precision] * per_image * s.batch


def _sampling(tracer, s: Settings, size, images: int, cfg: bool) -> float:
    """Peak of making `images` at once: the denoiser's steps (a doubled batch under classifier-free
    guidance; FLUX.1 is guidance-distilled: one pass) or the fp32 VAE decoding them all."""
    from .meta import DTYPES

    passes = 2 if cfg and tracer.family.name != "flux" else 1
    denoise = tracer.denoiser_sample(s.method, DTYPES[s.precision], size) * images * passes
    decode = tracer.vae("decode", size) * images
    return cal.INFERENCE_FACTOR * max(denoise, decode)


def optimizer_bytes(s: Settings, sizes: list[int]) -> float:
    """Optimizer state of tensors of these sizes. bitsandbytes' 8-bit states keep one fp32 absmax per
    256 values, and tensors under optimizer.min_8bit_size in 32 bits."""
    def one(n: int) -> float:
        small = n < s.min_8bit_size
        blocks = 4 * math.ceil(n / 256)
        return {"adamw": 8 * n, "adamw8bit": 8 * n if small else 2 * n + 2 * blocks,
                "lion": 4 * n, "lion8bit": 4 * n if small else n + blocks,
                "sgd": 4 * n if s.momentum else 0}[s.optimizer]
    return float(sum(one(n) for n in sizes))


def _host(tracer, comps, s: Settings) -> dict[str, float]:
    base = cal.HOST_BASELINE_GIB * GIB
    weights = sum(c.own * _load_bytes(c, s) for c in comps.values())
    per_image = tracer.cache_bytes_per_image(_square(s.resolution), WEIGHT_BYTES[s.precision], s.cache_latents)
    return {"loading": base + cal.LOADING_OVERHEAD * weights, "training": base + per_image * (s.images or 0)}


def _load_bytes(c: Component, s: Settings) -> float:
    # Each component is read in the dtype it runs in: the VAE in fp32, a quantized base in bf16 first.
    if c.name == "vae":
        return 4
    return 2 if s.quantize in QUANT_BYTES and c.name == "transformer" else WEIGHT_BYTES[s.precision]


def _square(side: int) -> tuple[int, int]:
    return side, side


def _n(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"
