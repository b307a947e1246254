"""What several processes must agree on: one process does a shared job (claim the run folder, make
class images, write files) and the others receive its result or its error; decisions one process
makes (stop, skip a non-finite batch) reach all of them at the same step, or they would hang."""

from __future__ import annotations

import os
from typing import Callable, TypeVar

from ..errors import FinetuneError, ReportedElsewhere

T = TypeVar("T")
COLLECTIVE_TIMEOUT_MINUTES = 120


def launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun) started; 1 when run directly."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def process_state():
    """accelerate's per-process state, with the process group up when launched several times. On a
    machine without CUDA, accelerate would otherwise take each process for a single one (every one
    writing every file): several processes there use gloo on the CPU."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    cpu = launched_processes() > 1 and not torch.cuda.is_available()
    if launched_processes() == 1:
        return PartialState(cpu=cpu)
    # The main process makes class images and validation samples while the others wait in a
    # collective; NCCL's default 10 minutes would end a run whose class images take longer.
    return PartialState(cpu=cpu, timeout=timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES))


def leave_process_group() -> None:
    """Take this process out of the process group before it exits, on success or error: left to
    interpreter shutdown, gloo's threads can find their peer gone first and abort the process
    ("terminate called without an active exception"), which the launcher then reports as a crash."""
    import sys

    if launched_processes() == 1 or "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_main(state, job: Callable[[], T]) -> T:
    """`job()` on the main process; every process returns its result, or raises its error (the
    others quietly: the main process reports it)."""
    if state.num_processes == 1:
        return job()
    from accelerate.utils import broadcast_object_list

    box, failure = [None], None
    if state.is_main_process:
        try:
            box = [("ok", job())]
        except BaseException as e:  # the others must hear of it, or they wait for ever
            failure = e
            box = [("error", str(e) if isinstance(e, FinetuneError) else f"{type(e).__name__}: {e}")]
    broadcast_object_list(box)
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "error":
        raise ReportedElsewhere(value)
    return value


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def summed(accelerator, values: list[float]) -> list[float]:
    """Each value summed over the processes."""
    if accelerator.num_processes == 1:
        return list(values)
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def per_process(accelerator, value: float) -> list[float]:
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))
