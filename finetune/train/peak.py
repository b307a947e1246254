"""What a run's memory peaked at, beside what `finetune plan` predicted for it: the prediction is logged
when training starts, the measured peaks when it ends, both written as one line of metrics.jsonl (which
the model card and the benchmarks read), in bytes, null where there is no figure:

    {"memory": {"device": "cuda" | "mps" | "cpu", "predicted_gpu_bytes": int | null,
                "predicted_ram_bytes": int | null, "peak_gpu_bytes": int | null, "peak_ram_bytes": int}}

GPU: `torch.cuda.max_memory_allocated` from the start of training (the counter is reset there; what
loading and class images took before is not in it), the figure the plan predicts. MPS keeps no
high-water mark, so no GPU peak there; a CPU run has none, and its "GPU" prediction is for the same run
on a GPU. Host: the process's peak resident memory since it started, compared with the plan's host
RAM for this device. On several processes each figure is the largest any process reached.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
DEVICES = ("cuda", "mps")  # anything else is reported as "cpu"


@dataclass
class MemoryWatch:
    device: str  # cuda | mps | cpu
    predicted_gpu: int | None
    predicted_ram: int | None

    def report(self, run) -> dict:
        """Log the measured peaks against the prediction and write the `memory` line (main process);
        every process must call it (the peaks are gathered)."""
        a = run.accelerator
        gpu, ram = _largest(a, peak_gpu_bytes(a.device), peak_ram_bytes())
        line = {"device": self.device, "predicted_gpu_bytes": self.predicted_gpu,
                "predicted_ram_bytes": self.predicted_ram, "peak_gpu_bytes": gpu, "peak_ram_bytes": ram}
        if a.is_main_process:
            _append(run.run_dir / "metrics.jsonl", {"memory": line})
            measured = f"peak {_gib(gpu)} GiB GPU" if gpu is not None else f"no GPU peak on {self.device}"
            run.log(f"memory: {measured} (plan said {_gib(self.predicted_gpu)}{_for_a_gpu(self.device)}), "
                    f"host RAM {_gib(ram)} GiB (plan said {_gib(self.predicted_ram)})")
        return line


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def watch_memory(run) -> MemoryWatch:
    """Log the plan's prediction for this run; the GPU's peak counter was reset when train() began
    (`reset_peak`), so loading and class images count."""
    a = run.accelerator
    device = a.device.type if a.device.type in DEVICES else "cpu"
    gpu = ram = None
    if a.is_main_process:
        gpu, ram = predict(run, device)
        if gpu is not None:
            run.log(f"plan: predicted peak {_gib(gpu)} GiB GPU, {_gib(ram)} GiB host RAM")
    return MemoryWatch(device, gpu, ram)


def predict(run, device: str) -> tuple[int | None, int | None]:
    """(GPU bytes, host bytes) the plan predicts for this run's recipe on `device`, from the model's
    configs (nothing loaded); (None, None), logged in one line, when no plan can be made for it."""
    from ..plan.run import predict as plan_recipe
    from .caches import fork_rng

    try:
        with fork_rng():  # a run trains alike with or without a prediction made first
            est = plan_recipe(run.recipe, images=len(run.examples))
    except Exception as e:  # a prediction is advice: nothing it meets (an unknown model) may stop the run
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        run.log(f"plan: no prediction for this run ({why})")
        return None, None
    return int(est.peak), int(est.host_peak_on(device))


def peak_gpu_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def peak_ram_bytes() -> int:
    """This process's peak resident memory. On Linux the kernel's high-water mark of its own pages
    (VmHWM): `ru_maxrss` would report at least the size of the process that started this one, which it
    carries over fork and exec. Elsewhere `ru_maxrss`: bytes on macOS, kilobytes on the BSDs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _largest(accelerator, gpu: int | None, ram: int) -> tuple[int | None, int]:
    if accelerator.num_processes == 1:
        return gpu, ram
    mine = torch.tensor([-1 if gpu is None else gpu, ram], dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(mine).view(-1, 2).max(dim=0).values.tolist()
    return (None if every[0] < 0 else every[0]), every[1]


def _append(path: Path, row: dict) -> None:
    # metrics.jsonl is appended to line by line as training goes (run_dir.MetricsLog); one more line.
    from .run_dir import MetricsLog

    log = MetricsLog(path)
    try:
        log.write(**row)
    finally:
        log.close()


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def _for_a_gpu(device: str) -> str:
    return "" if device == "cuda" else " GiB, for a GPU"
