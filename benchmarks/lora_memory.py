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
import sys
import tempfile
import time
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None, help="Also write the table (markdown) here.")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/lora_memory.py needs a CUDA GPU; none found.")
        return

    from finetune.recipe import load_recipe
    from finetune.train import train

    work = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    os.environ.setdefault("FINETUNE_CACHE", str(work / "cache"))
    make_images(work / "data", 8, args.resolution)
    rows = []
    for label, overrides in CONFIGS:
        sets = [f"{k}={v}" for k, v in overrides.items()] + [
            "model.base=builtin:sd15-full-random", f"data.path={work / 'data'}", f"data.resolution={args.resolution}",
            f"training.max_steps={args.steps}", f"training.batch_size={args.batch}", "training.lr_warmup_steps=0",
            "validation.prompts=[]", "output.save_every_n_steps=null", f"output.dir={work / 'runs'}",
            f"output.run_name=r{len(rows)}", "method.rank=16", "method.alpha=16"]
        recipe, path = load_recipe("sd15-lora", sets)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = train(recipe, path, log=lambda *_: None, progress=False)
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30
        metrics = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        # Steady-state speed: skip the first third of the steps (cuDNN autotuning, allocator warm-up).
        skip = len(metrics) // 3
        span = metrics[-1]["elapsed_s"] - metrics[skip - 1]["elapsed_s"]
        its = (len(metrics) - skip) / span
        rows.append((label, peak, its, wall, result.losses[-1]))
        del result
        print(f"{label:<36} peak {peak:6.2f} GiB  {its:5.2f} it/s  (wall {wall:5.1f} s)", flush=True)

    base_peak, base_its = rows[0][1], rows[0][2]
    gpu = torch.cuda.get_device_name()
    lines = [f"SD1.5-shaped UNet (860M params, random weights), LoRA rank 16, {args.resolution} px, batch {args.batch}, "
             f"{args.steps} steps, {gpu}, torch {torch.__version__}", "",
             "| configuration | peak VRAM (GiB) | vs first | it/s | vs first |", "| --- | --- | --- | --- | --- |"]
    for label, peak, its, _, _ in rows:
        lines.append(f"| {label} | {peak:.2f} | {peak / base_peak:.2f}x | {its:.2f} | {its / base_its:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
