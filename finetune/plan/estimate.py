"""The memory of a run, phase by phase, from parameter counts (exact) and activation traces
(estimated, `calibration.py`).

A run's GPU memory peaks in one of its phases, each on top of what stays resident (`weights.py`: the
denoiser as `memory:` stores it, the trained parameters in fp32, the text encoders and the VAE unless
`memory:` offloads them once their outputs are cached), as finetune/train places the components:
- caching: the text encoders and the VAE on the GPU while the captions are encoded, then (the text
  encoders offloaded) the VAE encoding the images one by one for the latent cache (fp32); the
  denoiser waits in host RAM (a bitsandbytes-quantized one is on the GPU);
- class images (prior preservation): the whole base model samples, before any adapter is attached;
- training: gradients, optimizer states and the activations of one step;
- validation: samples made with the adapter, the optimizer states still held; an offloaded VAE comes
  back to decode them, offloaded text encoders do not (the prompts were encoded before they left);
- EMA update (`training.ema`, finetune/train/ema.py): after an optimizer step, the gradients and
  activations freed, the average (fp32, one value per trained parameter) is updated: kept on the GPU
  it is there all along, with diffusers' foreach temporaries of the same size for the update; kept
  in CPU memory it visits the GPU whole, updated one tensor at a time.
Host RAM peaks while loading (the weights pass through it), while caching (the denoiser waits there)
or while training (the caches, offloaded encoders and parked blocks live there). `memory.compile`,
`tf32` and `attention` change speed, not memory.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from . import calibration as cal
from .settings import Settings
from .weights import BNB, PRECISION, WEIGHT_BYTES, Row, caching_weights, load_bytes, loaded_weights, weight_rows

GIB = 2**30


@dataclass
class Estimate:
    settings: Settings
    rows: list[Row] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # GPU bytes allocated at each phase's peak
    host: dict[str, float] = field(default_factory=dict)  # host bytes at each phase's peak
    trained: int = 0  # parameters the optimizer holds
    learned: int = 0  # parameters that learn (textual inversion: the new rows only)
    offloaded: float = 0.0  # bytes of the weights that leave the GPU after caching
    ema_host: float = 0.0  # bytes of the EMA kept in CPU memory (training.ema.device: cpu)
    parked: float = 0.0  # bytes of the denoiser's blocks kept in CPU memory (memory.offload_blocks)
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
        """Peak host RAM of the run on a CUDA GPU, the process and the CUDA runtime included."""
        return (cal.HOST_PROCESS_GIB + cal.CUDA_HOST_GIB) * GIB + max(self.host.values())

    def host_peak_on(self, device: str) -> float:
        """Peak host RAM of the same run on `device` ("cuda", "mps" or "cpu"). On the CPU the device's
        memory is host memory: everything the GPU would hold, the offloaded encoders too (they have
        nowhere to go), on top of the caches. On MPS as on CUDA without the CUDA runtime (not measured:
        how much of Metal's memory counts as the process's resident pages is not known here)."""
        if device == "cuda":
            return self.host_peak
        base = cal.HOST_PROCESS_GIB * GIB
        if device != "cpu":
            return base + max(self.host.values())
        away = self.offloaded + self.parked + self.ema_host
        caches = self.host["training"] - away
        phases = [b + (away if p == "training" else 0) for p, b in self.phases.items()]
        return base + max(self.host["loading"], max(phases) + caches)


def estimate(tracer, s: Settings) -> Estimate:
    """The breakdown and the phases of a run with settings `s` on the model `tracer` describes."""
    from .meta import DTYPES

    comps = tracer.counts(s.method, DTYPES[s.precision])
    est = Estimate(settings=s, trained=sum(c.trained for c in comps.values()))
    est.learned = est.trained - sum(c.embedding - s.method.vectors * c.embedding_dim for c in comps.values())
    weights = weight_rows(tracer, comps, s)
    est.rows += weights
    resident = _sum(weights, "resident", "visiting")
    est.offloaded, est.parked = _sum(weights, "offloaded"), _sum(weights, "parked")
    sizes = [n for c in comps.values() for n in c.trained_sizes]
    states = optimizer_bytes(s, sizes)
    est.rows += _training_rows(tracer, s, sizes, states)
    est.phases["training"] = resident + _sum(est.rows, "training") - _overlap(est.rows)
    _other_phases(tracer, comps, s, est, weights, states)
    _ema_update(s, sizes, est, resident + states)
    est.host = _host(tracer, comps, s, est, weights)
    return est


def _sum(rows: list[Row], *phases: str) -> float:
    return sum(r.bytes for r in rows if r.phase in phases)


def _other_phases(tracer, comps, s: Settings, est: Estimate, weights: list[Row], states: float) -> None:
    """Caching, validation and class images: sampling transients on top of the weights on the GPU then."""
    resident = _sum(weights, "resident", "visiting")
    encode = cal.INFERENCE_FACTOR * tracer.vae("encode", _square(s.resolution)) * (1 if s.cache_latents else s.batch)
    when = "for the latent cache" if s.cache_latents else "every step"
    est.rows.append(Row(f"VAE encoding images ({s.resolution} px, fp32, {when})", encode, "caching"))
    # Without a latent cache the images are encoded at every step, the optimizer states held.
    # Captions are encoded first; text encoders that go leave before the VAE encodes the images.
    est.phases["caching"] = max(caching_weights(tracer, weights, s), encode + caching_weights(
        tracer, weights, s, latents=True)) if s.cache_latents else encode + resident + states
    if s.validation_images:
        # The trainer samples at validation.height/width, else at the training resolution.
        size = (s.validation_size[0] or s.resolution, s.validation_size[1] or s.resolution)
        val = _sampling(tracer, s, size, s.validation_images, s.validation_cfg)
        est.rows.append(Row(f"validation samples ({s.validation_images} at a time, {size[1]}x{size[0]})",
                            val, "validation"))
        vae = sum(r.bytes for r in weights if r.phase == "offloaded" and r.component == "vae")
        est.phases["validation"] = resident + vae + states + val + _ema_on_gpu(s, est.trained)
    if s.prior_batch:  # before the method attaches anything: the weights as loaded
        cls = _sampling(tracer, s, _square(s.resolution), s.prior_batch, True)
        est.rows.append(Row(f"class images (prior preservation, {s.prior_batch} at a time)", cls, "class images"))
        est.phases["class images"] = loaded_weights(tracer, comps, s) + cls


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
    if s.ema == "accelerator":
        rows.append(Row("EMA of the trained weights (fp32, training.ema)", _ema_on_gpu(s, trained), "training"))
    return rows


def _ema_on_gpu(s: Settings, trained: int) -> float:
    """The average EMAModel keeps, one value per trained parameter in its dtype (fp32), when it stays on the GPU."""
    return 4.0 * trained if s.ema == "accelerator" else 0.0


def _ema_update(s: Settings, sizes: list[int], est: Estimate, held: float) -> None:
    """The moment of an EMA update: the weights and optimizer states `held`, gradients and activations
    gone. On the GPU, EMAModel's foreach step makes one temporary the size of the average; an average
    kept in CPU memory visits whole and is updated tensor by tensor (two temporaries of the largest)."""
    if s.ema is None or not sizes:
        return
    if s.ema == "accelerator":
        est.rows.append(Row("EMA update temporaries (foreach, fp32)", 4.0 * sum(sizes), "EMA update"))
    else:
        est.rows += [Row("EMA of the trained weights (fp32), visiting from CPU memory",
                         4.0 * sum(sizes), "EMA update"),
                     Row("EMA update temporaries (one tensor at a time)", 2 * 4.0 * max(sizes), "EMA update")]
    est.phases["EMA update"] = held + _ema_on_gpu(s, sum(sizes)) + _sum(est.rows, "EMA update")


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
    step = functools.partial(tracer.denoiser_step, s.method, dtype, s.checkpointing, _square(s.resolution), bool(text))
    per_image = step()
    # A text encoder that trains keeps its activations while the denoiser runs.
    per_image += sum(tracer.text_step(s.method, n, dtype, s.checkpointing) for n in text)
    return cal.ACTIVATION_FACTOR[s.precision] * per_image * s.batch + (_upcast(step) if s.fp8 else 0)


def _upcast(trace) -> float:
    """The upcast copies of fp8 weights a pass keeps (`trace(fp8)` minus `trace()`, at batch 1): once
    per pass whatever the batch, and exact bytes, with none of autocast's extras to calibrate."""
    return max(0.0, trace(fp8=True) - trace())


