"""Peak host RAM while loading a real-size model for training, against the bytes of its weights.

`finetune.train.setup.load_components` reads every component straight into the dtype it trains in
(the denoiser and text encoders in the weight dtype of `training.mixed_precision`, the VAE in fp32).
This measures what that costs in host RAM on the CPU, for the real SD1.5 and SDXL architectures with
random weights (`finetune/tiny_models`: `sd15-full-random`, `sdxl-full-random`; built once into
`--models-dir`, by default the finetune cache, ~4 GB (SD1.5 fp32) + 2 GB (SD1.5 fp16) + 7 GB (SDXL fp16)
of disk), and compares it with the path finetune took before: everything loaded as the libraries
load it by default (diffusers: fp32), then cast (`--old`).

Each case runs in a fresh process, so nothing is carried between cases. In it, after torch,
diffusers and transformers are imported (the baseline), the model is loaded and then every weight
is read once (a CPU run reads them all at its first step; weights kept as memory-mapped file pages
only count once read). Reported, minus the baseline:
- peak RSS: the kernel's high-water mark of resident memory (VmHWM in /proc/self/status, reset at
  the baseline; `ru_maxrss` would do, but it carries the parent's size over fork and exec). It
  counts pages of the safetensors files mapped while they are read (clean page cache, which the
  kernel can drop under memory pressure) as well as allocated memory;
- peak anon: the largest anonymous (allocated) resident memory seen by a thread sampling
  /proc/self/status every 2 ms: what loading really has to find in RAM;
- weights: the bytes of the loaded model's parameters and buffers in the dtypes they were loaded in.

Run:  python benchmarks/load_memory.py [--models sd15,sd15-fp16,sdxl] [--out benchmarks/results/load_memory.md]
CPU only; uses about 2x the largest model's weights of RAM (a case that would not fit in the memory
available now is skipped and says so). Run it with nothing else heavy on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
# name -> (builtin-style builder, keyword arguments, what is on disk)
MODELS = {
    "sd15": ("sd15-full-random", "finetune.tiny_models.sd15:build_sd15_full_random", {}, "SD1.5, fp32 files"),
    "sd15-fp16": ("sd15-full-random-fp16", "finetune.tiny_models.sd15:build_sd15_full_random", {"dtype": "float16"},
                  "SD1.5, fp16 files"),
    "sdxl": ("sdxl-full-random", "finetune.tiny_models.sdxl:build_sdxl_full_random", {"dtype": "float16"},
             "SDXL, fp16 files"),
}
# (mixed_precision, old path?) per model; the old path only where it differs from the new one.
CASES = [("no", False), ("fp16", False), ("bf16", False), ("bf16", True)]
BYTES = {"no": 4, "fp16": 2, "bf16": 2}


def build(name: str, models_dir: Path) -> Path:
    import importlib

    import torch

    folder_name, spec, kwargs, _ = MODELS[name]
    folder = models_dir / folder_name
    if not (folder / "model_index.json").is_file():
        module, fn = spec.split(":")
        kwargs = {k: getattr(torch, v) if k == "dtype" else v for k, v in kwargs.items()}
        getattr(importlib.import_module(module), fn)(folder, **kwargs)
    return folder


def file_stats(folder: Path) -> tuple[int, int]:
    """(parameters, bytes on disk) of the model's weight files, read from the safetensors headers."""
    from safetensors import safe_open

    n = size = 0
    for f in folder.glob("*/*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                count = 1
                for d in shape:
                    count *= d
                n += count
        size += f.stat().st_size
    return n, size


class AnonSampler(threading.Thread):
    """The largest RssAnon of this process seen, sampled every 2 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = False

    @staticmethod
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, self.status("RssAnon"))
            time.sleep(0.002)


def reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux: 5 into /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak includes the imports' own, which is at most the baseline


def run_one(folder: Path, precision: str, old: bool) -> dict:
    """One case, in this (fresh) process."""
    import torch
    import transformers  # noqa: F401
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    from finetune.recipe.schema import ModelConfig
    from finetune.train.setup import WEIGHT_DTYPES, load_components, resolve_family

    torch.set_num_threads(1)
    cfg = ModelConfig(base=str(folder))
    family, source = resolve_family(cfg)
    training = argparse.Namespace(mixed_precision=precision)
    cpu = torch.device("cpu")

    reset_peak()
    base_rss = AnonSampler.status("VmRSS")
    base_anon = AnonSampler.status("RssAnon")
    sampler = AnonSampler()
    sampler.start()
    t0 = time.perf_counter()
    if old:  # before: load as the libraries do by default, then cast
        weight_dtype = WEIGHT_DTYPES[precision]
        c = family.load(source, cfg)
        c.vae.to(cpu, dtype=torch.float32)
        c.denoiser.to(cpu, dtype=weight_dtype)
        for te in c.text_encoders.values():
            te.to(cpu, dtype=weight_dtype)
    else:
        c = load_components(family, source, cfg, training, cpu)
    load_s = time.perf_counter() - t0
    peak_load = AnonSampler.status("VmHWM")
    modules = {"denoiser": c.denoiser, "vae": c.vae, **c.text_encoders}
    with torch.no_grad():  # read every weight once, as the first step of a CPU run does
        for m in modules.values():
            for t in [*m.parameters(), *m.buffers()]:
                t.sum()  # no float32 temporary: it would count in the peak
    time.sleep(0.05)
    sampler.stop = True
    sampler.join()
    peak = AnonSampler.status("VmHWM")
    weights = sum(t.numel() * t.element_size() for m in modules.values() for t in [*m.parameters(), *m.buffers()])
    dtypes = {n: sorted({str(p.dtype).removeprefix("torch.") for p in m.parameters()}) for n, m in modules.items()}
    return {"weights": weights, "peak_rss": peak - base_rss, "peak_rss_load": peak_load - base_rss,
            "peak_anon": sampler.peak - base_anon, "load_s": load_s, "dtypes": dtypes,
            "baseline_rss": base_rss}


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="sd15,sd15-fp16,sdxl", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--cases", default=None, help="comma-separated precision[:old], e.g. bf16,bf16:old (default: all)")
    ap.add_argument("--models-dir", type=Path, default=None, help="where the models are built (default: the finetune cache)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    ap.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build(args.build[0], Path(args.build[1]))
        return
    if args.one:
        folder, precision, old = args.one
        print("RESULT " + json.dumps(run_one(Path(folder), precision, old == "old")), flush=True)
        return

    import torch
    import diffusers
    import transformers

    from finetune.cache import cache_dir

    models_dir = args.models_dir or cache_dir()
    cases = CASES if not args.cases else [(c.split(":")[0], c.endswith(":old")) for c in args.cases.split(",")]
    rows = []
    for name in args.models.split(","):
        folder = models_dir / MODELS[name][0]
        if not (folder / "model_index.json").is_file():  # built by a child: this process stays small
            print(f"building {folder} (once) ...", flush=True)
            subprocess.run([sys.executable, __file__, "--build", name, str(models_dir)], check=True)
        params, on_disk = file_stats(folder)
        for precision, old in cases:
            label = f"{MODELS[name][3]}, mixed_precision={precision}, {'before (fp32 load, then cast)' if old else 'now'}"
            need = on_disk + params * BYTES[precision] + (params * 4 if old else 0)
            if need > mem_available() - 2 * GIB:
                print(f"{label}: skipped, needs about {need / GIB:.1f} GiB, {mem_available() / GIB:.1f} GiB available",
                      flush=True)
                rows.append({"label": label, "model": name, "precision": precision, "old": old, "skipped": need})
                continue
            cmd = [sys.executable, __file__, "--one", str(folder), precision, "old" if old else "new"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{label}: failed\n{out.stderr[-3000:]}", flush=True)
                continue
            r = {"label": label, "model": name, "precision": precision, "old": old, **json.loads(line[len("RESULT "):])}
            rows.append(r)
            print(f"{label}: weights {r['weights'] / GIB:.2f} GiB, peak RSS {r['peak_rss'] / GIB:.2f} GiB "
                  f"({r['peak_rss'] / r['weights']:.2f}x), peak anon {r['peak_anon'] / GIB:.2f} GiB "
                  f"({r['peak_anon'] / r['weights']:.2f}x), {r['load_s']:.1f} s  {r['dtypes']}", flush=True)
    table = [f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM), torch {torch.__version__}, "
             f"diffusers {diffusers.__version__}, transformers {transformers.__version__}; random weights, "
             "real shapes; ratios against the loaded weights' bytes", "",
             "| model (on disk) | mixed_precision | path | weights (GiB) | peak RSS (GiB) | vs weights | "
             "peak anon (GiB) | vs weights | load (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        path = "before: fp32 load, then cast" if r["old"] else "now: load_components"
        if "skipped" in r:
            table.append(f"| {MODELS[r['model']][3]} | {r['precision']} | {path} | | skipped: needs ~{r['skipped'] / GIB:.0f} "
                         "GiB | | | | |")
            continue
        table.append(f"| {MODELS[r['model']][3]} | {r['precision']} | {path} | {r['weights'] / GIB:.2f} | "
                     f"{r['peak_rss'] / GIB:.2f} | {r['peak_rss'] / r['weights']:.2f}x | {r['peak_anon'] / GIB:.2f} | "
                     f"{r['peak_anon'] / r['weights']:.2f}x | {r['load_s']:.1f} |")
    command = " ".join(["python benchmarks/load_memory.py", *sys.argv[1:]])
    text = "\n".join([f"Command: `{command}`", "", *table])
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
