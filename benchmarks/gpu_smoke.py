"""One command that checks finetune on real-size models on a GPU machine: per family (SD1.5, SDXL,
FLUX.1), a LoRA trained for a few steps with the bundled recipe's settings and 2 images generated
with it, in a table of peak VRAM against `finetune plan`'s prediction, host RAM, speed and black images.

    python benchmarks/gpu_smoke.py --families sd15,sdxl --models-dir /tmp/ftmodels    # a lent GPU
    python benchmarks/gpu_smoke.py --families sdxl-dora-ema,sdxl-lokr,flux-lokr,sd15-prodigy,sd15-masked
                                   # the training options (DoRA + EMA on the CPU, LoKr, Prodigy, masks)
    OMP_NUM_THREADS=1 python benchmarks/gpu_smoke.py --tiny                            # CPU dry run, ~3 min

Per family, each step in its own process (this one imports no torch, so it stays small):
1. the model: the real architecture with random weights (`finetune/tiny_models`: sd15 and sdxl in fp16,
   FLUX.1 [dev] in bf16, 33 GB), built once into --models-dir, on the GPU when there is one; --tiny:
   the built-in tiny model of the family instead, at 64 px.
2. `finetune train <recipe>` for --steps steps on datasets/robot at the recipe's resolution and memory
   settings (on a CPU in fp32). From its metrics.jsonl: s/step (median of the steps after the first 3)
   and the `{"memory": ...}` row `finetune train` writes (measured peaks and plan's predictions; "not
   recorded" where the finetune in use writes none); from the kernel: the process's peak RSS.
3. `finetune generate` 2 images with the trained LoRA: wall time (loading included) and how many
   came out black (the manifest's "black image" verdicts).
4. `finetune eval` of the run (2 images per prompt, base and adapter, the tiny CLIP and DINOv2: the
   eval path on the GPU, not the metric models' figures): wall time, and which metrics it measured.
A family that fails becomes a row saying why; the others still run. The table is rewritten after each
family (a run cut short keeps the rows it finished) and printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
DATASET = ROOT / "datasets" / "robot"
PROMPT = "a photo of sks robot on a beach"
TINY_RESOLUTION = 64
SKIP_STEPS = 3  # the first steps pay for allocator warm-up and kernel selection
# The end-of-run validation sample is kept (its memory counts in the peak) but short: its memory does
# not depend on the number of denoising steps; generate samples with the recipe's own.
VALIDATION_STEPS = 4
GENERATE_IMAGES = 2


@dataclass(frozen=True)
class Family:
    recipe: str
    folder: str  # the full-size model's folder under --models-dir
    builder: str  # module:function that builds it
    dtype: str  # of its weights on disk, as the hub ships them
    tiny: str  # the built-in tiny model, for --tiny
    extra: tuple[str, ...] = ()  # recipe overrides: the training options a row checks
    data: Path = DATASET  # images (the masked row's have masks beside them)


SD15 = ("sd15-full-random-fp16", "finetune.tiny_models.sd15:build_sd15_full_random", "float16", "tiny-sd15")
SDXL = ("sdxl-full-random", "finetune.tiny_models.sdxl:build_sdxl_full_random", "float16", "tiny-sdxl")
FLUX = ("flux-full-random", "finetune.tiny_models.flux:build_flux_full_random", "bfloat16", "tiny-flux")
# What CPU tests cannot show of issue 17's options: DoRA's norms and LoKr's Kronecker products in bf16/fp16,
# EMA kept in host memory and brought over for each update, Prodigy's state on the GPU, masks at full size.
OPTION_ROWS = {
    "sdxl-dora-ema": Family("sdxl-lora", *SDXL, extra=("method.dora=true", "training.ema.device=cpu",
                                                       "training.ema.update_every=5")),
    "sdxl-lokr": Family("sdxl-style-lokr", *SDXL),
    "flux-lokr": Family("flux-lora", *FLUX, extra=("method.variant=lokr", "memory.fp8_base=false")),
    "sd15-prodigy": Family("sd15-lora", *SD15, extra=("optimizer.type=prodigy", "training.learning_rate=1.0",
                                                      "training.lr_scheduler=constant", "training.lr_warmup_steps=0")),
    "sd15-masked": Family("sd15-product-masked", *SD15, data=ROOT / "datasets" / "product" / "images"),
}

FAMILIES = {
    "sd15": Family("sd15-lora", *SD15),
    "sdxl": Family("sdxl-lora", *SDXL),
    "flux": Family("flux-lora", *FLUX),
    **OPTION_ROWS,
}


class Failure(Exception):
    """One family's step failed; the message is the table's reason."""


@dataclass
class Child:
    rc: int  # negative: ended by that signal
    seconds: float
    peak_rss: int  # bytes: the kernel's high-water mark of this process alone
    log: Path
    timed_out: bool = False


@dataclass
class Row:
    family: str
    recipe: str
    base: str = ""
    resolution: int | None = None
    settings: str = ""
    build_s: float | None = None
    memory: dict | None = None
    rss: int | None = None
    s_per_step: float | None = None
    train_s: float | None = None
    generate_s: float | None = None
    black: str = ""
    eval_s: float | None = None
    status: str = "ok"


def run_child(argv: list[str], log: Path, deadline: float) -> Child:
    """Run `argv` (output into `log`) until it ends or `deadline` (time.monotonic) passes.

    wait4 gives this child's own peak RSS; getrusage(RUSAGE_CHILDREN) would give the largest of all
    children so far (the model builder's included). This process imports no torch, so the RSS a child
    inherits at fork (counted in its peak until exec) is a few tens of MB."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start, timed_out = time.monotonic(), False
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)  # its own process group: a timeout ends all of it
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            timed_out = True
            break
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return Child(proc.returncode, time.monotonic() - start, usage.ru_maxrss * 1024, log, timed_out)