def _sampling(tracer, s: Settings, size, images: int, cfg: bool) -> float:
    """Peak of making `images` at once: the denoiser's steps (a doubled batch under classifier-free
    guidance; a guidance-distilled model, FLUX.1: one pass) or the fp32 VAE decoding them, one at a time
    (`devices.decode_latents` slices)."""
    from .meta import DTYPES

    passes = 2 if cfg and not tracer.family.guidance_distilled else 1
    sample = functools.partial(tracer.denoiser_sample, s.method, DTYPES[s.precision], size)
    denoise = sample() * images * passes + (_upcast(sample) if s.fp8 else 0)
    decode = tracer.vae("decode", size)
    return cal.INFERENCE_FACTOR * max(denoise, decode)


def optimizer_bytes(s: Settings, sizes: list[int]) -> float:
    """Optimizer state of tensors of these sizes. bitsandbytes' 8-bit states keep one fp32 absmax per
    256 values, and tensors under optimizer.min_8bit_size in 32 bits."""
    def one(n: int) -> float:
        small = n < s.min_8bit_size
        blocks = 4 * math.ceil(n / 256)
        return {"adamw": 8 * n, "adamw8bit": 8 * n if small else 2 * n + 2 * blocks,
                "lion": 4 * n, "lion8bit": 4 * n if small else n + blocks,
                "sgd": 4 * n if s.momentum else 0,
                "prodigy": 16 * n,  # exp_avg, exp_avg_sq, s, p0
                "adamw_schedulefree": 8 * n,  # z, exp_avg_sq
                # Factored second moments: a row and a column vector per matrix, here sized as for a
                # square one (the sizes carry no shapes); a full fine-tune's weights are near square.
                "adafactor": 8 * math.isqrt(n)}[s.optimizer]
    return float(sum(one(n) for n in sizes))


