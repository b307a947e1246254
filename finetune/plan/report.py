"""`finetune plan`'s output: the breakdown as a short table (GiB), the peak, and with --vram the changes."""

from __future__ import annotations

from . import calibration as cal
from .estimate import GIB, PRECISION, Estimate

WIDTH = 84
ESTIMATED = ("activations", "VAE encoding", "validation samples", "class images")
MARKS = {"offloaded": "  not in training", "parked": "  not on the GPU", "EMA update": "  at EMA updates"}
PHASES = {"training": "training step", "caching": "VAE encoding images", "validation": "validation samples",
          "class images": "class images", "EMA update": "EMA update (after an optimizer step)"}


def _g(b: float) -> str:
    return f"{b / GIB:.2f}"


def lines(result) -> list[str]:
    est: Estimate = result.estimate
    out = [f"finetune plan: {result.recipe_name}", f"  model   {result.spec.label}, family {result.spec.family.name}",
           f"  method  {describe_method(est, result.spec.family)}", f"  run     {describe_run(est.settings)}", "",
           f"{'GPU memory (allocated)':<{WIDTH}}{'GiB':>7}"]
    for row in est.rows:
        mark = "  estimated" if row.label.startswith(ESTIMATED) else MARKS.get(row.phase, "")
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
    return text + (f"; {s.quantize} base" if s.quantize != "none" else "; fp8 base" if s.fp8 else "")


def describe_run(s) -> str:
    precision = "fp32" if s.precision == "no" else f"{PRECISION[s.precision]} mixed precision"
    ckpt = "gradient checkpointing" if s.checkpointing else "no gradient checkpointing"
    val = f"{s.validation_images} validation image(s) per call" if s.validation_images else "no validation samples"
    ema = {None: "", "accelerator": ", EMA on the GPU", "cpu": ", EMA in CPU memory"}[s.ema]
    return f"{s.resolution} px, batch {s.batch}, {precision}, {ckpt}, {s.optimizer}, {val}{ema}"


def host_line(est: Estimate) -> str:
    phase = max(est.host, key=est.host.get)
    s = est.settings
    held = (["latent and text-embedding caches"] if s.host_caches else []) + (
        ["offloaded encoders"] if est.offloaded else []) + (["parked blocks"] if est.parked else []) + (
        {None: [], "cpu": ["the EMA", "the trained weights' copy while it is swapped in"],
         "accelerator": ["the trained weights' copy while the EMA is swapped in"]}[s.ema])
    loading = f"the weights pass through host RAM in their training dtype (x{cal.LOADING_OVERHEAD})"
    caching = "the denoiser waits in host RAM" + (", beside the caches" if s.host_caches else "")
    what = {"loading": f"while loading: {loading}", "caching": f"while caching: {caching}",
            "training": f"while training: {', '.join(held) or 'nothing but the process'}"}[phase]
    images = "" if s.images is not None or not s.host_caches else "; no data folder here, caches not counted"
    return (f"peak host RAM: {_g(est.host_peak)} GiB {what}, with ~{cal.HOST_PROCESS_GIB + cal.CUDA_HOST_GIB} GiB "
            f"for Python, torch and CUDA{images}")


def note(est: Estimate) -> list[str]:
    return ["Weights, trained parameters, gradients and optimizer states are counted from the model's configs",
            "(exact). Activations and sampling buffers are estimated: one step traced on the meta device (flash",
            "attention), scaled by factors fitted to H100 measurements of an SD1.5 LoRA at 512 px, batch 1 and 4",
            "(benchmarks/results/lora_memory_h100_*.md, reproduced within 1%); elsewhere expect within ~20%."]


def advice_lines(result) -> list[str]:
    adv, budget = result.advice, result.vram
    if not adv.steps and adv.fits:
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
        out.append(f"  then: finetune train {result.recipe_name} {' '.join(final_keys(adv.steps))}")
    return out


def final_keys(steps) -> list[str]:
    """The overrides of every step, each key once with the value the last step gave it."""
    keys: dict[str, str] = {}
    for step in steps:
        for k in step.change.keys:
            name = k.split("=", 1)[0]
            keys.pop(name, None)  # re-inserted: listed where it last changed
            keys[name] = k
    return list(keys.values())
