"""`finetune plan`'s output: the breakdown as a short table (GiB), the peak, and with --vram the changes."""

from __future__ import annotations

from . import calibration as cal
from .estimate import GIB, PRECISION, Estimate

WIDTH = 84
ESTIMATED = ("activations", "VAE encoding", "validation samples", "class images")
PHASES = {"training": "training step", "caching": "VAE encoding images", "validation": "validation samples",
          "class images": "class images"}


def _g(b: float) -> str:
    return f"{b / GIB:.2f}"


def lines(result) -> list[str]:
    est: Estimate = result.estimate
    out = [f"finetune plan: {result.recipe_name}", f"  model   {result.spec.label}, family {result.spec.family.name}",
           f"  method  {describe_method(est, result.spec.family)}", f"  run     {describe_run(est.settings)}", "",
           f"{'GPU memory (allocated)':<{WIDTH}}{'GiB':>7}"]
    for row in est.rows:
        mark = "  estimated" if row.label.startswith(ESTIMATED) else ""
        out.append(f"  {row.label:<{WIDTH - 2}}{_g(row.bytes):>7}{mark}")
    out += ["", f"{'at the peak of each phase':<{WIDTH}}{'GiB':>7}"]
    for phase, b in est.phases.items():
        out.append(f"  {PHASES[phase]:<{WIDTH - 2}}{_g(b):>7}{'  <- peak' if phase == est.peak_phase else ''}")
    out += ["", f"peak GPU memory: {_g(est.peak)} GiB allocated ({PHASES[est.peak_phase]}); the card needs about "
                f"{_g(est.needs)} GiB with the CUDA context (~{cal.CUDA_CONTEXT_GIB} GiB)",
            host_line(est), "", *note(est)]
    if result.advice is not None:
        out += ["", *advice_lines(result)]
    if result.ram is not None:
        verdict = "fits" if est.host_peak <= result.ram else "does NOT fit"
        out.append(f"--ram {_g(result.ram)} GiB: host RAM {verdict} (peak {_g(est.host_peak)} GiB)")
    return out


def describe_method(est: Estimate, family) -> str:
    mp, s = est.settings.method, est.settings
    parts = []
    if mp.kind == "dreambooth":
        parts.append(f"DreamBooth: the whole {family.denoiser_component}" + (" and text encoders" if mp.full_text else ""))
    if mp.rank:
        parts.append(f"LoRA rank {mp.rank} on the {family.denoiser_component}" + (" and text encoder(s)" if mp.text_lora else ""))
    if mp.vectors:
        parts.append(f"textual inversion, {mp.vectors} vector(s) per text encoder")
    text = ", ".join(parts) + f": {est.learned:,} parameters learn"
    if est.trained != est.learned:
        text += f" ({est.trained:,} in the optimizer: whole embedding matrices)"
    return text + (f"; {s.quantize} base" if s.quantize != "none" else "")


def describe_run(s) -> str:
    precision = "fp32" if s.precision == "no" else f"{PRECISION[s.precision]} mixed precision"
    ckpt = "gradient checkpointing" if s.checkpointing else "no gradient checkpointing"
    val = f"{s.validation_images} validation image(s) per call" if s.validation_images else "no validation samples"
    return f"{s.resolution} px, batch {s.batch}, {precision}, {ckpt}, {s.optimizer}, {val}"


def host_line(est: Estimate) -> str:
    phase = max(est.host, key=est.host.get)
    what = {"loading": f"while loading: the weights pass through host RAM in their training dtype (x{cal.LOADING_OVERHEAD})",
            "training": "while training: latent and text-embedding caches"}[phase]
    images = "" if est.settings.images is not None else "; no data folder here, caches not counted"
    return (f"peak host RAM: {_g(est.host_peak)} GiB {what}, plus ~{cal.HOST_BASELINE_GIB} GiB for Python, torch "
            f"and CUDA{images}")


def note(est: Estimate) -> list[str]:
    return ["Weights, trained parameters, gradients and optimizer states are counted from the model's configs",
            "(exact). Activations and sampling buffers are estimated: one step traced on the meta device (flash",
            "attention), scaled by factors fitted to H100 measurements of an SD1.5 LoRA at 512 px, batch 1 and 4",
            "(benchmarks/results/lora_memory_h100_*.md, reproduced within 1%); elsewhere expect within ~20%."]


def advice_lines(result) -> list[str]:
    adv, budget = result.advice, result.vram
    if not adv.steps:
        return [f"--vram {_g(budget)} GiB: fits ({_g(adv.final.needs)} GiB needed)"]
    out = []
    if adv.fits:
        out.append(f"--vram {_g(budget)} GiB: does not fit as it is; these changes make it fit, cheapest first:")
    else:
        out.append(f"--vram {_g(budget)} GiB: cannot fit; with every change plan knows the card still needs "
                   f"{_g(adv.final.needs)} GiB:")
    for step in adv.steps:
        out.append(f"  {step.change.label + ':':<52} {_g(step.before)} -> {_g(step.after)} GiB   "
                   f"{' '.join(step.change.keys)}")
    if adv.fits:
        keys = " ".join(k for step in adv.steps for k in step.change.keys)
        out.append(f"  then: finetune train {result.recipe_name} {keys}")
    return out + _not_yet(adv.final, result.spec.family)


def _not_yet(est: Estimate, family) -> list[str]:
    """What would still help that finetune cannot do yet (issue 13): text encoders leave the GPU."""
    if est.settings.method.text_lora or est.settings.method.vectors or est.settings.method.full_text:
        return []
    te = sum(r.bytes for r in est.rows if r.label.startswith("text_encoder") and "weights" in r.label)
    if te < 0.5 * GIB:
        return []
    return [f"  not yet an option: the text encoders stay on the GPU all run ({_g(te)} GiB); freeing them once "
            "their outputs are cached is planned."]
