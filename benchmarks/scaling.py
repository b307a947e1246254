"""Images per second with 1 process and with N (default: every GPU, or 2 CPU processes), same recipe,
printed as a ratio. Each run's rate is the median of its metrics rows after the first (start-up).

    python benchmarks/scaling.py                       # tiny SD1.5 on CPU: 1 vs 2 processes
    python benchmarks/scaling.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 --resolution 512 --steps 30

On CPU the ratio says whether the processes scale at all (two processes on two cores share them
with their OpenMP threads: run with OMP_NUM_THREADS=1 and a quiet machine); on a GPU machine it is
the speed-up of the data-parallel run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _recipe(base: str, data: Path, out: Path, name: str, resolution: int, steps: int, batch: int) -> dict:
    return {"model": {"base": base}, "data": {"path": str(data), "resolution": resolution},
            "method": {"type": "lora", "rank": 4},
            "training": {"max_steps": steps, "batch_size": batch, "seed": 0, "log_every_n_steps": 1},
            "output": {"dir": str(out), "run_name": name}}


def run(processes: int, args, tmp: Path, data: Path) -> float:
    import yaml

    name = f"p{processes}"
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(args.base, data, tmp / "out", name, args.resolution, args.steps,
                                             args.batch)))
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe), "--no-progress", "--processes",
                    str(processes)], check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (tmp / "out" / name / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_second"] for r in rows[1:])


def main() -> None:
    import torch

    from tests.helpers import make_image_folder

    p = argparse.ArgumentParser()
    p.add_argument("--base", default="builtin:tiny-sd15")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=1, help="per process")
    p.add_argument("--processes", type=int, default=torch.cuda.device_count() or 2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = make_image_folder(tmp / "data", n=16, sizes=((args.resolution, args.resolution),))
        one = run(1, args, tmp, data)
        many = run(args.processes, args, tmp, data)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"{device}: 1 process {one:.2f} images/s; {args.processes} processes {many:.2f} images/s; "
          f"ratio {many / one:.2f} (ideal {args.processes})")


if __name__ == "__main__":
    main()
