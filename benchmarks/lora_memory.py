"""Peak GPU memory and speed of SD1.5 LoRA training under the memory options a recipe can set.

The model is the real SD1.5 architecture at full width with random weights (`builtin:sd15-full-random`):
memory and speed depend on shapes, not on the weights, and no checkpoint can be downloaded here.
Every configuration trains the same LoRA (rank 16, UNet attention+projection+FF layers) on the same
512 px images; figures are printed as ratios against the first configuration, measured in the same run.

Run:  python benchmarks/lora_memory.py [--steps 30] [--batch 1] [--out benchmarks/results.md]
Needs a CUDA GPU (prints a message and exits on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = [
    ("fp32, AdamW", {"training.mixed_precision": "no", "optimizer.type": "adamw", "training.gradient_checkpointing": False}),
    ("fp16, AdamW", {"training.mixed_precision": "fp16", "optimizer.type": "adamw", "training.gradient_checkpointing": False}),
    ("fp16, AdamW 8-bit", {"training.mixed_precision": "fp16", "optimizer.type": "adamw8bit", "training.gradient_checkpointing": False}),
    ("fp16, AdamW 8-bit, checkpointing", {"training.mixed_precision": "fp16", "optimizer.type": "adamw8bit", "training.gradient_checkpointing": True}),
    ("bf16, AdamW 8-bit, checkpointing", {"training.mixed_precision": "bf16", "optimizer.type": "adamw8bit", "training.gradient_checkpointing": True}),
    ("bf16, Lion 8-bit, checkpointing", {"training.mixed_precision": "bf16", "optimizer.type": "lion8bit", "training.gradient_checkpointing": True}),
]


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (200 - 10 * i, 180, 160))
        ImageDraw.Draw(img).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(220, 60, 20 * i))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of sks ball, view {i}")


def run_one(index: int, args, work: Path) -> dict:
    """Train one configuration; runs in its own process so no memory is carried between configs."""
    from finetune.recipe import load_recipe
    from finetune.train import train

    label, overrides = CONFIGS[index]
    sets = [f"{k}={v}" for k, v in overrides.items()] + [
        "model.base=builtin:sd15-full-random", f"data.path={work / 'data'}", f"data.resolution={args.resolution}",
        f"training.max_steps={args.steps}", f"training.batch_size={args.batch}", "training.lr_warmup_steps=0",
        "validation.prompts=[]", "output.save_every_n_steps=null", f"output.dir={work / 'runs'}",
        f"output.run_name=r{index}", "method.rank=16", "method.alpha=16"]
    recipe, path = load_recipe("sd15-lora", sets)
    torch.cuda.reset_peak_memory_stats()
    result = train(recipe, path, log=lambda *_: None, progress=False)
    metrics = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # Steady-state speed: skip the first third of the steps (cuDNN autotuning, allocator warm-up).
    skip = len(metrics) // 3
    span = metrics[-1]["elapsed_s"] - metrics[skip - 1]["elapsed_s"]
    return {"label": label, "peak": torch.cuda.max_memory_allocated() / 2**30,
            "its": (len(metrics) - skip) / span, "loss": result.losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None, help="Also write the table (markdown) here.")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/lora_memory.py needs a CUDA GPU; none found.")
        return
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args.one, args, args.work)), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    os.environ.setdefault("FINETUNE_CACHE", str(work / "cache"))
    make_images(work / "data", 8, args.resolution)
    from finetune.tiny_models import resolve_builtin

    resolve_builtin("sd15-full-random")  # build once, outside the timed runs
    rows = []
    for i in range(len(CONFIGS)):
        cmd = [sys.executable, __file__, "--one", str(i), "--work", str(work), "--steps", str(args.steps),
               "--batch", str(args.batch), "--resolution", str(args.resolution)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{CONFIGS[i][0]}: failed\n{out.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(line[len("RESULT "):])
        rows.append(row)
        print(f"{row['label']:<36} peak {row['peak']:6.2f} GiB  {row['its']:5.2f} it/s  loss {row['loss']:.4f}", flush=True)
    if not rows:
        return
    base = rows[0]
    gpu = torch.cuda.get_device_name()
    lines = [f"SD1.5-shaped UNet (860M params, random weights), LoRA rank 16, {args.resolution} px, batch {args.batch}, "
             f"{args.steps} steps, {gpu}, torch {torch.__version__}; ratios against the first row, same run", "",
             "| configuration | peak VRAM (GiB) | vs first | it/s | vs first |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['peak']:.2f} | {r['peak'] / base['peak']:.2f}x | {r['its']:.2f} | "
                     f"{r['its'] / base['its']:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