def check(child: Child, what: str) -> Child:
    if child.rc == 0:
        return child
    if child.timed_out:
        raise Failure(f"{what}: stopped at the family's --timeout after {child.seconds:.0f} s (log: {child.log})")
    if child.rc < 0:  # SIGKILL that we did not send: most often the kernel's OOM killer
        raise Failure(f"{what}: killed by {signal.Signals(-child.rc).name} after {child.seconds:.0f} s, peak RSS "
                      f"{child.peak_rss / GIB:.1f} GiB (out of host memory?) (log: {child.log})")
    lines = [ln.strip() for ln in child.log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")] or lines[-1:] or ["no output"]
    raise Failure(f"{what} failed (exit {child.rc}): {errors[-1][:300]} (log: {child.log})")


def probe(work: Path) -> dict:
    """The machine: GPU name (None on a CPU), from a child process, and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    code = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    child = run_child([sys.executable, "-c", code], work / "probe.log", time.monotonic() + 300)
    lines = child.log.read_text(errors="replace").strip().splitlines() if child.rc == 0 else []
    machine = {"gpu": lines[-1].strip() if lines and lines[-1].strip() else None}
    for package in ("torch", "diffusers", "transformers", "peft", "bitsandbytes"):
        try:
            machine[package] = version(package)
        except PackageNotFoundError:
            machine[package] = "not installed"
    return machine


def build(family: str, models_dir: Path) -> None:
    """Build FAMILIES[family]'s full-size model into `models_dir` (run in a child process). With a GPU,
    parameters are created and randomly initialised on it (accelerate's `init_on_device`: parameters
    only, so the schedulers' numpy-backed tensors stay on the CPU): seconds where the CPU takes minutes
    for FLUX's 17B. The files are the same either way."""
    import importlib

    import torch
    from accelerate import init_on_device

    fam = FAMILIES[family]
    module, name = fam.builder.split(":")
    builder = getattr(importlib.import_module(module), name)
    folder, dtype = models_dir / fam.folder, getattr(torch, fam.dtype)
    if torch.cuda.is_available():
        try:
            with init_on_device(torch.device("cuda")):
                builder(folder, dtype=dtype)
            return
        except Exception as e:  # any failure on the GPU: the CPU builds the same shapes, only slower
            print(f"building on the GPU failed ({type(e).__name__}: {str(e)[:200]}); building on the CPU", flush=True)
            torch.cuda.empty_cache()
    builder(folder, dtype=dtype)


def model_base(fam: Family, family: str, args, row: Row, deadline: float) -> str:
    if args.tiny:
        return f"builtin:{fam.tiny}"
    folder = args.models_dir / fam.folder
    if not (folder / "model_index.json").is_file():
        print(f"  building {folder} (once) ...", flush=True)
        child = run_child([sys.executable, __file__, "--build", family, str(args.models_dir)],
                          args.work / f"{family}-build.log", deadline)
        row.build_s = child.seconds
        check(child, "building the model")
    return str(folder)


def train_overrides(base: str, args, cuda: bool, out_dir: Path, name: str, fam: Family | None = None) -> list[str]:
    fam = fam or FAMILIES["sd15"]
    overrides = [*fam.extra, f"model.base={base}", f"data.path={fam.data}", f"training.max_steps={args.steps}",
                 "training.log_every_n_steps=1", f"validation.every_n_steps={args.steps}",
                 f"validation.num_inference_steps={VALIDATION_STEPS}", f"output.dir={out_dir}",
                 f"output.run_name={name}"]
    if args.tiny:
        overrides.append(f"data.resolution={TINY_RESOLUTION}")
    if not cuda:  # the recipes' fp16/bf16 need a GPU
        overrides.append("training.mixed_precision=no")
    return overrides


def resolved(recipe: str, overrides: list[str]):
    """The recipe with the overrides, validated (a bad key fails here, before any model loads)."""
    from finetune.errors import FinetuneError
    from finetune.recipe.loader import apply_overrides, find_recipe, load_raw, validate

    try:
        return validate(apply_overrides(load_raw(find_recipe(recipe)), overrides), recipe)
    except FinetuneError as e:
        raise Failure(f"recipe {recipe}: {str(e).splitlines()[0]}") from e


def parse_metrics(path: Path) -> tuple[float | None, dict | None]:
    """(seconds per step: the median after the first SKIP_STEPS, or of all there are when the run is
    shorter; the `{"memory": ...}` row's contents, None when the run wrote none) of a metrics.jsonl."""
    elapsed, memory = {}, None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(row, dict) and isinstance(row.get("memory"), dict):
            memory = row["memory"]
        elif isinstance(row, dict) and "step" in row and "elapsed_s" in row:
            elapsed[row["step"]] = row["elapsed_s"]
    # Rows are written every step (training.log_every_n_steps=1), elapsed since the loop began.
    durations = {s: t - elapsed[s - 1] for s, t in elapsed.items() if s - 1 in elapsed}
    later = [d for s, d in durations.items() if s > SKIP_STEPS] or list(durations.values())
    return (statistics.median(later) if later else None), memory


def describe_settings(run_recipe: dict) -> str:
    """The memory-relevant settings the run used: precision, checkpointing, optimizer, batch, and every
    `memory:` key that differs from its default."""
    tr, opt = run_recipe.get("training", {}), run_recipe.get("optimizer", {})
    checkpointing = "checkpointing" if tr.get("gradient_checkpointing") else "no checkpointing"
    parts = [str(tr.get("mixed_precision")), checkpointing,
             str(opt.get("type")), f"batch {tr.get('batch_size')}"]
    try:
        from finetune.recipe.schema import MemoryConfig

        defaults = MemoryConfig().model_dump()
    except ImportError:  # a finetune without the memory section
        defaults = {}
    memory = run_recipe.get("memory") or {}
    parts += [f"memory.{k}={v}" for k, v in memory.items() if k in defaults and defaults[k] != v]
    method = run_recipe.get("method") or {}
    parts += [f"method.{k}={method[k]}" for k in ("variant", "dora", "conv_rank") if method.get(k) not in (None, False, "lora")]
    if tr.get("ema"):
        parts.append(f"ema on {tr['ema'].get('device')}")
    if (run_recipe.get("data") or {}).get("masks"):
        parts.append("masks")
    return ", ".join(parts)


def train(fam: Family, family: str, base: str, ctx: dict, row: Row) -> Path:
    """Train the family's LoRA; fills the row's training figures (those of a run cut short too),
    returns the run folder."""
    import yaml

    args, out_dir = ctx["args"], ctx["args"].work / "runs"
    overrides = train_overrides(base, args, ctx["cuda"], out_dir, ctx["name"], fam)
    recipe = resolved(fam.recipe, overrides)
    row.resolution, row.settings = recipe.data.resolution, describe_settings(recipe.model_dump())
    print(f"  training: finetune train {fam.recipe} {shlex.join(overrides)}", flush=True)
    argv = [sys.executable, "-m", "finetune", "train", fam.recipe, *overrides, "--no-progress"]
    child = run_child(argv, args.work / f"{family}-train.log", ctx["deadline"])
    run_dir = out_dir / ctx["name"]
    row.train_s, row.rss = child.seconds, child.peak_rss
    if (run_dir / "metrics.jsonl").is_file():
        row.s_per_step, row.memory = parse_metrics(run_dir / "metrics.jsonl")
    if (run_dir / "recipe.yaml").is_file():  # what the run used: mixed_precision "auto" made concrete
        row.settings = describe_settings(yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")))
    check(child, "finetune train")
    return run_dir


def black_images(out: Path) -> str:
    """"k of n" images the generate run reported black (its manifest's verdicts)."""
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if line]
    black = sum(any(str(v.get("reason", "")).startswith("black image") for v in r.get("verdicts", [])) for r in rows)
    return f"{black} of {len(rows)}"


def generate(fam: Family, family: str, base: str, run_dir: Path, ctx: dict, row: Row) -> None:
    args = ctx["args"]
    v = resolved(fam.recipe, []).validation  # the recipe's own sampling settings
    steps = VALIDATION_STEPS if args.tiny else v.num_inference_steps  # a dry run: only that it works
    out = args.work / f"{ctx['name']}-generated"
    argv = [sys.executable, "-m", "finetune", "generate", "--base", base, "--lora", str(run_dir), "--prompt", PROMPT,
            "--n", str(GENERATE_IMAGES), "--steps", str(steps), "--guidance", str(v.guidance_scale),
            "--width", str(row.resolution), "--height", str(row.resolution), "--out", str(out)]
    print(f"  generating: finetune {shlex.join(argv[3:])}", flush=True)
    child = check(run_child(argv, args.work / f"{family}-generate.log", ctx["deadline"]), "finetune generate")
    row.generate_s, row.black = child.seconds, black_images(out)


def evaluate(fam: Family, family: str, run_dir: Path, ctx: dict, row: Row) -> None:
    args = ctx["args"]
    steps = VALIDATION_STEPS if args.tiny else resolved(fam.recipe, []).validation.num_inference_steps
    argv = [sys.executable, "-m", "finetune", "eval", str(run_dir), "--n", str(GENERATE_IMAGES), "--steps", str(steps),
            "--clip", "builtin:tiny-clip", "--dino", "builtin:tiny-dinov2"]
    print(f"  evaluating: finetune {shlex.join(argv[3:])}", flush=True)
    child = check(run_child(argv, args.work / f"{family}-eval.log", ctx["deadline"]), "finetune eval")
    metrics = json.loads((run_dir / "eval" / "eval.json").read_text(encoding="utf-8"))["metrics"]
    if "dino" not in metrics:
        raise Failure(f"finetune eval measured no dino (see {args.work / f'{family}-eval.log'})")
    row.eval_s = child.seconds


def run_family(family: str, args, cuda: bool) -> Row:
    fam = FAMILIES[family]
    row = Row(family, fam.recipe)
    # A new run name each call: a --work folder used before keeps its runs and images apart.
    ctx = {"args": args, "cuda": cuda, "deadline": time.monotonic() + args.timeout,
           "name": f"{family}-{time.strftime('%Y%m%d-%H%M%S')}"}
    try:
        base = model_base(fam, family, args, row, ctx["deadline"])
        row.base = base if args.tiny else Path(base).name
        run_dir = train(fam, family, base, ctx, row)
        generate(fam, family, base, run_dir, ctx, row)
        evaluate(fam, family, run_dir, ctx, row)
    except Failure as e:
        row.status = str(e)
    except Exception as e:  # fail soft: anything else in this family is its row's reason, not the end of the run
        row.status = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def gib(value) -> str:
    return f"{value / GIB:.2f}" if isinstance(value, (int, float)) else "-"


def memory_cells(memory: dict | None) -> list[str]:
    """Peak VRAM, plan's prediction, their ratio, peak host RAM (run / plan), from the memory row;
    "-" where the row has no figure (no GPU peak on a CPU), "not recorded" where the run wrote no row."""
    if memory is None:
        return ["not recorded"] * 4
    peak, predicted = memory.get("peak_gpu_bytes"), memory.get("predicted_gpu_bytes")
    ratio = f"{peak / predicted:.2f}" if isinstance(peak, (int, float)) and predicted else "-"
    ram = f"{gib(memory.get('peak_ram_bytes'))} / {gib(memory.get('predicted_ram_bytes'))}"
    return [gib(peak), gib(predicted), ratio, ram]


def table(rows: list[Row], machine: dict, args) -> str:
    command = shlex.join(["python", "benchmarks/gpu_smoke.py", *sys.argv[1:]])
    lines = [f"Command: `{command}`", "",
             f"{machine.get('gpu') or 'CPU'}; " + ", ".join(f"{k} {v}" for k, v in machine.items() if k != "gpu") +
             f"; {time.strftime('%Y-%m-%d')}; {args.steps} steps per family, LoRA trained on datasets/robot (sd15-masked: datasets/product), "
             f"{GENERATE_IMAGES} images generated with it.", ""]
    if args.tiny:
        lines += ["**Tiny CPU dry run** (the built-in tiny models at 64 px): it shows the script works end to end "
                  "and the table's format. These are NOT real figures.", ""]
    lines += ["| family | recipe | model | resolution | settings | peak VRAM GiB | plan GiB | peak/plan | "
              "peak RAM GiB (run / plan) | peak RSS GiB (outside) | s/step | train s | generate s | black images | "
              "eval s | build s | status |", "|" + " --- |" * 17]
    for r in rows:
        cells = [r.family, r.recipe, r.base or "-", str(r.resolution or "-"), r.settings or "-",
                 *memory_cells(r.memory),
                 gib(r.rss) if r.rss else "-", f"{r.s_per_step:.3f}" if r.s_per_step else "-",
                 f"{r.train_s:.0f}" if r.train_s else "-", f"{r.generate_s:.0f}" if r.generate_s else "-",
                 r.black or "-", f"{r.eval_s:.0f}" if r.eval_s else "-", f"{r.build_s:.0f}" if r.build_s else "cached" if not args.tiny else "-",
                 r.status.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "peak VRAM, plan and peak RAM (run / plan): the `memory` row of the run's metrics.jsonl "
              "(torch's peak allocated GPU memory from the start of training, and the process's peak RSS; \"-\": "
              "no figure, e.g. no GPU peak on a CPU; \"not recorded\": this finetune writes no such row). "
              "Peak RSS (outside): "
              "the train process's high-water mark from the kernel (wait4), mapped weight files included. s/step: "
              f"median after the first {SKIP_STEPS} steps. generate s: {GENERATE_IMAGES} images at the recipe's "
              f"sampling steps ({VALIDATION_STEPS} in a tiny run), model loading included. eval s: `finetune eval` of the "
              f"run, {GENERATE_IMAGES} images per prompt without and with the LoRA, the tiny metric models."]
    return "\n".join(lines) + "\n"


def slug(gpu: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if gpu else "cpu"


def parse_args(argv=None):
    from finetune.cache import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="sd15,sdxl,flux", help="comma-separated: " + ", ".join(FAMILIES))
    ap.add_argument("--models-dir", type=Path, default=None,
                    help="where the full-size models are built once (default: the finetune cache); ~42 GB for all")
    ap.add_argument("--steps", type=int, default=20, help="training steps per family")
    ap.add_argument("--out", type=Path, default=None,
                    help="the markdown table (default: benchmarks/results/gpu_smoke_<gpu>[_tiny].md)")
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny models at 64 px: a CPU dry run")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per family, building included")
    ap.add_argument("--work", type=Path, default=None, help="run folders, images and logs (default: a new temp folder)")
    ap.add_argument("--build", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build:
        return args
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown or not args.families:
        ap.error(f"--families: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(FAMILIES)}")
    if args.steps < 1:
        ap.error("--steps: at least 1")
    args.models_dir = (args.models_dir or cache_dir()).expanduser().resolve()
    args.work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.build:
        build(args.build[0], Path(args.build[1]))
        return
    from finetune.files import write_text_atomically

    machine = probe(args.work)
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_smoke_{slug(machine.get('gpu'))}{'_tiny' * args.tiny}.md"
    print(f"{machine.get('gpu') or 'CPU'}; work folder (runs, images, logs): {args.work}", flush=True)
    rows = []
    for family in args.families:
        print(f"{family}:", flush=True)
        rows.append(run_family(family, args, cuda=machine.get("gpu") is not None))
        print(f"  {rows[-1].status}", flush=True)
        write_text_atomically(out, table(rows, machine, args))  # a run cut short keeps the finished rows
    print("\n" + table(rows, machine, args))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