def _host(tracer, comps, s: Settings, est: Estimate, weights: list[Row]) -> dict[str, float]:
    """Host bytes of each phase on top of the process itself: the weights passing through while
    loading; the denoiser waiting while the caches are made; the caches (unless memory.cache_dir keeps
    them on disk), the offloaded encoders, the parked blocks and the EMA's host copies while training."""
    read = sum(c.own * load_bytes(tracer, c, s) for c in comps.values())
    per_image = tracer.cache_bytes_per_image(_square(s.resolution), WEIGHT_BYTES[s.precision], s.cache_latents,
                                             s.cache_text)
    caches = per_image * (s.images or 0) if s.host_caches else 0
    denoiser = tracer.family.denoiser_component
    waiting = 0 if s.quantize in BNB else sum(
        r.bytes for r in weights if r.component == denoiser and r.phase in ("resident", "parked"))
    # EMAModel.store copies the trained weights to CPU memory while the average is swapped in (validation
    # samples, the files written with it); an average kept in CPU memory lives there.
    trained = 4.0 * est.trained if s.ema else 0.0
    est.ema_host = trained if s.ema == "cpu" else 0.0
    return {"loading": cal.LOADING_OVERHEAD * read, "caching": waiting + caches,
            "training": caches + est.offloaded + est.parked + est.ema_host + trained}


def _square(side: int) -> tuple[int, int]:
    return side, side
