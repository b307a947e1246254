"""How fast the commands a new user types first answer, against what importing the model
libraries alone costs (what `finetune validate` paid before it stopped importing them).

    python benchmarks/cli_startup.py [--repeat 5]

Each command runs in a fresh interpreter; the figures are the median wall time and the peak
resident memory of that process, printed with their ratio to `import torch, diffusers` measured
in the same run. Time it on a quiet machine: another CPU-heavy job makes every number larger.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# rusage of one child at a time: a fresh process per measurement.
MEASURE = ("import resource, subprocess, sys, time\n"
           "t = time.perf_counter(); subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
           "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")

COMMANDS = {
    "import torch, diffusers (baseline)": [sys.executable, "-c", "import torch, diffusers"],
    "finetune --version": [sys.executable, "-m", "finetune", "--version"],
    "finetune --help": [sys.executable, "-m", "finetune", "--help"],
    "finetune recipes": [sys.executable, "-m", "finetune", "recipes"],
    "finetune validate sd15-lora": [sys.executable, "-m", "finetune", "validate", "sd15-lora"],
    "finetune validate flux-lora": [sys.executable, "-m", "finetune", "validate", "flux-lora"],
    "finetune dataset check datasets/robot": [sys.executable, "-m", "finetune", "dataset", "check", "datasets/robot"],
}


def measure(cmd: list[str], repeat: int) -> tuple[float, float]:
    times, rss = [], []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=REPO, env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        times.append(float(out[0]))
        rss.append(int(out[1]) / 1024)  # KiB -> MiB on Linux
    return statistics.median(times), max(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    start = time.perf_counter()
    results = {name: measure(cmd, args.repeat) for name, cmd in COMMANDS.items()}
    base_t, base_m = results["import torch, diffusers (baseline)"]
    print("| command | median s | x baseline | peak MiB | x baseline |\n| --- | --- | --- | --- | --- |")
    for name, (t, m) in results.items():
        print(f"| {name} | {t:.2f} | {t / base_t:.2f} | {m:.0f} | {m / base_m:.2f} |")
    print(f"\n{args.repeat} runs each, {time.perf_counter() - start:.0f} s in all; Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
